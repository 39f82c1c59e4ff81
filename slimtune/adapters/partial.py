"""Partial connections: a trainable delta on a slice of a frozen base linear.

Shared by PaCA (input columns) and S2FT (input columns of o_proj/down_proj, output
rows of v_proj/up_proj).  The delta is its own fp32 parameter; the base weight
(dense, or NF4 dequantized by the base's own forward) is never written (DESIGN
rule 1).

Why hand-written: no library offers a linear whose backward keeps only a gathered
slice of the input.  Plain autograd on ``x[..., idx] @ delta.T`` would save the
gathered copy too, but the frozen base path would then need its own graph, and the
input-gradient of the two paths would be summed through an extra full-size
(tokens x in) temporary.  One ``autograd.Function`` computes
``grad_x = dY @ W + scatter(s * dY @ delta)`` in one buffer and saves nothing but
the slice (and the index).

Column form (PaCA, S2FT o_proj / down_proj), ``delta``: out x r::

    y      = base(x) + x[..., idx] @ (s*delta).T          == x @ (W with W[:, idx] += s*delta).T + b
    saved  : x[..., idx]  (a gathered, contiguous copy; the full x is not kept)
    grad_x = dY @ W;  grad_x[..., idx] += s * dY @ delta
    grad_delta = s * dY^T @ x[..., idx]   (summed over all batch dims)

Row form (S2FT v_proj / up_proj), ``delta``: k x in::

    y[..., rows] += x @ (s*delta).T
    saved  : the full x -- grad_delta = s * dY[..., rows]^T @ x needs every input
             column, so an output-row selection saves as much as LoRA's A factor does.
    grad_x = dY @ W + s * dY[..., rows] @ delta

``W`` for the input gradient is fetched again in backward with
``slimtune.quant.dense_weight`` (an NF4 base is dequantized again rather than the
dense copy being kept alive between forward and backward).  The frozen weight and
bias get no gradient.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "column_delta_linear",
    "row_delta_linear",
    "merge_columns",
    "merge_rows",
    "column_lora_factors",
    "row_lora_factors",
    "base_device",
    "selection_device",
    "SELECTION_BUFFER",
    "DELTA_PARAM",
    "COLUMNS",
    "ROWS",
    "slice_axes",
    "selection_state",
    "selections_from_state",
    "load_selections",
    "recover_slice",
    "preset_selections",
    "preset_selection",
    "has_presets",
]

SELECTION_BUFFER = "idx"  # the buffer holding a wrapped module's selected columns / rows
DELTA_PARAM = "delta"  # the trainable parameter of a wrapped module
COLUMNS, ROWS = "in", "out"  # a module's ``axis``: its slice is of input columns or of output rows
_PRESETS: list[dict[str, torch.Tensor]] = []


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    from slimtune.quant import dense_weight

    own = [p for p in base.parameters(recurse=False) if hasattr(p, "ds_id")]
    absent = [p for p in own if p.ds_status.name == "NOT_AVAILABLE"]
    if absent:
        # DeepSpeed ZeRO-3: ``base`` ran inside our autograd.Function, so ZeRO's pre-backward hooks
        # never fetch its (partitioned) weight again; gather it for this backward, read-only
        # (modifier_rank=None: nothing is written back), and keep a dense copy past the release.
        # (Under activation checkpointing the recompute has just fetched it: then it is read as is.)
        import deepspeed

        with deepspeed.zero.GatheredParameters(absent, modifier_rank=None):
            w = dense_weight(base, dtype=dtype)
            return w.clone() if any(w.data_ptr() == p.data_ptr() for p in own) else w
    return dense_weight(base, dtype=dtype)


class preset_selections:  # noqa: N801 - used as a context manager
    """``with preset_selections({module name: idx}): attach(model, cfg)`` -- attach uses these
    selections instead of deriving them (from the seed, weights or calibration data).

    Export of a sharded run rebuilds the model on rank 0 (on meta, or without the calibration
    data); the selections must be those the trained model used, so the engines gather the
    ``idx`` buffers with the deltas and the rebuild attaches with them."""

    def __init__(self, selections: dict[str, torch.Tensor]):
        self.selections = dict(selections)

    def __enter__(self):
        _PRESETS.append(self.selections)
        return self

    def __exit__(self, *exc):
        _PRESETS.pop()
        return False


def preset_selection(module_name: str) -> torch.Tensor | None:
    """The selection preset for ``module_name`` by an enclosing :class:`preset_selections`, else None."""
    if not _PRESETS:
        return None
    sel = _PRESETS[-1].get(module_name)
    if sel is None:
        raise KeyError(f"preset selections given but none for {module_name!r} (have {sorted(_PRESETS[-1])[:3]}...)")
    return sel.detach().to("cpu", torch.long)


def has_presets() -> bool:
    return bool(_PRESETS)


def base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


def selection_device(base: nn.Module) -> torch.device:
    """Where a wrapped module keeps its ``idx``: with the base, except on the meta device, where the
    indices stay real on the CPU.  A skeleton built on meta (export of a sharded run, LoRAM recovery
    from a checkpoint) then still knows which columns / rows were trained: a selection derived from
    (seed, module name, shapes) needs no weights.  (``model.to_empty`` would overwrite it: load
    ``idx`` after, as every caller here does.)"""
    dev = base_device(base)
    return torch.device("cpu") if dev.type == "meta" else dev


# --------------------------------------------------------------------------- selections as state
def slice_axes(model: nn.Module) -> dict[str, str]:
    """``{module name: COLUMNS | ROWS}`` of every wrapped module with a selection (PaCA, S2FT)."""
    return {n: m.axis for n, m in model.named_modules()
            if SELECTION_BUFFER in m._buffers and hasattr(m, "axis") and hasattr(m, DELTA_PARAM)}


def selection_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.idx": indices}`` (CPU, int64) of every wrapped module: what checkpoints store next
    to the deltas so that a resume or an export uses the trained selections, not re-derived ones."""
    return {f"{n}.{SELECTION_BUFFER}": model.get_submodule(n).idx.detach().to("cpu", torch.long).clone()
            for n in slice_axes(model)}


