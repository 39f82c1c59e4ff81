"""Quantization of frozen base weights (QLoRA-style NF4).

Two tables, one per axis:

* ``QUANTIZERS`` maps ``quant.name`` to ``(model, quant_cfg) -> None``;
* ``BACKENDS`` maps ``quant.backend`` to the module that quantizes one linear
  (``bitsandbytes``: ``bitsandbytes.nn.Linear4bit``; ``torchao``: an ``NF4Tensor``
  weight, shardable by FSDP2).

Everything else in slimtune asks this package about quantized layers
(:func:`is_quantized_linear`, :func:`dense_weight`, :func:`logical_numel`,
:func:`weight_bytes`) instead of knowing the backends.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Iterator

import torch
from torch import nn

from slimtune.quant import ao, bnb

log = logging.getLogger(__name__)

BACKENDS = {"bitsandbytes": bnb, "torchao": ao}


def _backend_of(module: nn.Module):
    for backend in BACKENDS.values():
        if backend.is_quantized(module):
            return backend
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return _backend_of(module) is not None


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out x in) weight of any base linear, dequantized if 4-bit, detached (no grad)."""
    backend = _backend_of(module)
    if backend is not None:
        w = backend.dense_weight(module)
    elif isinstance(module, nn.Linear):
        w = module.weight.detach()
    else:
        raise TypeError(f"dense_weight expects a base linear (nn.Linear or a 4-bit linear), got {type(module).__name__}")
    return w if dtype is None else w.to(dtype)


def logical_numel(param: torch.Tensor) -> int:
    """Element count of the weight a parameter stands for (out*in for packed 4-bit data)."""
    for backend in BACKENDS.values():
        n = backend.logical_numel(param)
        if n is not None:
            return n
    return param.numel()


def _matches(name: str, patterns: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == p or name == p or name.endswith("." + p) for p in patterns)


def _tied_weight_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(m.weight) for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    return {i for i, c in counts.items() if c > 1}


def iter_quantize(model: nn.Module, quant_cfg) -> Iterator[str]:
    """Quantize one linear at a time, yielding its name after the dense layer is released.

    Only one layer's dense weight and its packed copy are alive at once beyond the
    model itself, so quantizing costs about one layer of extra memory.
    """
    backend = BACKENDS[quant_cfg.backend]
    tied = _tied_weight_ids(model)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_quantized_linear(m) and not _matches(n, quant_cfg.skip_modules)
    ]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, attr)
        if id(dense.weight) in tied:
            log.warning("not quantizing %s: its weight is tied to another module", name)
            continue
        setattr(parent, attr, backend.quantize_linear(dense, quant_cfg))
        del dense  # the last reference to the dense weight: freed here, before the next layer
        yield name


def _quantize_nf4(model: nn.Module, quant_cfg) -> None:
    count = sum(1 for _ in iter_quantize(model, quant_cfg))
    if count == 0:
        log.warning("quant.name=nf4 quantized no layer (every linear was skipped)")


def _no_quant(model: nn.Module, quant_cfg) -> None:
    """quant.name=none: weights stay as loaded."""


QUANTIZERS: dict[str, Callable[[nn.Module, object], None]] = {"none": _no_quant, "nf4": _quantize_nf4}


def quantize(model: nn.Module, quant_cfg) -> None:
    """Replace the model's linears (other than ``quant_cfg.skip_modules``) in place."""
    QUANTIZERS[quant_cfg.name](model, quant_cfg)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every 4-bit linear with a dense ``nn.Linear`` (dtype: the weight's original dtype)."""
    for name, m in list(model.named_modules()):
        if not is_quantized_linear(m):
            continue
        weight = dense_weight(m, dtype)
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if m.bias is not None:
            dense.bias = nn.Parameter(m.bias.detach().to(weight.dtype), requires_grad=False)
        dense.train(m.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, dense)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's parameters and buffers, by kind.

    ``packed_4bit``: the 4-bit weight data; ``quant_constants``: absmax, nested absmax,
    offset and code tables (everything needed to dequantize besides the packed data);
    ``dense``: every other parameter (embeddings, norms, biases, dense linears, trainable
    parts); ``trainable``: the part of ``dense`` with ``requires_grad`` (not added again
    to ``total``); ``buffers``; ``total``; and ``quantized_numel``, the number of weights
    stored in 4 bit (for bits per weight).  A storage shared by several tensors counts once.
    """
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.device.type == "meta" or key not in seen:
            seen.add(key)
            return t.numel() * t.element_size()
        return 0

    out = dict(packed_4bit=0, quant_constants=0, dense=0, trainable=0, buffers=0, quantized_numel=0)
    for module in model.modules():
        backend = _backend_of(module)
        own = dict(module.named_parameters(recurse=False))
        if backend is not None:
            packed, consts, numel = backend.storage(module)
            out["packed_4bit"] += sum(nbytes(t) for t in packed)
            out["quant_constants"] += sum(nbytes(t) for t in consts)
            out["quantized_numel"] += numel
            own.pop("weight")
        for p in own.values():
            n = nbytes(p)
            out["dense"] += n
            out["trainable"] += n if p.requires_grad else 0
        out["buffers"] += sum(nbytes(b) for b in module.buffers(recurse=False))
    out["total"] = out["packed_4bit"] + out["quant_constants"] + out["dense"] + out["buffers"]
    return out


def bits_per_quantized_weight(wb: dict[str, int]) -> float:
    """(packed + constants) bits per 4-bit weight, from :func:`weight_bytes`' result."""
    if not wb["quantized_numel"]:
        return 0.0
    return 8.0 * (wb["packed_4bit"] + wb["quant_constants"]) / wb["quantized_numel"]
