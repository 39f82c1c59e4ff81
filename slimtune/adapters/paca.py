"""``method.name: paca`` -- PaCA, partial connection adaptation (QPaCA on an NF4 base).

Per target linear W (out x in): r input columns ``idx`` chosen by
``randperm(in, generator=selection_generator(seed, module_name))[:r]``; a zero-initialised
fp32 delta (out x r) trained as ``W[:, idx] + s * delta``.  Forward/backward go through
``partial.column_delta_linear``: only ``x[..., idx]`` (a gathered copy) is saved for
backward, the frozen base (dense or NF4) gets no gradient and is never written.

Export: the update is exactly a LoRA with ``B = s * delta`` (out x r) and ``A`` the
one-hot selector of ``idx`` (r x in), written with ``lora_alpha = r`` so PEFT's scale
is 1.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimtune.adapters.common import freeze_all, iter_target_linears, replace_module, selection_generator
from slimtune.adapters.partial import (
    COLUMNS,
    base_device,
    column_delta_linear,
    column_lora_factors,
    merge_columns,
    preset_selection,
    selection_device,
)

__all__ = ["PacaLinear", "select_columns", "attach", "selections", "lora_factors", "export_peft", "merge"]


def select_columns(in_features: int, r: int, seed: int, module_name: str) -> torch.Tensor:
    """The PaCA column indices of one weight: reproducible from (seed, module name), unsorted."""
    r = min(r, in_features)
    return torch.randperm(in_features, generator=selection_generator(seed, module_name))[:r]


class PacaLinear(nn.Module):
    """A frozen base linear plus a trainable delta on ``r`` of its input columns."""

    axis = COLUMNS  # the slice is of input columns (as an S2FT ``o_proj``): recovery and export read it

    def __init__(self, base: nn.Module, idx: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        dev = base_device(base)
        self.register_buffer("idx", idx.to(device=selection_device(base), dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(self.out_features, len(idx), dtype=torch.float32, device=dev))
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_delta_linear(x, self.base, self.delta, self.idx, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={len(self.idx)}, scale={self.scale}"


def _modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PacaLinear)]


def attach(model: nn.Module, cfg) -> None:
    """Freeze the model and wrap every target linear in a :class:`PacaLinear`."""
    freeze_all(model)
    pc = cfg.method.paca
    targets = list(iter_target_linears(model, cfg.method.target_modules))
    if not targets:
        raise ValueError(f"method.target_modules={cfg.method.target_modules} matched no linear layer of the model")
    for name, base in targets:
        idx = preset_selection(name)  # export of a sharded run: the trained model's selection
        if idx is None:
            idx = select_columns(base.in_features, pc.r, cfg.train.seed, name)
        replace_module(model, name, PacaLinear(base, idx, pc.scale))


def selections(model: nn.Module) -> dict[str, list[int]]:
    """Trained column indices per wrapped module (module names as in the HF model)."""
    return {name: m.idx.tolist() for name, m in _modules(model)}


def lora_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` in fp32 on CPU with ``B @ A`` equal to each module's update."""
    return {name: column_lora_factors(m.idx, m.delta, m.scale, m.in_features) for name, m in _modules(model)}


def export_peft(model: nn.Module, cfg, out_dir: Path) -> Path:
    """Write a PEFT LoRA adapter folder that reproduces the trained model on the original HF model."""
    from slimtune.adapters.export import write_selector_adapter

    return write_selector_adapter(out_dir, lora_factors(model), cfg, "PaCA")


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every delta into its base weight; NF4 bases become dense ``nn.Linear``."""
    for name, m in _modules(model):
        replace_module(model, name, merge_columns(m.base, m.idx, m.delta, m.scale))
