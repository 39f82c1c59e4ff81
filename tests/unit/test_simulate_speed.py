"""``slimtune plan --simulate`` at 70B scale, and the speed-ups that make it fast without changing
what it measures.

* The fast dispatch-cache keys (``slimtune.memory.fast_fake_cache_keys``) give every fake op the
  same output as torch's own keys (independent reference: the same ops with torch's keys), and
  a whole simulation the same tracked peak and breakdown, byte for byte.
* The tracker's fast paths (``prim.device`` answered in place, views passed through) count what
  the plain per-op rule counts (tests/unit/test_memory.py checks the tracker itself).
* The 70B LoRAM recipe's code path at full width on a 4-layer stack (default run, seconds);
  the whole 80-layer recipe through the CLI is marked slow (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from slimtune.config import load_config
from slimtune.memory import fast_fake_cache_keys
from slimtune.plan.simulate import simulate

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.preset=tiny-llama", "model.overrides={num_hidden_layers: 2, intermediate_size: 384}",
        "train.micro_batch_size=2", "data.max_seq_len=32", "train.num_threads=1"]


def _ops(x, w, idx):
    """A mix of ops whose outputs depend on shapes, strides, dtypes, offsets and requires_grad."""
    outs = [torch.mm(x, w), torch.mm(x.t().contiguous().t(), w), x.float() * 2, x[1:].clone(), x[:, ::2].contiguous(),
            torch.empty_like(x.t()), x.sum(dim=0, keepdim=True), torch.cat([x, x], dim=1), x.to(torch.bfloat16) + 1.5,
            torch.index_select(x, 0, idx), x.new_zeros((3, 5)), x.transpose(0, 1) @ x, (x + 1) if x.requires_grad else x]
    return [(tuple(o.shape), o.stride(), o.dtype, o.device, o.storage_offset(), o.requires_grad) for o in outs]


def test_fast_cache_keys_give_the_same_fake_outputs():
    results = []
    for fast in (False, True):
        FakeTensorMode.cache.clear()
        with contextlib.ExitStack() as stack:
            if fast:
                stack.enter_context(fast_fake_cache_keys())
            mode = stack.enter_context(FakeTensorMode())
            base = torch.empty(8, 6)
            inputs = [(base, torch.empty(6, 4)), (base[2:], torch.empty(6, 4)), (base.t().contiguous().t(), torch.empty(6, 4)),
                      (torch.empty(8, 6, dtype=torch.float16), torch.empty(6, 4, dtype=torch.float16)),
                      (torch.empty(8, 6, requires_grad=True), torch.empty(6, 4)), (torch.empty(5, 6), torch.empty(6, 2))]
            idx = torch.tensor([0, 2, 1])
            # each set twice: the second pass is answered from the cache
            results.append([_ops(x, w, idx) for _ in range(2) for x, w in inputs])
            hits = FakeTensorMode.cache_hits
        assert mode.cache_enabled and hits > 0
    FakeTensorMode.cache.clear()
    assert results[0] == results[1]
    assert FakeTensorMode._prep_args_for_hash.__qualname__.startswith("FakeTensorMode")  # patch undone


@pytest.mark.parametrize("overrides", [
    ["method.name=lora", "quant.name=nf4", "model.dtype=bfloat16", "quant.compute_dtype=bfloat16",
     "train.activation_checkpointing=true"],
    ["method.name=full", "optim.name=galore_adamw8bit", "optim.galore.rank=16", "optim.per_layer=true"],
    ["method.name=paca", "method.paca.r=8", "quant.name=nf4", "quant.backend=torchao", "model.dtype=bfloat16",
     "quant.compute_dtype=bfloat16"],
], ids=["qlora-ckpt", "galore8bit-per-layer", "qpaca-torchao"])
def test_simulation_is_unchanged_by_the_fast_keys(overrides, tmp_path):
    cfg = load_config(None, TINY + [f"output.dir={tmp_path}"] + overrides)
    FakeTensorMode.cache.clear()
    fast = simulate(cfg)
    FakeTensorMode.cache.clear()
    with mock.patch("slimtune.memory.fast_fake_cache_keys", contextlib.nullcontext):
        plain = simulate(cfg)
    assert fast.peak_bytes == plain.peak_bytes > 0
    assert fast.breakdown == plain.breakdown
    assert fast.phases == plain.phases


def _check_fits_and_adds_up(sim, gpu_mem=24 << 30):
    assert sum(sim.breakdown.values()) == sim.peak_bytes
    assert all(v >= 0 for v in sim.breakdown.values())
    assert 0 < sim.peak_bytes < gpu_mem


def test_llama70b_loram_code_path_on_four_full_width_layers():
    """The recipe as it is (Llama-3.1-70B width, 128k vocabulary, 4 x 512-token micro-batches,
    QLoRAM pruning, NF4, LoRA, checkpointing), with 4 decoder layers (1 kept whole at each end,
    2 pruned): fits, the breakdown adds up, and the 70B-scale weights are there."""
    cfg = load_config(REPO / "configs/llama70b_loram.yaml",
                      ["model.path=null", "model.preset=llama-3.1-70b", "model.overrides={num_hidden_layers: 4}",
                       "pruning.keep_first_layers=1", "pruning.keep_last_layers=1"])
    sim = simulate(cfg, world=1)
    _check_fits_and_adds_up(sim)
    emb = 128256 * 8192 * 2  # bf16 embeddings and lm_head
    assert sim.breakdown["weights"] > 2 * emb
    assert sim.breakdown["grads"] == sim.breakdown["trainable"] > 0
    assert sim.seconds < 120


@pytest.mark.slow
@pytest.mark.parametrize("config,gpus", [("configs/llama70b_loram.yaml", 1), ("configs/llama70b_s2ft.yaml", 2),
                                         ("configs/llama70b_paca.yaml", 2), ("configs/llama8b_galore.yaml", 1),
                                         ("configs/llama70b_qlora_fsdp2.yaml", 2), ("configs/llama70b_qlora_zero3.yaml", 2)])
def test_recipe_simulates_through_the_cli(config, gpus, capsys):
    from slimtune.cli import main

    rc = main(["plan", "--config", str(REPO / config), "--gpus", str(gpus), "--gpu-mem", "24GiB", "--simulate",
               "--json", "--no-advice"])
    out = json.loads(capsys.readouterr().out)
    sim = out["simulated"]
    assert sum(sim["breakdown"].values()) == sim["peak_bytes"]
    assert sim["fits"] is True, (config, sim["per_rank_peak_bytes"] / 2**30)
    assert rc == 0


def _cold_caches():
    """Both runs start as a fresh process does: DTensor's sharding propagation caches are
    emptied too (so that both runs do the same work; what they count does not depend on it, see
    tests/unit/test_plan.py::test_a_second_fsdp2_simulation_in_one_process_reports_the_same)."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    FakeTensorMode.cache.clear()
    _clear_sharding_prop_cache()


