"""DeepSpeed ZeRO-3 on fake tensors (``plan.simulate``): what lets its engine run there
(:func:`zero3_patches`), and speed-ups that leave every tracked byte as it was.

The release rule, answered from an index while simulating.

After each submodule's forward or backward, DeepSpeed's ``PartitionedParameterCoordinator``
asks ``__params_to_release(submodule, step_id)`` which of the submodule's gathered parameters it
may free: its non-persistent parameters, less those the prefetcher already fetched for a later
step, less every parameter of the modules that the trace runs next, until
``stage3_max_reuse_distance`` elements of them have been walked. DeepSpeed memoizes the answer per
``(submodule, step_id)`` (``functools.lru_cache``), so the first pass with a complete trace pays it
once per step: for the 80-layer ZeRO-3 QLoRA recipe 6,168 steps, each walking the trace module by
module (``iter_params`` per module) over the next few layers -- 2.39 s of its simulation (12,336
calls timed one by one in one run; 0.20 s with the index below).

:func:`fast_release` installs the same rule, memoized the same way (the answer of a step is
computed once and the same set object handed out again, as DeepSpeed's cache does; DeepSpeed's
callers add to it), computed from an index of the frozen trace: the cumulative number of elements
walked up to each position, and the positions at which each parameter appears. The walk's end is a
bisection on the cumulative count; whether a candidate appears before it, a bisection on its
positions. Same answers, in microseconds.

The index records what ``iter_params`` answered for each module of the trace when it was built.
DeepSpeed's own cache already assumes those answers do not change once the trace is complete;
every ``reset_step`` (the start of each forward) and the end of the simulation check them again,
and a change raises :class:`StaleReleaseIndex` (as does a complete trace that DeepSpeed did not
freeze), on which ``plan.simulate`` runs the simulation again without the index (tests/unit/test_simulate_speed.py compares each answer with DeepSpeed's
own, for reuse distances from none to the whole trace, and checks that rerun)."""
from __future__ import annotations

import bisect
import collections
import contextlib
import functools
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn

_RELEASE = "_PartitionedParameterCoordinator__params_to_release"
_ORDER = "_PartitionedParameterCoordinator__submodule_order"
_FETCHED = "_PartitionedParameterCoordinator__most_recent_step_id_param_fetched_for"
_REUSE = "_PartitionedParameterCoordinator__max_reuse_dist_in_numel"


class StaleReleaseIndex(RuntimeError):
    """A module of the trace answered ``iter_params`` differently from when the index was built."""


class _Index:
    """Positions and cumulative element counts of one frozen trace, walked with one ``recurse``."""

    def __init__(self, order: tuple, recurse: bool, iter_params) -> None:
        self.order, self.recurse = order, recurse  # the trace held: its id stays its own
        self.snapshot = [tuple(iter_params(m, recurse=recurse)) for m in order]
        self.walked = [0]  # elements walked before each position
        self.positions: dict = {}  # ds_id -> ascending positions in the trace
        for k, params in enumerate(self.snapshot):
            total = self.walked[-1]
            for p in params:
                self.positions.setdefault(p.ds_id, []).append(k)
                total += p.ds_numel
            self.walked.append(total)

    def end(self, step_id: int, distance: int) -> int:
        """Where DeepSpeed's walk from ``step_id`` stops: the first position at which the elements
        walked since ``step_id`` reach ``distance`` (checked before each module), else the end."""
        n = len(self.order)
        if step_id >= n:
            return step_id
        return bisect.bisect_left(self.walked, self.walked[step_id] + distance, step_id, n)

    def seen(self, ds_id, start: int, stop: int) -> bool:
        pos = self.positions.get(ds_id)
        if not pos:
            return False
        i = bisect.bisect_left(pos, start)
        return i < len(pos) and pos[i] < stop

    def check(self, iter_params) -> None:
        for k, m in enumerate(self.order):
            now = tuple(iter_params(m, recurse=self.recurse))
            if len(now) != len(self.snapshot[k]) or any(a is not b for a, b in zip(now, self.snapshot[k])):
                raise StaleReleaseIndex(f"the parameters of trace module {k} ({type(m).__name__}) changed after "
                                        "ZeRO-3's trace was complete")


