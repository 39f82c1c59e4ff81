"""End-of-run export: a PEFT adapter folder and/or a merged HF model folder (rank 0 writes)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("slimtune")


def export_run(model: nn.Module, tokenizer, cfg, out_dir: Path, info, prune_map=None) -> dict[str, str]:
    """``prune_map``: the model is a LoRAM-pruned one.  Its adapter has the pruned shapes, so it goes
    to ``pruned_adapter/`` (the adapter for the original model is the recovered one), and a merged
    model is the *original* model with the recovered adapter folded in."""
    pruned = prune_map is not None and prune_map.structured
    from slimtune.adapters import get_method
    from slimtune.launch.dist import barrier

    written: dict[str, str] = {}
    method = get_method(cfg.method.name)
    if info.is_main:
        if cfg.output.save_adapter and method.export_peft is not None:
            folder = out_dir / ("pruned_adapter" if pruned else "adapter")
            method.export_peft(model, cfg, folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            written["adapter"] = str(folder)
            log.info("PEFT adapter written to %s", folder)
        if cfg.output.save_merged or method.export_peft is None:
            folder = out_dir / "merged"
            if cfg.quant.name == "none" and prune_map is None:
                save_merged(model, tokenizer, cfg, folder)  # in place: nothing uses the model after this
            else:  # fold the update into the original dense weights, not the 4-bit / pruned ones
                from slimtune.pruning import trained_state

                trainable = trained_state(model)  # with PaCA/S2FT selections (a scored one is not re-derivable)
                merge_into_dense(cfg, trainable, folder, prune_map)
            written["merged"] = str(folder)
    barrier()
    return written


def save_merged(model: nn.Module, tokenizer, cfg, folder: Path) -> None:
    """Fold the trained parts into dense weights and write a HF model folder.

    Works on a copy-free basis: the model is modified in place, so call it last.
    """
    from slimtune.adapters import get_method

    get_method(cfg.method.name).merge(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    log.info("merged model written to %s", folder)


def merge_from_checkpoint(run_dir: str, out: str, checkpoint: str | None = None) -> Path:
    """``slimtune merge``: rebuild the run's model on a dense (unquantized) base, load the trained
    part from its latest (or given) checkpoint, merge, and write a HF folder.

    Merging happens on a dense base even for QLoRA runs: folding a delta into a 4-bit weight would
    re-quantize it and lose the update.
    """
    from slimtune.config import load_config
    from slimtune.launch.state import read_trainable_tensors
    from slimtune.trainer import checkpoint as ckpt

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run)
    if folder is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint to merge (looked in {ckpt.checkpoint_root(run)})")
    # any engine's checkpoint format (fsdp2 writes a sharded DCP folder)
    prune_map = None
    if cfg.pruning.strategy != "none":
        from slimtune.pruning.recover import find_prune_map

        prune_map = find_prune_map(run, folder)
    return merge_into_dense(cfg, read_trainable_tensors(folder), Path(out), prune_map)


def merge_into_dense(cfg, trainable: dict[str, torch.Tensor], out: Path, prune_map=None) -> Path:
    """Rebuild the run's model on its dense, unquantized base, load the trained tensors, merge, save.

    With a LoRAM ``prune_map`` the base is the original, unpruned model and the trained LoRA
    factors are first recovered to its shapes."""
    from slimtune.adapters.common import load_named_tensors
    from slimtune.trainer.loop import build_model

    dense_cfg = cfg.model_copy(deep=True)
    dense_cfg.quant.name = "none"
    dense_cfg.train.activation_checkpointing = False
    if prune_map is not None:
        from slimtune.pruning import build_recovered_model

        model, tokenizer = build_recovered_model(dense_cfg, prune_map, trainable)
    else:
        model, tokenizer = build_model(dense_cfg, torch.device("cpu"))
        load_named_tensors(model, trainable)
    save_merged(model, tokenizer, dense_cfg, out)
    return out
