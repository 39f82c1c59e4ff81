"""``method.name: s2ft`` -- structured sparse fine-tuning (S2FT) with partial back-propagation.

Per decoder layer, a few attention heads and MLP channels are trained:

* attention: the input columns of ``o_proj`` belonging to the selected heads
  (``head_dim`` columns per query head); with ``v_rows`` also the output rows of
  ``v_proj`` of the value heads they read;
* MLP: the input columns of ``down_proj`` of the selected intermediate channels; with
  ``up_rows`` also the same rows of ``up_proj``.

GQA rule (n_q query heads, n_kv value heads, g = n_q / n_kv; HF's ``repeat_kv`` makes
query head h read value head h // g, whose rows are ``v_proj`` rows [j*hd, (j+1)*hd)):

* ``v_rows`` off: the unit is a query head; ``round(attn_ratio * n_q)`` heads, each
  contributing o_proj columns [h*hd, (h+1)*hd).
* ``v_rows`` on: the unit is a whole KV group -- value head j and the o_proj columns of
  all g query heads that read it; ``round(attn_ratio * n_kv)`` groups.  A trained value
  head then only feeds trained output columns (the coupled structure the paper trains
  for MHA, where g = 1 and both rules coincide), and no v_proj row is trained for a
  single query head of a group.  (The official code reshapes v_proj by n_kv but indexes
  it with query-head ids, which is wrong whenever g > 1.)

Head/channel counts are read per layer from the module shapes (``o_proj.in_features //
head_dim``, ``v_proj.out_features // head_dim``), so LoRAM-pruned layers with fewer
heads work unchanged.

Selection is random (``selection_generator(seed, module name)``) or scored from a few
calibration batches (``score_columns``): weight column norm, mean |activation| at the
o_proj/down_proj input, their product, or the per-batch column norm of the weight
gradient; ``prefer`` picks the small or the large end.

Index-based slices, no co-permutation: the gathered copy ``x[..., idx]`` is what partial
back-prop must save anyway (a contiguous slice would need a ``.clone()`` of the same
size), the base is never permuted (so NF4 blocks and checkpoints stay in original
coordinates) and export needs no un-permutation.  docs/s2ft.md gives the measured cost.

``cfg.method.target_modules`` is not used: the trained modules are fixed by the method
(o_proj, v_proj, down_proj, up_proj).
"""
from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from slimtune.adapters.common import freeze_all, is_base_linear, replace_module, selection_generator
from slimtune.adapters.partial import (
    COLUMNS,
    ROWS,
    base_device,
    column_delta_linear,
    column_lora_factors,
    has_presets,
    merge_columns,
    merge_rows,
    preset_selection,
    row_delta_linear,
    row_lora_factors,
    selection_device,
)

__all__ = [
    "S2ftLinear",
    "head_dim",
    "score_columns",
    "plan_selection",
    "attach",
    "selections",
    "lora_factors",
    "export_peft",
    "merge",
]

O_PROJ, V_PROJ, DOWN_PROJ, UP_PROJ = "o_proj", "v_proj", "down_proj", "up_proj"
IN, OUT = COLUMNS, ROWS  # axis of the slice: input columns or output rows


