"""The memory planner against real runs (slimtune.memory.MemoryTracker on CPU, tiny models).

For every method -- full, LoRA, QLoRA, PaCA (and QPaCA), S2FT, GaLore (32-bit and 8-bit per-layer),
LoRAM -- the tracked peak of two real training steps (``plan.simulate.measure_real``: the trainer's
``build_model`` and engine) is the reference; ``plan --simulate`` (fake tensors) must be within 2%
of it and the analytic estimate within 10%. Both sharding engines are checked the same way with 2
gloo ranks in tests/e2e/test_plan_validation.py.

The tiny model uses intermediate size 384 (a multiple of the NF4 block of 64): at 352 bitsandbytes'
CPU kernel mis-decodes blocks straddling rows and ``slimtune.quant.bnb`` decodes them with a
CPU-only torch fallback whose temporaries no CUDA run has (not modeled by the planner).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from slimtune.config import load_config
from slimtune.memory.units import parse_bytes
from slimtune.plan import check_fits, plan
from slimtune.plan.analytic import estimate
from slimtune.plan.simulate import measure_real, simulate
from slimtune.plan.spec import inventory, model_spec, nf4_layout

TINY = ["model.preset=tiny-llama", "model.overrides={num_hidden_layers: 2, intermediate_size: 384}",
        "train.micro_batch_size=2", "data.max_seq_len=32", "train.num_threads=1"]
BF16_NF4 = ["quant.name=nf4", "model.dtype=bfloat16", "quant.compute_dtype=bfloat16"]

CASES = {
    "full": ["method.name=full"],
    "full-bf16-ckpt": ["method.name=full", "model.dtype=bfloat16", "train.activation_checkpointing=true"],
    "lora": ["method.name=lora"],
    "lora-bf16-packed": ["method.name=lora", "model.dtype=bfloat16", "data.packing=true"],
    "qlora-accum": ["method.name=lora", *BF16_NF4, "train.grad_accum=3"],
    "qlora-fp32-ckpt": ["method.name=lora", "quant.name=nf4", "train.activation_checkpointing=true"],
    "qlora-fused-loss": ["method.name=lora", *BF16_NF4, "kernels.enabled=true"],
    "paca": ["method.name=paca", "method.paca.r=8"],
    "qpaca": ["method.name=paca", "method.paca.r=8", *BF16_NF4],
    "s2ft": ["method.name=s2ft", "method.s2ft.attn_ratio=0.5", "method.s2ft.mlp_ratio=0.1"],
    "s2ft-rows": ["method.name=s2ft", "method.s2ft.attn_ratio=0.5", "method.s2ft.mlp_ratio=0.1",
                  "method.s2ft.v_rows=true", "method.s2ft.up_rows=true"],
    "galore": ["method.name=full", "optim.name=galore_adamw", "optim.galore.rank=16"],
    "galore8bit-per-layer": ["method.name=full", "optim.name=galore_adamw8bit", "optim.galore.rank=16",
                             "optim.per_layer=true"],
    "adamw8bit": ["method.name=lora", "optim.name=adamw8bit"],
    "loram": ["method.name=lora", "pruning.strategy=random", "pruning.ratio=0.5", "pruning.keep_first_layers=1"],
    "qloram": ["method.name=lora", "pruning.strategy=random", "pruning.ratio=0.5", *BF16_NF4],
    "eager-attention": ["method.name=lora", "model.attn_implementation=eager"],
}


def _cfg(tmp_path, overrides):
    return load_config(None, TINY + [f"output.dir={tmp_path}"] + overrides)


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_vs_simulated_vs_analytic(case, tmp_path):
    cfg = _cfg(tmp_path, CASES[case])
    real = measure_real(cfg)
    sim = simulate(cfg, world=1, cuda_defaults=False)  # CPU kernel choices, as the real CPU run
    ana = estimate(cfg, world=1, device="cpu")
    assert real.peak_bytes > 0
    # the simulation runs the same code on fake tensors: the same bytes up to the real batch's
    # attention mask (int64, a few KiB), which the fake batch does not carry
    assert sim.peak_bytes == pytest.approx(real.peak_bytes, rel=0.02), (sim.breakdown, real.breakdown)
    assert ana.allocated_peak == pytest.approx(real.peak_bytes, rel=0.10), (ana.moments, ana.by_category(),
                                                                           real.breakdown)


def _trainable_numel(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", ["full", "lora", "paca", "s2ft-rows", "loram"])
def test_inventory_matches_the_built_model(case, tmp_path):
    """The planner's parameter list (no model built) has the real model's trainable and frozen sizes."""
    from slimtune.trainer.loop import build_model

    cfg = _cfg(tmp_path, CASES[case])
    model, _ = build_model(cfg, "cpu")
    inv = inventory(model_spec(cfg), cfg)
    assert sum(p.numel for p in inv.params if p.trainable) == _trainable_numel(model)
    real_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(p.numel for p in inv.params if not p.trainable and not p.buffer) == real_frozen


@pytest.mark.parametrize("shape", [(384, 128), (128, 384), (64, 128), (1024, 4096)])
@pytest.mark.parametrize("quant", [["quant.backend=bitsandbytes"], ["quant.backend=bitsandbytes", "quant.double_quant=false"],
                                   ["quant.backend=torchao"]])
def test_nf4_layout_matches_the_quantizers(shape, quant):
    """Packed bytes and quantization constants per weight, against slimtune.quant.weight_bytes of
    real bitsandbytes / torchao layers."""
    from torch import nn

    from slimtune.quant import quantize, weight_bytes

    cfg = load_config(None, ["model.preset=tiny-llama", "quant.name=nf4"] + quant)
    lin = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    quantize(lin, cfg.quant)
    wb = weight_bytes(lin)
    lay = nf4_layout(math.prod(shape), cfg.quant, "float32")
    assert lay["packed"] == wb["packed_4bit"]
    assert lay["constants"] == wb["quant_constants"]


def test_llama70b_shapes_and_loram_pruning():
    cfg = load_config(None, ["model.preset=llama-3.1-70b", "pruning.strategy=structured", "pruning.ratio=0.85",
                             "pruning.keep_first_layers=4", "pruning.keep_last_layers=2"])
    spec = model_spec(cfg)
    assert (spec.hidden, spec.num_layers, spec.vocab, spec.kv_heads) == (8192, 80, 128256, 8)
    assert spec.layers[0].n_q == 64 and spec.layers[79].inter == 28672
    # floor(8 * 0.85) = 6 KV groups removed; ceil(28672 * 0.85) = 24372 channels removed
    assert (spec.layers[4].n_kv, spec.layers[4].n_q, spec.layers[4].inter) == (2, 16, 4300)
    assert spec.layers[78].inter == 28672


def test_path_without_config_is_matched_by_name_or_refused():
    from slimtune.config import ConfigError

    cfg = load_config(None, ["model.path=/nonexistent/Meta-Llama-3.1-8B-Instruct"])
    spec = model_spec(cfg)
    assert spec.hidden == 4096 and "llama-3.1-8b" in spec.source
    with pytest.raises(ConfigError, match="model.preset"):
        model_spec(load_config(None, ["model.path=/nonexistent/my-model"]))


def test_activation_checkpointing_and_fused_loss_lower_the_estimate():
    base = ["model.preset=llama-3.1-8b", "model.dtype=bfloat16", "train.micro_batch_size=2", "data.max_seq_len=2048"]
    plain = estimate(load_config(None, base))
    ckpt = estimate(load_config(None, base + ["train.activation_checkpointing=true"]))
    fused = estimate(load_config(None, base + ["kernels.enabled=true"]))
    assert ckpt.activations_ckpt < plain.activations_no_ckpt / 5  # the fp32 log-softmax stays either way
    assert ckpt.allocated_peak < plain.allocated_peak
    # unfused: 3 fp32 (tokens x 128256) buffers at the loss backward; fused: chunks only
    assert fused.allocated_peak < plain.allocated_peak - 2 * 4 * 2 * 2047 * 128256


def test_cli_json_and_exit_codes(tmp_path, capsys):
    from slimtune.cli import main

    rc = main(["plan", "--config", "configs/tiny_lora.yaml", "--json", "--gpu-mem", "24GiB", "--no-advice"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True
    assert out["per_rank_peak_bytes"] == sum(v["bytes"] for v in out["breakdown"].values())
    assert set(out["by_category"]) <= {"weights", "trainable", "grads", "optimizer", "activations", "temporaries",
                                       "overhead"}
    rc = main(["plan", "--config", "configs/tiny_lora.yaml", "--json", "--gpu-mem", "100MiB", "--no-advice"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["fits"] is False and out["per_rank_peak_bytes"] > parse_bytes("100MiB")


@pytest.mark.parametrize("gpu_mem,rc", [("24GiB", 0), ("1MiB", 1)])
def test_simulating_cli_process_exits_quickly_with_its_output_and_code(gpu_mem, rc):
    """The console entry leaves ``plan --simulate`` without tearing down the heap (``cli.entry``):
    the piped JSON is complete (flushed before the exit) and the exit code is the plan's."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "slimtune.cli", "plan", "--config", "configs/tiny_lora.yaml",
                           "--simulate", "--json", "--no-advice", "--gpu-mem", gpu_mem, "train.num_threads=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == rc, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["simulated"]["peak_bytes"] > 0 and out["fits"] is (rc == 0)


