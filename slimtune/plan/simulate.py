"""``slimtune plan --simulate``: build the run as ``train`` does, on fake tensors, with a fake
process group of N ranks, run real training steps and report one rank's tracked peak.

What runs is the trainer's own code: ``models.load_model(meta=True)``, the ``PRUNERS`` /
``QUANTIZERS`` / ``METHODS`` / ``SHARDERS`` / ``OPTIMIZERS`` tables, the engine's
``micro_step`` / ``backward`` / ``clip_and_step`` and the trainer's loss. Nothing is allocated:
every tensor is a ``FakeTensor`` (shape, dtype, device only), and
``slimtune.memory.MemoryTracker`` counts the storages those ops would allocate.

Where fake tensors cannot run the real step, this module does the smallest equivalent thing
and says so (``SimResult.notes``):

* bitsandbytes builds ``Params4bit`` with ``Tensor._make_subclass``, which a FakeTensor cannot
  enter. :func:`_quantize_bnb` runs bitsandbytes' own ``quantize_4bit`` on the fake weight (its
  ops have fake kernels) -- once per weight shape; later weights of that shape get new fake
  tensors of the same shapes and dtypes -- and installs the packed data and ``QuantState`` in
  the same ``Linear4bit`` class ``slimtune.quant.bnb`` builds, as a plain frozen Parameter (the
  form ``memory.fake_module`` gives any parameter subclass). Same shapes, dtypes and forward.
* Importance scores (LoRAM taylor/magnitude, S2FT activation/gradient scores) need values:
  the selection is made at random with the same counts, so every shape is the run's.
* Scalar reads of fake tensors (``float(loss)``, ``int(n_tokens)``, the engines'
  ``float(grad_norm)``) have no value; while simulating they read as 1. They only feed logs.
* The device mesh is created before entering fake mode (``init_device_mesh`` reads rank
  values) and handed to the FSDP2 engine in place of ``launch.fsdp2.make_mesh``.
* Batches are full ``max_seq_len`` sequences without padding or packing (the worst case of
  a padded batch; packing adds one boolean mask, counted by the analytic estimate). Fake
  tensors have no values, so two kernel choices are answered as a real batch gets them:
  SDPA's fused-kernel choice (:func:`_fused_attention_choice`) and transformers' skipping of
  an all-ones mask (:func:`_maskless_causal`).
* The accelerator is the CPU, where a host-to-GPU copy is no copy: ZeRO-3 with offloaded
  parameters on one rank per partition group copies them as a GPU would
  (``plan.zero3_sim.host_partition_copies``), and FSDP2 with CPU offload copies each host
  shard to the GPU before its all-gather (``plan.fsdp2_sim.host_shard_copies``); table
  ``SHARD_ON_GPU``, with ``cuda_defaults``.

Speed (a 70B recipe is a few hundred thousand fake ops): nothing is skipped or extrapolated --
every layer of every micro-batch runs. What is made cheaper is the cost per op:
``memory.fast_fake_ops`` memoizes fake ops one level above ``FakeTensorMode`` (keys without the
storage offsets a functional op cannot depend on, outputs built directly; a view's first call runs
its meta kernel directly; ops that return nothing are answered once per layout, foreach ops (in
place or not) once per distinct element layout; ``c10d`` collectives run their fake-process-group kernel
without the mode's per-call checks); the tracker and
:func:`_fast_device_mode` answer ``prim.device`` (about 60% of dispatches) in place and pass views
through; and ``memory.fast_fake_cache_keys`` computes ``FakeTensorMode``'s own cache keys in one
tuple per tensor. Two more remove work that allocates nothing a tracker would see differently:
``memory.fast_strided_shard_flag`` (FSDP2) makes one quadratic scan of DTensor's foreach sharding
propagation linear, ``memory.fast_foreach_strategies`` (FSDP2) computes its per-element strategies
once per distinct element, DTensor's sharding propagation runs in one fake mode of its own
whose ops the memo answers too (``plan.fsdp2_sim.own_propagation_mode``, ``memory.also_memoize``),
and :func:`replay_nf4_dequant` (torchao NF4) repeats the tracker events of
torchao's dequantization, recorded once per weight layout, instead of re-running its 20-odd fake
ops 9 times per linear per step (``memory.replay_pure_calls``); ZeRO-3's parameter-release rule is
answered from an index of its trace (``plan.zero3_sim.fast_release``). And the interpreter's own
overheads, where nothing a tracker sees depends on them: the tracker's dispatch runs without
torch's dynamo-disable wrapper (:func:`_plain_tracker_dispatch`), no automatic full garbage
collection runs while simulating (:func:`_no_full_collections`), torch's dispatch-rule look-up and
autograd Functions' signatures are memoized (:func:`_cached_torch_lookups`; these three live in ``plan.interpreter``), and the CLI keeps
``torch.compile`` from importing Inductor (``plan.cli._uncompiled``).
tests/unit/test_simulate_speed.py and tests/unit/test_fast_ops.py check that the peak, breakdown
and phase peaks are byte-identical with and without each of them. Wall times of the 70B recipes:
docs/planner.md.

DTensor's sharding propagation (FSDP2) builds fake tensors to derive output metadata; in a real
run they live in a fake mode of their own and allocate nothing, and while simulating they do too
(``plan.fsdp2_sim.own_propagation_mode``), so they are not counted, and a second simulation in one
process reports what the first did although DTensor's cache of those answers is then warm.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator
from unittest import mock

import torch
from torch import nn

# Optimizer classes whose CUDA default is the foreach implementation (one set of temporaries
# for all parameters); on the fake CPU device torch would pick the per-tensor loop.
_FOREACH_ON_CUDA = ("AdamW", "Adam")


@dataclass
class SimResult:
    """One rank's tracked peak. ``peak_bytes`` / ``breakdown``: on the GPU, the peak over time of
    what is not in host memory under CPU offload (see :func:`_host_memory`), and ``host_bytes`` the
    host part at that moment; ``tracked_bytes``: the peak of everything the tracker saw (fake
    tensors all sit on one fake device); ``phases``: per-phase peaks of everything tracked."""

    peak_bytes: int
    breakdown: dict[str, int]
    phases: dict[str, dict]
    world: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    tracked_bytes: int = 0
    host_bytes: int = 0


def _host_memory(cfg, world: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a CUDA run keeps in host memory, as ``MemoryTracker(host_categories=, host_phases=)``:
    with CPU offload the sharded parameters (FSDP2 ``CPUOffloadPolicy``, ZeRO-3 ``offload_param``:
    weights, trainable), the gradients and optimizer state (FSDP2, ZeRO-3 ``offload_optimizer``)
    and then also what the optimizer step allocates (it runs on the host). On the fake CPU device
    everything sits on one device: the tracker keeps these apart and records the peak of the rest
    over time (the GPU peak)."""
    from slimtune.plan.sharding import SHARD_PLANS

    params_off, opt_off = SHARD_PLANS[cfg.shard.strategy].offloads(cfg, world)
    categories = (("weights", "trainable") if params_off else ()) + (("optimizer", "grads") if opt_off else ())
    return categories, (("optimizer",) if opt_off else ())


