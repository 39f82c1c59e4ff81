"""Peak memory of the fused paths vs their references, measured with the project's tracker
(:class:`slimtune.memory.MemoryTracker`), on real CPU tensors or on fake tensors.

Used by ``benchmarks/kernels.py`` and ``tests/kernels/test_memory.py``; the figures are in
``docs/kernels.md``.

* :func:`measure_mlp` -- one QLoRA MLP block (``down(silu(gate(x)) * up(x))``, each
  projection a :class:`slimtune.adapters.lora.LoRALinear` around a bitsandbytes NF4
  ``Linear4bit``), forward + backward. Reference: the modules' own forward (bitsandbytes
  dequantizes the whole weight for its matmul and again in backward). Fused:
  :func:`slimtune.kernels.apply`.
* :func:`measure_loss` -- the causal-LM loss from final hidden states: reference
  ``F.cross_entropy(F.linear(h, W).float(), labels, reduction="sum")`` (the trainer's
  loss) vs :func:`slimtune.kernels.linear_cross_entropy` (chunked), forward + backward.

With ``fake=True`` every tensor is a fake tensor (no memory): this is how the 70B-sized
figures are obtained. The fused ops' fake implementations allocate exactly the outputs
their Triton kernels allocate (the kernels have no workspace), so the tracked peak is the
fused path's real one.

The reference's hidden transient: bitsandbytes' ``gemm_4bit`` (its training-shape path on
CPU and on CUDA alike) dequantizes the whole weight and calls ``F.linear`` *inside* the op,
where no dispatch mode sees the dense copy, and its fake implementation reports only the
output. :class:`_VisibleGemm4bit` replays that op as its two steps, so the tracker counts
the dense weight bitsandbytes really allocates.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Peak", "fake_linear4bit", "qlora_mlp", "measure_mlp", "measure_loss"]


@dataclass
class Peak:
    peak_bytes: int
    breakdown: dict[str, int]
    phases: dict[str, int]

    def __str__(self) -> str:
        from slimtune.memory import format_bytes

        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown.items() if v)
        return f"{format_bytes(self.peak_bytes)} ({parts})"


def fake_linear4bit(out_features: int, in_features: int, compute_dtype: torch.dtype, nested: bool = True,
                    blocksize: int = 64) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` whose packed data and quantization state are empty
    tensors of the real shapes (call inside ``FakeTensorMode`` for a fake layer of any size)."""
    from slimtune.quant.bnb import import_bitsandbytes

    bnb = import_bitsandbytes()
    QuantState = bnb.functional.QuantState

    n = out_features * in_features
    blocks = -(-n // blocksize)
    code = torch.empty(16)
    if nested:
        state2 = QuantState(absmax=torch.empty(-(-blocks // 256)), code=torch.empty(256), blocksize=256,
                            dtype=torch.float32)
        state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=torch.Size([out_features, in_features]),
                           code=code, blocksize=blocksize, quant_type="nf4", dtype=compute_dtype,
                           offset=torch.empty(()), state2=state2)
    else:
        state = QuantState(absmax=torch.empty(blocks), shape=torch.Size([out_features, in_features]), code=code,
                           blocksize=blocksize, quant_type="nf4", dtype=compute_dtype)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # bitsandbytes' Params4bit cannot wrap a fake tensor: build the shell on meta
        m = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=nested, quant_type="nf4", device="meta")
    # a plain Parameter carrying Params4bit's attributes (as slimtune.memory.fake_module does)
    w = nn.Parameter(torch.empty(-(-n // 2), 1, dtype=torch.uint8), requires_grad=False)
    for k, v in dict(quant_state=state, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                     quant_storage=torch.uint8, bnb_quantized=True, module=m).items():
        setattr(w, k, v)
    m.weight = w
    m.support_avx512bf16_for_cpu = False
    return m


def _real_linear4bit(out_features: int, in_features: int, compute_dtype: torch.dtype, seed: int) -> nn.Module:
    from slimtune.config import QuantConfig
    from slimtune.quant.bnb import quantize_linear

    g = torch.Generator().manual_seed(seed)
    # quantized from a weight in the compute dtype, as from a checkpoint loaded in that dtype
    dense = nn.Linear(in_features, out_features, bias=False, dtype=compute_dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_features, in_features, generator=g) * in_features ** -0.5)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[compute_dtype]
    return quantize_linear(dense, QuantConfig(name="nf4", compute_dtype=name))


class _MLP(nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def qlora_mlp(hidden: int, intermediate: int, r: int, dtype: torch.dtype, fake: bool) -> nn.Module:
    """A Llama MLP block with NF4 (double-quant) projections wrapped in LoRA (B non-zero)."""
    from slimtune.adapters.lora import LoRALinear

    def proj(o, i, seed):
        base = fake_linear4bit(o, i, dtype) if fake else _real_linear4bit(o, i, dtype, seed)
        lora = LoRALinear(base, r=r, alpha=2 * r)
        if not fake:
            with torch.no_grad():
                lora.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed + 100))
        return lora

    return _MLP(proj(intermediate, hidden, 1), proj(intermediate, hidden, 2), proj(hidden, intermediate, 3))


class _VisibleGemm4bit(TorchDispatchMode):
    """Run ``bitsandbytes::gemm_4bit`` as bitsandbytes' own fallback does -- dequantize the
    nested absmax, dequantize the weight, ``F.linear`` -- through the dispatcher, so a
    tracker below this mode sees the dense weight."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) != "bitsandbytes.gemm_4bit.default":
            return func(*args, **kwargs)
        a, b, shape_b, absmax, blocksize, quant_type = args[:6]
        bias = kwargs.get("bias", args[6] if len(args) > 6 else None)
        absmax_8bit = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None)
        if absmax_8bit is not None:
            code = kwargs.get("absmax_code", args[8] if len(args) > 8 else None)
            offset = kwargs.get("absmax_offset", args[9] if len(args) > 9 else None)
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_8bit, absmax, code, 256, torch.float32)
            absmax = absmax + offset
        w = torch.ops.bitsandbytes.dequantize_4bit.default(b, absmax, blocksize, quant_type, shape_b, a.dtype)
        return F.linear(a, w, bias)


def _fake_mode(fake: bool):
    if not fake:
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _run(tracker, forward, backward_from) -> Peak:
    with tracker, _VisibleGemm4bit():
        with tracker.phase("forward"):
            out = forward()
        with tracker.phase("backward"):
            backward_from(out)
    phases = {k: v["peak_bytes"] for k, v in tracker.phase_peaks.items()}
    return Peak(tracker.peak_bytes, tracker.peak_breakdown, phases)


def measure_mlp(hidden: int, intermediate: int, tokens: int, r: int = 16, dtype: torch.dtype = torch.bfloat16,
                fused: bool = False, fake: bool = True) -> Peak:
    """Peak bytes of one QLoRA MLP block, forward + backward, at ``tokens`` tokens.

    Real tensors with ``fused=True`` run the Triton kernels in the interpreter: keep the
    shapes small."""
    from slimtune.config import KernelsConfig
    from slimtune.kernels.apply import apply
    from slimtune.kernels.dispatch import force_triton
    from slimtune.memory import MemoryTracker

    with _fake_mode(fake):
        block = qlora_mlp(hidden, intermediate, r, dtype, fake)
        if fused:
            apply(block, KernelsConfig(enabled=True))
        x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
        gy = torch.randn(tokens, hidden, dtype=dtype)
        tracker = MemoryTracker()
        tracker.register_model(block)
        tracker.register(x, "activations")
        with force_triton(fused and not fake):
            return _run(tracker, lambda: block(x), lambda y: y.backward(gy))


def measure_loss(tokens: int, hidden: int, vocab: int, dtype: torch.dtype = torch.bfloat16, fused: bool = False,
                 fake: bool = True) -> Peak:
    """Peak bytes of the summed next-token loss from final hidden states (forward + backward)
    with a frozen head of ``vocab`` x ``hidden``."""
    from slimtune.kernels.ce import linear_cross_entropy
    from slimtune.memory import MemoryTracker

    with _fake_mode(fake):
        g = None if fake else torch.Generator().manual_seed(0)
        weight = torch.randn(vocab, hidden, dtype=dtype, generator=g)
        h = torch.randn(tokens, hidden, dtype=dtype, generator=g, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,), generator=g)
        tracker = MemoryTracker()
        tracker.register(weight, "weights")
        tracker.register(h, "activations")

        def ref():
            return F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=-100, reduction="sum")

        def fused_loss():
            return linear_cross_entropy(h, weight, labels)[0]

        return _run(tracker, fused_loss if fused else ref, lambda loss: loss.backward())
