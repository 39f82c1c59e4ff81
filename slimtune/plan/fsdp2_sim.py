"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on fake tensors (``plan.simulate``): what lets
its engine run there (:func:`fsdp2_patches`), and what a GPU does that the simulation's CPU
accelerator does not (:func:`host_shard_copies`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from slimtune.memory.tracker import tensor_storages


def fsdp2_patches(world: int, notes: list[str]) -> list:
    """The device mesh is made before fake mode (``init_device_mesh`` reads rank values) and
    handed to the engine in place of ``launch.fsdp2.make_mesh``; the shard report (a collective
    that gathers Python objects and writes a file) is skipped."""
    from torch.distributed.device_mesh import init_device_mesh

    import slimtune.launch.fsdp2 as fsdp2

    mesh = init_device_mesh("cpu", (world,))
    return [mock.patch.object(fsdp2, "make_mesh", lambda _info: mesh),
            mock.patch.object(fsdp2, "publish", lambda *a, **k: []),
            own_propagation_mode()]


@contextlib.contextmanager
def own_propagation_mode() -> Iterator[None]:
    """DTensor's sharding propagation derives an op's output metadata by running it on fake tensors
    built from the inputs' metadata, in ``detect_fake_mode() or FakeTensorMode()``. In a real run no
    fake mode is active: a fresh one is made and nothing is allocated. While simulating, the
    simulation's own mode was detected, so those tensors were counted as the run's memory (on the
    tiny full fine-tune with FSDP2, 11.3 MB made in the optimizer step, on a model of 0.9 MB), and
    only where the propagation cache missed, so a second simulation in one process read lower. Here
    it gets a mode of its own, as in a real run: one for the whole simulation rather than one per
    call, so that ``memory.also_memoize`` can answer its ops. A first optimizer step over the 1120
    LoRA DTensors of a 70B model propagates each foreach op once, building one fake tensor per
    element and input and running the op over all of them: about 7 s of the FSDP2 recipe before."""
    import torch.distributed.tensor._sharding_prop as sharding_prop
    from torch._subclasses.fake_tensor import FakeTensorMode

    from slimtune.memory.fast_ops import also_memoize

    mode = FakeTensorMode()
    with mock.patch.object(sharding_prop, "detect_fake_mode", lambda *args, **kwargs: mode), also_memoize(mode):
        yield


def host_shard_copies(engine, notes: list[str]) -> list:
    """With ``shard.cpu_offload`` (``CPUOffloadPolicy``) each shard lives in host memory, and
    FSDP2's ``FSDPParam.all_gather_inputs`` moves it to the GPU before the all-gather
    (``.to(self.device, non_blocking=True)``; for torchao's NF4 tensor the whole tensor, whose
    inner tensors ``fsdp_pre_all_gather`` then hands over). On a GPU those are copies in GPU
    memory, held until the all-gather has copied them in; on the CPU accelerator ``.to(cpu)`` is
    the shard itself, and nothing was counted. While simulating a GPU run, an all-gather input
    that is the host shard's own storage is replaced by a copy of it (``clone``: the same bytes on
    a new storage). Where FSDP2 also casts the moved shard (``param_dtype``, e.g. an fp32 LoRA
    factor gathered in bf16), the input is already a new tensor and is kept: the GPU's transient
    pre-cast copy, freed inside the same call, is not counted. Nothing changes without offload."""
    if not engine.cfg.shard.cpu_offload:
        return []
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ShardedState

    real = FSDPParam.all_gather_inputs

    def all_gather_inputs(self):
        inputs = real.fget(self)
        if not self.offload_to_cpu or self.sharded_state != ShardedState.SHARDED:
            return inputs
        host = {st._cdata for st in tensor_storages(self._sharded_local_tensor)}
        return [t.clone() if t.untyped_storage()._cdata in host else t for t in inputs]

    notes.append("FSDP2 CPU offload: each shard is copied from host memory to the GPU before its all-gather, "
                 "as on a GPU (the CPU accelerator would all-gather the host shard itself)")
    return [mock.patch.object(FSDPParam, "all_gather_inputs", property(all_gather_inputs))]
