"""Route a model's adapted 4-bit linears through the fused ops (``kernels.enabled``).

``apply(model, kernels_cfg)`` gives every eligible module an instance-level ``forward``
(the class and its other instances are untouched; ``nn.Module.__call__`` still runs every
hook, so FSDP2 / DeepSpeed module hooks fire as before):

* :class:`slimtune.adapters.lora.LoRALinear` over a bitsandbytes ``Linear4bit`` ->
  :func:`slimtune.kernels.nf4.nf4_lora_linear`;
* :class:`slimtune.adapters.paca.PacaLinear` and input-column
  :class:`slimtune.adapters.s2ft.S2ftLinear` over a ``Linear4bit`` ->
  :func:`slimtune.kernels.nf4.nf4_column_delta_linear`.

Anything else (dense bases, torchao NF4 bases, S2FT output rows, a base whose weight is an
FSDP2 ``DTensor`` shard) keeps its own forward. On CUDA, with ``kernels.liger_ops``,
Liger-Kernel's RMSNorm / SwiGLU / RoPE are applied to the model instance as well.

Sharded bases: the fused path reads the base's weight without calling the base's
forward, so a sharder's per-module gather hook does not run for it. Under DeepSpeed
ZeRO-3 (parameters with ``ds_id``) the weight is gathered explicitly around the forward
kernel *and again in backward* (:class:`_RegatheredLora`, :class:`_RegatheredColumn`),
so no gathered copy lives between the two. Under FSDP2 a ``Linear4bit`` inside a
``fully_shard``-ed decoder layer is unsharded by the layer's own pre-forward hook before
this forward runs; a base that is itself still a ``DTensor`` shard is left alone.
"""
from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from slimtune.kernels.nf4 import (
    NF4Parts,
    column_delta_grads,
    lora_grads,
    nf4_column_delta_linear,
    nf4_lora_linear,
    nf4_parts,
)

log = logging.getLogger(__name__)

__all__ = ["apply", "fused_lora_forward", "fused_column_forward", "gathered_params", "gathered_zero3"]


