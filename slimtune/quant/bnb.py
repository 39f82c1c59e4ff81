"""bitsandbytes NF4 backend: ``nn.Linear`` -> ``bitsandbytes.nn.Linear4bit``.

The packed bytes and quantization state are produced by bitsandbytes itself
(``Params4bit.to(device)`` calls ``bitsandbytes.functional.quantize_4bit``), so
slimtune's weights are exactly what ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` would give and PEFT's bnb LoRA layers accept them.

``bitsandbytes`` is imported lazily: a model can only contain a ``Linear4bit``
once bitsandbytes has been imported, so :func:`is_quantized` answers from
``sys.modules`` without paying the import (and its log noise) on dense runs.
"""
from __future__ import annotations

import copy
import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


class _DeferredCompile:
    """``torch.compile(fn, **kwargs)``, made at the first call instead of at definition. What
    ``torch.compile`` returns compiles nothing until it is called either; making it imports
    torch's inductor (``compile_fx`` and its kernel templates), which bitsandbytes' CPU ops pay
    at ``import bitsandbytes`` through their ``torch.compile`` decorators: 1.5-1.8 s of a
    2-core machine's start-up, in every process (train, plan, tests), for kernels that only
    CPU tensors reach. A ``torch.compile`` that raises is answered with ``fn`` itself, as
    bitsandbytes' own decorator does."""

    __slots__ = ("_compile", "_fn", "_kwargs", "_compiled", "__wrapped__")

    def __init__(self, compile_fn, fn, kwargs: dict) -> None:
        self._compile, self._fn, self._kwargs, self._compiled = compile_fn, fn, kwargs, None
        self.__wrapped__ = fn

    def __call__(self, *args, **kwargs):
        compiled = self._compiled
        if compiled is None:
            try:
                compiled = self._compile(self._fn, **self._kwargs)
            except Exception:  # noqa: BLE001 -- bitsandbytes' fallback for a failed torch.compile
                compiled = self._fn
            self._compiled = compiled
        return compiled(*args, **kwargs)


def import_bitsandbytes():
    """``import bitsandbytes``, with the ``torch.compile`` calls its modules make while importing
    deferred to their first call (:class:`_DeferredCompile`). The first import of bitsandbytes
    in a process decides; slimtune imports it through here."""
    if "bitsandbytes" not in sys.modules:
        from unittest import mock

        real = torch.compile

        def deferred(model=None, **kwargs):
            if model is None:  # ``@torch.compile(dynamic=False)``
                return lambda fn: _DeferredCompile(real, fn, kwargs)
            return _DeferredCompile(real, model, kwargs)

        with mock.patch.object(torch, "compile", deferred):
            import bitsandbytes  # noqa: F401
    import bitsandbytes

    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    mod = sys.modules.get("bitsandbytes.nn")
    return mod is not None and isinstance(module, mod.Linear4bit)


def quantize_linear(linear: nn.Linear, cfg) -> nn.Module:
    """A ``Linear4bit`` holding ``linear``'s weight in NF4 (bias kept dense, same Parameter)."""
    bnb = import_bitsandbytes()
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise ValueError("cannot quantize a weight on the meta device; materialize (load) it first")
    storage = _DTYPES[cfg.quant_storage]
    cls = bnb.nn.Linear4bit if _native_cpu_kernel_ok(linear.in_features, cfg.block_size) else _row_straddling_class()
    new = cls(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=_DTYPES[cfg.compute_dtype],
        compress_statistics=cfg.double_quant,
        quant_type="nf4",
        quant_storage=storage,
        device="meta",  # no throw-away dense allocation: the weight is set just below
    )
    params = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=cfg.block_size,
        compress_statistics=cfg.double_quant,
        quant_type="nf4",
        quant_storage=storage,
        module=new,
    )
    new.weight = params.to(weight.device)  # quantizes (bitsandbytes.functional.quantize_4bit)
    new.bias = linear.bias
    # On CPUs with AVX512-BF16, Linear4bit.forward in eval mode under no_grad re-packs the
    # weight in place into a CPU-only layout with a bf16, non-nested absmax.  That rewrites
    # the frozen base (outputs move by ~6e-3 on a 64x128 layer), and a later training forward
    # with an input that requires grad then fails (bitsandbytes 0.50.2: "a view of a leaf
    # Variable ... in-place operation").  An eval pass between training steps must not do
    # that, so keep the canonical format.
    new.support_avx512bf16_for_cpu = False
    new.train(linear.training)
    return new


def _canonical(module: nn.Module):
    """(packed data, quant_state) in bitsandbytes' canonical layout, without touching the module."""
    weight = module.weight
    state = weight.quant_state if getattr(weight, "quant_state", None) is not None else module.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # A Linear4bit built elsewhere may have been re-packed for the CPU kernel (see above);
        # the inverse mutates the state it is given, so hand it a shallow copy.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
    return weight.data, state


# --------------------------------------------------------------------------- CPU kernel workaround
# bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` kernel (used by Linear4bit's forward
# and backward on CPU) returns wrong values when a row's length is not a multiple of the
# block size, i.e. when NF4 blocks straddle rows (e.g. a 128 x 352 down_proj, block 64):
# the packed data and absmax from ``quantize_4bit`` are right (the flat-block decode in
# tests/unit/test_quant.py reproduces the weights), the CPU decode is not.  For such layers
# slimtune decodes the flat NF4 blocks itself, on CPU only; other devices keep bitsandbytes'
# kernels (not re-checked here for lack of a GPU).
def _native_cpu_kernel_ok(in_features: int, blocksize: int) -> bool:
    return in_features % blocksize == 0