FAST_PATHS = ["slimtune.memory.fast_strided_shard_flag", "slimtune.memory.fast_foreach_strategies",
              "slimtune.plan.simulate.replay_nf4_dequant"]


def _simulate_plain_and_fast(cfg, world, fast_names=FAST_PATHS):
    """``simulate`` twice: with every speed-up, and with the named ones replaced by no-ops."""
    _cold_caches()
    fast = simulate(cfg, world=world)
    _cold_caches()
    with contextlib.ExitStack() as stack:
        for name in fast_names:
            stack.enter_context(mock.patch(name, contextlib.nullcontext))
        plain = simulate(cfg, world=world)
    return fast, plain


@pytest.mark.parametrize("overrides,world", [
    (["method.name=lora", "quant.name=nf4", "quant.backend=torchao", "model.dtype=bfloat16", "shard.strategy=fsdp2",
      "quant.compute_dtype=bfloat16", "train.activation_checkpointing=true", "train.grad_accum=2"], 2),
    (["method.name=full", "optim.max_grad_norm=0", "shard.strategy=fsdp2"], 2),
    (["method.name=paca", "method.paca.r=8", "quant.name=nf4", "quant.backend=torchao", "model.dtype=bfloat16",
      "quant.compute_dtype=bfloat16", "train.activation_checkpointing=true", "train.grad_accum=3"], 1),
], ids=["fsdp2-qlora-ao-ckpt", "fsdp2-full-noclip", "qpaca-ao-ckpt"])
def test_simulation_is_unchanged_by_the_dtensor_and_nf4_speedups(overrides, world, tmp_path):
    """With and without the linear-time ``_StridedShard`` scan of DTensor's foreach propagation
    (``fast_strided_shard_flag``) and the replayed NF4 dequantization (``replay_nf4_dequant``):
    the tracked peak, breakdown and phase peaks are byte-identical, and both were used."""
    from torch.distributed.tensor import _sharding_prop as sp

    import slimtune.memory.fast_dtensor as fd
    import slimtune.memory.replay as rp

    cfg = load_config(None, TINY + [f"output.dir={tmp_path}"] + overrides)
    traces = []
    real_trace = rp._trace
    with mock.patch.object(fd, "_has_strided_shard", wraps=fd._has_strided_shard) as scans, \
            mock.patch.object(rp, "_make_output", wraps=rp._make_output) as replays, \
            mock.patch.object(rp, "_trace", lambda ev, out: traces.append(real_trace(ev, out)) or traces[-1]):
        fast, plain = _simulate_plain_and_fast(cfg, world)
    if cfg.shard.strategy == "fsdp2":
        assert scans.call_count > 0  # the fast scan answered the foreach ops of the first run
    if cfg.quant.name == "nf4":
        assert replays.call_count > 0  # dequantizations answered by replay in the first run
        # tracked calls too: every recorded trace could be kept (one per weight layout)
        assert traces and all(t is not rp._UNREPLAYABLE for t in traces), traces
    assert fast.peak_bytes == plain.peak_bytes > 0
    assert fast.breakdown == plain.breakdown
    assert fast.phases == plain.phases
    assert sp._propagate_use_strided_shard_flag.__module__ == sp.__name__  # patch undone