def _gpu_peak(tracker, model: nn.Module, host_categories: tuple[str, ...]) -> tuple[int, dict[str, int], int]:
    """The tracker's device peak (bytes, breakdown) and the host bytes at that moment, with
    bitsandbytes' quantization state on the GPU: a plain attribute of the weight, which parameter
    offload leaves there throughout (so it is added whatever the peak's moment), although the
    tracker counts it with the offloaded weights."""
    on_gpu = 0
    if "weights" in host_categories:
        from slimtune.launch.report import _quant_state_bytes

        on_gpu = sum(_quant_state_bytes(p) for p in model.parameters())
    breakdown = tracker.device_peak_breakdown
    breakdown["weights"] += on_gpu
    return tracker.device_peak_bytes + on_gpu, breakdown, tracker.device_peak_host_bytes - on_gpu


# --------------------------------------------------------------------------- fake-mode helpers
@contextlib.contextmanager
def _fake_scalars() -> Iterator[None]:
    """Scalar reads of fake tensors return 1 (see module doc)."""
    from torch._subclasses.fake_tensor import FakeTensor

    saved = {k: FakeTensor.__dict__.get(k) for k in ("__float__", "__int__", "item")}
    FakeTensor.__float__ = lambda self: 1.0
    FakeTensor.__int__ = lambda self: 1
    FakeTensor.item = lambda self: 1.0 if self.is_floating_point() else 1
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(FakeTensor, k)
            else:
                setattr(FakeTensor, k, v)