def fast_release():
    """Patches of ``PartitionedParameterCoordinator``: ``__params_to_release`` from the index,
    ``reset_step`` checking its coordinator's indexes first, and a last check of every index when
    the simulation leaves without an error (see module doc)."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    cls = coordinator.PartitionedParameterCoordinator
    indexes: dict = {}  # (id(coordinator), id(trace), recurse) -> (coordinator, _Index); both held

    def check(owner=None) -> None:
        for held, index in list(indexes.values()):
            if owner is None or held is owner:
                index.check(coordinator.iter_params)

    @functools.lru_cache(maxsize=None)
    def params_to_release(self, submodule, step_id: int) -> set:
        # DeepSpeed's rule, step for step (deepspeed/runtime/zero/partitioned_param_coordinator.py)
        if not self.is_complete_trace():
            raise RuntimeError("expected trace to be complete")
        order = getattr(self, _ORDER)
        if type(order) is not tuple:  # DeepSpeed freezes the trace into a tuple as it completes it
            raise StaleReleaseIndex("ZeRO-3's complete trace is not a frozen tuple")
        recurse = coordinator.z3_leaf_module(submodule)
        own = list(coordinator.iter_params(submodule, recurse=recurse))
        release = set(p.ds_id for p in own if not p.ds_persist)
        fetched = getattr(self, _FETCHED)
        for p in own:
            if fetched[p] > step_id:
                release.discard(p.ds_id)
        key = (id(self), id(order), recurse)
        if key not in indexes:
            indexes[key] = (self, _Index(order, recurse, coordinator.iter_params))
        index = indexes[key][1]
        stop = index.end(step_id, getattr(self, _REUSE))
        for ds_id in list(release):
            if index.seen(ds_id, step_id, stop):
                release.discard(ds_id)
        return release

    real_reset = cls.reset_step

    def reset_step(self) -> None:
        check(self)
        return real_reset(self)

    @contextlib.contextmanager
    def checked_on_exit() -> Iterator[None]:
        yield  # (after an error the simulation's own exception goes on as it is)
        check()

    return [mock.patch.object(cls, _RELEASE, params_to_release), mock.patch.object(cls, "reset_step", reset_step),
            checked_on_exit()]


def _fake_apply(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """``Module._apply`` for fake parameters: ``Module.to``/``.half()`` swap a parameter for
    the converted one, which fake tensors refuse (the fake mode holds weak references to them);
    here a no-op conversion keeps the parameter and a real one assigns ``param.data`` (what
    ``_apply`` does for plain tensors)."""
    if recurse:
        for child in self.children():
            _fake_apply(child, fn)
    for p in self._parameters.values():
        if p is None:
            continue
        with torch.no_grad():
            applied = fn(p)
        if applied is not p and (applied.dtype != p.dtype or applied.device != p.device):
            p.data = applied
    for key, b in self._buffers.items():
        if b is not None:
            self._buffers[key] = fn(b)
    return self


def _zero3_iter_params(original):
    """DeepSpeed's ``iter_params(module, recurse=False)``: the module's own parameters in
    registration order (``named_parameters(recurse=False)``: None entries skipped, each parameter
    once) then its ZeRO external parameters -- read from the module's dicts instead of through
    ``named_parameters``' generators (DeepSpeed asks it for every module several times per pass,
    and for every module of its reuse look-ahead). Recursive calls, and modules registering one
    parameter twice, go to DeepSpeed's function."""

    def iter_params(module, recurse=False):
        if recurse:
            return original(module, recurse)
        d = module.__dict__
        own = [p for p in d["_parameters"].values() if p is not None]
        if len(own) > 1 and len(set(map(id, own))) != len(own):
            return original(module, recurse)
        external = d.get("_external_params")
        return own + list(external.values()) if external else own

    return iter_params


def _check_for_duplicates(self, optimizer) -> None:
    """``DeepSpeedEngine._check_for_duplicates`` in linear time: the same assertion, message and
    first offending name. DeepSpeed rebuilds the id list of every parameter group twice for each of
    the model's parameters: with the 2,963 parameters and 1,120 trainable ones of the 70B QLoRA
    recipe, 6.6M ``id`` calls, about 0.6 s of its engine build (a real run pays it too, once)."""
    counts = collections.Counter(id(p) for group in optimizer.param_groups for p in group["params"])
    for name, param in self.module.named_parameters():
        assert counts[id(param)] <= 1, (f"Parameter with name: {name} occurs multiple times in optimizer.param_groups. "
                                        "Make sure it only appears once to prevent undefined behavior.")


