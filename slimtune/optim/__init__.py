"""Optimizers and LR schedules: the ``OPTIMIZERS`` table, ``build_optimizer``, ``build_scheduler``.

``OPTIMIZERS[name]`` (name = ``optim.name``) is an :class:`OptimizerSpec` with

* ``build(named_params, optim_cfg) -> torch.optim.Optimizer`` over ``[(name, param)]``
  (weight decay only on tensors with >= 2 dims that are not biases), and
* ``state_bytes(named_shapes, optim_cfg, param_bytes) -> int``: the optimizer-state
  bytes from parameter shapes alone (no allocation), for the planner and docs/galore.md.

| name             | implementation                                                       |
|------------------|----------------------------------------------------------------------|
| adamw            | ``torch.optim.AdamW``                                                |
| adamw8bit        | ``bitsandbytes.optim.AdamW8bit`` (runs on CPU with bitsandbytes 0.50) |
| galore_adamw     | ``slimtune.optim.galore.GaLoreAdamW`` (32-bit moments)               |
| galore_adamw8bit | ``GaLoreAdamW(bits=8)``: bitsandbytes 8-bit blockwise moments        |

With ``optim.per_layer: true`` every trainable parameter gets its own inner optimizer,
stepped inside its post-accumulate-grad hook (:class:`~slimtune.optim.per_layer.PerLayerOptimizer`).

Loop contract (the same code runs in both modes)::

    optimizer = build_optimizer(model, cfg)          # after adapters.attach / shard
    scheduler = build_scheduler(optimizer, cfg)      # LambdaLR over optimizer.param_groups
    for step in range(start, cfg.train.max_steps):
        for i, batch in enumerate(micro_batches):    # cfg.train.grad_accum of them
            set_sync(optimizer, i == len(micro_batches) - 1)   # BEFORE backward
            (model(**batch).loss / len(micro_batches)).backward()
        grad_norm = clip_grad_norm_(optimizer, cfg.optim.max_grad_norm)  # before step()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    # checkpoint: optimizer.state_dict() / scheduler.state_dict(); resume: build both the
    # same way, then load_state_dict on each (GaLore bases, step counters and 8-bit
    # moments are in the optimizer state and resume exactly).

In per-layer mode ``set_sync`` decides whether the hooks step parameters (only on the
last micro-batch), clipping already happened inside the hooks (per-tensor budget
clipping, see ``per_layer.py`` / docs/galore.md) and ``clip_grad_norm_`` just returns the
pre-clip global norm; ``step()`` is bookkeeping (it steps only gradients no hook
consumed).  In normal mode ``set_sync`` is a no-op and ``clip_grad_norm_`` is
``torch.nn.utils.clip_grad_norm_`` over the optimizer's parameters.  A data-parallel
engine must reduce gradients *inside* the hooks in per-layer mode: it sets
``optimizer.grad_reduce = fn`` (in-place reduction of one gradient).  The hooks stay on the
parameters for the optimizer's life: call ``optimizer.remove_hooks()`` before building
another per-layer optimizer on the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from slimtune.optim import projector, sharded
from slimtune.optim.galore import GaLoreAdamW
from slimtune.optim.per_layer import PerLayerOptimizer

NamedParams = list[tuple[str, nn.Parameter]]
NamedShapes = Sequence[tuple[str, Sequence[int]]]

_BNB_QMAP_BYTES = 2 * 256 * 4  # bitsandbytes' two dynamic maps, shared by an optimizer's 8-bit states


# --------------------------------------------------------------------------- param groups
def decays(name: str, shape: Sequence[int]) -> bool:
    """Weight decay applies to matrices and embeddings, not to biases or norm weights (1-D)."""
    return len(shape) >= 2 and not name.endswith(".bias")


def is_galore_target(name: str, shape: Sequence[int], galore_cfg) -> bool:
    """A 2-D weight one of whose dotted name parts is a target, and with rank < min(shape).

    A tensor whose smaller side is <= rank gains nothing from projection (the basis would
    add memory), so it stays plain Adam; this is what lets GaLore sit next to LoRA/PaCA
    factors, which are projected only when larger than the rank.
    """
    if len(shape) != 2 or galore_cfg.rank >= min(shape):
        return False
    return any(part in galore_cfg.target_modules for part in name.split("."))


def _adam_groups(named: NamedParams, weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if decays(n, p.shape)]
    no_decay = [p for n, p in named if not decays(n, p.shape)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _galore_groups(named: NamedParams, ocfg) -> list[dict]:
    g = ocfg.galore
    projected = [p for n, p in named if is_galore_target(n, p.shape, g)]
    rest = [(n, p) for n, p in named if not is_galore_target(n, p.shape, g)]
    groups = _adam_groups(rest, ocfg.weight_decay)
    if projected:
        groups.append({
            "params": projected, "weight_decay": ocfg.weight_decay, "rank": g.rank,
            "update_proj_gap": g.update_proj_gap, "scale": g.scale, "proj_type": g.proj_type,
            "svd": g.svd, "oversample": g.oversample, "power_iters": g.power_iters, "seed": g.seed,
            # the sign rule of refreshed bases (galore.py); config field requested, default "aligned"
            "basis_sign": g.basis_sign,
        })
    return groups


# --------------------------------------------------------------------------- builders
def _build_adamw(named: NamedParams, ocfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_adam_groups(named, ocfg.weight_decay), lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)


def _build_adamw8bit(named: NamedParams, ocfg) -> torch.optim.Optimizer:
    from slimtune.quant.bnb import import_bitsandbytes

    bnb = import_bitsandbytes()

    return bnb.optim.AdamW8bit(
        _adam_groups(named, ocfg.weight_decay), lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps,
        min_8bit_size=ocfg.min_8bit_size,
    )


def _build_galore(bits: int) -> Callable[[NamedParams, object], torch.optim.Optimizer]:
    def build(named: NamedParams, ocfg) -> torch.optim.Optimizer:
        return GaLoreAdamW(
            _galore_groups(named, ocfg), lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps,
            weight_decay=ocfg.weight_decay, bits=bits, min_8bit_size=ocfg.min_8bit_size,
        )

    return build


# --------------------------------------------------------------------------- state bytes from shapes
def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _bnb_moments_bytes(numel: int, min_8bit_size: int) -> int:
    """Two bitsandbytes Adam moments: uint8 codes + fp32 absmax per 256 block, or fp32 if small."""
    if numel < min_8bit_size:
        return 2 * numel * 4
    return 2 * numel + 2 * math.ceil(numel / 256) * 4


def _adamw_bytes(named_shapes: NamedShapes, ocfg, param_bytes: int) -> int:
    # torch AdamW: exp_avg and exp_avg_sq like the parameter, plus a 0-d fp32 step tensor.
    return sum(2 * _numel(s) * param_bytes + 4 for _, s in named_shapes)


def _adamw8bit_bytes(named_shapes: NamedShapes, ocfg, param_bytes: int) -> int:
    total = sum(_bnb_moments_bytes(_numel(s), ocfg.min_8bit_size) for _, s in named_shapes)
    any8 = any(_numel(s) >= ocfg.min_8bit_size for _, s in named_shapes)
    return total + (_BNB_QMAP_BYTES if any8 else 0)


def _galore_bytes(bits: int):
    def state_bytes(named_shapes: NamedShapes, ocfg, param_bytes: int) -> int:
        g = ocfg.galore
        total = 0
        for name, shape in named_shapes:
            moment_shape = shape
            if is_galore_target(name, shape, g):
                side = projector.projection_side(shape, g.proj_type)
                moment_shape = projector.projected_shape(shape, g.rank, side)
                total += _numel(projector.basis_shape(shape, g.rank, side)) * param_bytes
            n = _numel(moment_shape)
            total += 2 * n * param_bytes if bits == 32 else _bnb_moments_bytes(n, ocfg.min_8bit_size)
        return total

    return state_bytes


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[NamedParams, object], torch.optim.Optimizer]
    state_bytes: Callable[[NamedShapes, object, int], int]
    projects: bool  # GaLore: needs at least one projected weight


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", _build_adamw, _adamw_bytes, False),
    "adamw8bit": OptimizerSpec("adamw8bit", _build_adamw8bit, _adamw8bit_bytes, False),
    "galore_adamw": OptimizerSpec("galore_adamw", _build_galore(32), _galore_bytes(32), True),
    "galore_adamw8bit": OptimizerSpec("galore_adamw8bit", _build_galore(8), _galore_bytes(8), True),
}


# --------------------------------------------------------------------------- public API
def trainable_named_parameters(model: nn.Module) -> NamedParams:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optim`` over the model's trainable parameters (``cfg``: RunConfig)."""
    from slimtune.config import ConfigError

    ocfg = cfg.optim
    spec = OPTIMIZERS[ocfg.name]
    named = trainable_named_parameters(model)
    if not named:
        raise ConfigError("the model has no trainable parameters (did method.attach freeze everything?)")
    if spec.projects:
        for n, p in named:  # FSDP2's row blocks are handled (slimtune.optim.sharded); other layouts are not
            if sharded.is_sharded(p) and is_galore_target(n, p.shape, ocfg.galore):
                try:
                    sharded.check_row_sharded(p, n)
                except ValueError as e:
                    raise ConfigError(f"optim.name={ocfg.name}: {e}") from None
        if not any(is_galore_target(n, p.shape, ocfg.galore) for n, p in named):
            raise ConfigError(
                f"optim.name={ocfg.name} projects no parameter: no trainable 2-D weight has a name part in "
                f"optim.galore.target_modules={ocfg.galore.target_modules} and min(shape) > "
                f"optim.galore.rank={ocfg.galore.rank}; lower the rank or use adamw"
            )
    if ocfg.per_layer:
        return PerLayerOptimizer(named, lambda one: spec.build(one, ocfg), max_grad_norm=ocfg.max_grad_norm)
    return spec.build(named, ocfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``optim.warmup_steps``, then cosine / linear decay to
    ``optim.min_lr_ratio * lr`` at ``train.max_steps`` (or constant).

    transformers' ``get_wsd_schedule`` (warm-up, stable, decay) with the stable phase empty
    (cosine, linear) or filling the rest (constant).  Step 0 of a warm-up runs at
    ``min_lr_ratio * lr`` (transformers' convention).
    """
    from transformers.optimization import get_wsd_schedule

    ocfg, total = cfg.optim, cfg.train.max_steps
    warmup = min(ocfg.warmup_steps, total)
    rest = total - warmup
    decay_steps = {"cosine": rest, "linear": rest, "constant": 0}[ocfg.scheduler]
    decay_type = {"cosine": "cosine", "linear": "linear", "constant": "linear"}[ocfg.scheduler]
    return get_wsd_schedule(
        optimizer, num_warmup_steps=warmup, num_decay_steps=decay_steps, num_stable_steps=rest - decay_steps,
        decay_type=decay_type, min_lr_ratio=ocfg.min_lr_ratio,
    )


def set_sync(optimizer: torch.optim.Optimizer, is_last_micro_batch: bool) -> None:
    """Tell a per-layer optimizer whether this micro-batch's backward should step (no-op otherwise)."""
    if isinstance(optimizer, PerLayerOptimizer):
        optimizer.set_sync(is_last_micro_batch)


def clip_grad_norm_(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradients the next ``step()`` uses; return the pre-clip global norm.

    ``max_norm <= 0`` only measures.  Per-layer mode: clipping was done in the hooks with
    the ``max_grad_norm`` given at build time, so this only returns the norm.
    """
    if isinstance(optimizer, PerLayerOptimizer):
        if max_norm != optimizer.max_grad_norm:
            raise ValueError(
                f"per-layer optimizer clips with max_grad_norm={optimizer.max_grad_norm} (set at build), got {max_norm}"
            )
        return optimizer.grad_norm()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` held by this rank (each storage counted once;
    for a sharded (DTensor) state tensor, this rank's block)."""
    seen, total = set(), 0
    for param_state in optimizer.state.values():
        for value in _tensors(param_state):
            storage = sharded.local(value).untyped_storage()  # a DTensor: this rank's block
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def _tensors(obj) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def estimate_state_bytes(named_shapes: NamedShapes, ocfg, param_bytes: int) -> int:
    """Optimizer-state bytes of ``ocfg.name`` for parameters of these shapes (no allocation)."""
    return OPTIMIZERS[ocfg.name].state_bytes(named_shapes, ocfg, param_bytes)


__all__ = [
    "OPTIMIZERS", "OptimizerSpec", "GaLoreAdamW", "PerLayerOptimizer", "build_optimizer", "build_scheduler",
    "set_sync", "clip_grad_norm_", "optimizer_state_bytes", "estimate_state_bytes", "decays",
    "is_galore_target", "trainable_named_parameters",
]