def test_cli_table_marks_the_largest_item_and_plot(tmp_path, capsys):
    from slimtune.cli import main

    png = tmp_path / "plan.png"
    rc = main(["plan", "--config", "configs/tiny_lora.yaml", "--plot", str(png), "train.micro_batch_size=64",
               "data.max_seq_len=256", "--gpu-mem", "600MiB"])
    text = capsys.readouterr().out
    assert "<- largest" in text and "verdict:" in text and "assumptions:" in text
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert rc in (0, 1)


def test_plot_draws_the_run_and_every_variant(tmp_path):
    """--plot: one stacked bar per plan (the run and each advised variant); the figure is
    max(6, 2.2 x bars) inches wide at 120 dpi, so the PNG's width counts the bars drawn."""
    import struct

    from slimtune.plan.report import plot

    cfg = load_config(None, ["model.preset=llama-3.1-8b", "model.dtype=bfloat16", "method.name=lora",
                             "train.micro_batch_size=2", "data.max_seq_len=2048"])
    p = plan(cfg, gpus=1, gpu_mem=24 << 30)
    assert not p.fits and len(p.advice) >= 3  # enough bars for the width to count them
    png = tmp_path / "advice.png"
    plot(p, str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    bars = 1 + sum(v.estimate is not None for v in p.advice)
    assert width == int(max(6, 2.2 * bars) * 120) and height == 5 * 120


def test_advice_for_a_run_that_does_not_fit():
    """Llama-3.1-8B LoRA in bf16 at 2 x 4k tokens without checkpointing: over 24 GiB; every piece of
    advice is re-planned and fits, cheapest first."""
    cfg = load_config(None, ["model.preset=llama-3.1-8b", "model.dtype=bfloat16", "method.name=lora",
                             "train.micro_batch_size=2", "data.max_seq_len=4096"])
    p = plan(cfg, gpus=1, gpu_mem=24 << 30)
    assert not p.fits
    assert p.advice and all(v.fits and v.per_rank_peak <= 24 << 30 for v in p.advice)
    assert [v.cost for v in p.advice] == sorted(v.cost for v in p.advice)
    assert any("kernels.enabled=true" in v.overrides or "train.activation_checkpointing=true" in v.overrides
               for v in p.advice)


def test_check_fits_for_train():
    cfg = load_config("configs/tiny_lora.yaml")
    ok, text = check_fits(cfg, 1, 24 << 30)
    assert ok and "FITS" in text
    ok, text = check_fits(cfg, 1, 64 << 20)
    assert not ok and "DOES NOT FIT" in text


def test_fake_scalar_patch_is_undone():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from slimtune.plan.simulate import _fake_scalars

    with FakeTensorMode():
        t = torch.zeros(())
        with _fake_scalars():
            assert float(t) == 1.0
        with pytest.raises(Exception):
            float(t)
    assert "__float__" not in FakeTensor.__dict__


# ----------------------------------------------------------------- static figures and the recipes
def _plan_json(config, **kw):
    from pathlib import Path

    from slimtune.plan.report import to_json

    repo = Path(__file__).resolve().parents[2]
    return to_json(plan(load_config(repo / config), gpu_mem=24 << 30, advice=False, **kw))


def test_frozen_and_trainable_bytes_equal_the_real_quantized_model():
    """Independent reference: the bytes of the model build_model really builds (NF4 via bitsandbytes)."""
    from pathlib import Path

    from slimtune.quant import weight_bytes
    from slimtune.trainer.loop import build_model

    j = _plan_json("configs/tiny_qlora.yaml", gpus=1)
    b = {k: v["bytes"] for k, v in j["breakdown"].items()}
    model, _ = build_model(load_config(Path(__file__).resolve().parents[2] / "configs/tiny_qlora.yaml"), "cpu")
    real = weight_bytes(model)
    assert b["weights.4-bit packed (bitsandbytes)"] == real["packed_4bit"]
    assert b["weights.4-bit constants (absmax, code)"] == real["quant_constants"]
    assert b["trainable"] == real["trainable"]
    assert b["weights.frozen float32"] == real["dense"] - real["trainable"]
    assert b["optimizer"] == pytest.approx(2 * real["trainable"], rel=0.01)  # AdamW: two fp32 moments (+ step counters)


def test_breakdown_adds_up_and_70b_loram_fits_one_24gb_gpu():
    j = _plan_json("configs/llama70b_loram.yaml", gpus=1)
    assert sum(v["bytes"] for v in j["breakdown"].values()) == j["per_rank_peak_bytes"]
    assert j["fits"] is True and j["per_rank_peak_bytes"] < 24 << 30
    assert j["breakdown"][j["largest"]]["bytes"] == max(v["bytes"] for v in j["breakdown"].values())
    assert j["activations"]["no_checkpointing"] > j["activations"]["checkpointing"]


@pytest.mark.parametrize("config,gpus", [("configs/llama70b_loram.yaml", 1), ("configs/llama70b_qlora_fsdp2.yaml", 2),
                                         ("configs/llama70b_qlora_zero3.yaml", 2), ("configs/llama70b_paca.yaml", 2),
                                         ("configs/llama70b_s2ft.yaml", 2), ("configs/llama8b_galore.yaml", 1)])
def test_recipes_fit_24gb_at_their_gpu_counts(config, gpus):
    j = _plan_json(config, gpus=gpus)
    assert j["fits"] is True, (config, j["per_rank_peak_bytes"] / 2**30)


def test_plan_cli_json(capsys):
    from pathlib import Path

    from slimtune.cli import main

    repo = Path(__file__).resolve().parents[2]
    rc = main(["plan", "--config", str(repo / "configs/llama70b_qlora_fsdp2.yaml"), "--gpus", "2", "--json", "--no-advice"])
    out = json.loads(capsys.readouterr().out)
    assert {"per_rank_peak_bytes", "fits", "breakdown"} <= set(out)
    assert rc == (0 if out["fits"] else 1)


def test_simulating_zero3_leaves_no_process_group_environment_behind(tmp_path, monkeypatch):
    """DeepSpeed's comm setup writes RANK / WORLD_SIZE / MASTER_* into os.environ; after a
    simulation a run started in the same process (or a child it spawns) must not see them."""
    import os

    import torch.distributed as dist

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    cfg = _cfg(tmp_path, ["method.name=lora", "shard.strategy=deepspeed_zero3"])
    assert simulate(cfg, world=2, cuda_defaults=False).peak_bytes > 0
    assert {k: os.environ[k] for k in keys if k in os.environ} == {}
    assert not dist.is_initialized()


def test_a_closed_zero3_engine_is_not_kept_alive_by_deepspeed(tmp_path):
    """DeepSpeed keeps every engine it builds (``FWD_MODULE_STACK``, a class-level ``lru_cache``);
    ``ZeRO3Engine.close`` (which the trainer, ``measure_real`` and ``simulate`` call) lets it go, so
    no engine is left for interpreter exit to tear down behind gloo's threads."""
    import gc

    def engines():
        gc.collect()
        return sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())

    before = engines()
    cfg = _cfg(tmp_path, ["method.name=lora", "shard.strategy=deepspeed_zero3"])
    assert simulate(cfg, world=2, cuda_defaults=False).peak_bytes > 0
    assert engines() == before