def selections_from_state(state) -> dict[str, torch.Tensor]:
    """``{module name: idx}`` of the ``<module>.idx`` entries of a state (checkpoint, gathered export)."""
    suffix = "." + SELECTION_BUFFER
    out = {}
    for k, v in state.items():
        if not k.endswith(suffix):
            continue
        if v.is_floating_point():  # e.g. a state passed through ``.float()``: indices must stay integral
            if not torch.equal(v, v.round()):
                raise ValueError(f"{k}: selection indices are not integers")
        out[k[: -len(suffix)]] = v.detach().to("cpu", torch.long)
    return out


@torch.no_grad()
def load_selections(model: nn.Module, selections: dict[str, torch.Tensor]) -> None:
    """Overwrite the ``idx`` of wrapped modules with stored ones (resume).  Each count must match:
    the delta's shape was made for it."""
    axes = slice_axes(model)
    unknown = sorted(set(selections) - set(axes))
    if unknown:
        raise KeyError(f"stored selections for modules that have none in this model: {unknown[:5]}")
    for name, idx in selections.items():
        buf = model.get_submodule(name).idx
        if buf.shape != idx.shape:
            raise ValueError(f"{name}: stored selection has {idx.numel()} indices, the model {buf.numel()}")
        buf.copy_(idx.to(buf.device, buf.dtype))


