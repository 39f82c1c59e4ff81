"""Sharders: one table maps ``shard.strategy`` to an engine constructor.

An engine is built as ``SHARDERS[name](model, cfg, dist_info, build_optimizer)``
and offers the surface the loop uses: ``model``, ``optimizer``,
``micro_step(is_last)`` (context for one micro-batch), ``backward(loss)``,
``clip_and_step(max_norm) -> grad_norm``, ``save_state(folder)`` /
``load_state(folder)`` (checkpoint: trainable tensors and optimizer state),
``trainable_state_dict()`` (whole trainable tensors; rank 0 under sharding),
``unwrapped()`` (the model to evaluate; all ranks call it together),
``export_model()`` (collective: a whole model for export on rank 0, None elsewhere) and
``engine_buffers()`` (what the engine allocates for itself for the whole run, by memory
category; :func:`track_engine` registers it with a memory tracker).

| strategy        | engine                                   | module        |
|-----------------|------------------------------------------|---------------|
| none            | every rank holds the model; data parallel | replicate.py  |
| fsdp2           | ``torch.distributed.fsdp.fully_shard``    | fsdp2.py      |
| deepspeed_zero3 | ``deepspeed.initialize``, ZeRO stage 3    | zero3.py      |

The FSDP2 and DeepSpeed modules are imported when their strategy is chosen
(DeepSpeed's import is slow and probes the accelerator).
"""
from __future__ import annotations

from slimtune.launch.dist import DistInfo, barrier, ensure_process_group, init_distributed, shutdown
from slimtune.launch.launchers import check_launcher_env
from slimtune.launch.replicate import ReplicatedEngine


def _replicated(model, cfg, info, build_optimizer):
    check_launcher_env(cfg)
    return ReplicatedEngine(model, cfg, info, build_optimizer)


def _fsdp2(model, cfg, info, build_optimizer):
    from slimtune.launch.fsdp2 import FSDP2Engine

    check_launcher_env(cfg)
    return FSDP2Engine(model, cfg, info, build_optimizer)


def _zero3(model, cfg, info, build_optimizer):
    from slimtune.launch.zero3 import ZeRO3Engine

    check_launcher_env(cfg)
    return ZeRO3Engine(model, cfg, info, build_optimizer)


SHARDERS = {
    "none": _replicated,
    "fsdp2": _fsdp2,
    "deepspeed_zero3": _zero3,
}

__all__ = ["SHARDERS", "DistInfo", "init_distributed", "ensure_process_group", "barrier", "shutdown", "track_engine"]


def track_engine(tracker, model, engine) -> None:
    """Register a built run with a :class:`slimtune.memory.MemoryTracker`: the model's weights and
    trainable parameters, the optimizer's state and the engine's own long-lived buffers (ZeRO-3's
    fp32 master partitions and gradient buffers).  The trainer-path measurements (``plan
    --simulate``, the planner's real-run reference, the benchmarks) all use it."""
    tracker.register_model(model)
    tracker.register_optimizer(engine.optimizer)
    for category, tensors in engine.engine_buffers().items():
        if tensors:
            tracker.register(tensors, category)
