"""Helpers shared by every trainable-part method (LoRA, PaCA, S2FT).

DESIGN rule 1: the frozen base linear is never written during training.  Each
method wraps a base linear (``nn.Linear`` or a 4-bit linear from
``slimtune.quant``) in its own module that holds the trainable part as a
separate parameter and adds its effect after the base weight is gathered /
dequantized.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch import nn


def is_base_linear(module: nn.Module) -> bool:
    """A linear layer a method may adapt: dense ``nn.Linear`` or a quantized linear."""
    from slimtune.quant import is_quantized_linear

    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def iter_target_linears(model: nn.Module, target_modules: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` for base linears whose name ends with a target suffix."""
    for name, module in list(model.named_modules()):
        if not is_base_linear(module):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules or any(name.endswith("." + t) or name == t for t in target_modules):
            yield name, module


def replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def selection_generator(seed: int, module_name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, module name): identical on every rank (DESIGN rule 2)."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts; quantized weights counted by their logical size."""
    from slimtune.quant import logical_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return trainable, total


def load_named_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Copy tensors into the model's parameters and buffers (e.g. PaCA / S2FT ``idx``) by qualified
    name; every name must exist.  ``assign=True`` replaces them instead (a skeleton built on the meta
    device gets real tensors; parameters keep their ``requires_grad`` and dtype)."""
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    unknown = [k for k in tensors if k not in named and k not in buffers]
    if unknown:
        raise KeyError(f"tensors not in the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    with torch.no_grad():
        for k, v in tensors.items():
            owner, _, leaf = k.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if k in named:
                p = named[k]
                if assign:
                    setattr(module, leaf, nn.Parameter(v.detach().to(p.dtype), requires_grad=p.requires_grad))
                else:
                    p.copy_(v)
                continue
            b = buffers[k]
            if assign:
                module._buffers[leaf] = v.detach().to(b.dtype)
            elif b.shape != v.shape:
                raise ValueError(f"{k}: stored {tuple(v.shape)} does not fit the model's {tuple(b.shape)}")
            else:
                b.copy_(v)
