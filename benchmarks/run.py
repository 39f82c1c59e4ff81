"""``python -m benchmarks.run [--quick] [--methods ...] [--seeds ...]``: the whole benchmark.

1. base model (cached): ``benchmarks.base``;
2. trainable budgets: LoRA r=16's count, and the PaCA / S2FT knob values that match it;
3. memory: tracked peak by category of each variant over a few real steps (``benchmarks.measure``);
4. time: interleaved step times of all variants, ratios to LoRA and to full fine-tuning;
5. quality: ``train()`` per (variant, seed), eval exact match on the held-out task;
   then the ``transformers.Trainer`` + PEFT baselines: accuracy, memory, and loop step time
   from alternating short runs (``benchmarks.hf_baseline``);
6. at scale: the planner's simulation of the 70B recipes (``benchmarks.scale``);
7. ``benchmarks/results/results.json``, ``report.md`` and PNG charts (``benchmarks.report``).

The results JSON is rewritten after every stage, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

import torch

from benchmarks.common import CACHE, RESULTS, default_settings, environment, log, write_json

PARTS = ("memory", "timing", "quality", "hf", "scale")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, seeds and timing rounds (~15 min on 2 CPU cores)")
    ap.add_argument("--methods", nargs="+", help="variants to run (default: all); see benchmarks/variants.py")
    ap.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: quick 0 1 for core methods, else 0 1 2)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps per run (default: quick 120, else 400)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None,
                    help="torch threads (default: $OMP_NUM_THREADS, else torch's default)")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    return ap.parse_args(argv)


def _quiet() -> None:
    for name in ("slimtune", "slimtune.data", "transformers", "torchao", "bitsandbytes", "datasets", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    _quiet()
    from pathlib import Path

    from benchmarks import report
    from benchmarks.base import ensure_base, model_stats
    from benchmarks.variants import BUDGET_REFERENCE, BY_NAME, count_trainable, match_knob, select, variant_config

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    s = default_settings(args.quick, args.seeds, args.methods, device, threads, args.skip, args.steps)
    out_dir = Path(args.out)
    variants = select(args.methods)
    t_start = time.perf_counter()
    results: dict = {"settings": s.to_json(), "environment": environment(device), "stages_s": {}}

    def save(stage: str, t0: float) -> None:
        results["stages_s"][stage] = round(time.perf_counter() - t0, 1)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(out_dir / "results.json", results)

    # 1. base ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    base = ensure_base(threads)
    results["base"] = base
    base_dir = Path(base["path"])
    results["base_stats"] = model_stats(base_dir)
    save("base", t0)

    def cfg_of(v, seed: int, knobs: dict):
        return variant_config(s, base_dir, v, seed, CACHE / "runs" / f"{v.name}-s{seed}", knobs)

    # 2. budgets ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ref = BY_NAME[BUDGET_REFERENCE]
    target = count_trainable(cfg_of(ref, 0, {}))
    knobs: dict[str, float] = {}
    budgets = {"reference": ref.name, "reference_trainable": target, "knobs": {}}
    owners = {v.name if v.knob else v.knob_from for v in variants if v.knob or v.knob_from}
    for name in sorted(owners):
        knob = BY_NAME[name].knob

        def count(value, _v=BY_NAME[name], _k=knob):
            return count_trainable(cfg_of(_v, 0, {_v.name: int(value) if _k.integer else value}))

        value, n = match_knob(knob, target, count)
        knobs[name] = int(value) if knob.integer else value
        budgets["knobs"][name] = {"key": knob.key, "value": knobs[name], "trainable": n}
        log(f"budget: {name} {knob.key}={knobs[name]} -> {n:,} trainable (LoRA r=16: {target:,})")
    results["budgets"] = budgets
    save("budgets", t0)

    from benchmarks import hf_baseline, measure

    ref_cfg = cfg_of(ref, 0, knobs)
    batches, batch_records = measure.fixed_batches(ref_cfg, 8, device)

    # 3. memory -------------------------------------------------------------------------------
    results["memory"] = {}
    if "memory" not in s.skip:
        t0 = time.perf_counter()
        for v in variants:
            m = measure.measure_memory(v.name, cfg_of(v, 0, knobs), batches, s.memory_steps, device)
            results["memory"][v.name] = m
            log(f"memory {v.name:18s} peak {m['peak_bytes'] / 2**20:7.2f} MiB  trainable {m['trainable']:,}")
        save("memory", t0)

    # 4. time ---------------------------------------------------------------------------------
    results["timing"] = {}
    if "timing" not in s.skip:
        t0 = time.perf_counter()
        builds = [measure.build(v.name, cfg_of(v, 0, knobs), device) for v in variants]
        twins = [v for v in variants if v.name in hf_baseline.BASELINES] if "hf" not in s.skip else []
        builds += [hf_baseline.build_for_timing(v.name, cfg_of(v, 0, knobs), base_dir, device) for v in twins]
        timing = measure.measure_times(builds, batches, s.timing_warmup, s.timing_rounds, device)
        del builds
        measure.release()
        results["timing"] = {k: v for k, v in timing.items() if not k.startswith("peft_")}
        results["hf_model_timing"] = {
            v.name: {"slimtune_median_s": timing[v.name]["median_s"], "peft_median_s": timing[f"peft_{v.name}"]["median_s"],
                     "ratio": measure.paired_ratio(timing[v.name]["times_s"], timing[f"peft_{v.name}"]["times_s"])}
            for v in twins}
        for name, t in timing.items():
            log(f"time   {name:18s} median {t['median_s'] * 1e3:7.1f} ms  x{t.get('ratio_vs_lora', float('nan')):.2f} LoRA")
        save("timing", t0)

    # 5. quality ------------------------------------------------------------------------------
    results["quality"] = {v.name: [] for v in variants}
    if "quality" not in s.skip:
        t0 = time.perf_counter()
        for seed_i, seed in enumerate(s.seeds):
            for v in variants:
                if seed_i > 0 and not (s.seeds_all or v.core):
                    continue
                q = measure_quality(cfg_of(v, seed, knobs))
                results["quality"][v.name].append(q)
                log(f"quality {v.name:18s} seed {seed}: accuracy {q['accuracy']:.3f} ({q['wall_s']:.0f} s)")
                write_json(out_dir / "results.json", results)
        save("quality", t0)

    # 5b. transformers.Trainer + PEFT -------------------------------------------------------------
    results["hf"], results["hf_loop_timing"] = {}, {}
    twins = [v for v in variants if v.name in hf_baseline.BASELINES]
    if "hf" not in s.skip and twins:
        t0 = time.perf_counter()
        train_records, eval_prompts, tok = _hf_inputs(ref_cfg)
        for v in twins:
            cfg = cfg_of(v, s.seeds[0], knobs)
            r = hf_baseline.run_baseline(v.name, cfg, base_dir, CACHE / "runs" / f"hf-{v.name}", device,
                                         batch_records[: s.memory_steps * s.micro_batch_size], s.memory_steps,
                                         train_records, eval_prompts, tok)
            results["hf"][v.name] = r
            lt = hf_baseline.loop_timing(v.name, cfg, base_dir, CACHE / "runs" / f"loop-{v.name}", device,
                                         train_records, tok, s.loop_reps, s.loop_steps)
            results["hf_loop_timing"][v.name] = lt
            log(f"hf     {v.name:18s} accuracy {r['accuracy']:.3f}, peak {r.get('peak_bytes', 0) / 2**20:.2f} MiB, "
                f"loop step ratio slimtune/Trainer {lt['ratio']:.2f}")
            write_json(out_dir / "results.json", results)
        save("hf", t0)

    # 6. at scale -----------------------------------------------------------------------------
    if "scale" not in s.skip:
        t0 = time.perf_counter()
        from benchmarks.scale import simulate_all

        # --quick: every recipe simulated once, at the fewest GPUs it is written for (1-2 min each on
        # 2 CPU cores); the full run simulates every rank count
        results["scale"] = simulate_all(timeout_s=300 if s.quick else 1800, own_world_only=s.quick)
        save("scale", t0)
    else:
        results["scale"] = {"available": False, "reason": "skipped (--skip scale)"}

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(out_dir / "results.json", results)
    report.write_report(results, out_dir)
    log(f"done in {results['wall_s']:.0f} s: {out_dir / 'report.md'}")
    return results


def measure_quality(cfg) -> dict:
    from benchmarks.quality import run_quality

    return run_quality(cfg)


def _hf_inputs(cfg):
    """(train records as a datasets.Dataset, eval prompts, tokenizer): slimtune's tokenization."""
    from slimtune.data import build_datasets
    from slimtune.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    data = build_datasets(cfg, tok)
    return data.train.dataset, data.eval_prompts, tok


if __name__ == "__main__":
    main()