def test_zero3_on_one_gpu_with_offloaded_parameters_counts_their_gpu_copies(tmp_path):
    """One rank per partition group: DeepSpeed gathers nothing and moves each offloaded partition to
    the GPU (``ds_tensor.to(device)``: a copy there, the partition itself on the CPU accelerator).
    Simulating the GPU run (``cuda_defaults``), those copies are counted: one GPU then simulates
    within 2% of two (with offload, the weights stay in host memory on both), where without them it
    read about 40% lower; two GPUs are unchanged (they all-gather), and so is a run without offload."""
    from unittest import mock

    import slimtune.plan.simulate as sim

    cfg = _cfg(tmp_path, ["method.name=lora", *BF16_NF4, "quant.quant_storage=bfloat16",
                          "shard.strategy=deepspeed_zero3", "shard.deepspeed_config=configs/deepspeed/zero3_offload.json",
                          "train.activation_checkpointing=true"])
    no_copies = mock.patch.dict(sim.SHARD_ON_GPU, {"deepspeed_zero3": lambda engine, notes: []})
    one = simulate(cfg, world=1)
    two = simulate(cfg, world=2)
    with no_copies:
        one_plain = simulate(cfg, world=1)
        two_plain = simulate(cfg, world=2)
    assert abs(one.peak_bytes - two.peak_bytes) <= 0.02 * two.peak_bytes
    assert one_plain.peak_bytes < 0.8 * one.peak_bytes
    assert two_plain.peak_bytes == two.peak_bytes
    assert any("copied from their offloaded host partition" in n for n in one.notes)
    on_gpu = _cfg(tmp_path, ["method.name=lora", "shard.strategy=deepspeed_zero3"])  # zero3.json: no offload
    with no_copies:
        plain = simulate(on_gpu, world=1)
    assert simulate(on_gpu, world=1).peak_bytes == plain.peak_bytes


