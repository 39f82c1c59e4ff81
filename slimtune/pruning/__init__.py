"""LoRAM ("train small, infer large"): prune the frozen base, train LoRA on the small model,
recover the adapter to the original model's shapes.

The run flow (``trainer.loop.build_model``)::

    model, tok = load_model(cfg.model)
    prune_map = prune_model(model, cfg, tok)   # calibrate -> PRUNERS[strategy] -> align (cached)
    quantize(model, cfg.quant)                  # QLoRAM = structured pruning + NF4 of the pruned model
    attach(model, cfg)                          # LoRA on the pruned shapes
    ... train; save prune_map with every checkpoint (prune_map.save(folder)) ...
    export_recovered(model, cfg, prune_map, out_dir / "recovered")   # PEFT folder, original shapes

The method is any of ``METHODS`` with an adapter form: LoRA factors, PaCA columns and S2FT
heads / channels chosen on the pruned model are all recovered to original coordinates
(``recover.py``).

``PRUNERS[strategy](model, cfg, batches=None) -> PruneMap | None`` is the one table of
pruning strategies; ``batches`` are the calibration batches of
:func:`calibration_batches` (needed by ``importance: taylor`` and ``wanda``).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from slimtune.pruning.align import align, cached, load_cached_model
from slimtune.pruning.calibration import calibration_batches
from slimtune.pruning.masks import apply_masks, select_masks
from slimtune.pruning.prune_map import LayerPrune, PruneMap, model_dims
from slimtune.pruning.recover import (
    RECOVERED_DIR,
    build_recovered_model,
    export_recovered,
    pruned_skeleton,
    recover_lora_state,
    recover_run,
    recover_state,
    recovered_state_from,
    recovered_state_of,
    trained_state,
    write_recovered,
    write_recovered_state,
)
from slimtune.pruning.structured import apply_structured, select

_DEFAULT_IMPORTANCE = {"none": None, "random": "random", "structured": "taylor",
                       "semi_structured": "magnitude", "unstructured": "magnitude"}


def importance_of(pcfg) -> Optional[str]:
    """The criterion a pruning config uses (``random`` for the random strategy)."""
    if pcfg.strategy in ("none", "random"):
        return _DEFAULT_IMPORTANCE[pcfg.strategy]
    return pcfg.importance or _DEFAULT_IMPORTANCE[pcfg.strategy]


def apply_prune_map(model: nn.Module, prune_map: PruneMap) -> None:
    """Re-apply a stored PruneMap to an unpruned model (resume, recovery checks, cached alignment)."""
    if prune_map.masks:
        apply_masks(model, prune_map)
    if prune_map.layers:
        apply_structured(model, prune_map)


def _none(model: nn.Module, cfg, batches=None) -> None:
    return None


def _structured(model: nn.Module, cfg, batches=None) -> PruneMap:
    pm = select(model, cfg, importance_of(cfg.pruning), batches)
    apply_structured(model, pm)
    return pm


def _masked(model: nn.Module, cfg, batches=None) -> PruneMap:
    return select_masks(model, cfg, importance_of(cfg.pruning), batches)


PRUNERS: dict[str, Callable[..., Optional[PruneMap]]] = {
    "none": _none,
    "random": _structured,  # LoRAM-Rand: structured removal, units chosen at random
    "structured": _structured,  # LoRAM-Stru
    "semi_structured": _masked,  # LoRAM-Semi
    "unstructured": _masked,  # LoRAM-Unst
}


def prune_model(model: nn.Module, cfg, tokenizer, prune_map: Optional[PruneMap] = None) -> Optional[PruneMap]:
    """Everything between loading and quantizing: reuse a cached pruned + aligned model, or
    compute calibration batches, prune with ``PRUNERS[cfg.pruning.strategy]`` and align.

    ``prune_map``: the map stored with the checkpoint a run resumes from; it is applied as is
    instead of choosing units again (a Taylor score recomputed on another device could break
    a near tie differently)."""
    p = cfg.pruning
    if p.strategy == "none":
        return None
    if p.alignment.enabled:
        pm = cached(model, cfg, tokenizer)
        if pm is not None:
            if prune_map is not None and pm.to_dict() != prune_map.to_dict():
                raise ValueError("the cached aligned model was pruned differently from the checkpoint's PruneMap")
            return pm
    if prune_map is not None:
        apply_prune_map(model, prune_map)
        pm = prune_map
    else:
        pm = PRUNERS[p.strategy](model, cfg, calibration_batches(model, cfg, tokenizer))
    if p.alignment.enabled:
        align(model, pm, cfg, tokenizer)
    return pm


def prune_shapes(model: nn.Module, cfg) -> Optional[PruneMap]:
    """Prune to the run's *shapes* without data (meta / fake-tensor builds: planner, storage figures).

    Structured strategies keep exactly as many heads and channels whatever the importance, so
    units are chosen at random; mask strategies change no shape and do nothing here."""
    if cfg.pruning.strategy not in ("random", "structured"):
        return None
    pm = select(model, cfg, "random")
    apply_structured(model, pm)
    return pm


def load_pruned_model(cfg, device="cpu", prune_map: Optional[PruneMap] = None):
    """``(model, tokenizer, PruneMap | None)``: load, then :func:`prune_model`.  When the pruned,
    aligned model is cached, it is built on the meta device and filled from the cache, so the
    original weights are never read (what makes the 70B recipe's later runs cheap)."""
    from slimtune.models import load_model, load_tokenizer

    if cfg.pruning.strategy != "none" and cfg.pruning.alignment.enabled:
        tokenizer = load_tokenizer(cfg.model)
        hit = load_cached_model(cfg, tokenizer, device)
        if hit is not None:
            model, pm = hit
            if prune_map is not None and pm.to_dict() != prune_map.to_dict():
                raise ValueError("the cached aligned model was pruned differently from the checkpoint's PruneMap")
            return model, tokenizer, pm
    model, tokenizer = load_model(cfg.model, device=device)
    return model, tokenizer, prune_model(model, cfg, tokenizer, prune_map)


__all__ = [
    "PRUNERS", "PruneMap", "LayerPrune", "RECOVERED_DIR", "align", "apply_prune_map", "build_recovered_model",
    "calibration_batches",
    "export_recovered", "importance_of", "load_pruned_model", "model_dims", "prune_shapes", "prune_model",
    "pruned_skeleton", "recover_lora_state", "recover_run", "recover_state", "recovered_state_from",
    "recovered_state_of", "trained_state", "write_recovered", "write_recovered_state",
]