def test_plain_mapping_of_foreach_arguments_matches_pytree():
    """``fast_foreach_strategies`` rebuilds a foreach op's per-element arguments without pytree:
    the same containers and contents as ``tree_map_only``, and torch's function for anything else."""
    from torch.distributed.tensor._op_schema import OpStrategy, TupleStrategy
    from torch.utils._pytree import tree_map_only

    from slimtune.memory.fast_dtensor import _map_plain, _NotPlain

    kids = [OpStrategy([]) for _ in range(3)]
    tree = ((TupleStrategy(kids), [0.1, 0.2, 0.3], TupleStrategy(kids), 2, None), {"alpha": 1.5, "out": [TupleStrategy(kids)]})
    pick = lambda x: x.children[1]  # noqa: E731
    ours = _map_plain(tree, TupleStrategy, pick)
    ref = tree_map_only(TupleStrategy, pick, tree, is_leaf=lambda x: isinstance(x, TupleStrategy))
    assert ours == ref and type(ours[1]) is dict and type(ours[0][1]) is list
    assert ours[0][0] is kids[1] and ours[1]["out"][0] is kids[1]
    with pytest.raises(_NotPlain):
        _map_plain((torch.Size([2, 3]),), TupleStrategy, pick)  # a pytree node type it does not know


def test_schema_meta_with_scalar_lists_matches_torch():
    """``fast_foreach_strategies`` converts ``OpSchema.args_meta`` / ``kwargs_meta`` with a list of
    plain numbers copied whole, once known (``_plain_numbers``): the same values and container types
    as torch's property, for per-element schemas that share the foreach op's ScalarList; torch's
    properties are back afterwards."""
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, TupleStrategy

    import slimtune.memory.fast_dtensor as fd
    from slimtune.memory import fast_foreach_strategies

    meta = TensorMeta(torch.Size([4, 2]), (2, 1), torch.float32)
    strategy = OpStrategy([])  # its tensor meta (a property of its first spec) is patched below
    scalars = [0.5, 1, True]
    schemas = [OpSchema(torch.ops.aten.div_.Tensor, (strategy, scalars, (1.0, [2, strategy]), torch.Size([3]),
                                                   TupleStrategy([strategy])), {"alpha": [0.1, 0.2], "t": strategy})
               for _ in range(3)]
    with mock.patch.object(OpStrategy, "tensor_meta", meta, create=True):
        ref = [(s.args_meta, s.kwargs_meta) for s in schemas]
        with fast_foreach_strategies(), mock.patch.object(fd, "_plain_numbers", wraps=fd._plain_numbers) as asked:
            ours = [(s.args_meta, s.kwargs_meta) for s in schemas]
        assert asked.call_count >= 3 * 3  # each schema's ScalarList, its inner list and the kwarg list
        after = [(s.args_meta, s.kwargs_meta) for s in schemas]
    assert ours == ref == after
    for (args, kwargs), (rargs, rkwargs) in zip(ours, ref):
        assert [type(a) for a in args] == [type(a) for a in rargs]
        assert args[1] is not scalars and type(args[2][1]) is list and type(kwargs["alpha"]) is list
    assert "args_meta" in OpSchema.__dict__ and OpSchema.__dict__["args_meta"].fget.__module__ == OpSchema.__module__


