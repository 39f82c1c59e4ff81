"""Time DeepSpeed ZeRO-3's parameter-release rule inside one ``--simulate`` run of the ZeRO-3
QLoRA recipe (docs/planner.md): every call of ``__params_to_release`` is timed, with DeepSpeed's
own rule (``--rule deepspeed``) or slimtune's index of the trace (``--rule index``, the default
of ``plan --simulate``).

    python scripts/time_release_rule.py --rule deepspeed --layers 80
    python scripts/time_release_rule.py --rule index --layers 80
"""
from __future__ import annotations

import argparse
import time
from unittest import mock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", choices=["deepspeed", "index"], default="index")
    parser.add_argument("--layers", type=int, default=80)
    args = parser.parse_args()

    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    import slimtune.plan.zero3_sim as zsim
    from slimtune.config import load_config
    from slimtune.plan.simulate import simulate

    cfg = load_config("configs/llama70b_qlora_zero3.yaml", [
        "model.path=null", "model.preset=llama-3.1-70b", f"model.overrides.num_hidden_layers={args.layers}"])
    cls = coordinator.PartitionedParameterCoordinator
    calls, seconds = [0], [0.0]

    def timed(rule):
        def call(*a, **k):
            t = time.perf_counter()
            out = rule(*a, **k)
            seconds[0] += time.perf_counter() - t
            calls[0] += 1
            return out
        return call

    if args.rule == "deepspeed":
        patches = [mock.patch.object(cls, zsim._RELEASE, timed(cls.__dict__[zsim._RELEASE])),
                   mock.patch.object(zsim, "fast_release", lambda: [])]
    else:
        real = zsim.fast_release

        def fast_release():
            made = real()
            return [mock.patch.object(cls, zsim._RELEASE, timed(made[0].new))] + made[1:]

        patches = [mock.patch.object(zsim, "fast_release", fast_release)]
    for p in patches:
        p.start()
    t0 = time.perf_counter()
    result = simulate(cfg, world=2)
    total = time.perf_counter() - t0
    print(f"rule={args.rule} layers={args.layers}: simulate {total:.1f} s, release rule {calls[0]} calls "
          f"{seconds[0]:.2f} s, tracked peak {result.peak_bytes} bytes")


if __name__ == "__main__":
    main()
