"""Other launchers (slow: one launch each): the ``deepspeed`` launcher, the Slurm sbatch example
(run for real on this machine with stand-ins for ``srun`` and ``scontrol``), and bf16 runs with
mixed precision under both engines."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

from _launch import REPO, free_port, job, log_tail, run, run_jobs, shard_report, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_deepspeed_launcher(tmp_path):
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank",
                "--master_port", str(free_port())]
    res = run_jobs(launcher, [job("zero3_ds_launcher", tmp_path, "shard.strategy=deepspeed_zero3",
                                  "train.micro_batch_size=4")], tmp_path, "ds_launcher")
    rec = res["zero3_ds_launcher"]
    assert rec["world_size"] == 2 and rec["step"] == 4
    assert [r["rank"] for r in shard_report(rec["output_dir"])] == [0, 1]


def test_slurm_sbatch_example_runs(tmp_path):
    """configs/slurm/multinode.sbatch with SLURM_* set for one node and stand-ins on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    # srun: drop srun's own options, run the command once (one node, one task)
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "run"
    env_extra = {"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "4242",
                 "SLIMTUNE_GPUS_PER_NODE": "2", "SLIMTUNE_RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    cmd = ["env", *[f"{k}={v}" for k, v in env_extra.items()], "bash", str(REPO / "configs/slurm/multinode.sbatch"),
           str(REPO / "tests/distributed/base.yaml"), "shard.strategy=fsdp2", "train.max_steps=2",
           f"output.dir={out}"]
    proc = run(cmd, timeout=600)
    assert proc.returncode == 0, log_tail(proc.stdout)
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert [r["world_size"] for r in shard_report(out)] == [2, 2]


def test_bf16_mixed_precision_under_both_engines(tmp_path):
    bf16 = ["model.dtype=bfloat16", "quant.name=nf4", "quant.compute_dtype=bfloat16", "train.micro_batch_size=4"]
    jobs = [
        job("fsdp2_qlora_bf16", tmp_path, *bf16, "quant.backend=torchao", "shard.strategy=fsdp2",
            "shard.param_dtype=bfloat16"),
        job("zero3_qlora_bf16", tmp_path, *bf16, "quant.backend=bitsandbytes", "quant.quant_storage=bfloat16",
            "shard.strategy=deepspeed_zero3"),
    ]
    res = run_jobs(torchrun(2), jobs, tmp_path, "bf16")
    for name in ("fsdp2_qlora_bf16", "zero3_qlora_bf16"):
        losses = res[name]["losses"]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], (name, losses)
        for r in shard_report(res[name]["output_dir"]):
            assert 0.48 <= r["frozen_fraction_local"] <= 0.52, r
