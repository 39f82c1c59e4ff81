"""LoRAM with PaCA and S2FT: selections made on the pruned model, recovered to original coordinates.

References: the pruned update written by hand into the kept block of the original weights (plain
tensor indexing, independent of slimtune's export), PEFT loading the recovered adapter on the
original HF model, and the GQA structure of the original model (which value head a query head
reads)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from slimtune.config import dump_config, load_config
from slimtune.pruning import (
    PRUNERS,
    PruneMap,
    build_recovered_model,
    export_recovered,
    recover_run,
    trained_state,
)

METHOD_ARGS = {
    "paca": ["method.name=paca", "method.paca.r=8", "method.paca.scale=1.5",
             "method.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"],
    "s2ft": ["method.name=s2ft", "method.s2ft.attn_ratio=0.5", "method.s2ft.mlp_ratio=0.1", "method.s2ft.v_rows=true",
             "method.s2ft.up_rows=true", "method.s2ft.scale=0.5"],
}
HD = 32  # tiny-llama head_dim (4 query heads, 2 KV heads, hidden 128, intermediate 352)


def cfg(method, *overrides):
    return load_config(None, ["model.preset=tiny-llama", "model.overrides={num_hidden_layers: 3}", "train.seed=7",
                              "pruning.strategy=random", "pruning.ratio=0.5", "pruning.keep_first_layers=1",
                              *METHOD_ARGS[method], *overrides])


def _slices(model):
    from slimtune.adapters.partial import slice_axes

    return {n: model.get_submodule(n) for n in slice_axes(model)}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _slices(model).values():
            m.delta.copy_(torch.randn(m.delta.shape, generator=g) * 0.2)


def _dense_update(m) -> torch.Tensor:
    """The slice update as a dense (out x in) matrix, by plain indexing."""
    dw = torch.zeros(m.out_features, m.in_features)
    if m.axis == "in":
        dw[:, m.idx] += m.scale * m.delta.detach()
    else:
        dw[m.idx, :] += m.scale * m.delta.detach()
    return dw


def _setup(method, unit="kv_group", *extra):
    from slimtune.adapters import get_method
    from slimtune.models import load_model

    c = cfg(method, f"pruning.attn_unit={unit}", *extra)
    original, tok = load_model(c.model)
    small = copy.deepcopy(original)
    pm = PRUNERS["random"](small, c)
    get_method(method).attach(small, c)
    _randomize(small)
    return c, original, small, pm, tok


# --------------------------------------------------------------------------- the tensor mapping
@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("pruned_rows,pruned_cols", [(True, True), (True, False), (False, True)])
def test_recover_slice_puts_the_pruned_update_on_the_kept_block_and_zeros_elsewhere(axis, pruned_rows, pruned_cols):
    from slimtune.adapters.partial import recover_slice

    g = torch.Generator().manual_seed(3)
    n_out, n_in = 13, 11  # odd sizes
    rows = sorted(torch.randperm(n_out, generator=g)[:7].tolist()) if pruned_rows else None
    cols = sorted(torch.randperm(n_in, generator=g)[:5].tolist()) if pruned_cols else None
    p_out, p_in = len(rows) if rows else n_out, len(cols) if cols else n_in
    k = 3
    idx = torch.randperm(p_in if axis == "in" else p_out, generator=g)[:k]
    delta = torch.randn((p_out, k) if axis == "in" else (k, p_in), generator=g)
    dense_p = torch.zeros(p_out, p_in)
    if axis == "in":
        dense_p[:, idx] = delta
    else:
        dense_p[idx, :] = delta

    new_idx, new_delta = recover_slice(axis, idx, delta, rows, cols, (n_out, n_in))
    dense_o = torch.zeros(n_out, n_in)
    if axis == "in":
        dense_o[:, new_idx] = new_delta
    else:
        dense_o[new_idx, :] = new_delta
    r = torch.tensor(rows) if rows else torch.arange(n_out)
    c = torch.tensor(cols) if cols else torch.arange(n_in)
    assert torch.equal(dense_o[r][:, c], dense_p)
    keep = torch.zeros(n_out, n_in, dtype=torch.bool)
    keep[r.unsqueeze(1), c.unsqueeze(0)] = True
    assert dense_o[~keep].abs().sum() == 0

    with pytest.raises(ValueError, match="does not fit"):
        recover_slice(axis, idx, delta.t(), rows, cols, (n_out, n_in))
    with pytest.raises(ValueError, match="out of range"):
        recover_slice(axis, idx + 100, delta, rows, cols, (n_out, n_in))


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("method,unit", [("paca", "kv_group"), ("s2ft", "kv_group"), ("s2ft", "query_head")])
def test_recovered_update_is_the_pruned_one_on_the_original_model(tmp_path, method, unit):
    """Exact statement: for every trained linear, the recovered update restricted to the kept
    (rows, columns) equals the pruned model's update and is zero elsewhere; so PEFT on the original
    model equals the original model with the pruned update added by hand at the kept block, and
    slimtune's recovered model (``build_recovered_model``) gives the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    c, original, small, pm, _ = _setup(method, unit)
    index = pm.module_indices()
    by_hand = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in _slices(small).items():
            rows, cols, _ = index.get(name, (None, None, None))
            lin = by_hand.get_submodule(name)
            r = torch.arange(lin.out_features) if rows is None else torch.tensor(rows)
            k = torch.arange(lin.in_features) if cols is None else torch.tensor(cols)
            lin.weight[r.unsqueeze(1), k.unsqueeze(0)] += _dense_update(m)
    assert any(n in index for n in _slices(small))  # some trained linears really were pruned

    out = export_recovered(small, c, pm, tmp_path / "recovered")
    x = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = by_hand(input_ids=x).logits
        peft_logits = PeftModel.from_pretrained(copy.deepcopy(original), str(out)).eval()(input_ids=x).logits
        ours, _ = build_recovered_model(c, pm, trained_state(small))
        our_logits = ours(input_ids=x).logits
    torch.testing.assert_close(peft_logits, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(our_logits, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(want, original(input_ids=x).logits)  # the update is not zero

    # the adapter's dense update per module: zero at every pruned row and column
    state = load_file(str(out / "adapter_model.safetensors"))
    for name, (rows, cols, (n_out, n_in)) in index.items():
        if f"base_model.model.{name}.lora_A.weight" not in state:
            continue
        dw = state[f"base_model.model.{name}.lora_B.weight"] @ state[f"base_model.model.{name}.lora_A.weight"]
        assert dw.shape == (n_out, n_in)
        if rows is not None:
            assert dw[[i for i in range(n_out) if i not in rows]].abs().sum() == 0
        if cols is not None:
            assert dw[:, [i for i in range(n_in) if i not in cols]].abs().sum() == 0

    # selections in original coordinates: the kept index the pruned model selected
    sel = json.loads((out / "selections.json").read_text())
    for name, m in _slices(small).items():
        rows, cols, _ = index.get(name, (None, None, None))
        kept = cols if m.axis == "in" else rows
        assert sel[name] == (m.idx.tolist() if kept is None else [kept[i] for i in m.idx.tolist()])
    assert PruneMap.load(out / "prune_map").to_dict() == pm.to_dict()
    assert json.loads((out / "loram.json").read_text())["method"] == method


def test_s2ft_heads_recovered_on_a_pruned_gqa_model_keep_the_kv_coupling(tmp_path):
    """S2FT head selection on a GQA model pruned by query heads (groups shrink from 2 to 1 query
    head): in original coordinates every trained o_proj head reads (HF ``repeat_kv``: head h reads
    KV head h // g, g = 2) a value head whose v_proj rows are trained, and every trained value
    head feeds only trained heads among the kept ones."""
    c, original, small, pm, _ = _setup("s2ft", "query_head")
    out = export_recovered(small, c, pm, tmp_path / "recovered")
    sel = {k: torch.tensor(v) for k, v in json.loads((out / "selections.json").read_text()).items()}
    g = original.config.num_attention_heads // original.config.num_key_value_heads
    for i, lp in pm.layers.items():
        o, v = sel[f"model.layers.{i}.self_attn.o_proj"], sel[f"model.layers.{i}.self_attn.v_proj"]
        o_heads = sorted(set((o // HD).tolist()))
        v_heads = sorted(set((v // HD).tolist()))
        assert len(o) == len(o_heads) * HD and len(v) == len(v_heads) * HD  # whole heads
        assert set(o_heads) <= set(lp.q_heads)  # only kept heads are trained
        assert sorted({h // g for h in o_heads}) == v_heads
        assert set(o_heads) == {h for h in lp.q_heads if h // g in v_heads}


def _checkpoint(run, c, state, pm):
    from safetensors.torch import save_file

    folder = run / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(c))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "trainable.safetensors"))
    pm.save(folder)
    (folder / "COMPLETE").write_text("2")
    return folder


def test_recover_run_from_checkpoints_with_and_without_stored_selections(tmp_path):
    """``slimtune recover`` from a checkpoint: with the selections stored (``<module>.idx``, as the
    sharded engines write them) any selection recovers; without them a seeded random selection is
    derived again on a meta skeleton, while one scored from the weights cannot be and is refused."""
    from safetensors.torch import load_file

    for method, extra in (("paca", []), ("s2ft", ["method.s2ft.selection=weight"])):
        c, original, small, pm, _ = _setup(method, "kv_group", *extra)
        c = c.model_copy(update={"output": c.output.model_copy(update={"dir": str(tmp_path / method)})})
        at_end = load_file(str(export_recovered(small, c, pm, tmp_path / f"{method}_end") / "adapter_model.safetensors"))
        state = trained_state(small)
        with_idx = _checkpoint(tmp_path / f"{method}_with", c, state, pm)
        got = load_file(str(recover_run(with_idx.parents[1], tmp_path / f"{method}_cli") / "adapter_model.safetensors"))
        assert got.keys() == at_end.keys() and all(torch.equal(got[k], at_end[k]) for k in got)
        params_only = {k: v for k, v in state.items() if not k.endswith(".idx")}
        without = _checkpoint(tmp_path / f"{method}_without", c, params_only, pm)
        if method == "paca":  # random columns: derived again from (seed, module name, pruned shape)
            again = load_file(str(recover_run(without.parents[1], tmp_path / "paca_cli2") / "adapter_model.safetensors"))
            assert all(torch.equal(again[k], at_end[k]) for k in at_end)
        else:
            with pytest.raises(ValueError, match="idx"):
                recover_run(without.parents[1], tmp_path / "s2ft_cli2")


def test_selection_state_round_trip_and_load_checks():
    from slimtune.adapters.common import load_named_tensors
    from slimtune.adapters.partial import load_selections, selection_state, selections_from_state

    c, original, small, pm, _ = _setup("s2ft")
    sel = selection_state(small)
    assert sel and all(v.dtype == torch.long for v in sel.values())
    flipped = {k[: -len(".idx")]: v.flip(0) for k, v in sel.items()}
    load_selections(small, flipped)
    assert all(torch.equal(small.get_submodule(n).idx, v) for n, v in flipped.items())
    load_named_tensors(small, sel)  # buffers by name, as a checkpoint's tensors
    assert selection_state(small).keys() == sel.keys()
    assert all(torch.equal(selection_state(small)[k], v) for k, v in sel.items())
    assert selections_from_state({k: v.float() for k, v in sel.items()}).keys() == flipped.keys()
    name = next(iter(flipped))
    with pytest.raises(ValueError, match="indices"):
        load_selections(small, {name: flipped[name][:-1]})
    with pytest.raises(KeyError, match="none in this model"):
        load_selections(small, {"model.layers.0.mlp.gate_proj": flipped[name]})
