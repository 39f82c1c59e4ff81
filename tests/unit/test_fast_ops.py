"""``slimtune.memory.fast_fake_ops``: the per-op memo of fake outputs that ``plan --simulate`` uses.

Reference: the same ops through ``FakeTensorMode`` alone. Op by op, every output has the same
shape, strides, dtype, device, storage offset, storage size, requires_grad and aliasing (which
input's storage it shares, or a new one); whole simulations under both sharding engines give the
same tracked peak, breakdown and phase peaks, byte for byte.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.config import load_config
from slimtune.memory import MemoryTracker, fast_fake_ops
from slimtune.memory.fast_ops import also_memoize, call_op
from slimtune.plan.simulate import simulate

TINY = ["model.preset=tiny-llama", "model.overrides={num_hidden_layers: 2, intermediate_size: 384}",
        "train.micro_batch_size=2", "data.max_seq_len=32", "train.num_threads=1"]


class _Through(TorchDispatchMode):
    """Sends every op through ``call_op``, as the tracker and the simulation's untracked mode do."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return call_op(func, args, kwargs or {})


def _describe(out, inputs):
    storages = [t.untyped_storage()._cdata for t in inputs]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    desc = []
    for o in outs:
        st = o.untyped_storage()
        alias = storages.index(st._cdata) if st._cdata in storages else None
        desc.append((type(o).__name__, tuple(o.shape), o.stride(), o.dtype, o.device, o.storage_offset(), st.nbytes(),
                     o.requires_grad, alias, o.is_conj(), o.is_neg(), o._is_view(), o.is_leaf,
                     type(o.grad_fn).__name__, str(torch._C._dispatch_keys(o))))
    return desc


def _program():
    """Ops of every memo kind, each on several layouts and offsets, every call made three times
    (the second and third are answered by the memo where it applies)."""
    flat = torch.empty(4096)
    w = torch.empty(6, 4, requires_grad=True)
    idx = torch.tensor([0, 2, 1])
    gen = torch.Generator().manual_seed(0)
    results, inputs = [], [flat, w]

    def run(fn, *args):
        for _ in range(3):
            out = fn(*args)
            results.append(_describe(out, inputs + [a for a in args if isinstance(a, torch.Tensor)]))
        inputs.extend(o for o in (out if isinstance(out, (tuple, list)) else (out,)))
        return out

    for start in (0, 96, 1000, 2048):  # parameters at different offsets of one flat buffer (DeepSpeed)
        x = run(lambda s: flat.narrow(0, s, 48).view(8, 6), start)
        run(torch.mm, x, w.detach())
        run(lambda a: a.t(), x)
        run(lambda a: a[1:, ::2], x)
        run(lambda a: a.split([3, 5]), x)
        run(lambda a: a.unbind(0), x)
        run(lambda a: torch.as_strided(a, (4, 4), (6, 1), 3), x)
        run(lambda a: a.view(torch.int32), x)
        run(lambda a: a.to(torch.bfloat16) + 1.5, x)
        run(lambda a: torch.cat([a, a], dim=1), x)
        run(lambda a: a.sum(dim=0, keepdim=True), x)
        run(lambda a: torch.index_select(a, 0, idx), x)
        run(lambda a: a.add_(1.0), x)
        run(lambda a: a.uniform_(), x)
        run(lambda a: torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=gen), x)  # LoRA's seeded init
        run(lambda a: torch.randn(a.shape, generator=gen, dtype=torch.bfloat16), x)
        run(lambda a, b: a.copy_(b), x, torch.empty(8, 6, dtype=torch.float16))
        run(lambda a: torch.empty_like(a.t()), x)
        run(lambda a: a.new_zeros((3, 5)), x)
        run(lambda a: a.detach(), x)
        # views with the source's own layout (built by detaching the source), of a leaf that
        # requires grad and of a view of it: autograd's view bookkeeping must be the fake mode's
        run(lambda a: a.detach(), w)
        run(lambda a: a.view(6, 4), w)
        run(lambda a: torch.ops.aten.alias.default(a), w)
        run(lambda a: a.view(3, 8).view(6, 4), w)
        run(lambda a: a.expand(5, 4), w[1:])
        run(lambda a: a.conj().detach(), torch.empty(3, dtype=torch.complex64))
        run(lambda a: a.unsqueeze(0).expand(2, 8, 6), x)
        run(lambda a: a.contiguous().view(-1), x[:, :3])
        run(lambda a: a.clone(memory_format=torch.contiguous_format), x.t())
        run(lambda a: torch.ops.aten._unsafe_view.default(a, [6, 8]), x)
        run(lambda a, o: torch.cat([a, a], out=o), x, flat.narrow(0, start + 48, 96).view(16, 6))
        run(lambda a, o: torch.cat([a, a], out=o), x, torch.empty(0))  # resizes out: not memoized
        # views keyed by integer arguments: a new key (first call: the direct meta-kernel view) per start
        run(lambda s: flat[s + 7: s + 4000: 3], start)
        run(lambda s: flat.narrow(0, s + 1, 5).select(0, 2), start)
        run(lambda s: flat[-s - 9:], start)  # negative start
        run(lambda s: flat.view(64, 64)[s % 64:, 1:70], start)  # end clamped
        run(lambda s: torch.as_strided(flat, (3, 5), (5, 1), s + 11), start)  # absolute offset
        run(lambda s: flat.view(64, 64).split_with_sizes([s % 7 + 1, 63 - s % 7]), start)
        run(lambda a: a.unsqueeze(-1).transpose(0, 2).squeeze(0), x)
        run(lambda a: a.view(2, 4, 6).permute(2, 0, 1), x)
        # in-place foreach ops (checked once per element layout) and a void op with out= tensors
        ys = [x, x.t().contiguous(), x[:, :2], torch.empty(7, dtype=torch.bfloat16)]
        run(lambda a, b: torch._foreach_addcmul_(ys, ys, ys, value=0.5) or ys, x, w)
        run(lambda a, b: torch._foreach_lerp_(ys, [t.clone() for t in ys], 0.1) or ys, x, w)
        run(lambda a, b: torch._foreach_addcdiv_(ys, ys, ys, [1.0, 2.0, 3.0, 4.0]) or ys, x, w)
        run(lambda a, b: torch._foreach_mul_(ys, 2.0) or ys, x, w)
        run(lambda a: torch._foreach_sqrt(ys), x)
        # functional foreach ops: outputs built per element layout (repeated layouts among them)
        zs = [x, x.clone(), x.t().contiguous(), x[:, :2].clone(), x]
        run(lambda a: torch._foreach_norm(zs), x)
        run(lambda a: torch._foreach_add(zs, zs), x)
        run(lambda a: torch._foreach_div(zs, [1.0, 2.0, 3.0, 4.0, 5.0]), x)
        run(lambda a: torch._foreach_mul(zs, a.new_ones(())), x)
        run(lambda a: torch._foreach_sqrt(zs + [a.to(torch.bfloat16)]), x)
        outs = [torch.empty(16), torch.empty(32)]
        run(lambda a: torch.split_with_sizes_copy(a.reshape(-1), [16, 32], out=outs) or outs, x)
    return results


