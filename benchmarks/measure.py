"""Memory and step time of slimtune's real training path, per variant.

Each variant's model is built exactly as ``slimtune.trainer.loop.train`` builds it
(``build_model`` -> ``SHARDERS[shard.strategy]`` engine -> ``build_optimizer`` /
``build_scheduler``), and a step is the loop's step for ``grad_accum=1``: forward and
token-sum loss (``token_loss_sum``), ``engine.backward(loss / tokens)`` inside
``engine.micro_step``, ``engine.clip_and_step``, ``scheduler.step()``: :func:`train_step` calls
the loop's own ``optimizer_step`` (the quality runs go through ``train()`` itself).

Memory: ``MemoryTracker`` around ``memory_steps`` steps of a freshly built model (the
optimizer state is created inside the tracked region), with the model and optimizer
registered, forward/backward phases labelled. On CUDA also ``torch.cuda.max_memory_allocated``
over the same steps.

Time: all variants are built side by side and stepped round-robin in a shuffled order each
round, on the same batches, so a slow spell of the (shared, noisy) machine hits every method
alike; the ratio to LoRA is the median of the per-round ratios.
"""
from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import median, quartiles, synchronize


@dataclass
class Built:
    name: str
    cfg: Any
    model: torch.nn.Module
    engine: Any
    scheduler: Any


def device_of(name: str) -> torch.device:
    return torch.device("cuda", 0) if name == "cuda" else torch.device(name)


def fixed_batches(cfg, n: int, device: str) -> tuple[list[dict], list[dict]]:
    """The first ``n`` micro-batches of the trainer's own sampler (seed 0), the same for every
    variant, and their records in order (for the Trainer baseline's sequential sampler)."""
    from slimtune.data import BatchSampler, build_datasets, collate
    from slimtune.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    data = build_datasets(cfg, tok)
    sampler = BatchSampler(len(data.train), cfg.train.micro_batch_size, seed=0, shuffle=True)
    out, records = [], []
    for _ in range(n):
        recs = [data.train[i] for i in sampler.next_batch()]
        records.extend(recs)
        b = collate(recs, tok.pad_token_id)
        out.append({k: v.to(device_of(device)) for k, v in b.items()})
    return out, records


def calibration_batches(cfg, device: str):
    """As the trainer passes them to ``build_model``: the first records in file order, in micro-batches
    (used only by data-driven selections, e.g. S2FT scored by activation)."""
    from slimtune.data import build_datasets, collate
    from slimtune.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    records = build_datasets(cfg, tok).train
    mb = cfg.train.micro_batch_size
    for start in range(0, len(records) - mb + 1, mb):
        b = collate([records[i] for i in range(start, start + mb)], tok.pad_token_id)
        yield {k: v.to(device_of(device)) for k, v in b.items()}


def build(name: str, cfg, device: str) -> Built:
    from slimtune.launch import SHARDERS
    from slimtune.launch.dist import DistInfo
    from slimtune.optim import build_optimizer, build_scheduler
    from slimtune.trainer.loop import build_model

    torch.manual_seed(cfg.train.seed)
    dev = device_of(device)
    model, _ = build_model(cfg, dev, calibration=calibration_batches(cfg, device))
    engine = SHARDERS[cfg.shard.strategy](model, cfg, DistInfo(device=dev), build_optimizer)
    scheduler = build_scheduler(engine.optimizer, cfg)
    model.train()
    return Built(name, cfg, model, engine, scheduler)


def train_step(b: Built, batch: dict, tracker=None) -> float:
    """One optimizer step through the trainer's own :func:`slimtune.trainer.loop.optimizer_step`
    (grad_accum=1, one rank), then the scheduler; returns the loss."""
    from slimtune.trainer.loop import optimizer_step

    n_tok = float(int((batch["labels"][:, 1:] != -100).sum()))
    loss_total, _ = optimizer_step(b.engine, [batch], n_tok, b.cfg, phase=tracker.phase if tracker else None)
    b.scheduler.step()
    return float(loss_total) / max(n_tok, 1.0)


def release() -> None:
    """Free what the caller has dropped (and the CUDA cache), so the next build starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_memory(name: str, cfg, batches: list[dict], steps: int, device: str) -> dict:
    """Tracked peak (and its breakdown) over ``steps`` steps of a fresh build of the run."""
    from slimtune.launch import track_engine
    from slimtune.memory import MemoryTracker

    cuda = device == "cuda"
    if cuda:
        release()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    b = build(name, cfg, device)
    tracker = MemoryTracker(device=device_of(device).type)
    track_engine(tracker, b.model, b.engine)
    losses = []
    with tracker:
        for i in range(steps):
            losses.append(train_step(b, batches[i % len(batches)], tracker))
    out = {
        "peak_bytes": tracker.peak_bytes,
        "peak_breakdown": tracker.peak_breakdown,
        "phases": {k: v["peak_bytes"] for k, v in tracker.phase_peaks.items()},
        "trainable": trainable_count(b.model),
        "total_params": sum(p.numel() for p in b.model.parameters()),
        "losses": losses,
    }
    if cuda:
        synchronize(device)
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated() - before
    del b, tracker
    release()
    return out


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Median and quartiles over rounds of a[i] / b[i] (two variants timed in the same rounds)."""
    r = [x / y for x, y in zip(a, b)]
    q1, q3 = quartiles(r)
    return {"median": median(r), "q1": q1, "q3": q3, "rounds": len(r)}


def measure_times(builds: list[Built], batches: list[dict], warmup: int, rounds: int, device: str,
                  references: tuple[str, ...] = ("lora", "full"), seed: int = 0) -> dict[str, dict]:
    """Interleaved step times (seconds): per variant the list, median, quartiles, mean, and for
    each reference the median over rounds of (its time / the reference's time in the same round)."""
    rng = random.Random(seed)
    for w in range(warmup):
        for b in builds:
            train_step(b, batches[w % len(batches)])
    times: dict[str, list[float]] = {b.name: [] for b in builds}
    for r in range(rounds):
        order = list(builds)
        rng.shuffle(order)
        batch = batches[r % len(batches)]
        for b in order:
            synchronize(device)
            t0 = time.perf_counter()
            train_step(b, batch)
            synchronize(device)
            times[b.name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        q1, q3 = quartiles(ts)
        rec = {"times_s": ts, "median_s": median(ts), "q1_s": q1, "q3_s": q3, "mean_s": sum(ts) / len(ts)}
        for ref in references:
            if ref in times:
                ratios = [t / t_ref for t, t_ref in zip(ts, times[ref])]
                rec[f"ratio_vs_{ref}"] = median(ratios)
                rec[f"ratio_vs_{ref}_q"] = quartiles(ratios)
        out[name] = rec
    return out