class S2ftLinear(nn.Module):
    """A frozen base linear plus a trainable delta on some input columns (``axis="in"``,
    delta out x k) or output rows (``axis="out"``, delta k x in)."""

    def __init__(self, base: nn.Module, idx: torch.Tensor, axis: str, scale: float = 1.0):
        super().__init__()
        if axis not in (IN, OUT):
            raise ValueError(f"axis must be {IN!r} or {OUT!r}, got {axis!r}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.axis = axis
        self.scale = float(scale)
        dev = base_device(base)
        self.register_buffer("idx", idx.to(device=selection_device(base), dtype=torch.long))
        shape = (self.out_features, len(idx)) if axis == IN else (len(idx), self.in_features)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = column_delta_linear if self.axis == IN else row_delta_linear
        return fn(x, self.base, self.delta, self.idx, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, axis={self.axis}, k={len(self.idx)}"


# --------------------------------------------------------------------------- structure
def head_dim(model: nn.Module) -> int:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def _pairs(model: nn.Module, col_leaf: str, row_leaf: str):
    """(col_name, col_module, row_name, row_module|None) for each block holding ``col_leaf``."""
    mods = dict(model.named_modules())
    for name, m in mods.items():
        if name.rsplit(".", 1)[-1] != col_leaf or not is_base_linear(m):
            continue
        row_name = name[: -len(col_leaf)] + row_leaf
        row = mods.get(row_name)
        yield name, m, row_name, (row if row is not None and is_base_linear(row) else None)


def _count(ratio: float, n: int) -> int:
    return 0 if ratio <= 0 else min(n, max(1, int(math.floor(ratio * n + 0.5))))


def _pick(n_units: int, k: int, seed: int, name: str, unit_scores: Optional[torch.Tensor], prefer: str) -> list[int]:
    if unit_scores is None:
        chosen = torch.randperm(n_units, generator=selection_generator(seed, name))[:k]
    else:
        chosen = torch.argsort(unit_scores.float(), descending=(prefer == "large"), stable=True)[:k]
    return sorted(int(i) for i in chosen)


def _ranges(units: list[int], width: int) -> torch.Tensor:
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def plan_selection(model: nn.Module, s2cfg, seed: int, scores: Optional[dict[str, torch.Tensor]] = None) -> dict[str, tuple[str, torch.Tensor]]:
    """``{module name: (axis, indices)}`` for every slice to train.

    ``scores`` (from :func:`score_columns`) maps each o_proj/down_proj name to one score per
    input column; a unit's score is the sum over its columns.  Without scores the choice
    is random, from ``selection_generator(seed, o_proj or down_proj name)``.
    """
    plan: dict[str, tuple[str, torch.Tensor]] = {}
    if s2cfg.attn_ratio > 0:
        hd = head_dim(model)
        for o_name, o, v_name, v in _pairs(model, O_PROJ, V_PROJ):
            n_q = o.in_features // hd
            if n_q * hd != o.in_features:
                raise ValueError(f"{o_name}: in_features={o.in_features} is not a multiple of head_dim={hd}")
            by_group = bool(s2cfg.v_rows)
            if by_group:
                if v is None:
                    raise ValueError(f"method.s2ft.v_rows=true but {v_name} is not a linear layer of the model")
                n_kv = v.out_features // hd
                if n_kv * hd != v.out_features or n_q % n_kv:
                    raise ValueError(f"{v_name}: {v.out_features} rows do not form KV heads of {hd} that divide {n_q} query heads")
                g = n_q // n_kv
            n_units = n_kv if by_group else n_q
            width = g * hd if by_group else hd  # o_proj columns per unit
            unit_scores = None
            if scores is not None:
                unit_scores = scores[o_name].reshape(n_units, width).sum(-1)
            units = _pick(n_units, _count(s2cfg.attn_ratio, n_units), seed, o_name, unit_scores, s2cfg.prefer)
            plan[o_name] = (IN, _ranges(units, width))
            if by_group:
                plan[v_name] = (OUT, _ranges(units, hd))
    if s2cfg.mlp_ratio > 0:
        for d_name, d, u_name, u in _pairs(model, DOWN_PROJ, UP_PROJ):
            n = d.in_features
            ch_scores = scores[d_name] if scores is not None else None
            ch = torch.tensor(_pick(n, _count(s2cfg.mlp_ratio, n), seed, d_name, ch_scores, s2cfg.prefer), dtype=torch.long)
            plan[d_name] = (IN, ch)
            if s2cfg.up_rows:
                if u is None:
                    raise ValueError(f"method.s2ft.up_rows=true but {u_name} is not a linear layer of the model")
                plan[u_name] = (OUT, ch.clone())
    return plan


# --------------------------------------------------------------------------- scoring
def _scored_modules(model: nn.Module, s2cfg) -> dict[str, nn.Module]:
    out = {}
    if s2cfg.attn_ratio > 0:
        out.update({n: m for n, m, _, _ in _pairs(model, O_PROJ, V_PROJ)})
    if s2cfg.mlp_ratio > 0:
        out.update({n: m for n, m, _, _ in _pairs(model, DOWN_PROJ, UP_PROJ)})
    return out


def _run(model: nn.Module, batch) -> torch.Tensor:
    batch = dict(batch)
    if "labels" not in batch:
        batch["labels"] = batch["input_ids"]
    return model(**batch).loss


def score_columns(model: nn.Module, batches: Iterable, criterion: str, modules: Optional[dict[str, nn.Module]] = None) -> dict[str, torch.Tensor]:
    """One fp32 score per input column of each o_proj/down_proj (or of ``modules``).

    * ``weight``: L2 norm of the weight column (no batches used);
    * ``activation``: mean |x_j| over all calibration tokens at the module input;
    * ``weight_activation``: the product of the two;
    * ``gradient``: sum over batches of the L2 norm of column j of that batch's weight
      gradient ``dY^T x`` (per batch, so only one weight-sized temporary exists at a
      time; the frozen weights never get a ``.grad``).

    ``batches`` yields dicts for ``model(**batch)`` (``input_ids`` [+ ``attention_mask``,
    ``labels``]; labels default to ``input_ids``).
    """
    from slimtune.quant import dense_weight

    if modules is None:
        raise ValueError("score_columns needs the modules to score")
    if criterion == "weight":
        return {n: dense_weight(m, torch.float32).norm(dim=0) for n, m in modules.items()}
    if criterion not in ("activation", "weight_activation", "gradient"):
        raise ValueError(f"unknown S2FT selection criterion {criterion!r}")
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}
    tokens = {n: 0 for n in modules}
    grad = criterion == "gradient"

    def fwd_hook(name):
        def hook(mod, args, out):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1])
            if not grad:
                sums[name] += x2.abs().sum(0, dtype=torch.float64).cpu()
                tokens[name] += x2.shape[0]
                return None

            def on_grad(dy):
                g = dy.reshape(-1, dy.shape[-1]).t().float() @ x2.float()  # out x in, this batch only
                sums[name] += g.norm(dim=0).double().cpu()

            out.register_hook(on_grad)
            return None

        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # scoring must not leave .grad on any parameter
        p.requires_grad_(False)
    try:
        if grad:
            # Nothing in the frozen model requires grad: make the embedding output do so,
            # so dY reaches every layer (HF's own switch for this).
            model.enable_input_require_grads()
            try:
                for batch in batches:
                    _run(model, batch).backward()
            finally:
                model.disable_input_require_grads()
        else:
            with torch.no_grad():
                for batch in batches:
                    model(**{k: v for k, v in dict(batch).items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    if grad:
        return {n: s.float() for n, s in sums.items()}
    act = {n: (sums[n] / max(tokens[n], 1)).float() for n in modules}
    if criterion == "weight_activation":
        return {n: act[n] * dense_weight(m, torch.float32).norm(dim=0).cpu() for n, m in modules.items()}
    return act


# --------------------------------------------------------------------------- method API
def _modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, S2ftLinear)]


