"""Optimizer-state memory of AdamW / 8-bit AdamW / GaLore: measured on a small model, and
computed from parameter shapes for LLaMA-7B and Llama-3.1-8B (meta device, nothing allocated).

    python -m slimtune.optim.report            # prints the tables quoted in docs/galore.md
    # per rank under FSDP2 (and the 1-rank run with shard.strategy=none):
    torchrun --nproc_per_node 2 -m slimtune.optim.report --sharded
    torchrun --nproc_per_node 1 -m slimtune.optim.report --sharded

Measured = bytes of the tensors in ``optimizer.state`` after real steps
(``optimizer_state_bytes``); the shape-only figure is ``estimate_state_bytes``, the same
function the planner uses, checked against the measurement here and in tests/unit/test_optim.py.
"""
from __future__ import annotations

import argparse

import torch

from slimtune.config import RunConfig
from slimtune.optim import build_optimizer, estimate_state_bytes, optimizer_state_bytes

NAMES = ("adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit")

# Llama shapes (public configs): LLaMA-7B is the paper's model; Llama-3.1-8B is our recipe's.
LLAMA_SHAPES = {
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
}


SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1024)


def _cfg(name: str, rank: int, gap: int = 200) -> RunConfig:
    return RunConfig(model={"preset": "tiny-llama"}, optim={"name": name, "galore": {"rank": rank, "update_proj_gap": gap}})