def _real_like(t):
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu").requires_grad_(t.requires_grad)


@contextlib.contextmanager
def _fused_attention_choice() -> Iterator[None]:
    """SDPA asks ``aten._fused_sdp_choice`` which kernel to run; fake tensors answer with the
    meta kernel's choice (the math path, which keeps the s x s probabilities). Answer as the
    real CPU dispatcher does for tensors of the same shape, strides and dtype (the flash
    kernel where a real run uses it, which keeps what CUDA's flash kernel keeps)."""
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    op = torch.ops.aten._fused_sdp_choice.default
    table = fake_impls.op_implementations_dict

    def choice(fake_mode, func, *args, **kwargs):
        with unset_fake_temporarily():
            return func(*[_real_like(a) for a in args], **{k: _real_like(v) for k, v in kwargs.items()})

    previous = table.get(op)
    table[op] = choice
    try:
        yield
    finally:
        if previous is None:
            del table[op]
        else:
            table[op] = previous


@contextlib.contextmanager
def _maskless_causal(packed: bool) -> Iterator[None]:
    """transformers counts fake tensors as graph tracing and then always builds the 4-D causal
    mask (and expands K/V to every head for it). A real unpadded batch (no cache) runs SDPA
    causal without a mask: while simulating, ``_ignore_causal_mask_sdpa`` gives that answer
    for a batch without padding mask and with equal query and key lengths (its own rule), and
    ``find_packed_sequence_indices`` finds no packed sequences (the simulated batch is not
    packed: positions 0..s-1 in every row, for which it returns None)."""
    import transformers.masking_utils as mu

    real = mu._ignore_causal_mask_sdpa

    def ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is None and q_length == kv_length and (local_attention_size is None or kv_length < local_attention_size):
            return True
        return real(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    if packed:  # transformers finds the packed records (on fake positions it keeps its mask: no skip)
        yield
        return
    # position ids 0..s-1 in every row (the unpacked batch): one sequence per row
    with mock.patch.object(mu, "_ignore_causal_mask_sdpa", ignore), \
            mock.patch.object(mu, "find_packed_sequence_indices", lambda position_ids: None):
        yield


@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """A ``fake`` process group of ``world`` ranks (this process is rank 0)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan --simulate needs a process without a process group (one is already initialised)")
    # DeepSpeed's comm setup writes RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_*) into the
    # environment; a later ``train`` in this process would then try an env:// rendezvous
    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CROSS_RANK", "CROSS_SIZE")
    env_before = {k: os.environ.get(k) for k in env_keys}
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and ds_comm.cdb is not None and dist.is_initialized():
            # DeepSpeed keeps references to the groups it was given: release them with the group
            ds_comm.destroy_process_group()
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _bnb_dynamic_map(fake_mode) -> Iterator[None]:
    """bitsandbytes builds its 256-entry dynamic map lazily with data-dependent ops; build it
    for real and hand the fake mode a fake copy while simulating."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from slimtune.quant.bnb import import_bitsandbytes

    bf = import_bitsandbytes().functional
    had = "dynamic" in bf.name2qmap
    with unset_fake_temporarily():
        real = bf.name2qmap["dynamic"] if had else bf.create_dynamic_map()
    bf.name2qmap["dynamic"] = fake_mode.from_tensor(real)
    try:
        yield
    finally:
        if had:
            bf.name2qmap["dynamic"] = real
        else:
            del bf.name2qmap["dynamic"]


# --------------------------------------------------------------------------- untracked ops
def _fast_device_mode():
    """A dispatch mode for the untracked parts of the simulation (build, step 1's micro-batch):
    it answers ``prim.device`` -- which fake tensors ask for most ops, about 60% of all
    dispatches -- as ``FakeTensorMode``'s own handler does, and passes every other op on.
    ``MemoryTracker`` has the same fast path for the tracked part."""
    from torch._subclasses.fake_tensor import FakeTensor, _device_handler
    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type

    from slimtune.memory.fast_ops import call_op

    device_op = torch.ops.prim.device.default
    no_subclass_tf = torch._C.DisableTorchFunctionSubclass

    class FastDevice(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # no torch.compile wrapper around every dispatch: see _plain_tracker_dispatch

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is device_op and type(args[0]) is FakeTensor:
                return _device_handler(args)
            for t in types:
                if t is not FakeTensor and is_traceable_wrapper_subclass_type(t):
                    return NotImplemented  # DTensor / NF4 unwrap first, as under the tracker
            with no_subclass_tf():
                return call_op(func, args, kwargs or {})

    return FastDevice()


from slimtune.plan.interpreter import (  # noqa: E402  (entered by simulate(); patched by the tests)
    _CachedSignatures, _cached_torch_lookups, _no_full_collections, _plain_tracker_dispatch)
from slimtune.plan.fsdp2_sim import fsdp2_patches, host_shard_copies  # noqa: E402
from slimtune.plan.zero3_sim import host_partition_copies, zero3_patches  # noqa: E402


# --------------------------------------------------------------------------- engines
# shard.strategy -> patches that let its engine run on fake tensors (one table, as launch.SHARDERS)
SHARD_SIMULATION = {
    "none": lambda world, notes: [],
    "fsdp2": fsdp2_patches,
    "deepspeed_zero3": zero3_patches,
}
# shard.strategy -> patches (given the built engine) for what a GPU does that the CPU accelerator does not
SHARD_ON_GPU = {
    "none": lambda engine, notes: [],
    "fsdp2": host_shard_copies,
    "deepspeed_zero3": host_partition_copies,
}


# --------------------------------------------------------------------------- build
def _meta_model(cfg) -> nn.Module:
    """``models.load_model(meta=True)``; a ``model.path`` without config.json here is built
    from the architecture the planner matched (``plan.spec.hf_config``)."""
    from pathlib import Path

    from slimtune.models import DTYPES, load_model

    if cfg.model.preset is not None or (Path(cfg.model.path) / "config.json").is_file():
        model, _ = load_model(cfg.model, meta=True)
        return model
    from transformers import AutoModelForCausalLM

    from slimtune.plan.spec import hf_config

    config, _ = hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype],
                                                 attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    return model


def _prune(model: nn.Module, cfg, fake_mode, notes: list[str]) -> None:
    """Structured pruning with the run's counts (random units: importance needs values). The
    units are drawn for real (seeded CPU generator, outside the fake mode); the weights are
    sliced in it."""
    p = cfg.pruning
    if p.strategy == "none":
        return
    if p.strategy in ("random", "structured"):
        from slimtune.pruning.structured import apply_structured, select

        pm = select(model, cfg, "random")
        with fake_mode:
            apply_structured(model, pm)
        if p.strategy == "structured":
            notes.append(f"pruning: {p.importance or 'taylor'} importance needs real values; the same number of "
                         "heads and channels was chosen at random (identical shapes)")
        if p.alignment.enabled:
            notes.append("pruning.alignment (continued pre-training of the pruned model, cached) is a separate "
                         "run before this one and is not part of this plan")
        return
    notes.append(f"pruning.strategy={p.strategy} zeroes weights in place (no change of GPU bytes); its masks "
                 "stay in host memory")


def _quantize_bnb(model: nn.Module, qcfg) -> None:
    """bitsandbytes NF4 on fake weights (see module doc): ``quant.bnb.quantize_linear``'s module,
    with the packed data and state bitsandbytes' ``quantize_4bit`` computes."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from slimtune.quant import iter_quantize
    from slimtune.quant import bnb as qbnb

    bf = qbnb.import_bitsandbytes().functional

    done: dict = {}  # (shape, dtype) -> (packed, QuantState) of the first weight of that shape

    def fresh(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) if isinstance(t, torch.Tensor) else t

    def like(packed, state):
        """New fake tensors with the shapes and dtypes bitsandbytes produced for this shape."""
        new = copy.copy(state)
        new.absmax, new.code, new.offset = fresh(state.absmax), fresh(state.code), fresh(state.offset)
        if state.state2 is not None:
            new.state2 = copy.copy(state.state2)
            new.state2.absmax, new.state2.code = fresh(state.state2.absmax), fresh(state.state2.code)
        return fresh(packed), new

    def quantize_linear(linear: nn.Linear, cfg) -> nn.Module:
        storage = qbnb._DTYPES[cfg.quant_storage]
        cls = qbnb.import_bitsandbytes().nn.Linear4bit if qbnb._native_cpu_kernel_ok(linear.in_features, cfg.block_size) \
            else qbnb._row_straddling_class()
        with unset_fake_temporarily():  # the module shell on the meta device, as quant.bnb builds it
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      compute_dtype=qbnb._DTYPES[cfg.compute_dtype], compress_statistics=cfg.double_quant,
                      quant_type="nf4", quant_storage=storage, device="meta")
        w = linear.weight.detach()
        key = (tuple(w.shape), w.dtype)
        if key not in done:
            done[key] = bf.quantize_4bit(w, blocksize=cfg.block_size, compress_statistics=cfg.double_quant,
                                         quant_type="nf4", quant_storage=storage)
            packed, state = done[key]
        else:
            packed, state = like(*done[key])
        weight = nn.Parameter(packed, requires_grad=False)
        weight.quant_state = state
        weight.blocksize, weight.compress_statistics, weight.quant_type = cfg.block_size, cfg.double_quant, "nf4"
        weight.quant_storage, weight.bnb_quantized, weight.module = storage, True, new
        new.weight = weight
        new.quant_state = state
        new.bias = linear.bias
        new.support_avx512bf16_for_cpu = False
        new.train(linear.training)
        return new

    with mock.patch.object(qbnb, "quantize_linear", quantize_linear):
        for _ in iter_quantize(model, qcfg):
            pass


def _fresh_like(t):
    """A new fake tensor with ``t``'s shape, strides and dtype (wrapper subclasses rebuilt from
    fresh inner tensors)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not isinstance(t, torch.Tensor):
        return t
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        return type(t).__tensor_unflatten__({n: _fresh_like(getattr(t, n)) for n in names}, ctx, t.shape, t.stride())
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _quantize_bnb_sim(model: nn.Module, qcfg, fake_mode, notes: list[str]) -> None:
    with _bnb_dynamic_map(fake_mode):
        _quantize_bnb(model, qcfg)
    notes.append("bitsandbytes NF4: packed data and QuantState from bitsandbytes' quantize_4bit on fake weights "
                 "(once per weight shape), installed as plain frozen parameters of Linear4bit (Params4bit cannot "
                 "wrap a fake tensor)")


