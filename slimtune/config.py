"""Typed run configuration: YAML file + dotted ``key=value`` overrides.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is
an error, and every error is reported as one line naming the dotted key, the
value given and what is allowed, before any model is built.

Allowed names for the pluggable axes (method, quant, pruning, optimizer,
sharder) are listed here as ``Literal`` types; each one has exactly one
implementation in the matching table (``slimtune.adapters.METHODS``,
``slimtune.quant.QUANTIZERS`` ...).  A test checks the two agree.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (field, value, what is allowed)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- model
class ModelConfig(_Section):
    # A local HF folder (config.json + safetensors), or a tiny preset name
    # ("tiny-llama", "tiny-qwen2", "tiny-mistral") built with random weights.
    path: Optional[str] = None
    preset: Optional[Literal["tiny-llama", "tiny-qwen2", "tiny-mistral", "llama-3.1-8b", "llama-3.1-70b", "llama-2-7b", "llama-2-13b", "llama-2-70b"]] = None
    # Preset size overrides (only with ``preset``), e.g. {"num_hidden_layers": 2}.
    overrides: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: Optional[str] = None  # defaults to ``path`` or the bundled byte tokenizer
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    # Initialise the preset from this seed (so the "untrained" model is reproducible).
    init_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.preset is None):
            raise ValueError("set exactly one of model.path (a local HF model folder) or model.preset (a built-in tiny/meta preset)")
        if self.overrides and self.preset is None:
            raise ValueError("model.overrides only applies to model.preset")
        return self


# --------------------------------------------------------------------------- data
class DataSource(_Section):
    path: str  # file (json/jsonl/parquet/txt) or a folder written by datasets.save_to_disk
    split: Optional[str] = None  # split name inside a saved DatasetDict
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    max_records: Optional[int] = Field(default=None, ge=1)


class DataConfig(_Section):
    train: DataSource = Field(default_factory=lambda: DataSource(path="data/tasks/train.jsonl"))
    eval: Optional[DataSource] = Field(default_factory=lambda: DataSource(path="data/tasks/eval.jsonl"))
    max_seq_len: int = Field(default=128, ge=8)
    packing: bool = False
    overlong: Literal["truncate", "drop"] = "truncate"
    mask_prompt: bool = True
    # Eval accuracy: greedy-decode the response of this many eval records.
    eval_generate_records: int = Field(default=64, ge=0)
    max_new_tokens: int = Field(default=16, ge=1)
    shuffle: bool = True


# --------------------------------------------------------------------------- method
class LoraConfig(_Section):
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    rslora: bool = False  # scale = alpha / sqrt(r) instead of alpha / r
    init: Literal["kaiming", "gaussian"] = "kaiming"


class PacaConfig(_Section):
    r: int = Field(default=32, ge=1)  # trained input columns per weight
    scale: float = Field(default=1.0, gt=0)


class S2ftConfig(_Section):
    # Fraction of attention heads trained (o_proj input column groups; v_proj rows if v_rows).
    # With v_rows the unit is a whole KV group (its value head + the o_proj columns of every
    # query head that reads it), counted as a fraction of the KV heads; see docs/s2ft.md.
    attn_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    # Fraction of MLP intermediate channels trained (down_proj input columns; up_proj rows if up_rows).
    mlp_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    v_rows: bool = False
    up_rows: bool = False
    selection: Literal["random", "weight", "activation", "weight_activation", "gradient"] = "random"
    # Which end of a score is trained (scored selections only); the paper found small activations best.
    prefer: Literal["small", "large"] = "small"
    calibration_batches: int = Field(default=4, ge=1)
    scale: float = Field(default=1.0, gt=0)  # update = scale * delta


DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MethodConfig(_Section):
    name: Literal["full", "lora", "paca", "s2ft"] = "lora"
    # Module-name suffixes of the linears the method adapts (ignored by ``full``).
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora: LoraConfig = Field(default_factory=LoraConfig)
    paca: PacaConfig = Field(default_factory=PacaConfig)
    s2ft: S2ftConfig = Field(default_factory=S2ftConfig)
    # Also train embeddings/lm_head under ``full``? (full always trains everything)
    train_embeddings: bool = True

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("must name at least one module, e.g. [q_proj, v_proj]")
        return v


# --------------------------------------------------------------------------- quant
class QuantConfig(_Section):
    name: Literal["none", "nf4"] = "none"
    backend: Literal["bitsandbytes", "torchao"] = "bitsandbytes"
    double_quant: bool = True
    # NF4 block size (weights per absmax); the sizes bitsandbytes' kernels accept.
    block_size: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # bitsandbytes packed-byte storage dtype; must equal the param dtype under ZeRO-3/FSDP1.
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"])

    @model_validator(mode="after")
    def _backend_options(self):
        if self.backend == "torchao" and not self.double_quant:
            raise ValueError("quant.backend=torchao always double-quantizes the scales; set quant.double_quant=true or use quant.backend=bitsandbytes")
        if self.backend == "torchao" and self.quant_storage != "uint8":
            raise ValueError(f"quant.quant_storage={self.quant_storage} is a bitsandbytes option (ZeRO-3/FSDP1); quant.backend=torchao stores uint8")
        return self


# --------------------------------------------------------------------------- pruning
class PruningCalibrationConfig(_Section):
    """Plain-text batches for importance scores that need data (taylor, wanda)."""

    source: Optional[DataSource] = None  # None: the run's data.train
    num_samples: int = Field(default=16, ge=1)  # packed sequences
    seq_len: int = Field(default=128, ge=8)
    batch_size: int = Field(default=4, ge=1)


class PruningAlignmentConfig(_Section):
    """LoRAM's optional alignment: brief continued pre-training of the pruned model on plain
    text (all weights but the frozen ones), cached under ``cache_dir`` and reused across runs."""

    enabled: bool = False
    data: Optional[DataSource] = None
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    micro_batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    seq_len: int = Field(default=512, ge=8)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    # Module-name parts kept frozen during alignment (the official code freezes lm_head).
    frozen: list[str] = Field(default_factory=lambda: ["lm_head"])
    seed: int = 0
    cache_dir: str = "~/.cache/slimtune/loram"

    @model_validator(mode="after")
    def _needs_data(self):
        if self.enabled and self.data is None:
            raise ValueError("pruning.alignment.enabled=true needs pruning.alignment.data (a plain-text source)")
        return self


class PruningConfig(_Section):
    """LoRAM: prune the frozen base before quantization and training; recover the adapter after.

    ``random`` and ``structured`` remove whole attention head groups and MLP channels (a
    smaller dense model); ``semi_structured`` (N:M) and ``unstructured`` zero weights in place.
    """

    strategy: Literal["none", "random", "structured", "semi_structured", "unstructured"] = "none"
    # Fraction removed: structured/random per layer (heads and channels), unstructured per matrix.
    ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    attn_ratio: Optional[float] = Field(default=None, ge=0.0, lt=1.0)  # structured: overrides ratio for heads
    mlp_ratio: Optional[float] = Field(default=None, ge=0.0, lt=1.0)  # structured: overrides ratio for channels
    # kv_group: a KV head goes with its whole query group (GQA-safe, as the official code);
    # query_head: the same number of query heads is removed inside every KV group.
    attn_unit: Literal["kv_group", "query_head"] = "kv_group"
    # Leave the first / last decoder layers unpruned (the official 70B run prunes layers 4..77 of 80).
    keep_first_layers: int = Field(default=0, ge=0)
    keep_last_layers: int = Field(default=0, ge=0)
    # Round the kept MLP channels up to a multiple of this (1 = the official count), e.g. 128 so
    # every rank's FSDP2 row shard of a pruned NF4 weight holds whole quantization blocks.
    channel_multiple: int = Field(default=1, ge=1)
    # structured: taylor (|w * dL/dw| summed per head group / channel) or magnitude (L2 norm);
    # masks: magnitude (|w|) or wanda (|w| * input activation norm).  None: taylor for
    # structured, magnitude for masks; ignored by random.
    importance: Optional[Literal["taylor", "magnitude", "wanda"]] = None
    n_m: tuple[int, int] = (2, 4)  # semi_structured: keep N of every M consecutive input weights
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))  # masks only
    seed: Optional[int] = None  # random selection; None: train.seed
    calibration: PruningCalibrationConfig = Field(default_factory=PruningCalibrationConfig)
    alignment: PruningAlignmentConfig = Field(default_factory=PruningAlignmentConfig)
    # Write the recovered adapter (PEFT, original shapes) to output.dir/recovered at the end of a run.
    recover_at_end: bool = True
    # Also evaluate the recovered adapter on the original (unpruned, quantized as quant.*) model at
    # the end; needs memory for the whole original model (off for the 70B recipe).
    eval_recovered: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        s = self.strategy
        if s == "none":
            if self.alignment.enabled:
                raise ValueError("pruning.alignment needs a pruning.strategy other than none")
            return self
        if s in ("random", "structured"):
            if max(self.attn_ratio if self.attn_ratio is not None else self.ratio,
                   self.mlp_ratio if self.mlp_ratio is not None else self.ratio) <= 0:
                raise ValueError(f"pruning.strategy={s} needs pruning.ratio (or attn_ratio/mlp_ratio) > 0")
            if s == "structured" and self.importance == "wanda":
                raise ValueError("pruning.importance=wanda is for masks; structured pruning allows taylor or magnitude")
        else:
            if self.importance == "taylor":  # None resolves to magnitude
                raise ValueError(f"pruning.strategy={s} allows importance magnitude or wanda (taylor is for structured)")
            if self.attn_ratio is not None or self.mlp_ratio is not None:
                raise ValueError("pruning.attn_ratio / mlp_ratio apply to structured pruning only")
        if s == "unstructured" and self.ratio <= 0:
            raise ValueError("pruning.strategy=unstructured needs pruning.ratio > 0")
        if s == "semi_structured":
            n, m = self.n_m
            if not 0 < n < m:
                raise ValueError(f"pruning.n_m={list(self.n_m)}: need 0 < N < M (e.g. [2, 4])")
        return self


# --------------------------------------------------------------------------- optim
class GaloreConfig(_Section):
    """GaLore projection settings (used by optim.name galore_adamw / galore_adamw8bit)."""

    rank: int = Field(default=128, ge=1)
    update_proj_gap: int = Field(default=200, ge=1)  # new SVD basis every this many steps
    scale: float = Field(default=0.25, gt=0)  # projected-back update is multiplied by this
    # std: right projection if rows >= cols else left (as galore-torch); left/right: always that side.
    proj_type: Literal["std", "left", "right"] = "std"
    # 2-D weights whose dotted name has one of these parts are projected (if rank < min(shape)).
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    svd: Literal["exact", "randomized"] = "exact"
    oversample: int = Field(default=8, ge=0)  # randomized SVD: extra columns beyond rank
    power_iters: int = Field(default=2, ge=0)  # randomized SVD: subspace iterations
    seed: int = 0  # randomized SVD sketch seed (combined with the step)
    # aligned: after a basis refresh each new singular vector is flipped to point like the previous
    # basis's (an SVD fixes vectors only up to sign; the moments carried across refreshes would
    # otherwise depend on LAPACK's sign choice, and sharded and 1-rank runs drift apart);
    # svd: LAPACK's signs as they come, exactly galore-torch's trajectory (docs/galore.md).
    basis_sign: Literal["aligned", "svd"] = "aligned"


class OptimConfig(_Section):
    name: Literal["adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit"] = "adamw"
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, ge=0)  # 0 disables clipping
    # Step each parameter in its post-accumulate-grad hook and free its grad at once
    # (see slimtune/optim/__init__.py for the loop contract and docs/galore.md for clipping).
    per_layer: bool = False
    # 8-bit optimizers keep tensors with fewer elements than this in 32-bit state (bitsandbytes rule).
    min_8bit_size: int = Field(default=4096, ge=0)
    galore: GaloreConfig = Field(default_factory=GaloreConfig)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


# --------------------------------------------------------------------------- shard
class ShardConfig(_Section):
    # none: every rank holds the whole model (data parallel); fsdp2: torch fully_shard per decoder
    # layer + root; deepspeed_zero3: deepspeed.initialize with ``deepspeed_config`` (see docs/sharding.md).
    strategy: Literal["none", "fsdp2", "deepspeed_zero3"] = "none"
    # Parameters, gradients and optimizer state on the CPU (FSDP2: CPUOffloadPolicy; ZeRO-3:
    # offload_param + offload_optimizer to cpu, overriding the JSON).
    cpu_offload: bool = False
    # FSDP2 mixed precision: dtype parameters are all-gathered and computed in (null: each
    # parameter's own dtype) and dtype gradients are reduced in.
    param_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    # FSDP2: free gathered layer weights after forward (re-gather in backward).
    reshard_after_forward: bool = True
    # DeepSpeed JSON; "auto" values are filled from the run config (batch, accumulation, clipping, dtype).
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    # fsdp2 / deepspeed_zero3 + model.path: build on the meta device, then per decoder layer read its
    # tensors from the safetensors files, quantize, attach the method and shard, so a rank holds its
    # shards + one layer (docs/sharding.md).
    low_memory_load: bool = False


# --------------------------------------------------------------------------- train
class TrainConfig(_Section):
    max_steps: int = Field(default=100, ge=1)
    micro_batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    seed: int = 42
    eval_every: int = Field(default=0, ge=0)  # 0 = never (besides before/after if eval_at_ends)
    eval_at_ends: bool = True
    eval_batch_size: int = Field(default=16, ge=1)
    log_every: int = Field(default=1, ge=1)
    save_every: int = Field(default=0, ge=0)  # 0 = only at the end
    keep_last: int = Field(default=2, ge=1)
    resume: Literal["auto", "never"] | str = "auto"  # auto: latest checkpoint in output.dir; or a path
    activation_checkpointing: bool = False
    progress_bar: bool = True
    tensorboard: bool = True
    # On a GPU, train first runs the analytic memory plan (slimtune plan) for this run and stops with
    # the planner's table and advice when it cannot fit; true skips that check.
    skip_memory_check: bool = False
    # Stop after this many optimizer steps in this process (testing resume): not a schedule setting.
    stop_after_steps: Optional[int] = Field(default=None, ge=1)
    num_threads: Optional[int] = Field(default=None, ge=1)


# --------------------------------------------------------------------------- output
class OutputConfig(_Section):
    dir: str = "runs/default"
    save_adapter: bool = True
    save_merged: bool = False
    overwrite: bool = False


class KernelsConfig(_Section):
    # Master switch for slimtune.kernels (docs/kernels.md). Each op falls back to its torch
    # reference where Triton is missing or tensors are on CPU, so enabling is always safe.
    enabled: bool = False
    # LoRA / PaCA / input-column S2FT over a bitsandbytes NF4 base: dequantize inside the
    # matmul tiles, adapter term fused (slimtune.kernels.apply).
    fused_linear: bool = True
    # Loss without full logits (Liger's fused linear CE on CUDA, chunked torch elsewhere).
    fused_loss: bool = True
    # Liger-Kernel RMSNorm / SwiGLU / RoPE on the model instance (CUDA only).
    liger_ops: bool = True
    # Tokens per loss chunk; default: Liger's rule (chunk logits ~ tokens x hidden values).
    loss_chunk_tokens: Optional[int] = Field(default=None, ge=1)


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.quant.name != "none" and self.method.name == "full":
            raise ValueError(
                "method.name=full cannot train a quantized base (quant.name="
                f"{self.quant.name}); use a method that trains an added part (lora) or set quant.name=none"
            )
        if self.shard.low_memory_load and self.pruning.strategy != "none":
            raise ValueError(
                f"shard.low_memory_load=true cannot be combined with pruning.strategy={self.pruning.strategy}: "
                "low-memory loading fills each rank's shard straight from the checkpoint files, and LoRAM pruning "
                "needs the whole layer (and calibration data) to choose what to keep; set shard.low_memory_load=false "
                "(a cached aligned LoRAM model is loaded without reading the original weights anyway)"
            )
        galore = self.optim.name.startswith("galore")
        if (galore or self.optim.per_layer) and self.shard.strategy == "deepspeed_zero3":
            raise ValueError(
                f"optim.name={self.optim.name} / optim.per_layer={self.optim.per_layer} cannot run under "
                "shard.strategy=deepspeed_zero3: ZeRO-3 flattens parameters into 1-D partitions and owns the "
                "optimizer step, so GaLore gets no 2-D gradient to project and per-layer hooks never see a whole "
                "gradient; use shard.strategy=fsdp2 or none, or optim.name=adamw/adamw8bit"
            )
        return self


# --------------------------------------------------------------------------- loading
def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (``1e-4``, ``true``, ``[q_proj,v_proj]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is empty or has an empty part")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {key}: {p!r} is a value, not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_scalar(value)
    return raw


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        # pydantic puts Literal alternatives in ctx['expected']
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            section = _section_for(loc)
            if section is not None:
                msg += f"; allowed keys here: {', '.join(sorted(section.model_fields))}"
        if e["type"] == "literal_error":
            msg = f"not an allowed value; allowed: {e['ctx']['expected']}"
        given = e.get("input")
        given_txt = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{loc or '<config>'}: {msg}{given_txt}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _section_for(loc: str):
    """The pydantic model that owns the parent of dotted ``loc``, for listing allowed keys."""
    parts = loc.split(".")[:-1]
    model: Any = RunConfig
    for p in parts:
        field = model.model_fields.get(p)
        if field is None:
            return None
        ann = field.annotation
        # unwrap Optional[X]
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                ann = cand
                break
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def validate(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
    raw = apply_overrides(raw, list(overrides or []))
    return validate(raw)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