def test_fsdp2_with_cpu_offload_all_gathers_a_gpu_copy_of_each_host_shard(tmp_path):
    """FSDP2 with CPU offload moves each host shard to the GPU before its all-gather
    (``FSDPParam.all_gather_inputs``: ``.to(device)``), a copy on a GPU but the shard itself on the
    CPU accelerator. While simulating a GPU run (``plan.fsdp2_sim.host_shard_copies``), every
    all-gather input -- torchao NF4 inner tensors and plain LoRA factors -- is a new storage with
    the shard's bytes, which a tracker counts; without offload nothing is patched."""
    import contextlib
    from types import SimpleNamespace

    from slimtune.launch import SHARDERS
    from slimtune.launch.dist import DistInfo
    from slimtune.memory import MemoryTracker
    from slimtune.memory.tracker import tensor_storages
    from slimtune.optim import build_optimizer
    from slimtune.plan.fsdp2_sim import fsdp2_patches, host_shard_copies
    from slimtune.plan.simulate import fake_process_group
    from slimtune.trainer.loop import build_model

    wide = "model.overrides={num_hidden_layers: 2, hidden_size: 512, intermediate_size: 1536}"  # NF4 splits in 2
    cfg = _cfg(tmp_path, ["method.name=lora", *BF16_NF4, "quant.backend=torchao", "shard.strategy=fsdp2",
                          "shard.cpu_offload=true", wide])
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with fake_process_group(2), contextlib.ExitStack() as stack:
        for patch in fsdp2_patches(2, []):
            stack.enter_context(patch)
        model, _ = build_model(cfg, "cpu")
        engine = SHARDERS["fsdp2"](model, cfg, info, build_optimizer)
        stack.callback(engine.close)
        model._get_fsdp_state()._lazy_init()
        params = model.model.layers[0]._get_fsdp_state()._fsdp_param_group.fsdp_params
        assert {type(p._sharded_local_tensor).__name__ for p in params} == {"NF4Tensor", "Tensor"}

        def on_host(p, inputs):
            host = {st._cdata for st in tensor_storages(p._sharded_local_tensor)}
            return [t.untyped_storage()._cdata in host for t in inputs]

        for p in params:  # the CPU accelerator: the host shard itself
            assert all(on_host(p, p.all_gather_inputs))
        notes: list[str] = []
        for patch in host_shard_copies(engine, notes):
            stack.enter_context(patch)
        for p in params:
            tracker = MemoryTracker()
            with tracker:
                inputs = p.all_gather_inputs
            assert not any(on_host(p, inputs))
            assert tracker.peak_bytes == sum(t.untyped_storage().nbytes() for t in inputs) > 0
        assert any("copied from host memory to the GPU" in n for n in notes)
    no_offload = load_config(None, TINY + [f"output.dir={tmp_path}", "shard.strategy=fsdp2"])
    assert host_shard_copies(SimpleNamespace(cfg=no_offload), []) == []