@torch.no_grad()
def _decode_flat_blocks(data: torch.Tensor, state) -> torch.Tensor:
    """NF4/FP4 decode of bitsandbytes' layout: consecutive weights in flat blocks, high nibble first."""
    from bitsandbytes.functional import dequantize_blockwise

    n = math.prod(state.shape)
    packed = data.reshape(-1).view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n].long()
    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    values = F.pad(state.code.float()[codes], (0, (-n) % state.blocksize)).view(-1, state.blocksize)
    return (values * absmax.float()[:, None]).reshape(-1)[:n].view(state.shape).to(state.dtype)


class _FlatDecodeMatmul(torch.autograd.Function):
    """x @ W.T with W decoded from 4 bit in forward and again in backward (only packed bytes are kept)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x @ dense_weight(module).to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ dense_weight(ctx.module).to(grad_out.dtype), None


# --------------------------------------------------------------------------- ZeRO-3 route
# bitsandbytes' ``MatMul4Bit`` keeps ``B = weight.view(-1, 1)`` (a view of the weight) on its
# autograd context (``ctx.tensors``) whenever its input needs a gradient.  DeepSpeed ZeRO-3 frees a
# parameter after its module's forward by replacing ``param.data``; the view still points at the
# gathered storage, which therefore stays alive until that module's backward: every 4-bit weight
# of the model is held whole on every rank from forward to backward (measured in
# tests/distributed/test_kernels_zero3.py).  Under ZeRO-3 the forward below runs bitsandbytes'
# own forward inside an autograd function that keeps the module instead, and the backward reads
# the weight again -- gathered by ZeRO-3's pre-backward hook, or here when no hook did
# (``slimtune.kernels.gathered_params``) -- and dequantizes it as bitsandbytes' backward does.
class _ReleasedWeightMatmul(torch.autograd.Function):
    """``forward(module, x)`` (bitsandbytes' Linear4bit forward, or slimtune's row-straddling one)
    with nothing of the weight saved; the backward is bitsandbytes' ``dx = dy @ W``."""

    @staticmethod
    def forward(ctx, x, module, forward):
        ctx.module, ctx.x_dtype = module, x.dtype
        return forward(module, x)  # autograd is off in here: nothing is saved

    @staticmethod
    def backward(ctx, dy):
        from slimtune.kernels.apply import gathered_params

        module = ctx.module
        dtype = module.compute_dtype or dy.dtype
        with gathered_params(module):
            dx = dy.to(dtype) @ dense_weight(module).to(dtype)
        return dx.to(ctx.x_dtype), None, None


class _Zero3AwareForward:
    """Instance ``forward`` of a 4-bit linear (see :func:`route_forward`); a plain object rather than
    a bound method so that the module still pickles and deep-copies."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        forward = type(m).forward
        if (hasattr(m.weight, "ds_id") and torch.is_grad_enabled() and x.requires_grad
                and not any(p.requires_grad for p in m.parameters(recurse=False))):
            return _ReleasedWeightMatmul.apply(x, m, forward)
        return forward(m, x)


def route_forward(module: nn.Module) -> nn.Module:
    """Give a bitsandbytes 4-bit linear the ZeRO-3-aware forward: unchanged (its class's forward)
    unless its weight is a ZeRO-3 partition and the input needs a gradient; then no gathered
    weight is kept from forward to backward.  Returns ``module``."""
    if is_quantized(module):
        module.forward = _Zero3AwareForward(module)
    return module


@functools.cache
def _row_straddling_class():
    """A Linear4bit whose CPU forward decodes blocks that straddle rows correctly (see above)."""
    base = import_bitsandbytes().nn.Linear4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return base.forward(self, x)
        dtype = self.compute_dtype or x.dtype
        out = _FlatDecodeMatmul.apply(x.to(dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    return type("RowStraddlingLinear4bit", (base,), {"forward": forward, "__module__": __name__})


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    data, state = _canonical(module)
    if data.device.type == "cpu" and not _native_cpu_kernel_ok(state.shape[-1], state.blocksize):
        return _decode_flat_blocks(data, state)
    return dequantize_4bit(data, state)


def logical_numel(param) -> int | None:
    mod = sys.modules.get("bitsandbytes.nn")
    if mod is None or not isinstance(param, mod.Params4bit) or param.quant_state is None:
        return None
    return math.prod(param.quant_state.shape)


def storage(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(packed tensors, constant tensors, logical numel) of one quantized linear's weight."""
    data, state = _canonical(module)
    consts = [state.absmax, state.code]
    if state.nested:
        consts += [state.offset, state.state2.absmax, state.state2.code]
    return [data], [t for t in consts if isinstance(t, torch.Tensor)], math.prod(state.shape)


def __getattr__(name: str):
    # lets pickle find the lazily built class by name (``slimtune.quant.bnb.RowStraddlingLinear4bit``)
    if name == "RowStraddlingLinear4bit":
        return _row_straddling_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
