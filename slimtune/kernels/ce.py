"""Causal-LM loss without full logits: a linear cross-entropy over token chunks.

``linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")`` (the
trainer's loss, :mod:`slimtune.trainer.loss`) without the (tokens x vocab) fp32 logits:

* CUDA tensors: Liger-Kernel's fused linear cross-entropy
  (``LigerFusedLinearCrossEntropyFunction``, BSD-2). It computes the gradients during the
  forward, chunk by chunk, and keeps them for backward; nothing of it is rewritten here.
* Everything else (CPU, fake and meta tensors): :class:`_ChunkedLinearCE`, plain torch.
  The forward computes, chunk by chunk, the chunk's logits, their log-sum-exp and the
  target logit, and keeps only the hidden states it was given, the labels and one fp32
  log-sum-exp per token; backward recomputes each chunk's logits and turns them into that
  chunk's gradients. Why hand-written: Liger's path is Triton-only (it runs on CPU only in
  Triton's interpreter) and cannot run on fake tensors, and torch has no chunked CE.
  Being plain torch ops, it is traced by fake tensors and torch.compile as it is, and the
  memory tracker sees its real buffers.

Chunk size (both paths): Liger's rule, ``next_pow2(ceil(tokens / ceil(vocab / hidden)))``
tokens, so one chunk of logits has about tokens x hidden elements (256 tokens for
Llama-3-70B at 4096 tokens: 131 MB of fp32 logits instead of 2.1 GB).

``token_loss_sum_fused(model, batch)`` is the trainer's ``token_loss_sum`` on this loss.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.kernels.dispatch import triton_forced, triton_available

__all__ = ["linear_cross_entropy", "token_loss_sum_fused", "gathered_weight", "chunk_tokens_for", "liger_usable"]


def chunk_tokens_for(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: one chunk's logits hold about ``n_tokens * hidden`` values (Liger's rule)."""
    inc = max(1, math.ceil(vocab / hidden))
    per = max(1, math.ceil(n_tokens / inc))
    return max(1, min(n_tokens, 1 << (per - 1).bit_length()))


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(h, weight, bias).float()  # model-dtype matmul, fp32 loss (as the trainer's loss)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk: int, regather=None):
        n = hidden.shape[0]
        loss = hidden.new_zeros((), dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = _logits(hidden[s:e], weight, bias)
            lab = labels[s:e]
            valid = lab != ignore_index
            lse_c = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
            del logits
            lse[s:e] = lse_c
            loss = loss + torch.where(valid, lse_c - tgt, 0.0).sum()
        ctx.ignore_index, ctx.chunk, ctx.regather = ignore_index, chunk, regather
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # ZeRO-3: the saved weight is the partitioned parameter itself, whole only while gathered
        with ctx.regather() if ctx.regather is not None else contextlib.nullcontext():
            return _ChunkedLinearCE._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, chunk = hidden.shape[0], ctx.chunk
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            lab = labels[s:e]
            valid = lab != ctx.ignore_index
            # d loss / d logits = softmax - onehot(label), zero on ignored tokens, times grad_loss
            g = _logits(hidden[s:e], weight, bias).sub_(lse[s:e, None]).exp_()
            g.scatter_add_(1, torch.where(valid, lab, 0).unsqueeze(1), torch.full((e - s, 1), -1.0, device=g.device))
            g.mul_((valid.float() * grad_loss).unsqueeze(1))
            gl = g.to(hidden.dtype)
            del g
            if need_h:
                gh[s:e] = gl @ weight.to(hidden.dtype)
            if need_w:
                gw.add_((gl.t() @ hidden[s:e]).float())
            if need_b:
                gb.add_(gl.float().sum(0))
        return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
                None, None, None, None)


def liger_usable(t: Tensor) -> bool:
    """Liger's fused linear CE runs on ``t``: CUDA with Triton, or CPU under ``force_triton``
    when this process imported Triton in interpreter mode (``TRITON_INTERPRET=1`` before
    the first ``import triton``: Liger's kernels call Triton's own jitted helpers, which are
    compiled-only otherwise)."""
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t) or not triton_available():
        return False
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or broken: use the torch path
        return False
    if t.device.type == "cuda":
        return True
    if t.device.type != "cpu" or not triton_forced():
        return False
    import triton.language.standard as tls
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tls.zeros, InterpretedFunction)


def _liger_sum(hidden, weight, bias, labels, ignore_index: int) -> Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return liger_fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="sum")


