"""LoRAM end to end on the tiny preset: prune (Taylor scores from calibration text) -> align (cached)
-> NF4 (QLoRAM) -> LoRA -> train -> recover -> PEFT on the *original* model."""
from __future__ import annotations

import math

import copy
from pathlib import Path

import pytest
import torch

from slimtune.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_loram.yaml"
FAST = ["model.overrides={num_hidden_layers: 2}", "data.max_seq_len=48", "train.micro_batch_size=4",
        "train.eval_at_ends=false", "train.progress_bar=false", "train.tensorboard=false", "train.num_threads=1",
        "pruning.calibration.num_samples=8",
        "pruning.alignment.enabled=true", "pruning.alignment.steps=2", "pruning.alignment.micro_batch_size=2"]


def _cfg(tmp_path, *extra):
    return load_config(TINY, FAST + [f"output.dir={tmp_path / 'run'}", f"pruning.alignment.cache_dir={tmp_path / 'cache'}",
                                     *extra])


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_loram_flow_trains_pruned_model_and_recovers_to_original(tmp_path, quant):
    """The flow build_model runs for a LoRAM config, driven through the public functions."""
    from peft import PeftModel

    from slimtune.adapters import get_method
    from slimtune.data import build_datasets, collate
    from slimtune.models import load_model
    from slimtune.optim import build_optimizer
    from slimtune.pruning import export_recovered, prune_model
    from slimtune.pruning.storage import param_bytes
    from slimtune.quant import QUANTIZERS, weight_bytes
    from slimtune.trainer.loss import token_loss_sum

    cfg = _cfg(tmp_path, f"quant.name={quant}")
    model, tok = load_model(cfg.model)
    original = copy.deepcopy(model)
    full_bytes = param_bytes(model)
    pm = prune_model(model, cfg, tok)
    assert sorted(pm.layers) == [1] and (tmp_path / "cache").is_dir()
    QUANTIZERS[cfg.quant.name](model, cfg.quant)
    get_method("lora").attach(model, cfg)
    if quant == "nf4":  # the pruned weights really are 4-bit now
        assert weight_bytes(model)["quantized_numel"] > 0
    assert param_bytes(model) < full_bytes

    data = build_datasets(cfg, tok)
    opt = build_optimizer(model, cfg)
    batch = collate([data.train[i] for i in range(8)], tok.pad_token_id)
    model.train()
    losses = []
    for _ in range(6):
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach() / n))
    assert losses[-1] < losses[0]

    out = export_recovered(model, cfg, pm, tmp_path / "recovered", tok)
    peft_model = PeftModel.from_pretrained(original, str(out)).eval()
    x = batch["input_ids"][:2]
    with torch.no_grad():
        with peft_model.disable_adapter():
            before = peft_model(input_ids=x).logits
        after = peft_model(input_ids=x).logits
    assert after.isfinite().all() and not torch.allclose(before, after)  # the trained update reaches the original