def test_linear_duplicate_parameter_check_answers_as_deepspeed():
    """ZeRO-3's engine build runs ``_check_for_duplicates`` in linear time while simulating: it
    passes and fails where DeepSpeed's own does, with the same message."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    from slimtune.plan.zero3_sim import _check_for_duplicates

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    a, b, c, d = model.parameters()
    engine = SimpleNamespace(module=model)
    for groups in ([[a, b], [c, d]], [[a, c]], [[a, b], [c, a]], [[a, a, d]], [[], [d], [d]]):
        optimizer = SimpleNamespace(param_groups=[{"params": g} for g in groups])
        outcomes = []
        for check in (DeepSpeedEngine._check_for_duplicates, _check_for_duplicates):
            try:
                check(engine, optimizer)
                outcomes.append(None)
            except AssertionError as err:
                outcomes.append(str(err))
        assert outcomes[0] == outcomes[1], groups
    assert outcomes[0] and "3.bias" not in outcomes[0] and "1.bias" in outcomes[0]


@pytest.mark.parametrize("overrides", [
    ["method.name=lora", "quant.name=nf4", "quant.quant_storage=bfloat16", "model.dtype=bfloat16",
     "quant.compute_dtype=bfloat16", "train.activation_checkpointing=true", "train.grad_accum=2",
     "shard.deepspeed_config=configs/deepspeed/zero3_offload.json"],
    ["method.name=full", "train.grad_accum=2"],
], ids=["qlora-bnb-offload-ckpt", "full"])
def test_simulation_is_unchanged_by_the_zero3_speedups(overrides, tmp_path):
    """DeepSpeed's leaf-module flag and per-module parameter lists read from the module's dicts
    (``_zero3_speedups``): byte-identical peak, breakdown and phase peaks, and they were used."""
    import slimtune.plan.zero3_sim as zsim

    cfg = load_config(None, TINY + [f"output.dir={tmp_path}", "shard.strategy=deepspeed_zero3"] + overrides)
    calls = []
    real = zsim._zero3_iter_params

    def counting(original):
        fast = real(original)
        return lambda module, recurse=False: calls.append(recurse) or fast(module, recurse)

    _cold_caches()
    with mock.patch.object(zsim, "_zero3_iter_params", counting):
        fast = simulate(cfg, world=2)
    assert calls.count(False) > 0
    _cold_caches()
    with mock.patch.object(zsim, "_zero3_speedups", lambda: []):
        plain = simulate(cfg, world=2)
    assert fast.peak_bytes == plain.peak_bytes > 0
    assert fast.breakdown == plain.breakdown
    assert fast.phases == plain.phases


@pytest.mark.parametrize("overrides,world", [
    (["shard.strategy=deepspeed_zero3", "method.name=lora", "quant.name=nf4", "quant.quant_storage=bfloat16",
      "model.dtype=bfloat16", "quant.compute_dtype=bfloat16", "train.activation_checkpointing=true",
      "train.grad_accum=2"], 2),
    (["shard.strategy=fsdp2", "method.name=lora", "quant.name=nf4", "quant.backend=torchao", "model.dtype=bfloat16",
      "quant.compute_dtype=bfloat16", "train.activation_checkpointing=true", "train.grad_accum=2"], 2),
    (["method.name=full", "optim.name=galore_adamw8bit", "optim.galore.rank=16", "optim.per_layer=true"], 1),
], ids=["zero3-qlora-bnb", "fsdp2-qlora-ao", "galore8bit-per-layer"])
def test_simulation_is_unchanged_by_the_interpreter_speedups(overrides, world, tmp_path):
    """The tracker's dispatch without torch's dynamo wrapper, no full garbage collections, and
    memoized dispatch-rule / Function-signature look-ups: byte-identical peak, breakdown and phase
    peaks; all of them were in force during the run and undone after it."""
    import inspect

    import torch._library.simple_registry as registry
    import torch.autograd.function as function

    import slimtune.plan.simulate as sim
    from slimtune.memory import MemoryTracker

    cfg = load_config(None, TINY + [f"output.dir={tmp_path}"] + overrides)
    seen = []

    real_foreach = sim._foreach_like_cuda

    def spy(optimizer, notes):  # called once the engine is built, inside the simulation's patches
        seen.append((MemoryTracker.__dict__["__torch_dispatch__"], function.inspect, registry.find_torch_dispatch_rule))
        real_foreach(optimizer, notes)

    wrapped = MemoryTracker.__dict__["__torch_dispatch__"]
    _cold_caches()
    with mock.patch.object(sim, "_foreach_like_cuda", spy):
        fast = simulate(cfg, world=world)
    dispatch, insp, rule = seen[0]
    # the tracker's own dispatch, without torch's dynamo wrapper, entered by the interpreter's patch
    assert dispatch is not wrapped and dispatch.__module__ == "slimtune.plan.interpreter"
    assert wrapped.__wrapped__ in [c.cell_contents for c in dispatch.__closure__]
    assert insp is not inspect and rule.__module__ == "slimtune.plan.interpreter"
    assert MemoryTracker.__dict__["__torch_dispatch__"] is wrapped and function.inspect is inspect  # undone
    assert registry.find_torch_dispatch_rule.__module__ == registry.__name__
    _cold_caches()
    with mock.patch.object(sim, "_plain_tracker_dispatch", contextlib.nullcontext), \
            mock.patch.object(sim, "_no_full_collections", contextlib.nullcontext), \
            mock.patch.object(sim, "_cached_torch_lookups", lambda: []):
        plain = simulate(cfg, world=world)
    assert fast.peak_bytes == plain.peak_bytes > 0
    assert fast.breakdown == plain.breakdown
    assert fast.phases == plain.phases


def test_memoized_signatures_bind_as_inspect_does():
    """The simulation's ``inspect`` for autograd Functions: ``bind(...).apply_defaults()`` gives
    inspect's own args and kwargs for every kind of signature, and the same errors."""
    import inspect

    from slimtune.plan.simulate import _CachedSignatures

    ours = _CachedSignatures(inspect)

    def two(a, b): ...
    def star(*args): ...
    def ctx_star(ctx, *args): ...
    def default(a, b=2): ...
    def keyword_only(a, *, c): ...

    calls = [(two, (1, 2), {}), (star, (1, 2, 3), {}), (star, (), {}), (ctx_star, (0, 1), {}), (default, (1,), {}),
             (default, (1, 3), {}), (two, (1,), {"b": 2}), (keyword_only, (1,), {"c": 3})]
    for fn, args, kwargs in calls:
        ref = inspect.signature(fn).bind(*args, **kwargs)
        got = ours.signature(fn).bind(*args, **kwargs)
        ref.apply_defaults()
        got.apply_defaults()
        assert (got.args, got.kwargs) == (ref.args, ref.kwargs), fn.__name__
    assert ours.signature(two) is ours.signature(two)  # memoized
    for bad_args in [(1, 2, 3), (1,)]:
        with pytest.raises(TypeError):
            ours.signature(two).bind(*bad_args)
    assert ours.Parameter is inspect.Parameter  # the rest is inspect's