def recover_slice(axis: str, idx: torch.Tensor, delta: torch.Tensor, rows, cols,
                  shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A slice trained on a structurally pruned weight, in the original weight's coordinates.

    ``rows`` / ``cols``: the original indices of the pruned weight's rows / columns (None = not
    pruned); ``shape``: the original (out, in).  Columns (``delta`` out' x k): the selected columns
    become ``cols[idx]`` and the delta's rows land at ``rows`` (zero at pruned rows).  Rows
    (``delta`` k x in'): the selected rows become ``rows[idx]``, the delta's columns land at
    ``cols``.  Either way the original update restricted to (rows, cols) equals the pruned
    update and is zero at every pruned row and column."""
    n_out, n_in = shape
    idx = idx.detach().to("cpu", torch.long)
    delta = delta.detach()
    r = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
    c = None if cols is None else torch.as_tensor(cols, dtype=torch.long)
    if axis == COLUMNS:
        select, scatter, along = c, r, 0
        kept_sel, kept_other = (n_in if c is None else len(c)), (n_out if r is None else len(r))
        want = (kept_other, len(idx))
    elif axis == ROWS:
        select, scatter, along = r, c, 1
        kept_sel, kept_other = (n_out if r is None else len(r)), (n_in if c is None else len(c))
        want = (len(idx), kept_other)
    else:
        raise ValueError(f"axis must be {COLUMNS!r} or {ROWS!r}, got {axis!r}")
    if tuple(delta.shape) != want:
        raise ValueError(f"delta {tuple(delta.shape)} does not fit {len(idx)} selected {axis} indices of a pruned "
                         f"weight with {kept_other} kept {'rows' if axis == COLUMNS else 'columns'} (expected {want})")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= kept_sel):
        raise ValueError(f"selection indices out of range for the {kept_sel} kept {axis} indices")
    new_idx = idx if select is None else select[idx]
    if scatter is None:
        return new_idx, delta.clone()
    full_shape = (n_out, len(idx)) if axis == COLUMNS else (len(idx), n_in)
    full = delta.new_zeros(full_shape)
    full.index_copy_(along, scatter.to(delta.device), delta)
    return new_idx, full


class _ColumnDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, idx, scale, base):
        x_sel = x.index_select(-1, idx)  # a fresh contiguous copy, never a view that pins x
        y = base(x)
        y = y.add_(torch.nn.functional.linear(x_sel, (delta * scale).to(x.dtype)).to(y.dtype))
        ctx.scale = scale
        ctx.base = base
        ctx.x_dtype = x.dtype
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(x_sel, idx, delta)
        else:
            del x_sel
            ctx.save_for_backward(None, idx, delta)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_sel, idx, delta = ctx.saved_tensors
        s = ctx.scale
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = _dense_weight(ctx.base, dy.dtype)  # out x in; NF4: dequantized again here
            grad_x = torch.matmul(dy, w)
            grad_x.index_add_(-1, idx, torch.matmul(dy, (delta * s).to(dy.dtype)))
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dy2 = dy.reshape(-1, dy.shape[-1])
            xs2 = x_sel.reshape(-1, x_sel.shape[-1]).to(dy.dtype)
            grad_delta = (dy2.t() @ xs2).to(delta.dtype).mul_(s)
        return grad_x, grad_delta, None, None, None


class _RowDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, rows, scale, base):
        y = base(x)
        y.index_add_(-1, rows, torch.nn.functional.linear(x, (delta * scale).to(x.dtype)).to(y.dtype))
        ctx.scale = scale
        ctx.base = base
        ctx.x_dtype = x.dtype
        # grad_delta needs every input column: the full x is saved (same as LoRA's A factor).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, rows, delta)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rows, delta = ctx.saved_tensors
        s = ctx.scale
        dy_rows = dy.index_select(-1, rows)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = _dense_weight(ctx.base, dy.dtype)
            grad_x = torch.matmul(dy, w)
            grad_x.add_(torch.matmul(dy_rows, (delta * s).to(dy.dtype)))
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            d2 = dy_rows.reshape(-1, dy_rows.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(dy.dtype)
            grad_delta = (d2.t() @ x2).to(delta.dtype).mul_(s)
        return grad_x, grad_delta, None, None, None


def column_delta_linear(x: torch.Tensor, base: nn.Module, delta: torch.Tensor, idx: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``base(x)`` with ``s*delta`` (out x r) added to input columns ``idx`` of the base weight."""
    return _ColumnDelta.apply(x, delta, idx, float(scale), base)


def row_delta_linear(x: torch.Tensor, base: nn.Module, delta: torch.Tensor, rows: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``base(x)`` with ``s*delta`` (k x in) added to output rows ``rows`` of the base weight."""
    return _RowDelta.apply(x, delta, rows, float(scale), base)


# --------------------------------------------------------------------------- merge / export
def _dense_linear_like(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` and the base's bias (merging an NF4 base)."""
    bias = getattr(base, "bias", None)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.to(weight.dtype))
    out.requires_grad_(False)
    return out


@torch.no_grad()
def _merged(base: nn.Module, add_slice) -> nn.Module:
    """Fold a slice update into the base; a dense ``nn.Linear`` is updated in place and
    returned, a quantized base is replaced by a dense ``nn.Linear`` (the merged model is a
    plain HF model)."""
    from slimtune.quant import is_quantized_linear

    if isinstance(base, nn.Linear) and not is_quantized_linear(base):  # bnb's Linear4bit is an nn.Linear too
        w = base.weight
        w.copy_(add_slice(w.float()).to(w.dtype))
        return base
    w = _dense_weight(base, None)
    return _dense_linear_like(base, add_slice(w.float()).to(w.dtype))


def merge_columns(base: nn.Module, idx: torch.Tensor, delta: torch.Tensor, scale: float) -> nn.Module:
    def add(w):
        w[:, idx] += scale * delta.detach().float().to(w.device)
        return w

    return _merged(base, add)


def merge_rows(base: nn.Module, rows: torch.Tensor, delta: torch.Tensor, scale: float) -> nn.Module:
    def add(w):
        w[rows, :] += scale * delta.detach().float().to(w.device)
        return w

    return _merged(base, add)


def _one_hot(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(len(idx) x n) with row i selecting index idx[i]."""
    sel = torch.zeros(len(idx), n, dtype=torch.float32)
    sel[torch.arange(len(idx)), idx.cpu()] = 1.0
    return sel


def column_lora_factors(idx: torch.Tensor, delta: torch.Tensor, scale: float, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A`` equal to the column update: A one-hot (r x in), B = s*delta (out x r)."""
    return _one_hot(idx, in_features), (scale * delta.detach().float()).cpu().contiguous()


def row_lora_factors(rows: torch.Tensor, delta: torch.Tensor, scale: float, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A`` equal to the row update: A = s*delta (k x in), B one-hot (out x k)."""
    return (scale * delta.detach().float()).cpu().contiguous(), _one_hot(rows, out_features).t().contiguous()
