"""End-to-end runs of the trainer on the tiny preset: loss falls, exports load,
resume reproduces losses exactly, a killed save leaves the previous checkpoint usable,
SIGTERM saves and exits, and a 2-process torchrun run matches a 1-process run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimtune.config import load_config
from slimtune.trainer import checkpoint as ckpt
from slimtune.trainer.loop import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_lora.yaml"
# Small and quick: 2 layers, short sequences, no generation-based eval unless asked.
FAST = ["model.overrides={num_hidden_layers: 2}", "data.max_seq_len=48", "train.micro_batch_size=4",
        "train.eval_at_ends=false", "train.progress_bar=false", "train.tensorboard=false", "train.log_every=1",
        "train.num_threads=1"]


def _cfg(tmp_path, *extra):
    return load_config(TINY, FAST + [f"output.dir={tmp_path}", *extra])


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_short_run_learns_and_exports_peft_adapter(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=25", "optim.warmup_steps=2", "train.save_every=0")
    result = train(cfg)
    assert result.step == 25
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 26))
    last5 = sum(list(losses.values())[-5:]) / 5
    assert last5 < losses[1] - 0.4, losses  # starts near ln(vocab) = 5.56; a clear fall in 25 steps
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000025"


def test_resume_reproduces_losses_exactly(tmp_path):
    common = ["train.max_steps=8", "train.save_every=4", "method.lora.dropout=0.1", "optim.warmup_steps=2"]
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train(_cfg(full_dir, *common))
    first = train(_cfg(split_dir, *common, "train.stop_after_steps=3"))
    assert first.step == 3 and first.interrupted
    second = train(_cfg(split_dir, *common))
    assert second.step == 8
    a, b = _losses(full_dir), _losses(split_dir)
    assert list(a) == list(range(1, 9)) and list(b) == list(range(1, 9))
    for s in a:
        assert a[s] == b[s], f"step {s}: uninterrupted {a[s]!r} vs resumed {b[s]!r}"


def test_run_killed_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    common = ["train.max_steps=6", "train.save_every=2"]
    reference = tmp_path / "ref"
    train(_cfg(reference, *common))

    run = tmp_path / "run"
    from slimtune.launch.replicate import ReplicatedEngine

    real_save = ReplicatedEngine.save_state
    calls = {"n": 0}

    def dying_save(self, folder):
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint (step 4): die half-way through writing
            from safetensors.torch import save_file

            save_file({"partial": torch.zeros(1)}, str(folder / "trainable.safetensors"))
            raise KeyboardInterrupt("killed while saving")
        return real_save(self, folder)

    monkeypatch.setattr(ReplicatedEngine, "save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(run, *common))
    monkeypatch.setattr(ReplicatedEngine, "save_state", real_save)
    # The half-written step-4 folder is not a checkpoint; step 2 is intact.
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert (run / "checkpoints" / "step-00000004.tmp").exists()
    train(_cfg(run, *common))
    a, b = _losses(reference), _losses(run)
    for s in range(1, 7):
        assert a[s] == b[s]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_keep_last_k(tmp_path):
    train(_cfg(tmp_path, "train.max_steps=5", "train.save_every=1", "train.keep_last=2"))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
    args = [sys.executable, str(REPO / "train.py"), "--config", str(TINY), *FAST, f"output.dir={tmp_path}",
            "train.max_steps=100000", "train.save_every=0"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = ckpt.list_checkpoints(tmp_path)
    assert saved, out
    last_logged = max(_losses(tmp_path))
    assert saved[-1][0] == last_logged
    assert "SIGTERM" in out


def test_a_run_that_fails_mid_training_lets_go_of_its_engine_and_metrics(tmp_path, monkeypatch):
    """An error in the loop (here a non-finite loss at step 3) propagates as it is, after the engine
    (DeepSpeed keeps engines alive otherwise) and the metrics file are closed; the checkpoint of
    step 2 is intact."""
    import slimtune.launch as launch
    import slimtune.trainer.loop as loop
    from slimtune.trainer.metrics import MetricsLogger

    closed = []
    real_engine = launch.SHARDERS["none"]

    def engine_spy(*args, **kwargs):
        engine = real_engine(*args, **kwargs)
        real_close = engine.close
        engine.close = lambda: closed.append("engine") or real_close()
        return engine

    real_metrics_close = MetricsLogger.close
    monkeypatch.setattr(MetricsLogger, "close", lambda self: closed.append("metrics") or real_metrics_close(self))
    monkeypatch.setitem(launch.SHARDERS, "none", engine_spy)
    real_step, calls = loop.optimizer_step, []

    def failing_step(engine, batches, global_tokens, cfg):
        calls.append(1)
        loss, norm = real_step(engine, batches, global_tokens, cfg)
        return (loss * float("nan") if len(calls) == 3 else loss), norm

    monkeypatch.setattr(loop, "optimizer_step", failing_step)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(_cfg(tmp_path, "train.max_steps=5", "train.save_every=2"))
    assert closed == ["metrics", "engine"]  # the metrics file first, then the engine
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_bad_data_file_fails_fast_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": \n')
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(TINY), *FAST,
                           f"output.dir={tmp_path / 'out'}", f"data.train.path={bad}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "line 2" in proc.stderr, proc.stderr


def test_invalid_config_fails_before_heavy_work(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(TINY), "method.lora.r=0"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "method.lora.r" in proc.stderr and "greater than or equal to 1" in proc.stderr
    assert not (REPO / "runs" / "tiny_lora" / "metrics.jsonl").exists() or time.time() - t0 < 60


@pytest.mark.distributed
def test_two_process_torchrun_matches_single_process(tmp_path):
    """Same global batch (2 ranks x 2 = 1 rank x 4): same losses up to float summation order."""
    common = ["train.max_steps=4", "train.save_every=0", "optim.warmup_steps=1"]
    single = tmp_path / "single"
    train(_cfg(single, *common))
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           str(REPO / "train.py"), "--config", str(TINY), *FAST, f"output.dir={double}", *common,
           "train.micro_batch_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses(single), _losses(double)
    assert list(a) == list(b) == [1, 2, 3, 4]
    for s in a:
        # fp32; the two runs sum the same per-token losses in a different order (per rank,
        # then all-reduce), so agreement is to float rounding, amplified a little by 3 AdamW steps.
        assert abs(a[s] - b[s]) < 1e-4 * max(1.0, abs(a[s])), (s, a[s], b[s])
    assert (double / "adapter" / "adapter_model.safetensors").is_file()


def _tiny_base_and_tokenizer(cfg):
    from slimtune.models import load_model

    return load_model(cfg.model)


def test_qlora_run_exports_adapter_and_merged_model_that_agree(tmp_path):
    """QLoRA (NF4 base) run: the PEFT adapter on the *dense* original base equals the merged
    model written at the end of the run and by `slimtune merge`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.cli import main

    cfg = _cfg(tmp_path, "quant.name=nf4", "train.max_steps=3", "output.save_merged=true", "optim.warmup_steps=0")
    train(cfg)
    base, _ = _tiny_base_and_tokenizer(cfg)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert main(["merge", "--run", str(tmp_path), "--out", str(tmp_path / "merged_cli")]) == 0
    merged_cli = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged_cli")).eval()
    ids = torch.randint(3, 200, (2, 17))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            untouched = peft_model(input_ids=ids).logits
        assert (ref - untouched).abs().max() > 1e-4  # the adapter was trained: it changes the logits
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged_cli(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_fused_kernels_give_the_same_run(tmp_path):
    """kernels.enabled routes QLoRA linears and the loss through the fused ops (torch reference
    path on CPU): same losses as the plain path to float tolerance."""
    common = ["quant.name=nf4", "train.max_steps=3", "optim.warmup_steps=0"]
    plain = train(_cfg(tmp_path / "plain", *common))
    fused = train(_cfg(tmp_path / "fused", *common, "kernels.enabled=true", "kernels.loss_chunk_tokens=32"))
    for a, b in zip(plain.losses, fused.losses):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (plain.losses, fused.losses)