def test_dispatch_rule_memo_answers_as_torch_outside_the_simulation():
    """torch's C++ may keep the memoized ``find_torch_dispatch_rule`` after a simulation (it holds
    the first function it finds): outside the simulation it must call the original every time."""
    import torch._library.simple_registry as registry

    from slimtune.plan.interpreter import _cached_torch_lookups

    op, cls, rule, seen = torch.ops.aten.mul.Tensor, torch.Tensor, object(), []
    with mock.patch.object(registry, "find_torch_dispatch_rule", lambda o, c: seen.append(1) or rule):
        switch, rule_patch, _ = _cached_torch_lookups()
    find_rule = rule_patch.new
    assert find_rule(op, cls) is rule and find_rule(op, cls) is rule and len(seen) == 2  # not simulating
    with switch:
        assert find_rule(op, cls) is rule and find_rule(op, cls) is rule and len(seen) == 3  # memoized
    assert find_rule(op, cls) is rule and len(seen) == 4  # after: the original again


def _deepspeed_release_rule():
    """DeepSpeed's own ``__params_to_release`` body (inside its NVTX wrapper and lru_cache)."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    from slimtune.plan.zero3_sim import _RELEASE

    outer = coordinator.PartitionedParameterCoordinator.__dict__[_RELEASE]
    cached = [c.cell_contents for c in outer.__closure__ if hasattr(c.cell_contents, "cache_info")]
    assert len(cached) == 1
    return cached[0].__wrapped__


def _release_answers(distance: int, tmp_path) -> tuple[list, object]:
    """A tiny ZeRO-3 simulation (LoRA, activation checkpointing, two micro-batches) with reuse
    distance ``distance``, recording for the first computation of every (submodule, step) the
    index's answer, DeepSpeed's own rule's answer and the submodule's releasable parameters."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    import slimtune.plan.zero3_sim as zsim

    ds = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_max_reuse_distance"] = distance
    (tmp_path / f"ds{distance}.json").write_text(json.dumps(ds))
    cfg = load_config(None, TINY + [f"output.dir={tmp_path}", "shard.strategy=deepspeed_zero3",
                                    f"shard.deepspeed_config={tmp_path / f'ds{distance}.json'}", "method.name=lora",
                                    "train.activation_checkpointing=true", "train.grad_accum=2"])
    reference = _deepspeed_release_rule()
    real_fast_release = zsim.fast_release
    answers: list = []

    def checking():
        patches = real_fast_release()
        fast = patches[0].new
        seen: set = set()

        def release(self, submodule, step_id):
            out = fast(self, submodule, step_id)
            if (id(submodule), step_id) not in seen:  # later calls hand out the cached (and updated) set
                seen.add((id(submodule), step_id))
                own = {p.ds_id for p in coordinator.iter_params(submodule) if not p.ds_persist}
                answers.append((set(out), reference(self, submodule, step_id), own))
            return out

        return [mock.patch.object(coordinator.PartitionedParameterCoordinator, zsim._RELEASE, release)] + patches[1:]

    _cold_caches()
    with mock.patch.object(zsim, "fast_release", checking):
        result = simulate(cfg, world=2)
    return answers, result


