"""Distributed initialisation from the torchrun / accelerate environment.

torchrun and ``accelerate launch`` both set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; we read them and pick ``nccl`` on CUDA, ``gloo`` on CPU.
A plain ``python train.py`` runs as a single process with no process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: int = 600) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_safe_store(rank, world, timeout_s)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None,
                                **({"store": store, "rank": rank, "world_size": world} if store is not None else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def _restart_safe_store(rank: int, world: int, timeout_s: int):
    """Under torchrun the agent hosts one TCPStore that outlives worker restarts, and the workers'
    env:// rendezvous uses it without a per-attempt prefix (torch 2.13): after ``--max-restarts``
    restarts a group's setup can read the dead attempt's addresses and fail ("Connection refused").
    Prefix the keys with the restart count.  None (plain env://) outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"/slimtune/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def ensure_process_group(info: DistInfo) -> None:
    """A process group even for one process (FSDP2, DCP and DeepSpeed need one; ``python train.py``
    does not create it): a 1-rank group over an in-memory store, so nothing listens on a port."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError("ensure_process_group: a multi-rank run must be initialised by init_distributed()")
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def shutdown() -> None:
    """Destroy the process group while the interpreter is whole: first collect cyclic garbage
    (engines, hooks) that may still hold tensors of finished gloo work, so none is left for the
    group's worker threads to drop during interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