def test_with_cpu_offload_the_optimizer_step_runs_on_the_host(tmp_path):
    """FSDP2 with CPU offload steps the optimizer on the host, next to its offloaded state: what the
    optimizer's step allocates (step 1 creates the AdamW state there; foreach buffers) is not GPU
    memory, and the GPU peak is the largest GPU part over time. Counting the step's allocations on
    the GPU until they are tagged as optimizer state made step 1 the GPU peak, with the state in it."""
    from unittest import mock

    import slimtune.plan.simulate as sim

    cfg = _cfg(tmp_path, ["method.name=full", "shard.strategy=fsdp2", "shard.cpu_offload=true",
                          "train.activation_checkpointing=true", "model.overrides={num_hidden_layers: 6}",
                          "data.max_seq_len=8", "train.micro_batch_size=1"])
    result = simulate(cfg, world=2)
    host = ("weights", "trainable", "optimizer", "grads")
    with mock.patch.object(sim, "_host_memory", lambda cfg, world: (host, ())):  # the step's allocations on the GPU
        on_gpu = simulate(cfg, world=2)
    assert on_gpu.breakdown["optimizer"] > 0 and on_gpu.peak_bytes > result.peak_bytes
    assert result.breakdown["optimizer"] == 0
    backward = result.phases["backward"]["peak_breakdown"]
    assert result.peak_bytes >= sum(backward.values()) - sum(backward[c] for c in host)
    assert result.host_bytes > 0 and any("what the optimizer step allocates" in n for n in result.notes)