def _quantize_torchao_sim(model: nn.Module, qcfg, fake_mode, notes: list[str]) -> None:
    """``quant.QUANTIZERS`` with torchao's ``to_nf4`` run once per weight shape; later weights of
    that shape get an ``NF4Tensor`` of fresh fake inner tensors with the same shapes and dtypes
    (``to_nf4`` is several hundred fake ops per weight: most of a 70B build otherwise)."""
    from slimtune.quant import QUANTIZERS
    from slimtune.quant import ao

    nf4 = ao._nf4_module()
    real = nf4.to_nf4
    done: dict = {}

    def to_nf4(tensor, block_size=64, scaler_block_size=256):
        key = (tuple(tensor.shape), tensor.dtype, block_size, scaler_block_size)
        if key not in done:
            done[key] = real(tensor, block_size, scaler_block_size)
            return done[key]
        return _fresh_like(done[key])

    with mock.patch.object(nf4, "to_nf4", to_nf4):
        QUANTIZERS[qcfg.name](model, qcfg)
    notes.append("torchao NF4: to_nf4 on fake weights once per weight shape; later weights of that shape get fresh "
                 "fake NF4 tensors of the same layout")


def _tensor_layout(t) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)


def _nf4_layout(w) -> tuple:
    """What torchao's ``NF4Tensor.get_original_weight`` allocates depends on: the layouts of the
    tensor and its inner tensors (not their storage offsets: it makes no views of them)."""
    return (_tensor_layout(w), w.block_size, w.n_blocks, w.scaler_block_size,
            *(_tensor_layout(getattr(w, n)) for n in w.__tensor_flatten__()[0]))