def test_foreach_ops_still_refuse_mismatched_elements():
    """Per-element checking must not let a bad element through after good ones of other layouts."""
    mode = FakeTensorMode()
    with mode, fast_fake_ops(mode), _Through():
        a, b = torch.empty(4, 3), torch.empty(5)
        torch._foreach_add_([a, b], [a, b])
        torch._foreach_add_([a, b, a], [a, b, a])
        with pytest.raises(RuntimeError):
            torch._foreach_add_([a, b], [a, torch.empty(3, 5)])


def test_memoized_fake_ops_give_the_outputs_fake_mode_gives():
    runs = []
    for memo_on in (False, True):
        FakeTensorMode.cache.clear()
        mode = FakeTensorMode(allow_non_fake_inputs=False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(mode)
            memo = stack.enter_context(fast_fake_ops(mode)) if memo_on else None
            stack.enter_context(_Through())
            runs.append(_program())
        if memo_on:
            assert memo.hits > 100 and memo.misses > 0
    assert runs[0] == runs[1]
    assert all(d[0] == FakeTensor.__name__ for call in runs[1] for d in call)


def test_also_memoize_answers_another_fake_mode_with_the_outputs_it_gives():
    """DTensor's sharding propagation runs under a fake mode of its own (plan.fsdp2_sim): with
    ``also_memoize`` its ops are answered by a memo of that mode, and give what that mode gives."""
    runs = []
    for also in (False, True):
        FakeTensorMode.cache.clear()
        main, other = FakeTensorMode(), FakeTensorMode()
        with contextlib.ExitStack() as stack:
            memo = stack.enter_context(fast_fake_ops(main))
            if also:
                stack.enter_context(also_memoize(other))
            stack.enter_context(other)
            stack.enter_context(_Through())
            runs.append(_program())
        assert memo.hits == memo.misses == 0  # the simulation's own memo answers only its mode
        if also:
            assert memo.others[id(other)].hits > 100
        else:
            assert not memo.others
    assert runs[0] == runs[1]
    assert all(d[0] == FakeTensor.__name__ for call in runs[1] for d in call)


def test_ops_whose_outputs_need_values_or_change_metadata_are_not_memoized():
    from slimtune.memory.fast_ops import _kind

    aten = torch.ops.aten
    for op in (aten.nonzero.default, aten._local_scalar_dense.default, aten.set_.source_Storage_storage_offset,
               aten.resize_.default, aten.t_.default, aten.record_stream.default):
        assert _kind(op) is None, op
    assert _kind(aten._foreach_add_.Scalar) == "void"
    assert _kind(aten.mm.default) == "functional"
    assert _kind(aten.add_.Tensor) == "inplace"
    assert _kind(aten.slice.Tensor) == "view"
    assert _kind(aten._unsafe_view.default) == "view"
    assert _kind(aten.cat.out) == "out"
    assert _kind(torch.ops.c10d._allgather_base_.default) == "collective"


def test_memo_leaves_no_trace_outside_its_context():
    mode = FakeTensorMode()
    with mode, fast_fake_ops(mode):
        pass
    calls = []
    with mode, _Through():
        a = torch.empty(3)
        calls.append(a + a)
    assert isinstance(calls[0], FakeTensor)


def test_memo_answers_only_under_its_fake_mode():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = FakeTensorMode()
    with mode, fast_fake_ops(mode) as memo, _Through():
        fakes = [torch.empty(3, 4) for _ in range(2)]
        with unset_fake_temporarily():
            real = torch.empty(3, 4)
    assert all(type(t) is FakeTensor for t in fakes) and memo.hits == 1
    assert type(real) is torch.Tensor


def test_tracker_counts_memoized_outputs_as_fresh_allocations():
    mode = FakeTensorMode()
    peaks = []
    for memo_on in (False, True):
        with contextlib.ExitStack() as stack:
            stack.enter_context(mode)
            if memo_on:
                stack.enter_context(fast_fake_ops(mode))
            x = torch.empty(256, 256)
            tracker = MemoryTracker()
            with tracker:
                kept = [x @ x for _ in range(4)]  # 4 x 256 KiB alive at once
                del kept
                y = (x + 1).t()[1:]
                del y
            peaks.append((tracker.peak_bytes, tracker.current_bytes))
    assert peaks[0] == peaks[1] == (4 * 256 * 256 * 4, 0)


def test_built_fresh_marks_only_outputs_built_from_a_functional_recipe():
    """The tracker's shortcut (``built_fresh``: a new storage, no input's) holds exactly for a
    memo hit of a functional op; a first call, a view, an in-place op or no memo say False."""
    from slimtune.memory.fast_ops import built_fresh

    mode = FakeTensorMode()
    mul, view, add_ = torch.ops.aten.mul.Tensor, torch.ops.aten.view.default, torch.ops.aten.add_.Tensor
    with mode:
        x = torch.empty(8, 8)
    assert not built_fresh()  # no memo
    with mode, fast_fake_ops(mode):
        call_op(mul, (x, x), {})
        assert not built_fresh()  # first call: through the fake mode
        out = call_op(mul, (x, x), {})
        assert built_fresh() and out.untyped_storage()._cdata != x.untyped_storage()._cdata
        call_op(view, (x, [64]), {})
        call_op(view, (x, [64]), {})
        assert not built_fresh()
        call_op(add_, (out, x), {})
        call_op(add_, (out, x), {})
        assert not built_fresh()


@pytest.mark.parametrize("overrides,world", [
    (["method.name=lora", "quant.name=nf4", "quant.quant_storage=bfloat16", "model.dtype=bfloat16",
      "quant.compute_dtype=bfloat16", "shard.strategy=deepspeed_zero3", "train.activation_checkpointing=true",
      "train.grad_accum=2"], 2),
    (["method.name=lora", "quant.name=nf4", "quant.backend=torchao", "model.dtype=bfloat16", "shard.strategy=fsdp2",
      "quant.compute_dtype=bfloat16", "train.activation_checkpointing=true", "train.grad_accum=2"], 2),
    (["method.name=s2ft", "train.activation_checkpointing=true"], 1),
], ids=["zero3-qlora-bnb", "fsdp2-qlora-ao", "s2ft"])
def test_simulation_is_unchanged_by_the_op_memo(overrides, world, tmp_path):
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    cfg = load_config(None, TINY + [f"output.dir={tmp_path}"] + overrides)
    results = []
    for fast in (True, False):
        FakeTensorMode.cache.clear()
        _clear_sharding_prop_cache()
        results.append(simulate(cfg, world=world, fast_ops=fast))
    fast, plain = results
    assert fast.peak_bytes == plain.peak_bytes > 0
    assert fast.breakdown == plain.breakdown
    assert fast.phases == plain.phases


def test_collectives_on_the_fake_process_group_return_what_fake_mode_returns():
    from slimtune.plan.simulate import fake_process_group
    import torch.distributed as dist

    seen = []
    with fake_process_group(2):
        for memo_on in (False, True):
            mode = FakeTensorMode()
            with contextlib.ExitStack() as stack:
                stack.enter_context(mode)
                memo = stack.enter_context(fast_fake_ops(mode)) if memo_on else None
                stack.enter_context(_Through())
                a, out = torch.empty(4, 6), torch.empty(8, 6)
                results = [dist.all_gather_into_tensor(out, a), dist.broadcast(a, 0), dist.all_reduce(a),
                           dist.reduce_scatter_tensor(a, out), dist.all_gather_into_tensor(out, a, async_op=True).wait()]
                tensors = [t for t in (a, out)]
                seen.append(([type(r).__name__ for r in results], [_describe(t, [a, out]) for t in tensors]))
            if memo_on:
                assert memo.hits >= 5
    assert seen[0] == seen[1]
