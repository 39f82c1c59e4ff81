"""Loss without full logits: the chunked torch path and Liger's fused linear CE (interpreted
on CPU) against ``F.cross_entropy`` on full logits, and ``token_loss_sum_fused`` against the
trainer's ``token_loss_sum``."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.kernels import chunk_tokens_for, force_triton, linear_cross_entropy, token_loss_sum_fused
from slimtune.kernels.ce import liger_usable


def data(n, h, v, dtype, seed=0, ignored=5, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:ignored]] = -100
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, b


def reference(hidden, weight, labels, bias=None):
    logits = F.linear(hidden, weight, bias).float()  # what the trainer's loss does
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def losses_and_grads(fn, hidden, weight, labels, bias):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, leaves[2])
    (loss * 0.37).backward()  # a non-unit upstream gradient
    return loss.detach(), [t.grad for t in leaves if t is not None]


# fp32: summation order only. bf16: logits and gradients are rounded to bf16 in both paths
# at different points (per chunk vs whole), relative to the largest reference magnitude.
CE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-3, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, None, 1000])
def test_chunked_equals_full_logits(dtype, chunk):
    hidden, weight, labels, bias = data(37, 16, 50, dtype, bias=chunk == 7)
    ref_loss, ref_grads = losses_and_grads(reference, hidden, weight, labels, bias)
    got_loss, got_grads = losses_and_grads(
        lambda h, w, lab, b: linear_cross_entropy(h, w, lab, bias=b, chunk_tokens=chunk)[0], hidden, weight, labels, bias)
    loss_tol, grad_tol = CE_TOL[dtype]
    torch.testing.assert_close(got_loss, ref_loss, rtol=loss_tol, atol=loss_tol)
    for got, exp in zip(got_grads, ref_grads):
        assert got.dtype == exp.dtype
        err = (got.float() - exp.float()).abs().max() / exp.float().abs().max()
        assert err <= grad_tol, err


def test_count_mean_and_shapes():
    hidden, weight, labels, _ = data(24, 8, 30, torch.float32, ignored=4)
    loss_sum, n = linear_cross_entropy(hidden.reshape(2, 12, 8), weight, labels.reshape(2, 12))
    assert n == 20 and isinstance(n, int)
    loss_mean, n2 = linear_cross_entropy(hidden, weight, labels, reduction="mean")
    torch.testing.assert_close(loss_mean, loss_sum / 20)
    torch.testing.assert_close(loss_mean, F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")


def test_chunk_rule_matches_liger():
    # Liger: inc = cdiv(V, H); chunk = next_pow2(cdiv(BT, inc))
    assert chunk_tokens_for(4096, 128256, 8192) == 256
    assert chunk_tokens_for(4096, 32000, 4096) == 512
    assert chunk_tokens_for(10, 50, 100) == 10  # vocab < hidden: one chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_path_interpreted_on_cpu(dtype):
    hidden, weight, labels, _ = data(37, 16, 50, dtype)
    with force_triton():
        if not liger_usable(hidden):
            pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set in this process "
                        "(run tests/kernels on its own to interpret Liger's kernels)")
        got_loss, got_grads = losses_and_grads(lambda h, w, lab, b: linear_cross_entropy(h, w, lab)[0],
                                               hidden, weight, labels, None)
    ref_loss, ref_grads = losses_and_grads(reference, hidden, weight, labels, None)
    loss_tol, grad_tol = CE_TOL[dtype]
    torch.testing.assert_close(got_loss, ref_loss, rtol=loss_tol, atol=loss_tol)
    for got, exp in zip(got_grads, ref_grads):
        err = (got.float() - exp.float()).abs().max() / exp.float().abs().max()
        assert err <= grad_tol, err


def test_fake_tensors_pass_through():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.randn(64, 32, requires_grad=True)
        weight = torch.randn(1000, 32)
        labels = torch.randint(0, 1000, (64,))
        loss, n = linear_cross_entropy(hidden, weight, labels)
        loss.backward()
        assert loss.shape == () and hidden.grad.shape == hidden.shape
        assert isinstance(n, torch.Tensor) and n.shape == ()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels[1, 9:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_token_loss_sum_fused_equals_trainer_loss():
    from slimtune.trainer.loss import token_loss_sum

    model = tiny_llama()
    ref = copy.deepcopy(model)
    b = batch()
    loss, n = token_loss_sum_fused(model, b, chunk_tokens=5)
    loss_ref, n_ref = token_loss_sum(ref, b)
    assert n == n_ref
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    loss_ref.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_token_loss_sum_fused_with_fsdp2_sharded_head(tmp_path):
    """One-rank gloo FSDP2: parameters are DTensor shards; the head's weight is gathered
    (and its gradient lands on the shard) exactly as through the model's own forward."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from slimtune.trainer.loss import token_loss_sum

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        model.config.tie_word_embeddings = False
        ref = copy.deepcopy(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(model.lm_head.weight, DTensor)
        b = batch()
        loss, n = token_loss_sum_fused(model, b)
        loss_ref, n_ref = token_loss_sum(ref, b)
        assert n == n_ref
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        loss.backward()
        loss_ref.backward()
        g = model.lm_head.weight.grad
        assert isinstance(g, DTensor)
        torch.testing.assert_close(g.full_tensor(), ref.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad.full_tensor(),
                                   ref.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
        os.environ.pop("MASTER_ADDR", None)


def test_chunked_backward_reenters_the_regather_context():
    """ZeRO-3's contract, by hand: the head's parameter holds its whole data only inside a
    context (``GatheredParameters``) and an empty partition outside it.  The chunked backward
    recomputes the logits from that parameter, so it must enter the context again (``regather``);
    without it the recompute multiplies by an empty tensor (what crashed under ZeRO-3)."""
    import contextlib

    hidden, weight, labels, _ = data(23, 16, 40, torch.float32)
    weight.requires_grad_(False)  # a frozen head (ZeRO-3 refuses a trainable one in the fused loss)
    whole = weight.detach().clone()
    head = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    entered = []

    @contextlib.contextmanager
    def gathered():
        entered.append(1)
        head.data = whole
        try:
            yield
        finally:
            head.data = torch.empty(0)  # partitioned again, as ZeRO-3 does on exit

    ref_loss, (ref_gh, _) = losses_and_grads(lambda h, w, lab, b: reference(h, w, lab), hidden, whole, labels, None)
    h = hidden.detach().clone().requires_grad_()
    with gathered():
        loss, _ = linear_cross_entropy(h, head, labels, chunk_tokens=5, regather=gathered)
    assert head.numel() == 0  # released between forward and backward
    (loss * 0.37).backward()
    assert len(entered) == 2 and head.numel() == 0
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-6)

    h2 = hidden.detach().clone().requires_grad_()
    with gathered():
        loss2, _ = linear_cross_entropy(h2, head, labels, chunk_tokens=5)
    with pytest.raises(RuntimeError):
        loss2.backward()