def replay_nf4_dequant():
    """torchao's NF4 dequantization (``get_original_weight``: 20-odd fake ops, run 9 times per
    linear per step) through ``memory.replay_pure_calls``: the tracker sees the same
    allocations and releases in the same order (tests/unit/test_simulate_speed.py)."""
    from slimtune.memory import replay_pure_calls
    from slimtune.quant import ao

    return replay_pure_calls(ao._nf4_module().NF4Tensor, "get_original_weight", _nf4_layout)


# quant.backend -> how ``plan --simulate`` quantizes on fake tensors (one table, as quant.BACKENDS)
QUANT_SIMULATION = {"bitsandbytes": _quantize_bnb_sim, "torchao": _quantize_torchao_sim}


def _attach(model: nn.Module, cfg, notes: list[str]) -> None:
    from slimtune.adapters import get_method
    from slimtune.plan.methods import METHOD_PLANS

    cfg, context = METHOD_PLANS[cfg.method.name].simulation(cfg, notes)
    with context:
        get_method(cfg.method.name).attach(model, cfg)


def build_fake_model(cfg, fake_mode, notes: list[str]) -> nn.Module:
    """``trainer.loop.build_model`` on fake tensors: meta build -> fake parameters -> prune ->
    quantize -> attach -> kernels -> activation checkpointing."""
    from slimtune.memory import fake_module
    from slimtune.quant import QUANTIZERS

    model = _meta_model(cfg)
    fake_module(model, fake_mode, device="cpu")
    _prune(model, cfg, fake_mode, notes)
    with fake_mode:
        if cfg.quant.name == "none":
            QUANTIZERS[cfg.quant.name](model, cfg.quant)
        else:
            QUANT_SIMULATION[cfg.quant.backend](model, cfg.quant, fake_mode, notes)
        _attach(model, cfg, notes)
        if cfg.kernels.enabled:
            from slimtune.kernels import apply as apply_kernels

            apply_kernels(model, cfg.kernels)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# --------------------------------------------------------------------------- steps