def test_release_index_answers_as_deepspeeds_rule(tmp_path):
    """ZeRO-3's release rule from the index (``zero3_sim.fast_release``) against DeepSpeed's own
    rule, answer by answer, for reuse distances from none through a partial window (a million
    elements of this 2-layer model) to the whole trace: the same sets, and the distance changes how many
    parameters stay gathered (whole simulations with and without the index: the zero3_speedups test)."""
    kept = {}
    for distance in (0, 1_000_000, 1_000_000_000):
        answers, result = _release_answers(distance, tmp_path)
        assert len(answers) > 50 and result.peak_bytes > 0
        assert all(ours == ref for ours, ref, _ in answers)
        kept[distance] = sum(len(own - ours) for ours, _, own in answers)  # releasable but kept gathered
    assert kept[0] < kept[1_000_000] < kept[1_000_000_000]


@pytest.mark.parametrize("accum", [2, 1], ids=["checked-at-reset_step", "checked-at-the-end"])
def test_release_index_goes_stale_loudly_and_the_simulation_reruns_without_it(accum, tmp_path):
    """When a trace module's parameters differ from what the index recorded (here the record is
    altered once, right after it is built: DeepSpeed itself stops with a tracing error when a
    module's parameters really change after its trace), the next ``reset_step`` -- or, with one
    micro-batch per step (no later forward), the end of the simulation -- raises
    ``StaleReleaseIndex`` and ``simulate`` runs again with DeepSpeed's own rule, and says so."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    import slimtune.plan.zero3_sim as zsim

    # two micro-batches: the check at the second one's start (reset_step, inside DeepSpeed's forward hook) raises
    cfg = load_config(None, TINY + [f"output.dir={tmp_path}", "shard.strategy=deepspeed_zero3", "method.name=lora",
                                    f"train.grad_accum={accum}"])
    real_init = zsim._Index.__init__
    built = []

    def recording_init(self, order, recurse, iter_params):
        real_init(self, order, recurse, iter_params)
        if not built:  # the first index only: its record of the first module with parameters loses one
            k = next(k for k, params in enumerate(self.snapshot) if params)
            self.snapshot[k] = self.snapshot[k][1:]
        built.append(self)

    index = zsim._Index((), False, coordinator.iter_params)
    assert index.end(0, 10) == 0 and not index.seen(1, 0, 0)
    _cold_caches()
    with mock.patch.object(zsim._Index, "__init__", recording_init):
        result = simulate(cfg, world=2)
    assert len(built) == 1  # the second run did without the index
    assert any("DeepSpeed's own release rule" in n and "changed after" in n for n in result.notes)
    _cold_caches()
    with mock.patch.object(zsim, "fast_release", lambda: []):
        plain = simulate(cfg, world=2)
    assert result.peak_bytes == plain.peak_bytes > 0 and result.breakdown == plain.breakdown
