"""Recovery: map what was trained on the pruned model back to the original model's coordinates.

Per pruned linear, the PruneMap gives the original indices R of its kept output rows and C of its
kept input columns (``module_indices``).  Whatever the method, the recovered update dW (original
out x in) equals the pruned update dW_p on the block (R, C) and is zero at every pruned row and
column -- the official "zeroA" recovery:

* LoRA ``B_p`` (|R| x r), ``A_p`` (r x |C|): ``B[R, :] = B_p``, ``A[:, C] = A_p``.
* PaCA / S2FT column slice (``idx`` into the pruned columns, delta |R| x k): the columns become
  ``C[idx]`` and ``delta[R, :] = delta_p`` (``partial.recover_slice``).
* S2FT row slice (``idx`` into the pruned rows, delta k x |C|): the rows become ``R[idx]`` and
  ``delta[:, C] = delta_p``.  Heads map head-wise (R and C list whole heads, in order), so an
  o_proj head of the pruned model is the same original head, and the GQA coupling (a query head
  reads the value head whose v_proj rows are trained) holds in the original model too.

Linears whose shape did not change (and every linear under mask pruning) keep their tensors.  The
original model with the recovered tensors is built by attaching the run's method
(``METHODS``) with the recovered selections (``partial.preset_selections``): for LoRAM-PaCA the
original model carries PaCA layers whose ``idx`` are original column indices.  Only the update
is carried over: the original model's output is not the pruned model's (it has its pruned heads
and channels back); the pruned model's trained update is.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from slimtune.pruning.prune_map import PruneMap, model_dims

log = logging.getLogger("slimtune")

_KEY = re.compile(r"^(?P<pre>base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?P<suf>\.weight)?$")
RECOVERED_DIR = "recovered"
SELECTIONS_FILE = "selections.json"


def recover_state(prune_map: PruneMap, state: Mapping[str, torch.Tensor], axes: Optional[Mapping[str, str]] = None,
                  original_config=None) -> dict[str, torch.Tensor]:
    """Trained tensors of the pruned model, mapped to the original model's coordinates (pure tensor
    mapping; keys are kept as given).

    * LoRA factors: slimtune FQNs (``model.layers.0.self_attn.q_proj.lora_A``) or PEFT names
      (``base_model.model.<module>.lora_A.weight``);
    * PaCA / S2FT slices: ``<module>.delta`` and ``<module>.idx`` for each module in ``axes``
      (``{module: "in" | "out"}``, ``partial.slice_axes`` of the pruned model).

    Other tensors pass through.  ``original_config`` (a HF config), when given, is checked against
    the dimensions the PruneMap was made for."""
    from slimtune.adapters.partial import DELTA_PARAM, SELECTION_BUFFER, recover_slice

    if original_config is not None and model_dims(original_config) != prune_map.dims:
        raise ValueError(f"PruneMap was made for {prune_map.dims}, not for this model ({model_dims(original_config)})")
    index = prune_map.module_indices()
    axes = dict(axes or {})
    slice_keys = {f"{m}.{leaf}" for m in axes for leaf in (DELTA_PARAM, SELECTION_BUFFER)}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in slice_keys:
            continue
        m = _KEY.match(key)
        if m is None or m.group("module") not in index:
            out[key] = t
            continue
        out[key] = _recover_lora_factor(key, t, m.group("kind"), *index[m.group("module")])
    for module, axis in axes.items():
        d_key, i_key = f"{module}.{DELTA_PARAM}", f"{module}.{SELECTION_BUFFER}"
        if d_key not in state or i_key not in state:
            raise ValueError(f"{module}: the state needs both {d_key} and {i_key} to recover the slice")
        if module not in index:  # shape unchanged: the same indices and delta
            out[d_key], out[i_key] = state[d_key], state[i_key]
            continue
        rows, cols, shape = index[module]
        out[i_key], out[d_key] = recover_slice(axis, state[i_key], state[d_key], rows, cols, shape)
    return out


def _recover_lora_factor(key: str, t: torch.Tensor, kind: str, rows, cols, shape) -> torch.Tensor:
    n_out, n_in = shape
    if kind == "lora_A":  # r x in: scatter columns
        if cols is None:
            if t.shape[1] != n_in:
                raise ValueError(f"{key}: {tuple(t.shape)} does not have the original {n_in} input columns")
            return t
        if t.shape[1] != len(cols):
            raise ValueError(f"{key}: {t.shape[1]} input columns, the PruneMap kept {len(cols)}")
        full = t.new_zeros(t.shape[0], n_in)
        full[:, torch.tensor(cols, dtype=torch.long, device=t.device)] = t
        return full
    if rows is None:  # out x r: scatter rows
        if t.shape[0] != n_out:
            raise ValueError(f"{key}: {tuple(t.shape)} does not have the original {n_out} output rows")
        return t
    if t.shape[0] != len(rows):
        raise ValueError(f"{key}: {t.shape[0]} output rows, the PruneMap kept {len(rows)}")
    full = t.new_zeros(n_out, t.shape[1])
    full[torch.tensor(rows, dtype=torch.long, device=t.device)] = t
    return full


def recover_lora_state(prune_map: PruneMap, pruned_lora_state: Mapping[str, torch.Tensor],
                       original_config=None) -> dict[str, torch.Tensor]:
    """:func:`recover_state` of LoRA factors only (other tensors pass through unchanged)."""
    return recover_state(prune_map, pruned_lora_state, None, original_config)


# --------------------------------------------------------------------------- models around the tensors
def trained_state(model) -> dict[str, torch.Tensor]:
    """What recovery needs from a pruned model: its trainable tensors (fp32, CPU) and the PaCA /
    S2FT selections (``<module>.idx``, int64), by FQN."""
    from slimtune.adapters.partial import selection_state

    state = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state.update(selection_state(model))
    return state


def recovered_state_of(model, prune_map: PruneMap) -> dict[str, torch.Tensor]:
    """The recovered tensors of a live pruned model (its ``config`` describes the original model)."""
    from slimtune.adapters.partial import slice_axes

    return recover_state(prune_map, trained_state(model), slice_axes(model), model.config)


def _selections_context(state: Mapping[str, torch.Tensor]):
    from slimtune.adapters.partial import preset_selections, selections_from_state

    sel = selections_from_state(state)
    return preset_selections(sel) if sel else contextlib.nullcontext()


def _attach(model, cfg, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Attach the run's method (``METHODS``) with the selections stored in ``state`` (if any)."""
    from slimtune.adapters import get_method

    try:
        with _selections_context(state):
            get_method(cfg.method.name).attach(model, cfg)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        raise ValueError(f"cannot rebuild the {what} model's {cfg.method.name} layers: {err}. A selection made from "
                         "weights or calibration data is only known from the <module>.idx tensors saved with "
                         "the checkpoint") from err