def loss_fn(cfg):
    """The trainer's loss for this config: ``token_loss_sum``, or the fused one with
    ``kernels.enabled`` and ``kernels.fused_loss``."""
    if cfg.kernels.enabled and cfg.kernels.fused_loss:
        from slimtune.kernels import token_loss_sum_fused

        return lambda model, batch: token_loss_sum_fused(model, batch, chunk_tokens=cfg.kernels.loss_chunk_tokens)
    from slimtune.trainer.loss import token_loss_sum

    return token_loss_sum


def make_batch(cfg, vocab: int, fake: bool = False) -> dict:
    """One full micro-batch: ``max_seq_len`` tokens per row, every label counted, no padding.

    Unpacked: a real all-ones attention mask lets transformers drop the mask (SDPA runs causal
    without one); a fake mask has no values, so the fake batch passes none, which is what the
    real one amounts to. Packed (``data.packing``): two records per row, positions restarting
    at the middle, no attention mask (``data.collate`` / ``data.model_inputs``): transformers
    builds the block-diagonal mask from the positions."""
    b, s = cfg.train.micro_batch_size, cfg.data.max_seq_len
    ids = torch.randint(0, vocab, (b, s))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": None if fake else torch.ones_like(ids)}
    if cfg.data.packing:
        half = s // 2
        batch["position_ids"] = torch.cat([torch.arange(half), torch.arange(s - half)]).expand(b, s).contiguous()
    return batch


class _Untracked:
    """Stands in for the tracker outside the tracked window (phases are no-ops)."""

    @staticmethod
    def phase(name):
        return contextlib.nullcontext()


