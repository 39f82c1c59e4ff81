"""PaCA and S2FT under FSDP2 and DeepSpeed ZeRO-3 (2 gloo ranks) against the unsharded 1-rank run.

Two launches: ``partial_2r`` (``torchrun --nproc_per_node 2``: paca and s2ft under each engine, 4
jobs, plus two with activation checkpointing) and ``partial_1r`` (``torchrun --nproc_per_node 1``: the same runs, ``shard.strategy=none``,
micro-batch 8 so the global batch equals 2 ranks x 4).  The tolerance and why it holds are
those of ``test_sharded_training.py`` (1e-5 per step over 4 AdamW steps in fp32).

S2FT uses ``selection=weight`` with ``v_rows`` / ``up_rows``: its selections are derived from the
weights, which the rank-0 export rebuild (on meta) does not have, so the exported adapter is
right only if the trained model's selections travel with the gathered deltas.

Checkpoints hold the selections (``<module>.idx``): a ZeRO-3 S2FT run stopped after 2 steps is
resumed with ``selection=random`` -- a different rule, standing in for any re-derivation that
could come out differently -- and must continue exactly as the uninterrupted run; FSDP2's DCP
checkpoint holds them as buffers.  LoRAM + PaCA under ZeRO-3: columns chosen on the pruned
model, the recovered adapter (original coordinates) equal to the single-process run's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _launch import BASE, job, run_jobs, torchrun

pytestmark = pytest.mark.distributed

LOSS_TOL = 1e-5
METHODS = {
    "paca": ["method.name=paca", "method.paca.r=8", "method.target_modules=[q_proj, v_proj, o_proj, down_proj]"],
    "s2ft": ["method.name=s2ft", "method.s2ft.attn_ratio=0.5", "method.s2ft.mlp_ratio=0.05", "method.s2ft.v_rows=true",
             "method.s2ft.up_rows=true", "method.s2ft.selection=weight"],
}
ENGINES = {"fsdp2": ["shard.strategy=fsdp2"], "deepspeed_zero3": ["shard.strategy=deepspeed_zero3"]}
CASES = [(m, e) for m in METHODS for e in ENGINES]
AC = ["train.activation_checkpointing=true"]
AC_CASES = [("paca", "deepspeed_zero3"), ("s2ft", "fsdp2")]  # recompute inside the engines' gather hooks
LORAM = ["pruning.strategy=random", "pruning.ratio=0.5", "pruning.keep_first_layers=1", "pruning.eval_recovered=false"]


@pytest.fixture(scope="session")
def partial_2r(dist_workdir):
    jobs = [job(f"{m}_{e}", dist_workdir, *METHODS[m], *ENGINES[e], "train.micro_batch_size=4") for m, e in CASES]
    jobs += [job(f"{m}_{e}_ac", dist_workdir, *METHODS[m], *ENGINES[e], *AC, "train.micro_batch_size=4")
             for m, e in AC_CASES]
    resumed = f"output.dir={dist_workdir / 's2ft_zero3_resumed'}"
    jobs += [job("s2ft_zero3_stop", dist_workdir, *METHODS["s2ft"], *ENGINES["deepspeed_zero3"],
                 "train.micro_batch_size=4", "train.stop_after_steps=2", resumed),
             job("s2ft_zero3_resume", dist_workdir, *METHODS["s2ft"], *ENGINES["deepspeed_zero3"],
                 "train.micro_batch_size=4", "method.s2ft.selection=random", resumed),
             job("loram_paca_deepspeed_zero3", dist_workdir, *METHODS["paca"], *LORAM, *ENGINES["deepspeed_zero3"],
                 "train.micro_batch_size=4")]
    return run_jobs(torchrun(2), jobs, dist_workdir, "partial_2r")


@pytest.fixture(scope="session")
def partial_1r(dist_workdir):
    jobs = [job(f"{m}_1r", dist_workdir, *METHODS[m], "shard.strategy=none", "train.micro_batch_size=8")
            for m in METHODS]
    jobs.append(job("loram_paca_1r", dist_workdir, *METHODS["paca"], *LORAM, "shard.strategy=none",
                    "train.micro_batch_size=8"))
    return run_jobs(torchrun(1), jobs, dist_workdir, "partial_1r")


@pytest.mark.parametrize("method,engine,ac", [(m, e, "") for m, e in CASES] + [(m, e, "_ac") for m, e in AC_CASES])
def test_loss_curve_matches_unsharded(method, engine, ac, partial_2r, partial_1r):
    two, one = partial_2r[f"{method}_{engine}{ac}"], partial_1r[f"{method}_1r"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(two["losses"]) == len(one["losses"]) == 4
    diff = max(abs(a - b) for a, b in zip(two["losses"], one["losses"]))
    print(f"{method} {engine}{ac}: max |loss(2 ranks) - loss(1 rank)| = {diff:.2e}")
    assert diff <= LOSS_TOL, (two["losses"], one["losses"])
    assert one["losses"][-1] < one["losses"][0]  # the deltas train (not a no-op compared with itself)


@pytest.mark.parametrize("method,engine", CASES)
def test_exported_adapter_loads_and_matches_unsharded(method, engine, partial_2r, partial_1r):
    from peft import PeftModel
    from safetensors.torch import load_file

    from slimtune.config import load_config
    from slimtune.models import load_model

    two_dir = Path(partial_2r[f"{method}_{engine}"]["output_dir"]) / "adapter"
    one_dir = Path(partial_1r[f"{method}_1r"]["output_dir"]) / "adapter"
    two, one = load_file(str(two_dir / "adapter_model.safetensors")), load_file(str(one_dir / "adapter_model.safetensors"))
    assert sorted(two) == sorted(one)
    for k in one:  # one-hot selectors identical (same selections), delta factors equal to training rounding
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=0)
    assert any(float(v.abs().max()) > 0 for k, v in two.items()), "the exported deltas are all zero"

    cfg = load_config(str(BASE), METHODS[method])
    torch.manual_seed(0)
    base, tok = load_model(cfg.model)
    ids = torch.tensor([tok.encode("12+34=")])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(two_dir))
        out = model(input_ids=ids).logits
    assert json.loads((two_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not torch.allclose(out, ref)  # the adapter is applied
    n_loaded = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    assert n_loaded == 2 * len({k.rsplit(".lora_", 1)[0] for k in two})


def _selection_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(".idx")}


def test_checkpoints_hold_selections_and_zero3_resume_uses_them(partial_2r, dist_workdir):
    from slimtune.adapters.partial import selection_state
    from slimtune.config import load_config
    from slimtune.launch.state import read_trainable_tensors
    from slimtune.trainer import checkpoint as ckpt
    from slimtune.trainer.loop import build_model

    full = partial_2r["s2ft_deepspeed_zero3"]
    stop, resume = partial_2r["s2ft_zero3_stop"], partial_2r["s2ft_zero3_resume"]
    assert stop["step"] == 2 and len(stop["losses"]) == 2 and len(resume["losses"]) == 2
    stored = {}
    for engine in ENGINES:  # ZeRO-3 (trainable.safetensors) and FSDP2 (DCP buffers) alike
        run = Path(partial_2r[f"s2ft_{engine}"]["output_dir"])
        stored[engine] = _selection_tensors(read_trainable_tensors(ckpt.list_checkpoints(run)[0][1]))
    assert stored["fsdp2"].keys() == stored["deepspeed_zero3"].keys() and stored["fsdp2"]
    assert all(torch.equal(stored["fsdp2"][k], v) for k, v in stored["deepspeed_zero3"].items())
    # the rule the resume was configured with selects other heads / channels than the stored ones ...
    derived, _ = build_model(load_config(str(BASE), METHODS["s2ft"] + ["method.s2ft.selection=random"]), "cpu")
    derived = selection_state(derived)
    assert derived.keys() == stored["deepspeed_zero3"].keys()
    assert any(not torch.equal(derived[k], v) for k, v in stored["deepspeed_zero3"].items())
    # ... yet the resumed run continues exactly as the uninterrupted one: the stored selections won
    losses = stop["losses"] + resume["losses"]
    diff = max(abs(a - b) for a, b in zip(losses, full["losses"]))
    print(f"s2ft deepspeed_zero3 stop at 2 + resume: max |loss - uninterrupted| = {diff:.2e}")
    assert diff <= LOSS_TOL, (losses, full["losses"])
    last = _selection_tensors(read_trainable_tensors(ckpt.latest_checkpoint(Path(resume["output_dir"]))))
    assert all(torch.equal(last[k], v) for k, v in stored["deepspeed_zero3"].items())


def test_loram_paca_under_zero3_recovers_like_one_process(partial_2r, partial_1r):
    from safetensors.torch import load_file

    two, one = partial_2r["loram_paca_deepspeed_zero3"], partial_1r["loram_paca_1r"]
    diff = max(abs(a - b) for a, b in zip(two["losses"], one["losses"]))
    print(f"loram+paca deepspeed_zero3: max |loss(2 ranks) - loss(1 rank)| = {diff:.2e}")
    assert len(two["losses"]) == 4 and diff <= LOSS_TOL, (two["losses"], one["losses"])
    a, b = (load_file(str(Path(r["output_dir"]) / "recovered" / "adapter_model.safetensors")) for r in (two, one))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)
    sel_two, sel_one = (json.loads((Path(r["output_dir"]) / "recovered" / "selections.json").read_text())
                        for r in (two, one))
    assert sel_two == sel_one
    # original coordinates: layer 1 was pruned, so its down_proj columns index the original 512 channels
    assert max(sel_two["model.layers.1.mlp.down_proj"]) < 512 and len(sel_two["model.layers.1.mlp.down_proj"]) == 8