def _load_complete(model, state: Mapping[str, torch.Tensor], assign: bool, what: str) -> None:
    from slimtune.adapters.common import load_named_tensors

    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if missing:
        raise KeyError(f"the {what} state lacks trained tensors {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                       "(pass trained_state(model): every trainable tensor and the selections)")
    load_named_tensors(model, dict(state), assign=assign)


def _meta_cfg(cfg):
    c = cfg.model_copy(deep=True)
    c.quant.name = "none"  # trained tensors do not depend on the base's storage
    return c


def pruned_skeleton(cfg, prune_map: PruneMap, pruned_state: Mapping[str, torch.Tensor]):
    """The pruned model on the meta device with the run's method attached and ``pruned_state``
    loaded: the trained tensors (and selections) are real, the base weights are not.  Selections
    absent from the state are derived as in training (seeded, shape-only rules); one made from
    weights or data cannot be, and raises."""
    from slimtune.models import load_model
    from slimtune.pruning.structured import apply_structured

    model, _ = load_model(cfg.model, meta=True)
    if prune_map.layers:
        apply_structured(model, prune_map)
    c = _meta_cfg(cfg)
    _attach(model, c, pruned_state, "pruned")
    _load_complete(model, pruned_state, assign=True, what="pruned")
    return model


def recovered_state_from(cfg, prune_map: PruneMap, pruned_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`recover_state` of tensors alone (a checkpoint): the module kinds (slice axes) come from
    a meta skeleton of the pruned model."""
    return recovered_state_of(pruned_skeleton(cfg, prune_map, pruned_state), prune_map)


def _original_skeleton(cfg, config, recovered: Mapping[str, torch.Tensor]):
    """The original model on meta with the method attached at the recovered selections and the
    recovered tensors loaded (real): enough for the method's PEFT export."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _attach(model, _meta_cfg(cfg), recovered, "original")
    _load_complete(model, recovered, assign=True, what="recovered")
    return model


def write_recovered_state(cfg, prune_map: PruneMap, recovered: Mapping[str, torch.Tensor], original_config, out_dir,
                          tokenizer=None, provenance: Optional[dict] = None) -> Path:
    """Write recovered tensors as a PEFT adapter folder for the original model (the method's own
    ``export_peft``, from the ``METHODS`` table), with ``loram.json``, the PruneMap and the
    selections in original coordinates (``selections.json``)."""
    from slimtune.adapters import get_method
    from slimtune.adapters.partial import selections_from_state

    method = get_method(cfg.method.name)
    if method.export_peft is None:
        raise ValueError(f"method.name={cfg.method.name!r} has no adapter form to recover into")
    original = _original_skeleton(cfg, original_config, recovered)
    out = Path(method.export_peft(original, cfg, Path(out_dir)) or out_dir)
    info = {"method": cfg.method.name, "prune_map": prune_map.summary(), "prune_settings": prune_map.settings,
            **(provenance or {})}
    (out / "loram.json").write_text(json.dumps(info, indent=1, default=str))
    selections = selections_from_state(recovered)
    if selections:  # original coordinates (DESIGN rule 2); the PEFT one-hot factors say the same
        (out / SELECTIONS_FILE).write_text(json.dumps({k: v.tolist() for k, v in sorted(selections.items())}))
    prune_map.save(out / "prune_map")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    log.info("recovered LoRAM adapter (original shapes) written to %s", out)
    return out


def write_recovered(cfg, prune_map: PruneMap, pruned_state: Mapping[str, torch.Tensor], out_dir,
                    tokenizer=None, provenance: Optional[dict] = None) -> Path:
    """Recover a pruned run's trained tensors (``trained_state`` or a checkpoint's) and write them
    as a PEFT adapter folder for the original model."""
    skeleton = pruned_skeleton(cfg, prune_map, pruned_state)
    return write_recovered_state(cfg, prune_map, recovered_state_of(skeleton, prune_map), skeleton.config, out_dir,
                                 tokenizer, provenance)


def export_recovered(model, cfg, prune_map: PruneMap, out_dir, tokenizer=None) -> Path:
    """End of a LoRAM run: recover the live pruned model's update into ``out_dir``."""
    return write_recovered_state(cfg, prune_map, recovered_state_of(model, prune_map), model.config, out_dir,
                                 tokenizer)


def build_recovered_model(cfg, prune_map: PruneMap, pruned_state: Mapping[str, torch.Tensor], device="cpu"):
    """The *original* model (loaded, quantized as ``cfg.quant``) with the run's method attached at
    the recovered selections and the recovered tensors loaded: what the trainer's eval runs on to
    score the recovered update, and what ``slimtune merge`` folds.  ``pruned_state``: the pruned
    model's :func:`trained_state` (or a checkpoint's tensors)."""
    from slimtune.models import load_model
    from slimtune.quant import QUANTIZERS

    recovered = recovered_state_from(cfg, prune_map, pruned_state)
    model, tokenizer = load_model(cfg.model, device=device)
    QUANTIZERS[cfg.quant.name](model, cfg.quant)
    _attach(model, cfg, recovered, "original")
    _load_complete(model, {k: v.to(device) for k, v in recovered.items()}, assign=False, what="recovered")
    model.eval()
    return model, tokenizer


def find_prune_map(run_dir: Path, checkpoint: Optional[Path]) -> PruneMap:
    from slimtune.pruning.prune_map import MAP_NAME

    for folder in ([checkpoint] if checkpoint is not None else []) + [run_dir]:
        if (folder / MAP_NAME).is_file():
            return PruneMap.load(folder)
    raise FileNotFoundError(
        f"no {MAP_NAME} in {checkpoint or '(no checkpoint)'} or {run_dir}: this run's PruneMap was not saved"
    )


def recover_run(run_dir, out_dir, checkpoint: Optional[str] = None) -> Path:
    """``slimtune recover --run DIR --out DIR``: the trained update of the run's latest (or given)
    checkpoint, recovered to the original model's coordinates, as a PEFT adapter folder.  Any
    engine's checkpoint (replicated, FSDP2's DCP folder, ZeRO-3); nothing of the base is read."""
    from slimtune.config import load_config
    from slimtune.launch.state import read_trainable_tensors
    from slimtune.models import load_tokenizer
    from slimtune.trainer import checkpoint as ckpt

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    if cfg.pruning.strategy == "none":
        raise ValueError(f"{run}: pruning.strategy=none; there is nothing to recover (use `slimtune export`)")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run)
    if folder is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint (looked in {ckpt.checkpoint_root(run)})")
    pm = find_prune_map(run, folder)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in read_trainable_tensors(folder).items()}
    try:
        tokenizer = load_tokenizer(cfg.model)
    except (OSError, ValueError):  # a model folder without tokenizer files: the adapter does not need one
        tokenizer = None
    return write_recovered(cfg, pm, state, out_dir, tokenizer, provenance={"checkpoint": str(folder)})