def test_a_second_fsdp2_simulation_in_one_process_reports_the_same(tmp_path):
    """DTensor's sharding propagation runs ops on fake tensors made from metadata, and caches its
    answers per process. A real run makes them in a fake mode of its own (nothing allocated); so
    does the simulation (``plan.fsdp2_sim.own_propagation_mode``): the first simulation, whose
    propagation misses the cache, counts nothing more than the second, which hits it -- peaks,
    breakdowns and every phase. Before, the first run's optimizer phase counted the propagation's
    tensors (here 11.3 MB, a 0.9 MB model) and the GPU peak was that step's."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    cfg = _cfg(tmp_path, ["method.name=full", "model.dtype=bfloat16", "shard.strategy=fsdp2",
                          "train.activation_checkpointing=true"])
    _clear_sharding_prop_cache()
    first, second = simulate(cfg, world=2), simulate(cfg, world=2)
    assert (first.peak_bytes, first.breakdown, first.phases) == (second.peak_bytes, second.breakdown, second.phases)
    assert first.peak_bytes == first.phases["backward"]["peak_bytes"]  # not the optimizer step


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp2_full_fine_tuning_analytic_matches_the_simulation_at_depth(offload, tmp_path):
    """A full fine-tune under FSDP2 peaks around its reduce-scatters (a layer's unsharded gradients
    next to the reduce-scatter input FSDP2 keeps until the next unit's, the previous layer's flat
    all-gather buffer): with 6 layers the analytic plan (``plan.analytic._fsdp2_reduce_moments``)
    is within 5% of ``--simulate``; without those moments it read 0.72 of it with offload."""
    cfg = _cfg(tmp_path, ["method.name=full", "shard.strategy=fsdp2", f"shard.cpu_offload={str(offload).lower()}",
                          "train.activation_checkpointing=true", "data.max_seq_len=8", "train.micro_batch_size=1",
                          "model.overrides={num_hidden_layers: 6, intermediate_size: 384}"])
    sim = simulate(cfg, world=2)
    ana = estimate(cfg, world=2, device="cuda")
    assert ana.allocated_peak == pytest.approx(sim.peak_bytes, rel=0.05), (ana.moments, sim.breakdown)
    assert "reduce-scatter" in ana.moment or ana.moment == "backward (second layer)"
