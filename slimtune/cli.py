"""``slimtune train | check-config | merge | plan | recover | export``.

Every sub-command takes ``--config FILE`` (where it needs one) followed by dotted
``key=value`` overrides, as in ``slimtune train --config configs/tiny_lora.yaml train.max_steps=20``.
"""
from __future__ import annotations

import argparse
import sys

from slimtune.config import ConfigError, load_config


def _cmd_train(args) -> int:
    from slimtune.trainer.loop import setup_logging, train

    cfg = load_config(args.config, args.overrides)
    setup_logging()
    result = train(cfg)
    return 0 if result.step >= cfg.train.max_steps or result.interrupted else 1


def _cmd_check(args) -> int:
    for path in args.files:
        cfg = load_config(path, args.overrides)
        print(f"{path}: ok (method={cfg.method.name}, quant={cfg.quant.name}, shard={cfg.shard.strategy})")
    return 0


def _cmd_merge(args) -> int:
    from slimtune.trainer.export import merge_from_checkpoint
    from slimtune.trainer.loop import setup_logging

    setup_logging(0)
    out = merge_from_checkpoint(args.run, args.out, args.checkpoint)
    print(f"merged model written to {out}")
    return 0


def _cmd_recover(args) -> int:
    from slimtune.pruning import recover_run
    from slimtune.trainer.loop import setup_logging

    setup_logging(0)
    out = recover_run(args.run, args.out, args.checkpoint)
    print(f"recovered adapter (original model shapes) written to {out}")
    return 0


# One table: sub-command name -> (handler, argument builder).
def _args_train(p):
    p.add_argument("--config", required=True, help="run YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")


def _args_check(p):
    p.add_argument("files", nargs="+", help="run YAML file(s) to validate")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override (repeatable)")


def _args_merge(p):
    p.add_argument("--run", required=True, help="a finished run's output.dir")
    p.add_argument("--out", required=True, help="folder for the merged HF model")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint folder (default: the latest)")


def _args_recover(p):
    p.add_argument("--run", required=True, help="a LoRAM run's output.dir")
    p.add_argument("--out", required=True, help="folder for the recovered PEFT adapter")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint folder (default: the latest)")


_QUICK_EXIT = [False]  # set by ``plan --simulate``: see :func:`entry`


def _cmd_plan(args) -> int:
    from slimtune.plan.cli import run

    _QUICK_EXIT[0] = bool(args.simulate)
    return run(args)


def _args_plan(p):
    from slimtune.plan.cli import add_arguments

    add_arguments(p)


COMMANDS = {
    "train": (_cmd_train, _args_train, "train a model from a run config"),
    "check-config": (_cmd_check, _args_check, "validate run configs and exit"),
    "merge": (_cmd_merge, _args_merge, "merge a run's trained part into a full HF model folder"),
    "recover": (_cmd_recover, _args_recover, "LoRAM: map a pruned run's adapter back to the original model"),
    "plan": (_cmd_plan, _args_plan, "memory planner: does this run fit these GPUs, and what dominates"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"slimtune: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # data/model errors that are the user's to fix
        from slimtune.data import DataError
        from slimtune.trainer.loop import MemoryPlanError

        if isinstance(err, (DataError, FileNotFoundError, MemoryPlanError)):
            print(f"slimtune: {err}", file=sys.stderr)
            return 2
        raise


def entry() -> None:
    """The ``slimtune`` console script (and ``python -m slimtune.cli``): :func:`main`, then exit.
    After ``plan --simulate`` the process leaves without tearing its heap down: the simulation
    leaves a 70B model's fake tensors, modules and engine state behind, whose release (the
    tracker's finalizers among it) took about 3 s of a one-minute ZeRO-3 plan, and nothing is
    left to write once the report is printed -- output and log handlers are flushed first."""
    rc = main()
    if _QUICK_EXIT[0]:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