def micro_batches(engine, cfg, vocab: int, tracker=_Untracked, fake: bool = False, micro: int | None = None) -> list:
    """The forward/backward half of one optimizer step, as ``trainer.loop.train`` runs it: all
    of the step's micro-batches fetched first, then each under ``engine.micro_step`` (no-sync /
    sync on the last). Returns the fetched batches (the trainer holds them through the step).

    ``micro``: run only this many of the ``grad_accum`` micro-batches (all are still fetched).
    From the second micro-batch on, memory repeats (gradients accumulate in place), so the
    simulation runs 2: the first (no sync) and the last (sync)."""
    loss = loss_fn(cfg)
    accum = cfg.train.grad_accum
    run = accum if micro is None else max(1, min(accum, micro))
    batches = [make_batch(cfg, vocab, fake) for _ in range(accum)]
    global_tokens = float(accum * cfg.train.micro_batch_size * (cfg.data.max_seq_len - 1))
    for i in range(run):
        with engine.micro_step(is_last=i == run - 1):
            with tracker.phase("forward"):
                loss_sum, _ = loss(engine.model, batches[i])
            with tracker.phase("backward"):
                engine.backward(loss_sum / global_tokens)
        del loss_sum
    return batches


def optimizer_step(engine, cfg, tracker=_Untracked) -> None:
    with tracker.phase("step"):
        engine.clip_and_step(cfg.optim.max_grad_norm)


def train_step(engine, cfg, vocab: int, tracker=_Untracked, fake: bool = False, micro: int | None = None) -> None:
    """One optimizer step: :func:`micro_batches` then :func:`optimizer_step`."""
    batches = micro_batches(engine, cfg, vocab, tracker, fake, micro)
    optimizer_step(engine, cfg, tracker)
    del batches


def _foreach_like_cuda(optimizer, notes: list[str]) -> None:
    inner = getattr(optimizer, "inner", [optimizer])
    changed = False
    for opt in inner:
        if type(opt).__name__ in _FOREACH_ON_CUDA:
            for g in opt.param_groups:
                if g.get("foreach") is None:
                    g["foreach"] = True
                    changed = True
    if changed:
        notes.append("AdamW uses its foreach implementation, as torch chooses on CUDA")


def simulate(cfg, world: int = 1, steps: int = 2, cuda_defaults: bool = True, fast_ops: bool = True) -> SimResult:
    """Build and run ``cfg`` as rank 0 of ``world`` on fake tensors; return its tracked peak. Run
    again with DeepSpeed's own release rule if the model changed under ZeRO-3's release index."""
    from slimtune.plan import zero3_sim

    try:
        return _simulate(cfg, world, steps, cuda_defaults, fast_ops)
    except zero3_sim.StaleReleaseIndex as err:
        with mock.patch.object(zero3_sim, "fast_release", lambda: []):
            result = _simulate(cfg, world, steps, cuda_defaults, fast_ops)
        result.notes.append(f"ZeRO-3: {err}; simulated again with DeepSpeed's own release rule")
        return result


