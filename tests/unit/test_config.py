"""Config validation: every error names the key, the value and what is allowed."""
from pathlib import Path

import pytest

from slimtune.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.preset=tiny-llama"]


def _err(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, BASE + overrides if path is None else overrides)
    return str(info.value)


def test_unknown_key_names_key_and_allowed_keys():
    msg = _err(["train.max_stepz=5"])
    assert "train.max_stepz" in msg and "unknown key" in msg and "max_steps" in msg


def test_unknown_section():
    msg = _err(["trainer.max_steps=5"])
    assert "trainer" in msg and "unknown key" in msg and "train" in msg


def test_wrong_type_names_value():
    msg = _err(["method.lora.r=sixteen"])
    assert "method.lora.r" in msg and "'sixteen'" in msg and "integer" in msg


def test_out_of_range_names_bound():
    msg = _err(["train.max_steps=0"])
    assert "train.max_steps" in msg and "greater than or equal to 1" in msg and "(got 0)" in msg
    msg = _err(["method.lora.dropout=1.5"])
    assert "method.lora.dropout" in msg and "less than 1" in msg


def test_bad_choice_lists_allowed_values():
    msg = _err(["method.name=dora"])
    assert "method.name" in msg and "'dora'" in msg and "'lora'" in msg and "'full'" in msg
    msg = _err(["quant.name=int3"])
    assert "quant.name" in msg and "'nf4'" in msg


def test_model_source_required():
    with pytest.raises(ConfigError) as info:
        load_config(None, [])
    assert "model" in str(info.value)
    msg = _err(["model.path=/x"])  # both preset and path
    assert "exactly one of model.path" in msg


def test_cross_section_check():
    msg = _err(["method.name=full", "quant.name=nf4"])
    assert "quant.name=nf4" in msg and "full" in msg


def test_override_syntax_errors():
    msg = _err(["train.max_steps"])
    assert "key=value" in msg
    msg = _err(["train.max_steps=5", "train.max_steps.x=1"])
    assert "not a section" in msg


def test_overrides_parse_like_yaml():
    cfg = load_config(None, BASE + ["optim.lr=1e-4", "method.target_modules=[q_proj,v_proj]", "train.activation_checkpointing=true"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.activation_checkpointing is True


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(p) in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "not found" in str(info.value)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("**/*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    if path.parent.name in ("accelerate", "deepspeed", "slurm"):
        pytest.skip("launcher config, not a run config")
    load_config(path)


def test_check_config_cli(capsys):
    from slimtune.cli import main

    assert main(["check-config", str(REPO / "configs/tiny_lora.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["check-config", str(REPO / "configs/tiny_lora.yaml"), "--set", "method.name=nope"]) == 2
    assert "method.name" in capsys.readouterr().err


def test_literal_names_match_tables():
    """The names the config accepts are exactly the names the tables implement."""
    from typing import get_args

    from slimtune.adapters import METHODS
    from slimtune.config import MethodConfig, QuantConfig, ShardConfig
    from slimtune.launch import SHARDERS
    from slimtune.quant import QUANTIZERS

    assert set(get_args(MethodConfig.model_fields["name"].annotation)) == set(METHODS())
    assert set(get_args(QuantConfig.model_fields["name"].annotation)) == set(QUANTIZERS)
    assert set(get_args(ShardConfig.model_fields["strategy"].annotation)) == set(SHARDERS)


@pytest.mark.parametrize("overrides, needle", [
    (["optim.name=galore_adamw", "shard.strategy=deepspeed_zero3"], "ZeRO-3 flattens parameters"),
    (["optim.per_layer=true", "shard.strategy=deepspeed_zero3"], "per-layer hooks"),
    (["shard.low_memory_load=true", "pruning.strategy=structured", "pruning.ratio=0.5"], "low_memory_load"),
])
def test_unsupported_combinations_are_refused_before_any_work(overrides, needle):
    assert needle in _err(overrides)