def _count(labels: Tensor, ignore_index: int):
    from torch._subclasses.fake_tensor import is_fake

    n = (labels != ignore_index).sum()
    # fake labels (planner simulation) have no value: the count stays a 0-dim tensor
    return n if (is_fake(labels) or labels.device.type == "meta") else int(n)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    bias: Optional[Tensor] = None,
    chunk_tokens: Optional[int] = None,
    regather: Optional[Callable[[], ContextManager]] = None,
):
    """``(loss, n_tokens)``: cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``
    (already aligned with ``hidden``: shift before calling), never holding more than one
    chunk of logits. ``reduction``: ``"sum"`` (the trainer's convention) or ``"mean"`` (over
    non-ignored tokens). ``n_tokens`` is an int (a 0-dim tensor for fake labels).

    ``regather``: for a weight that is whole only inside a context (a ZeRO-3 parameter under
    ``GatheredParameters``), a factory of that context; the chunked path's backward, which
    recomputes the logits, re-enters it (Liger's path needs no weight in backward)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if h.shape[0] != lab.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {lab.shape[0]} labels")
    n_tokens = _count(lab, ignore_index)
    if chunk_tokens is None and liger_usable(h):
        loss = _liger_sum(h, weight, bias, lab, ignore_index)
    else:
        chunk = chunk_tokens or chunk_tokens_for(h.shape[0], weight.shape[0], weight.shape[1])
        loss = _ChunkedLinearCE.apply(h, weight, bias, lab, int(ignore_index), int(chunk), regather)
    if reduction == "mean":
        loss = loss / max(n_tokens, 1) if isinstance(n_tokens, int) else loss / n_tokens.clamp(min=1)
    return loss, n_tokens


# --------------------------------------------------------------------------- sharded lm_head
def _zero3_params(module: nn.Module) -> Optional[list[Tensor]]:
    """A linear head's DeepSpeed ZeRO-3 parameters (weight, bias), or None when ZeRO-3 does not partition it."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if not hasattr(weight, "ds_id"):
        return None
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise NotImplementedError(
            "the fused loss reads lm_head's weight outside its forward; under ZeRO-3 a trainable lm_head "
            "gets no gradient that way: use kernels.fused_loss=false (or freeze lm_head)"
        )
    return [p for p in (weight, bias) if p is not None]


def _zero3_gather(params: list[Tensor]) -> ContextManager:
    from slimtune.kernels.apply import gathered_zero3

    return gathered_zero3(params)


@contextlib.contextmanager
def gathered_weight(module: nn.Module) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    """``(weight, bias)`` of a linear head as full tensors, whatever shards it.

    * FSDP2: a sharded parameter is a ``DTensor``; ``full_tensor()`` all-gathers it with
      autograd, so a trainable head's gradient is reduce-scattered back onto its shard.
      (After the root module's forward FSDP2 leaves the root's parameters -- the head's
      among them -- unsharded, and then the plain tensor is used as it is.)
    * DeepSpeed ZeRO-3: the partitioned parameter is gathered for the block
      (``deepspeed.zero.GatheredParameters``) and partitioned again after it (unless ZeRO-3
      holds it whole already: :func:`slimtune.kernels.apply.gathered_zero3`). ZeRO-3 only
      reduces gradients it sees through module hooks, so a trainable head is refused here:
      compute that loss through the module (``token_loss_sum``).
    """
    weight = module.weight
    bias = getattr(module, "bias", None)
    params = _zero3_params(module)
    if params is not None:
        with _zero3_gather(params):
            yield weight, bias
        return

    def full(t):
        if t is None:
            return None
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    yield full(weight), full(bias)


def token_loss_sum_fused(model: nn.Module, batch: dict, ignore_index: int = -100, chunk_tokens: Optional[int] = None):
    """The trainer's ``token_loss_sum`` (summed next-token loss, label-token count) for a HF
    causal LM, with the logits never materialized.

    The model's own forward runs (so every FSDP2 / ZeRO-3 / activation-checkpointing hook
    fires as usual) with ``logits_to_keep=1``: the head projects one position per sequence
    only. A forward hook on the decoder (``model.get_decoder()``) keeps the final hidden
    states, which go through :func:`linear_cross_entropy` with the head's gathered weight.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    captured: dict[str, Tensor] = {}

    def keep(_module, _args, out):
        captured["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = decoder.register_forward_hook(keep)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured.pop("hidden")
    # Position t predicts label t+1. Shifting the labels (last position: ignored) instead of
    # slicing the hidden states keeps ``hidden`` a view: no (tokens x hidden) copy.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=ignore_index).to(hidden.device)
    params = _zero3_params(head)
    # ZeRO-3: the chunked backward recomputes the logits, so it gathers the head again (and
    # no gathered copy of the head lives between forward and backward)
    regather = None if params is None else functools.partial(_zero3_gather, params)
    with gathered_weight(head) as (weight, bias):
        return linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, bias=bias,
                                    chunk_tokens=chunk_tokens, regather=regather)