def _zero3_speedups() -> list:
    """Two of DeepSpeed's per-module questions answered from the module's dicts, with the same
    answers (tests/unit/test_simulate_speed.py compares whole simulations with and without):
    ``z3_leaf_module`` -- ``hasattr(module, '_z3_leaf') and module._z3_leaf``, where for the usual
    module without the flag ``hasattr`` goes through ``Module.__getattr__`` and a caught
    AttributeError (the flag is an instance attribute, ``set_z3_leaf_module``) -- and
    :func:`_zero3_iter_params`; the release rule from an index (:func:`fast_release`); and the
    engine's duplicate-parameter check in linear time (:func:`_check_for_duplicates`)."""
    import deepspeed.runtime.engine as ds_engine
    import deepspeed.runtime.zero.parameter_offload as offload
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import deepspeed.utils.nvtx as nvtx

    leaf = lambda module: module.__dict__.get("_z3_leaf", False)  # noqa: E731
    params = _zero3_iter_params(coordinator.iter_params)
    # NVTX ranges: DeepSpeed pushes one around each of its instrumented calls (tens of thousands
    # per pass) through its accelerator, whose CPU ranges are no-ops; nothing of them is simulated
    return [mock.patch.object(offload, "z3_leaf_module", leaf), mock.patch.object(coordinator, "z3_leaf_module", leaf),
            mock.patch.object(offload, "iter_params", params), mock.patch.object(coordinator, "iter_params", params),
            mock.patch.object(nvtx, "enable_nvtx", False),
            mock.patch.object(ds_engine.DeepSpeedEngine, "_check_for_duplicates", _check_for_duplicates)] + fast_release()


def zero3_patches(world: int, notes: list[str]) -> list:
    """DeepSpeed on fake tensors: ``Module.to`` through :func:`_fake_apply`; two checks that read
    values are answered as in a healthy run -- the cross-rank agreement on the module order
    (every fake rank is this one) and the non-finite gradient-norm check (finite) -- the shard
    report is skipped, and no CPU shared-memory comm op is built (a GPU run has none). Plus
    :func:`_zero3_speedups`."""
    import importlib

    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import deepspeed.runtime.zero.stage3 as stage3

    import slimtune.launch.zero3 as zero3

    # (``import deepspeed.comm.torch as m`` would bind the ``torch`` package that module imports)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    notes.append("DeepSpeed: Module.to on fake parameters assigns .data instead of swapping them; the cross-rank "
                 "module-order check and the non-finite grad-norm check are answered as in a healthy run")
    # On a CPU accelerator DeepSpeed's comm backend JIT-compiles its shared-memory collective op
    # (about a minute of C++ the first time in an environment); a GPU run (the run being planned)
    # has no such op and goes through torch.distributed -- here, the fake process group.
    return _zero3_speedups() + [
        mock.patch.object(ds_torch_comm, "build_shm_op", lambda: None),
        mock.patch.object(nn.Module, "_apply", _fake_apply),
        mock.patch.object(coordinator, "assert_ints_same_as_other_ranks", lambda ints: None),
        mock.patch.object(stage3, "is_invalid_grad_norm", lambda norm: False),
        mock.patch.object(zero3, "publish", lambda *a, **k: [])]


def host_partition_copies(engine, notes: list[str]) -> list:
    """What a GPU does that the simulation's CPU accelerator does not, when a parameter's partition
    group has one rank (``--gpus 1``, or a parameter DeepSpeed does not split): DeepSpeed gathers
    nothing and sets ``param.data = ds_tensor.data.to(<accelerator device>)``. With ``offload_param``
    the partition lives in host memory, so on a GPU that ``.to`` is a copy in GPU memory, held until
    the parameter is released; on the CPU accelerator it is the partition itself, and nothing was
    counted (the 70B ZeRO-3 recipe on one GPU simulated 2 GiB below two GPUs: the bf16 ``lm_head``,
    gathered at the loss). While simulating a GPU run, DeepSpeed's no-gather handles copy such
    partitions; persistent parameters stay on the GPU (DeepSpeed keeps them there) and are not
    copied. Nothing changes without parameter offload."""
    offload = engine.ds.zero_offload_param()
    if offload is None or str(getattr(offload.device, "value", offload.device)) not in ("cpu", "nvme"):
        return []
    import deepspeed.runtime.zero.partition_parameters as pp

    def copying(real_init):
        def init(self, params):
            real_init(self, params)
            for param in params if isinstance(params, list) else [params]:
                ds = param.ds_tensor
                if not param.ds_persist and not hasattr(ds, "ds_quant_scale") \
                        and param.data.untyped_storage()._cdata == ds.data.untyped_storage()._cdata:
                    param.data = ds.data.clone().view(param.ds_shape)  # the host-to-GPU copy
        return init

    notes.append("DeepSpeed: parameters gathered by one rank (no all-gather) are copied from their offloaded "
                 "host partition to the GPU, as on a GPU (the CPU accelerator would use the partition itself)")
    return [mock.patch.object(pp.NoGatherHandle, "__init__", copying(pp.NoGatherHandle.__init__)),
            mock.patch.object(pp.NoGatherCoalescedHandle, "__init__", copying(pp.NoGatherCoalescedHandle.__init__))]