def _zero3(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


@contextlib.contextmanager
def gathered_params(module: nn.Module) -> Iterator[None]:
    """The module's own parameters, whole, for the block (DeepSpeed ZeRO-3); a no-op otherwise."""
    if not _zero3(module):
        yield
        return
    with gathered_zero3(list(module.parameters(recurse=False))):
        yield


def gathered_zero3(params: list[Tensor]) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.GatheredParameters`` over those of ``params`` that are ZeRO-3 partitions
    not available now (read-only: ``modifier_rank=None``); they are partitioned again on exit.

    A parameter ZeRO-3 already holds whole -- fetched by its own module hooks (a backward after
    the module's forward ran, a recompute under activation checkpointing) or persistent (smaller
    than ``stage3_param_persistence_threshold``) -- is read as it is: ``GatheredParameters``
    would partition it on exit, under the hook that is still using it (DeepSpeed refuses to free
    a parameter active in a submodule), or drop a persistent parameter's whole copy."""
    absent = [p for p in params if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not absent:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(absent, modifier_rank=None)


def _parts(base: nn.Module) -> Optional[NF4Parts]:
    from torch.distributed.tensor import DTensor

    if isinstance(getattr(base, "weight", None), DTensor):
        return None
    return nf4_parts(base)


def _compute_dtype(base: nn.Module, x: Tensor) -> torch.dtype:
    return getattr(base, "compute_dtype", None) or x.dtype


def _bias(base: nn.Module) -> Optional[Tensor]:
    b = getattr(base, "bias", None)
    return None if b is None else b.detach()


# --------------------------------------------------------------------------- LoRA
class _RegatheredLora(torch.autograd.Function):
    """nf4_lora_linear for a ZeRO-3 base: gathers the base in forward and again in backward."""

    @staticmethod
    def forward(ctx, x2, lora_a, lora_b, xl2, base, scale):
        with gathered_params(base):
            w = nf4_parts(base)
            y, xa = torch.ops.slimtune.nf4_lora_linear(x2, *w.op_args(), w.rows, _bias(base), lora_a, lora_b, xl2, scale)
        ctx.base, ctx.scale = base, scale
        ctx.save_for_backward(x2, xa, lora_a, lora_b, xl2)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b, xl2 = ctx.saved_tensors
        n = ctx.needs_input_grad
        with gathered_params(ctx.base):
            w = nf4_parts(ctx.base)
            dx, da, db, dxl = lora_grads(w, x2, xa, lora_a, lora_b, xl2, ctx.scale, dy, None, n[0], n[1], n[2], n[3])
        return dx, da, db, dxl, None, None


def fused_lora_forward(module: nn.Module, x: Tensor) -> Tensor:
    """:class:`LoRALinear` forward through the fused NF4 op (same result as ``module.forward``
    up to rounding; the LoRA product is computed in the base's compute dtype)."""
    base = module.base
    dt = _compute_dtype(base, x)
    xc = x.to(dt)
    dropout = module.dropout
    x_lora = dropout(xc) if isinstance(dropout, nn.Dropout) and dropout.p > 0 and module.training else None
    if _zero3(base):
        lead = xc.shape[:-1]
        x2 = xc.reshape(-1, module.in_features).contiguous()
        xl2 = None if x_lora is None else x_lora.reshape(-1, module.in_features).contiguous()
        y = _RegatheredLora.apply(x2, module.lora_A, module.lora_B, xl2, base, float(module.scale))
        return y.reshape(*lead, module.out_features).to(x.dtype)
    w = _parts(base)
    y = nf4_lora_linear(xc, w, module.lora_A, module.lora_B, module.scale, _bias(base), x_lora)
    return y.to(x.dtype)


# --------------------------------------------------------------------------- column delta
class _RegatheredColumn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, delta, idx, base, scale):
        with gathered_params(base):
            w = nf4_parts(base)
            y, x_sel = torch.ops.slimtune.nf4_column_delta_linear(x2, *w.op_args(), w.rows, _bias(base), delta, idx, scale)
        ctx.base, ctx.scale = base, scale
        ctx.save_for_backward(x_sel, delta, idx)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_sel, delta, idx = ctx.saved_tensors
        n = ctx.needs_input_grad
        with gathered_params(ctx.base):
            w = nf4_parts(ctx.base)
            dx, dd = column_delta_grads(w, x_sel, delta, idx, ctx.scale, dy, None, n[0], n[1])
        return dx, dd, None, None, None


def fused_column_forward(module: nn.Module, x: Tensor) -> Tensor:
    """PacaLinear / input-column S2ftLinear forward through the fused NF4 column-delta op."""
    base = module.base
    dt = _compute_dtype(base, x)
    xc = x.to(dt)
    if _zero3(base):
        lead = xc.shape[:-1]
        x2 = xc.reshape(-1, module.in_features).contiguous()
        y = _RegatheredColumn.apply(x2, module.delta, module.idx, base, float(module.scale))
        return y.reshape(*lead, module.out_features).to(x.dtype)
    y = nf4_column_delta_linear(xc, _parts(base), module.delta, module.idx, module.scale, _bias(base))
    return y.to(x.dtype)


# --------------------------------------------------------------------------- apply
def _eligible_base(base: nn.Module) -> bool:
    return _zero3(base) or _parts(base) is not None


def _routes() -> list[tuple[type, callable, callable]]:
    """(module type, eligibility test, fused forward): the one table of what gets fused."""
    routes = []
    try:
        from slimtune.adapters.lora import LoRALinear

        routes.append((LoRALinear, lambda m: _eligible_base(m.base), fused_lora_forward))
    except ImportError:
        pass
    try:
        from slimtune.adapters.paca import PacaLinear

        routes.append((PacaLinear, lambda m: _eligible_base(m.base), fused_column_forward))
    except ImportError:
        pass
    try:
        from slimtune.adapters.s2ft import IN, S2ftLinear

        routes.append((S2ftLinear, lambda m: m.axis == IN and _eligible_base(m.base), fused_column_forward))
    except ImportError:
        pass
    return routes


def _apply_liger(model: nn.Module) -> bool:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception:  # noqa: BLE001
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def apply(model: nn.Module, kernels_cfg) -> dict[str, int]:
    """Route eligible modules through the fused ops; returns counts by module type (and
    ``liger`` = 1 when Liger's RMSNorm/SwiGLU/RoPE were applied). A no-op unless
    ``kernels_cfg.enabled``."""
    counts: dict[str, int] = {}
    if not kernels_cfg.enabled:
        return counts
    if kernels_cfg.fused_linear:
        routes = _routes()
        for _, m in model.named_modules():
            for typ, eligible, fwd in routes:
                if isinstance(m, typ) and eligible(m):
                    m.forward = types.MethodType(fwd, m)
                    m._slimtune_fused = True
                    counts[typ.__name__] = counts.get(typ.__name__, 0) + 1
                    break
    from torch._subclasses.fake_tensor import is_fake

    # real CUDA tensors only: Liger's Triton kernels cannot run on fake tensors (planner)
    on_cuda = any(p.device.type == "cuda" and not is_fake(p) for p in model.parameters())
    if kernels_cfg.liger_ops and on_cuda and _apply_liger(model):
        counts["liger"] = 1
    log.info("kernels: fused %s", counts or "nothing")
    return counts


def remove(model: nn.Module) -> None:
    """Undo :func:`apply`'s forward routing (Liger's instance patches stay)."""
    for m in model.modules():
        if m.__dict__.pop("_slimtune_fused", False):
            m.__dict__.pop("forward", None)
