"""At scale, simulated: the planner's ``--simulate`` per-rank peak of every 70B recipe
(``configs/llama70b_*.yaml``) at 1, 2, 4 and 8 ranks, against 24 GiB per GPU, with the planner's
analytic estimate beside it.

The analytic estimate (no torch model) runs in this process. The simulations of one recipe run
in a subprocess of their own (``python -m benchmarks.scale --config X --worlds 1 2 4 8``, one
JSON line per cell): the simulation installs a fake process group and patches, and a crash or
hang must not take the benchmark down. A cell that cannot run is reported with the reason,
never filled in.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from benchmarks.common import CONFIGS, REPO, log

WORLDS = (1, 2, 4, 8)
GPU_MEM = 24 * 2**30


def recipes() -> list[Path]:
    return sorted(CONFIGS.glob("llama70b_*.yaml"))


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def analytic(config: Path, world: int) -> dict:
    """The planner's analytic per-rank peak (CUDA assumptions) of one cell."""
    from slimtune.config import load_config

    out: dict = {"recipe": config.name, "world": world}
    try:
        cfg = load_config(config)
        out["shard"] = cfg.shard.strategy
        from slimtune.plan.analytic import estimate

        out["analytic_peak_bytes"] = int(estimate(cfg, world=world, device="cuda").per_rank_peak)
    except Exception as err:  # reported, not filled in
        out["analytic_error"] = _error(err)
    return out


def simulated(config: Path, world: int) -> dict:
    """Run in the child process: the fake-tensor simulation of one cell."""
    from slimtune.config import load_config

    out: dict = {"recipe": config.name, "world": world}
    t0 = time.perf_counter()
    try:
        from slimtune.plan.simulate import simulate

        res = simulate(load_config(config), world=world)
    except Exception as err:
        out["error"] = _error(err)
        return out
    out.update({"peak_bytes": int(res.peak_bytes), "breakdown": {k: int(v) for k, v in res.breakdown.items()},
                "fits_24gib": res.peak_bytes <= GPU_MEM, "seconds": round(time.perf_counter() - t0, 1),
                "notes": list(res.notes)})
    return out


def _simulate_recipe(config: Path, worlds, timeout_s: float) -> dict[int, dict]:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--config", str(config), "--worlds", *map(str, worlds)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        stdout, stderr, rc, timed_out = proc.stdout, proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr, rc, timed_out = "", None, True
    got = {}
    for ln in stdout.splitlines():
        if ln.startswith("{"):
            cell = json.loads(ln)
            got[cell["world"]] = cell
    for w in worlds:
        if w in got:
            continue
        if timed_out:
            got[w] = {"error": f"the simulations of this recipe did not finish within {timeout_s:.0f} s"}
        else:
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            got[w] = {"error": f"exit {rc}: {tail[0][:300]}"}
    return got


def smallest_world(config: Path) -> int:
    """The fewest GPUs a recipe is written for: 1 unshared, 2 when it shards (FSDP2 / ZeRO-3)."""
    from slimtune.config import load_config

    return 1 if load_config(config).shard.strategy == "none" else 2


def simulate_all(worlds=WORLDS, timeout_s: float = 1800, budget_s: Optional[float] = None,
                 own_world_only: bool = False) -> dict:
    """Every recipe at every rank count (analytic), simulated at every rank count or, with
    ``own_world_only`` (``--quick``), at :func:`smallest_world` only. ``timeout_s``: per recipe
    (all its simulated rank counts); ``budget_s``: no new recipe's simulation starts once this
    much time is spent."""
    found = recipes()
    if not found:
        return {"available": False, "reason": "no configs/llama70b_*.yaml recipes in this tree"}
    try:
        import slimtune.plan.simulate  # noqa: F401
    except ImportError as err:
        return {"available": False, "reason": f"slimtune.plan.simulate is not importable: {err}"}
    cells: list[dict] = []
    t_all = time.perf_counter()
    for config in found:
        rows = {w: analytic(config, w) for w in worlds}
        spent = time.perf_counter() - t_all
        if budget_s is not None and spent > budget_s:
            sims = {w: {"error": f"not run: the time budget for simulations ({budget_s:.0f} s in --quick) was "
                                 "spent on the recipes before; run without --quick"} for w in worlds}
        else:
            t0 = time.perf_counter()
            left = timeout_s if budget_s is None else max(30.0, min(timeout_s, budget_s - spent))
            sim_worlds = [smallest_world(config)] if own_world_only else list(worlds)
            sims = _simulate_recipe(config, sim_worlds, left)
            sims.update({w: {"error": "not simulated in --quick (only at the recipe's smallest GPU count); "
                                      "run without --quick"} for w in worlds if w not in sims})
            log(f"scale: {config.name} simulated in {time.perf_counter() - t0:.0f} s")
        for w in worlds:
            cells.append({**rows[w], **sims[w]})
    ok = [c for c in cells if "peak_bytes" in c]
    out = {"available": bool(ok) or any("analytic_peak_bytes" in c for c in cells), "simulated": bool(ok),
           "gpu_mem_bytes": GPU_MEM, "worlds": list(worlds), "cells": cells}
    if not ok:
        out["reason"] = "no simulation finished: " + "; ".join(sorted({c["error"] for c in cells if "error" in c}))[:600]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="simulate one recipe at some rank counts; one JSON line per cell")
    ap.add_argument("--config", required=True)
    ap.add_argument("--worlds", type=int, nargs="+", required=True)
    args = ap.parse_args()
    for w in args.worlds:
        print(json.dumps(simulated(Path(args.config), w)), flush=True)


if __name__ == "__main__":
    main()