def _llama(meta: bool, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def measured_small(rank: int = 64) -> list[tuple[str, int, int]]:
    """(name, measured bytes, estimated bytes) for a small GQA Llama in fp32 after 2 steps."""
    rows = []
    ids = torch.randint(0, 1024, (2, 2, 64), generator=torch.Generator().manual_seed(0))
    for name in NAMES:
        model = _llama(False, **SMALL)
        cfg = _cfg(name, rank)
        opt = build_optimizer(model, cfg)
        for batch in ids:
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        rows.append((name, optimizer_state_bytes(opt), estimate_state_bytes(shapes, cfg.optim, 4)))
    return rows


def peak_per_layer(rank: int = 64, seq: int = 32) -> list[tuple[str, int, dict[str, int]]]:
    """Tracked peak of the third training step (full fine-tune, fp32, batch 1 x ``seq``),
    normal vs per-layer mode: (label, peak bytes, breakdown at the peak)."""
    from slimtune.memory import MemoryTracker
    from slimtune.optim import clip_grad_norm_, set_sync

    rows = []
    ids = torch.randint(0, 1024, (3, 1, seq), generator=torch.Generator().manual_seed(0))
    for name in ("adamw", "galore_adamw8bit"):
        for per_layer in (False, True):
            model = _llama(False, **SMALL)
            cfg = _cfg(name, rank)
            cfg.optim.per_layer = per_layer
            opt = build_optimizer(model, cfg)
            tracker = MemoryTracker()
            tracker.register_model(model)
            tracker.register_optimizer(opt)
            with tracker:
                for i, batch in enumerate(ids):
                    if i == len(ids) - 1:
                        tracker.reset_peak()
                    set_sync(opt, True)
                    with tracker.phase("forward"):
                        loss = model(input_ids=batch, labels=batch).loss
                    with tracker.phase("backward"):
                        loss.backward()
                    del loss
                    clip_grad_norm_(opt, cfg.optim.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            rows.append((f"{name}{' per-layer' if per_layer else ''}", tracker.peak_bytes, tracker.peak_breakdown))
    return rows


def from_shapes(model_name: str, ranks=(128, 512, 1024), param_bytes: int = 2) -> list[tuple[str, int]]:
    """(label, bytes) for bf16 parameters (so AdamW keeps bf16 moments: the paper's BF16 baseline)."""
    model = _llama(True, **LLAMA_SHAPES[model_name])
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    rows = [(name, estimate_state_bytes(shapes, _cfg(name, 128).optim, param_bytes)) for name in ("adamw", "adamw8bit")]
    for rank in ranks:
        for name in ("galore_adamw", "galore_adamw8bit"):
            rows.append((f"{name} r={rank}", estimate_state_bytes(shapes, _cfg(name, rank).optim, param_bytes)))
    return rows


def sharded_state_bytes(steps: int = 6, rank: int = 8) -> dict[str, dict[str, int]]:
    """Optimizer-state bytes held by this rank after ``steps`` full fine-tuning steps of the
    distributed tests' tiny Llama (hidden 256, 2 layers, fp32), under FSDP2 when launched on
    more than one rank and with ``shard.strategy=none`` on one.  Two figures per optimizer:
    ``tracked`` (the memory tracker's "optimizer" category after the steps) and ``state``
    (``optimizer_state_bytes``: this rank's blocks of the tensors in ``optimizer.state``)."""
    from slimtune.launch import SHARDERS, init_distributed
    from slimtune.memory import MemoryTracker
    from slimtune.trainer.loop import build_model

    info = init_distributed()
    out = {}
    for name in ("adamw", "galore_adamw", "galore_adamw8bit"):
        cfg = RunConfig(
            model={"preset": "tiny-llama", "dtype": "float32",
                   "overrides": {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512}},
            method={"name": "full"}, shard={"strategy": "fsdp2" if info.world_size > 1 else "none"},
            optim={"name": name, "min_8bit_size": 1024, "galore": {"rank": rank, "update_proj_gap": 5}},
        )
        torch.manual_seed(0)
        model, _ = build_model(cfg, info.device)
        vocab = model.config.vocab_size
        engine = SHARDERS[cfg.shard.strategy](model, cfg, info, build_optimizer)
        tracker = MemoryTracker()
        tracker.register_optimizer(engine.optimizer)
        ids = torch.randint(0, vocab, (steps, 4, 48), generator=torch.Generator().manual_seed(info.rank))
        with tracker:
            for batch in ids:
                engine.backward(engine.model(input_ids=batch, labels=batch).loss)
                engine.clip_and_step(1.0)
        out[name] = {"tracked": tracker.current_breakdown["optimizer"],
                     "state": optimizer_state_bytes(engine.optimizer)}
        del engine, model
    return out


def _print_sharded(args) -> None:
    import json

    import torch.distributed as dist

    mine = sharded_state_bytes()
    world = dist.get_world_size() if dist.is_initialized() else 1
    every = [None] * world
    if world > 1:
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"optimizer state per rank, {world} rank(s), tiny Llama h=256 2 layers fp32, full fine-tune, GaLore rank 8")
        for name in mine:
            figs = ", ".join(f"rank {r}: tracked {e[name]['tracked']:,} B (state {e[name]['state']:,} B)"
                             for r, e in enumerate(every))
            print(f"  {name:<18} {figs}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(every, f, indent=1)


def _print(title: str, rows, base: int) -> None:
    print(f"\n{title}")
    for label, *vals in rows:
        gib = vals[0] / 2**30
        extra = f"  (estimate {vals[1]:,} B)" if len(vals) > 1 else ""
        print(f"  {label:<26} {vals[0]:>16,} B  {gib:8.3f} GiB  {100 * (vals[0] / base - 1):+7.1f}% vs adamw{extra}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-rank", type=int, default=64)
    ap.add_argument("--sharded", action="store_true", help="per-rank state under torchrun (FSDP2 on > 1 rank)")
    ap.add_argument("--json", help="with --sharded: also write every rank's figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.sharded:
        _print_sharded(args)
        return
    rows = measured_small(args.small_rank)
    _print(f"measured, small GQA Llama (h=256, 4 layers, fp32), GaLore rank {args.small_rank}", rows, rows[0][1])
    print("\ntracked peak of one training step (small GQA Llama, fp32, full fine-tune, batch 1 x 32)")
    for label, peak, breakdown in peak_per_layer(args.small_rank):
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in breakdown.items() if v >= 2**16)
        print(f"  {label:<28} peak {peak / 2**20:7.2f} MiB  ({parts} MiB)")
    for model_name in LLAMA_SHAPES:
        rows = from_shapes(model_name)
        _print(f"from shapes, {model_name}, bf16 parameters", rows, rows[0][1])


if __name__ == "__main__":
    main()