def test_tiny_loram_config_through_the_trainer(tmp_path):
    """``python train.py --config configs/tiny_loram.yaml`` in short: the loop prunes, saves the
    PruneMap with every checkpoint, recovers at the end and scores the original model with it."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from slimtune.models import load_model
    from slimtune.pruning import PruneMap, recover_run
    from slimtune.trainer import checkpoint as ckpt
    from slimtune.trainer.loop import train

    cfg = _cfg(tmp_path, "train.max_steps=4", "optim.warmup_steps=1", "train.save_every=2", "train.eval_every=0",
               "data.eval_generate_records=4")
    result = train(cfg)
    run = tmp_path / "run"
    last = ckpt.latest_checkpoint(run)
    assert last.name == "step-00000004"
    assert load_file(str(last / "trainable.safetensors"))["model.layers.1.mlp.up_proj.lora_B"].shape[0] == 176  # trained small
    pm = PruneMap.load(last)
    assert sorted(pm.layers) == [1] and pm.settings["importance"] == "taylor"
    assert {"recovered_eval_loss", "recovered_eval_accuracy"} <= set(result.eval["recovered"])
    recovered = run / "recovered"
    again = recover_run(run, tmp_path / "recovered_cli")  # `slimtune recover` from the checkpoint gives the same
    at_end, from_cli = (load_file(str(d / "adapter_model.safetensors")) for d in (recovered, again))
    assert at_end.keys() == from_cli.keys()
    for k, v in at_end.items():
        torch.testing.assert_close(v, from_cli[k])
    original, _ = load_model(cfg.model)
    peft_model = PeftModel.from_pretrained(original, str(recovered))
    up = peft_model.base_model.model.model.layers[1].mlp.up_proj
    assert up.lora_B["default"].weight.shape == (352, cfg.method.lora.r)


@pytest.mark.parametrize("config", ["tiny_loram_paca.yaml", "tiny_loram_s2ft.yaml"])
def test_tiny_loram_partial_run_recovers_to_the_original_model(tmp_path, config):
    """LoRAM + PaCA / S2FT through the trainer: selections made on the pruned model; ``slimtune
    recover`` turns the checkpoint into a PEFT adapter for the *original* model (the same as the one
    written at the end of the run), PEFT reproduces the logits of slimtune's recovered model, and
    ``slimtune merge`` folds the same update into the original weights."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from slimtune.cli import main
    from slimtune.models import load_model
    from slimtune.pruning import PruneMap, build_recovered_model
    from slimtune.launch.state import read_trainable_tensors
    from slimtune.trainer import checkpoint as ckpt
    from slimtune.trainer.loop import train
    from transformers import AutoModelForCausalLM

    cfg = load_config(REPO / "configs" / config,
                      FAST[:-3] + [f"output.dir={tmp_path / 'run'}", "train.max_steps=3", "optim.warmup_steps=1",
                                   "train.save_every=3", "train.eval_every=0", "data.eval_generate_records=4"])
    result = train(cfg)
    assert result.losses[-1] < result.losses[0]
    # the trainer scored the original model with the recovered selections and deltas
    assert math.isfinite(result.eval["recovered"]["recovered_eval_loss"])
    run = tmp_path / "run"
    last = ckpt.latest_checkpoint(run)
    pm = PruneMap.load(last)
    assert sorted(pm.layers) == [1]
    assert main(["recover", "--run", str(run), "--out", str(tmp_path / "cli")]) == 0
    at_end, from_cli = (load_file(str(d / "adapter_model.safetensors")) for d in (run / "recovered", tmp_path / "cli"))
    assert at_end.keys() == from_cli.keys()
    for k, v in at_end.items():
        torch.testing.assert_close(v, from_cli[k])
    # the pruned adapter (pruned shapes) and the recovered one hold the same update on the kept block
    pruned = load_file(str(run / "pruned_adapter" / "adapter_model.safetensors"))
    compared = 0
    for name, (rows, cols, _) in pm.module_indices().items():
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" not in pruned:
            continue
        compared += 1
        dw_p = pruned[f"{key}.lora_B.weight"] @ pruned[f"{key}.lora_A.weight"]
        dw = from_cli[f"{key}.lora_B.weight"] @ from_cli[f"{key}.lora_A.weight"]
        r = torch.arange(dw.shape[0]) if rows is None else torch.tensor(rows)
        c = torch.arange(dw.shape[1]) if cols is None else torch.tensor(cols)
        torch.testing.assert_close(dw[r][:, c], dw_p)
        assert dw.abs().sum() == pytest.approx(float(dw_p.abs().sum()), rel=1e-5)  # nothing outside the block
    assert compared >= 3  # pruned attention and MLP linears were trained

    original, tok = load_model(cfg.model)
    ids = torch.tensor([tok.encode("12+34=56")])
    ours, _ = build_recovered_model(cfg, pm, read_trainable_tensors(last))
    assert main(["merge", "--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        base_logits = original(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(original, str(tmp_path / "cli")).eval()(input_ids=ids).logits
        torch.testing.assert_close(peft_logits, ours(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_logits, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(peft_logits, base_logits)  # the trained update reaches the original model
