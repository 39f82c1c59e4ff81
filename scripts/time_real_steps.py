"""Time real training steps of a recipe on a toy-width model of the recipe's depth (docs/planner.md,
ninth round): what the engine's own host-side work costs on this CPU, beside what
``plan --simulate`` takes for the same micro-batches of the 70B model.

The recipe runs for real (the trainer's ``build_model`` and engine, ``plan.simulate``'s
``micro_batches`` and ``optimizer_step``) with ``model.preset=tiny-llama`` at the recipe's 80
layers, width 128, ``data.max_seq_len=64`` and micro-batch 1; everything else (quantization,
adapters, checkpointing, the engine and its offload) is the recipe's. Each step runs 2
micro-batches, as the simulation's tracked step does; rank 0 prints the wall time of each.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/time_real_steps.py configs/llama70b_qlora_zero3.yaml
    torchrun --nproc_per_node 2 scripts/time_real_steps.py configs/llama70b_qlora_fsdp2.yaml shard.low_memory_load=false

Extra ``key=value`` overrides follow the config (``shard.low_memory_load=false`` for the FSDP2 recipe:
a preset has no checkpoint to load).

With ``--simulate`` (one process, no torchrun) it times the other side instead: ``plan --simulate``
of the recipe itself (the 70B model, ``--gpus`` fake ranks), printing the wall time of the
untracked first micro-batch, of step 2 (its 2 tracked micro-batches and optimizer step) and of the
whole simulation:

    python scripts/time_real_steps.py configs/llama70b_qlora_zero3.yaml --simulate --gpus 2
"""
from __future__ import annotations

import argparse
import time

TOY = ["model.path=null", "model.preset=tiny-llama", "model.overrides={num_hidden_layers: 80}",
       "data.max_seq_len=64", "train.micro_batch_size=1", "train.num_threads=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--simulate", action="store_true", help="time plan --simulate of the recipe instead")
    parser.add_argument("--gpus", type=int, default=2, help="fake ranks for --simulate")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.simulate:
        simulated(args)
    else:
        real(args)


def simulated(args) -> None:
    from unittest import mock

    import slimtune.plan.simulate as sim
    from slimtune.config import load_config
    from slimtune.plan.cli import _uncompiled

    cfg = load_config(args.config, args.overrides)
    times: list[tuple[str, float]] = []
    real_micro, real_step = sim.micro_batches, sim.optimizer_step

    def micro_batches(engine, cfg, vocab, tracker=sim._Untracked, fake=False, micro=None):
        t = time.perf_counter()
        out = real_micro(engine, cfg, vocab, tracker, fake, micro)
        times.append(("untracked micro-batch" if tracker is sim._Untracked else "tracked micro-batches",
                      time.perf_counter() - t))
        return out

    def optimizer_step(engine, cfg, tracker=sim._Untracked):
        t = time.perf_counter()
        real_step(engine, cfg, tracker)
        times.append(("optimizer step", time.perf_counter() - t))

    with _uncompiled(), mock.patch.object(sim, "micro_batches", micro_batches), \
            mock.patch.object(sim, "optimizer_step", optimizer_step):
        t = time.perf_counter()
        result = sim.simulate(cfg, world=args.gpus)
        total = time.perf_counter() - t
    # order: untracked micro-batch, step 1's optimizer step, step 2's micro-batches and optimizer step
    untracked = sum(s for name, s in times if name == "untracked micro-batch")
    step2 = sum(s for _, s in times[-2:])
    print(f"untracked micro-batch: {untracked:.2f} s; step 2 (2 tracked micro-batches and the optimizer step): "
          f"{step2:.2f} s; whole simulation: {total:.2f} s; simulated peak {result.peak_bytes} B")


def real(args) -> None:
    import torch
    import torch.distributed as dist

    from slimtune.config import load_config
    from slimtune.launch import SHARDERS
    from slimtune.launch.dist import DistInfo
    from slimtune.optim import build_optimizer
    from slimtune.plan.simulate import micro_batches, optimizer_step
    from slimtune.trainer.loop import build_model

    cfg = load_config(args.config, TOY + args.overrides)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    info = DistInfo(rank=rank, world_size=dist.get_world_size(), local_rank=rank, device=torch.device("cpu"))
    model, _ = build_model(cfg, "cpu")
    engine = SHARDERS[cfg.shard.strategy](model, cfg, info, build_optimizer)
    try:
        for step in range(args.steps):
            t = time.perf_counter()
            micro_batches(engine, cfg, model.config.vocab_size, micro=2)
            optimizer_step(engine, cfg)
            if rank == 0:
                print(f"step {step + 1}: {time.perf_counter() - t:.2f} s (2 micro-batches and the optimizer step)",
                      flush=True)
    finally:
        engine.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
