"""``slimtune plan --config FILE [--gpus N] [--gpu-mem 24GiB] [--nodes M] [--json] [--simulate]
[--plot FILE.png] [key=value ...]``.

The lead wires :func:`add_arguments` / :func:`run` into ``slimtune.cli.COMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run YAML (see configs/)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (ranks per node); default 1")
    parser.add_argument("--nodes", type=int, default=1, help="nodes; world size = gpus x nodes; default 1")
    parser.add_argument("--gpu-mem", default="24GiB", help="memory of one GPU, e.g. 24GiB, 80GB (default 24GiB)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    parser.add_argument("--simulate", action="store_true",
                        help="also build the run on fake tensors with a fake process group and run 2 training steps")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="draw the breakdown (and advice) as stacked bars")
    parser.add_argument("--no-advice", action="store_true", help="skip re-planning variants")
    parser.add_argument("--cuda-context", default=None, help="assumed CUDA context per process (default 0.5GiB)")
    parser.add_argument("--fragmentation", type=float, default=None,
                        help="assumed allocator overhead as a fraction of the allocated peak (default 0.10)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.max_seq_len=1024")


def run(args) -> int:
    """Returns 0 when the run fits, 1 when it does not (2 for config errors, from the CLI)."""
    from slimtune.plan.interpreter import _no_full_collections

    # a short process that imports torch, transformers and (simulating) DeepSpeed and builds a 70B
    # model's modules: automatic full collections walk all of it, about 1 s of a ZeRO-3 recipe
    with _no_full_collections():
        return _run(args)


def _run(args) -> int:
    import logging
    import warnings

    from slimtune.config import load_config
    from slimtune.memory.units import parse_bytes
    from slimtune.plan import Assumptions, plan
    from slimtune.plan.report import plot, render_text, to_json

    for noisy in ("torchao", "bitsandbytes", "torch.utils._pytree", "deepspeed", "DeepSpeed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.gpus < 1 or args.nodes < 1:
        print("slimtune plan: --gpus and --nodes must be >= 1", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    a = Assumptions()
    if args.cuda_context is not None:
        a = Assumptions(cuda_context=parse_bytes(args.cuda_context), comm_buffers=a.comm_buffers,
                        fragmentation=a.fragmentation)
    if args.fragmentation is not None:
        a = Assumptions(cuda_context=a.cuda_context, comm_buffers=a.comm_buffers, fragmentation=args.fragmentation)
    import contextlib

    # libraries print progress to stdout while a run is simulated (DeepSpeed's op builds): with --json,
    # stdout must hold the object alone
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext(), \
            _uncompiled() if args.simulate else contextlib.nullcontext():
        p = plan(cfg, gpus=args.gpus, gpu_mem=parse_bytes(args.gpu_mem), nodes=args.nodes, simulate=args.simulate,
                 advice=not args.no_advice, source=args.config, assumptions=a)
    if args.json:
        print(json.dumps(to_json(p), indent=1))
    else:
        print(render_text(p))
    if args.plot:
        plot(p, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    fits = p.fits if p.simulated is None else (p.fits and p.simulated_fits)
    return 0 if fits else 1


def _uncompiled():
    """``torch.compile`` answering its own argument while ``plan --simulate`` runs. Libraries wrap
    functions in ``torch.compile`` when they are imported -- bitsandbytes its CPU kernels, DeepSpeed
    its Muon optimizer -- and that imports Inductor: a second or more of a planner run in which
    every tensor is fake and no compiled function is ever called (the planned run's CUDA kernels are
    bitsandbytes' own; the recipes do not use Muon). Training processes are not affected."""
    from unittest import mock

    import torch

    def plain(model=None, **_kwargs):
        return model if model is not None else (lambda fn: fn)

    return mock.patch.object(torch, "compile", plain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtune plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