def _simulate(cfg, world: int, steps: int, cuda_defaults: bool, fast_ops: bool) -> SimResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from slimtune.launch import SHARDERS, track_engine
    from slimtune.launch.dist import DistInfo
    from slimtune.memory import (MemoryTracker, fast_fake_cache_keys, fast_fake_ops, fast_foreach_strategies,
                                 fast_strided_shard_flag)
    from slimtune.optim import build_optimizer

    t0 = time.perf_counter()
    notes: list[str] = []
    info = DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"))
    sharded = cfg.shard.strategy != "none"
    with contextlib.ExitStack() as stack:
        stack.enter_context(fast_fake_cache_keys())
        stack.enter_context(_plain_tracker_dispatch())
        stack.enter_context(_no_full_collections())
        for patch in _cached_torch_lookups():
            stack.enter_context(patch)
        if sharded or world > 1:
            stack.enter_context(fake_process_group(world))
        if cfg.shard.strategy == "fsdp2":
            stack.enter_context(fast_strided_shard_flag())
            stack.enter_context(fast_foreach_strategies())
        if cfg.quant.name != "none" and cfg.quant.backend == "torchao":
            stack.enter_context(replay_nf4_dequant())
        for patch in SHARD_SIMULATION[cfg.shard.strategy](world, notes):
            stack.enter_context(patch)
        fake_mode = FakeTensorMode()
        if fast_ops:
            stack.enter_context(fast_fake_ops(fake_mode))
        with _fast_device_mode():
            model = build_fake_model(cfg, fake_mode, notes)
        vocab = model.config.vocab_size
        stack.enter_context(fake_mode)
        stack.enter_context(_fake_scalars())
        stack.enter_context(_fused_attention_choice())
        stack.enter_context(_maskless_causal(cfg.data.packing))
        with _fast_device_mode():
            engine = SHARDERS[cfg.shard.strategy](model, cfg, info, build_optimizer)
        stack.callback(engine.close)  # on the way out, under the fake mode still (also after an error)
        if cuda_defaults:
            _foreach_like_cuda(engine.optimizer, notes)
            for patch in SHARD_ON_GPU[cfg.shard.strategy](engine, notes):
                stack.enter_context(patch)
        # Before step 1's optimizer step there is no optimizer state, so step 1's forward/backward
        # cannot exceed a later step's: it runs one micro-batch, untracked. The tracker registers what
        # is alive (weights, trainable parameters, gradients) and records step 1's optimizer step
        # (state created; GaLore's first SVD) and every later step in full.
        with _fast_device_mode():
            batches = micro_batches(engine, cfg, vocab, fake=True, micro=1)
        host_categories, host_phases = _host_memory(cfg, world)
        tracker = MemoryTracker(host_categories=host_categories, host_phases=host_phases)
        track_engine(tracker, model, engine)
        tracker.register(batches, "temporaries")
        with tracker:
            optimizer_step(engine, cfg, tracker)
            del batches
            for _ in range(max(1, steps - 1)):
                train_step(engine, cfg, vocab, tracker, fake=True, micro=2)
        if cfg.train.grad_accum > 2:
            notes.append(f"gradient accumulation: 2 of the {cfg.train.grad_accum} micro-batches of each step were run "
                         "(all were fetched, as the trainer does); micro-batches 3.. repeat the second one's memory")
    peak, gpu, host = _gpu_peak(tracker, model, host_categories)
    if host_categories:
        notes.append("CPU offload: what the run keeps in host memory (" + ", ".join(host_categories)
                     + (", and what the optimizer step allocates" if host_phases else "")
                     + ") is not counted in the GPU peak, the largest GPU part over time")
    return SimResult(peak_bytes=peak, breakdown=gpu, phases=tracker.phase_peaks, world=world,
                     seconds=time.perf_counter() - t0, notes=notes, tracked_bytes=tracker.peak_bytes, host_bytes=host)


def measure_real(cfg, steps: int = 2, seed: int = 0) -> SimResult:
    """The same steps on real tensors (a CPU run of a small model): ``trainer.loop.build_model``
    and the engine, tracked by ``MemoryTracker`` -- the reference the planner is tested against.
    ``tracked_bytes``: the peak of everything (all on the CPU); ``peak_bytes`` / ``breakdown``: what
    a GPU run would hold on the GPU, split off as :func:`simulate` does (the same without offload)."""
    from slimtune.launch import SHARDERS, track_engine
    from slimtune.launch.dist import DistInfo
    from slimtune.memory import MemoryTracker
    from slimtune.optim import build_optimizer
    from slimtune.trainer.loop import build_model

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    model, _ = build_model(cfg, "cpu")
    if cfg.kernels.enabled:
        from slimtune.kernels import apply as apply_kernels

        apply_kernels(model, cfg.kernels)
    engine = SHARDERS[cfg.shard.strategy](model, cfg, info, build_optimizer)
    host_categories, host_phases = _host_memory(cfg, world)
    tracker = MemoryTracker(host_categories=host_categories, host_phases=host_phases)
    track_engine(tracker, model, engine)
    try:
        with tracker:
            for _ in range(steps):
                train_step(engine, cfg, model.config.vocab_size, tracker)
    finally:
        engine.close()
    peak, gpu, host = _gpu_peak(tracker, model, host_categories)
    return SimResult(peak_bytes=peak, breakdown=gpu, phases=tracker.phase_peaks, world=world,
                     seconds=time.perf_counter() - t0, tracked_bytes=tracker.peak_bytes, host_bytes=host)
