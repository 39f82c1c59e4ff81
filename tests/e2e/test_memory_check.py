"""``train``'s start-up memory check: on a GPU it runs the analytic plan before any weight is
read and stops with the planner's table when the run cannot fit; ``train.skip_memory_check``
turns it off.  No GPU here: the GPU's size is patched in, everything else is the real path."""
from __future__ import annotations

from pathlib import Path

import pytest

from slimtune.cli import main
from slimtune.config import load_config
from slimtune.trainer import loop

REPO = Path(__file__).resolve().parents[2]
FAST = ["model.overrides={num_hidden_layers: 2}", "data.max_seq_len=48", "train.micro_batch_size=4",
        "train.eval_at_ends=false", "train.progress_bar=false", "train.tensorboard=false", "train.max_steps=2",
        "train.save_every=0", "train.num_threads=1"]


def _built_nothing(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    return calls


def test_run_that_cannot_fit_stops_before_loading_with_the_planner_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "_gpu_memory_bytes", lambda device: 8 << 20)  # an 8 MiB "GPU"
    built = _built_nothing(monkeypatch)
    rc = main(["train", "--config", str(REPO / "configs/tiny_lora.yaml"), *FAST, f"output.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and not built
    assert "does not fit" in err and "train.skip_memory_check=true" in err
    assert "per-rank peak" in err and "DOES NOT FIT" in err  # the planner's table is printed
    assert "activation checkpointing" in err  # with its advice


def test_run_that_fits_passes_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_gpu_memory_bytes", lambda device: 80 << 30)
    cfg = load_config(REPO / "configs/tiny_lora.yaml", FAST + [f"output.dir={tmp_path}"])
    loop.startup_memory_check(cfg, 1, 80 << 30)  # no raise
    with pytest.raises(loop.MemoryPlanError):
        loop.startup_memory_check(cfg, 1, 8 << 20)


def test_skip_memory_check_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_gpu_memory_bytes", lambda device: 8 << 20)
    cfg = load_config(REPO / "configs/tiny_lora.yaml", FAST + [f"output.dir={tmp_path}", "train.skip_memory_check=true"])
    loop.startup_memory_check(cfg, 1, 8 << 20)  # no raise
    result = loop.train(cfg)  # and the run goes ahead on this CPU
    assert result.step == 2


def test_no_check_off_gpu():
    assert loop._gpu_memory_bytes("cpu") is None