def attach(model: nn.Module, cfg, calibration: Optional[Iterable] = None) -> None:
    """Freeze the model and wrap the selected o_proj/v_proj/down_proj/up_proj slices.

    ``calibration``: an iterable of batches, needed when ``method.s2ft.selection`` is not
    ``random`` (the first ``calibration_batches`` are used).
    """
    s2 = cfg.method.s2ft
    freeze_all(model)
    scores = None
    presets = has_presets()  # export of a sharded run: the trained model's selections, not re-derived
    if s2.selection != "random" and not presets:
        if calibration is None and s2.selection != "weight":
            raise ValueError(
                f"method.s2ft.selection={s2.selection} scores heads/channels on calibration batches; "
                "pass attach(model, cfg, calibration=batches) or use selection=random/weight"
            )
        batches = list(islice(calibration, s2.calibration_batches)) if calibration is not None else []
        scores = score_columns(model, batches, s2.selection, _scored_modules(model, s2))
    plan = plan_selection(model, s2, cfg.train.seed, scores)
    if not any(len(idx) for _, idx in plan.values()):
        raise ValueError("method.s2ft selected nothing to train: set method.s2ft.attn_ratio or method.s2ft.mlp_ratio > 0")
    mods = dict(model.named_modules())
    for name, (axis, idx) in plan.items():
        if presets:
            idx = preset_selection(name)
        replace_module(model, name, S2ftLinear(mods[name], idx, axis, s2.scale))


def selections(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"axis": "in"|"out", "idx": [...]}}`` of every trained slice."""
    return {n: {"axis": m.axis, "idx": m.idx.tolist()} for n, m in _modules(model)}


def lora_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` (fp32, CPU) with ``B @ A`` equal to each slice update."""
    out = {}
    for n, m in _modules(model):
        if m.axis == IN:
            out[n] = column_lora_factors(m.idx, m.delta, m.scale, m.in_features)
        else:
            out[n] = row_lora_factors(m.idx, m.delta, m.scale, m.out_features)
    return out


def export_peft(model: nn.Module, cfg, out_dir: Path) -> Path:
    """Write a PEFT LoRA adapter folder (one-hot factor per slice) for the original HF model."""
    from slimtune.adapters.export import write_selector_adapter

    return write_selector_adapter(out_dir, lora_factors(model), cfg, "S2FT")


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every slice delta into its base weight; NF4 bases become dense ``nn.Linear``."""
    for name, m in _modules(model):
        fold = merge_columns if m.axis == IN else merge_rows
        replace_module(model, name, fold(m.base, m.idx, m.delta, m.scale))
