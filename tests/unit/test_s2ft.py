"""S2FT: row/column slices, GQA head selection, scoring, memory, merge and PEFT export.

References: plain autograd on full trainable weights, bitsandbytes NF4 dequant, PEFT's
LoRA layer (saved bytes) and ``PeftModel.from_pretrained`` (export).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtune.adapters import s2ft
from slimtune.adapters.common import count_parameters
from slimtune.adapters.partial import row_delta_linear
from slimtune.config import validate
from slimtune.memory import saved_activation_bytes

torch.set_num_threads(1)

HD = 16  # head_dim of the tiny models: hidden 64 / 4 heads; 2 KV heads (GQA, g = 2)


# --------------------------------------------------------------------------- helpers
def _cfg(seed=11, **kw):
    s2 = {"attn_ratio": 0.5, "mlp_ratio": 0.1, "v_rows": True, "up_rows": True, **kw}
    return validate({"model": {"preset": "tiny-llama"}, "method": {"name": "s2ft", "s2ft": s2}, "train": {"seed": seed}})


def _tiny(family: str = "llama", n_kv: int = 2):
    torch.manual_seed(0)
    kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=n_kv, vocab_size=300, max_position_embeddings=64)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _nf4(lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def saved_bytes(fn, exclude) -> int:
    """Distinct storages saved for backward while ``fn`` runs, minus model state."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _set_random_deltas(model, scale=0.05, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _apply_to_dense(ref: nn.Module, model: nn.Module) -> None:
    """Write every slice update of ``model`` into the plain weights of ``ref`` (a copy of the original)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, s2ft.S2ftLinear):
                w = ref.get_submodule(name).weight
                if m.axis == "in":
                    w[:, m.idx] += m.scale * m.delta
                else:
                    w[m.idx, :] += m.scale * m.delta


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- row autograd
@pytest.mark.parametrize("n_in,n_out,batch,k,scale,bias", [
    (41, 9, (3, 5), 4, 1.0, True),
    (16, 32, (2,), 7, 2.0, False),
    (8, 64, (4, 3), 64, 0.5, True),
])
def test_row_grads_match_full_weight_autograd(n_in, n_out, batch, k, scale, bias):
    torch.manual_seed(n_in + n_out)
    base = nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)
    rows = torch.randperm(n_out)[:k]
    delta = nn.Parameter(torch.randn(k, n_in))
    x = torch.randn(*batch, n_in, requires_grad=True)
    g_out = torch.randn(*batch, n_out)
    (row_delta_linear(x, base, delta, rows, scale) * g_out).sum().backward()

    w_full = base.weight.detach().clone()
    w_full[rows, :] += scale * delta.detach()
    w_full.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w_full, base.bias)
    (y_ref * g_out).sum().backward()
    torch.testing.assert_close(row_delta_linear(x, base, delta, rows, scale), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.grad, scale * w_full.grad[rows, :], rtol=1e-5, atol=1e-5)


def test_row_slice_on_nf4_base_matches_dense_dequantized():
    import bitsandbytes.functional as bf

    torch.manual_seed(2)
    q = _nf4(nn.Linear(64, 40)).requires_grad_(False)
    dense = nn.Linear(64, 40).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(bf.dequantize_4bit(q.weight.data, q.weight.quant_state))
        dense.bias.copy_(q.bias)
    rows = torch.tensor([33, 2, 17, 5])
    d1 = nn.Parameter(torch.randn(4, 64))
    d2 = nn.Parameter(d1.detach().clone())
    x1 = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 40)
    y1, y2 = row_delta_linear(x1, q, d1, rows, 1.0), row_delta_linear(x2, dense, d2, rows, 1.0)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d1.grad, d2.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- memory
def _lora_layer(n_in, n_out, r):
    from peft import LoraConfig, get_peft_model

    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(n_in, n_out))
    pm = get_peft_model(copy.deepcopy(holder), LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]))
    holder.requires_grad_(False)
    return holder.proj, pm.base_model.model.proj, sum(p.numel() for p in pm.parameters() if p.requires_grad)


def _state(m):
    return list(m.parameters()) + list(m.buffers())


def test_saved_bytes_vs_lora_of_equal_budget():
    """down_proj-like columns (352 -> 128) and up_proj-like rows (128 -> 352) of the tiny-llama
    preset against a PEFT LoRA layer of rank 8 with the same number of trainable weights."""
    torch.manual_seed(0)
    r, tokens = 8, 4 * 32
    # columns: k channels of down_proj, k * out = r * (in + out)
    base, lora, budget = _lora_layer(352, 128, r)
    k = budget // 128
    cols = s2ft.S2ftLinear(base, torch.randperm(352)[:k], "in")
    assert cols.delta.numel() == budget
    x = torch.randn(4, 32, 352, requires_grad=True)
    b_lora, b_cols = saved_bytes(lambda: lora(x), _state(lora)), saved_bytes(lambda: cols(x), _state(cols))
    assert b_lora == tokens * (352 + r) * 4
    assert b_cols == tokens * k * 4  # only the gathered channels
    # the project's memory tracker counts the same activation bytes, so the same ratio k / (in + r)
    assert (saved_activation_bytes(lora, x), saved_activation_bytes(cols, x)) == \
        (b_lora, b_cols)
    # rows: k rows of up_proj, k * in = r * (in + out); grad_delta needs the whole input
    base, lora, budget = _lora_layer(128, 352, r)
    k = budget // 128
    rows = s2ft.S2ftLinear(base, torch.randperm(352)[:k], "out")
    assert rows.delta.numel() == budget
    x = torch.randn(4, 32, 128, requires_grad=True)
    b_lora, b_rows = saved_bytes(lambda: lora(x), _state(lora)), saved_bytes(lambda: rows(x), _state(rows))
    assert b_lora == tokens * (128 + r) * 4
    assert b_rows == tokens * 128 * 4  # x only: a row slice saves what LoRA's A factor does, minus x@A^T
    assert (saved_activation_bytes(lora, x), saved_activation_bytes(rows, x)) == \
        (b_lora, b_rows)


# --------------------------------------------------------------------------- GQA selection
def _plan(model, cfg):
    return s2ft.plan_selection(model, cfg.method.s2ft, cfg.train.seed)


def test_gqa_plan_selects_whole_kv_groups_with_their_value_rows():
    model = _tiny()
    plan = _plan(model, _cfg())
    for layer in range(2):
        o_axis, o_idx = plan[f"model.layers.{layer}.self_attn.o_proj"]
        v_axis, v_idx = plan[f"model.layers.{layer}.self_attn.v_proj"]
        assert (o_axis, v_axis) == ("in", "out")
        assert len(v_idx) == HD and len(o_idx) == 2 * HD  # round(0.5 * 2 KV) = 1 group = 2 query heads
        kv = int(v_idx[0]) // HD
        assert v_idx.tolist() == list(range(kv * HD, (kv + 1) * HD))
        assert o_idx.tolist() == list(range(kv * 2 * HD, (kv + 1) * 2 * HD))  # query heads 2kv, 2kv+1
        d_axis, d_idx = plan[f"model.layers.{layer}.mlp.down_proj"]
        u_axis, u_idx = plan[f"model.layers.{layer}.mlp.up_proj"]
        assert (d_axis, u_axis) == ("in", "out") and torch.equal(d_idx, u_idx) and len(d_idx) == round(0.1 * 176)


def test_query_head_unit_without_v_rows():
    plan = _plan(_tiny(), _cfg(attn_ratio=0.75, v_rows=False, mlp_ratio=0.0))
    assert set(plan) == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    for _, idx in plan.values():
        heads = sorted({int(c) // HD for c in idx})
        assert len(heads) == 3 and idx.tolist() == [h * HD + d for h in heads for d in range(HD)]


def test_gqa_value_rows_feed_exactly_the_selected_output_columns():
    """Structural check through HF's own attention (repeat_kv): changing the trained v_proj
    rows changes o_proj's input in exactly the trained o_proj columns."""
    model = _tiny()
    s2ft.attach(model, _cfg(seed=3))
    captured = []
    o_proj = model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda m, a, o: captured.append(a[0].detach().clone()))
    _logits(model, IDS)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.delta.normal_()
    _logits(model, IDS)
    handle.remove()
    changed = ((captured[1] - captured[0]).abs().amax(dim=(0, 1)) > 1e-6).nonzero().flatten().tolist()
    assert changed == sorted(o_proj.idx.tolist())


@pytest.mark.parametrize("n_kv,v_rows", [(2, True), (2, False), (4, True), (1, True)])
def test_model_grads_match_full_finetune_slices(n_kv, v_rows):
    original = _tiny(n_kv=n_kv)
    model = copy.deepcopy(original)
    s2ft.attach(model, _cfg(v_rows=v_rows, scale=1.5))
    _set_random_deltas(model)
    ref = copy.deepcopy(original)
    _apply_to_dense(ref, model)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss_ref = ref(input_ids=IDS, labels=IDS).loss
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_ref.backward()
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, s2ft.S2ftLinear):
            g = ref.get_submodule(name).weight.grad
            want = g[:, m.idx] if m.axis == "in" else g[m.idx, :]
            torch.testing.assert_close(m.delta.grad, 1.5 * want, rtol=1e-4, atol=1e-7)
            n += 1
    assert n == 2 * (4 if v_rows else 3)


# --------------------------------------------------------------------------- scoring
def test_weight_scoring_picks_the_smallest_or_largest_heads():
    model = _tiny()
    for prefer in ("small", "large"):
        cfg = _cfg(attn_ratio=0.5, v_rows=False, mlp_ratio=0.05, selection="weight", prefer=prefer)
        scores = s2ft.score_columns(model, [], "weight", s2ft._scored_modules(model, cfg.method.s2ft))
        plan = s2ft.plan_selection(model, cfg.method.s2ft, 0, scores)
        for layer in model.model.layers:
            w = layer.self_attn.o_proj.weight.detach()
            head_norm = torch.stack([w[:, h * HD:(h + 1) * HD].norm(dim=0).sum() for h in range(4)])
            want = sorted(torch.argsort(head_norm, descending=prefer == "large")[:2].tolist())
            name = [n for n, m in model.named_modules() if m is layer.self_attn.o_proj][0]
            assert sorted({int(c) // HD for c in plan[name][1]}) == want
            ch = layer.mlp.down_proj.weight.detach().norm(dim=0)
            dname = name.replace("self_attn.o_proj", "mlp.down_proj")
            assert plan[dname][1].tolist() == sorted(torch.argsort(ch, descending=prefer == "large")[:9].tolist())


def test_gradient_scores_equal_weight_gradient_column_norms():
    model = _tiny()
    mods = s2ft._scored_modules(model, _cfg().method.s2ft)
    scores = s2ft.score_columns(model, [{"input_ids": IDS}], "gradient", mods)
    ref = _tiny()
    ref.requires_grad_(False)
    for name in mods:
        ref.get_submodule(name).weight.requires_grad_(True)
    ref(input_ids=IDS, labels=IDS).loss.backward()
    for name in mods:
        torch.testing.assert_close(scores[name], ref.get_submodule(name).weight.grad.norm(dim=0), rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind


def test_activation_scoring_selects_from_calibration_batches():
    model = _tiny()
    batches = [{"input_ids": IDS}, {"input_ids": IDS.flip(1)}]
    cfg = _cfg(selection="activation", mlp_ratio=0.1, calibration_batches=1)
    with pytest.raises(ValueError, match="calibration"):
        s2ft.attach(copy.deepcopy(model), cfg)
    mods = s2ft._scored_modules(model, cfg.method.s2ft)
    # reference: mean |input| of down_proj from a hook on the first batch only
    acts = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, a[0].abs().reshape(-1, a[0].shape[-1]).mean(0)))
             for n, m in mods.items()]
    _logits(model, IDS)
    for h in hooks:
        h.remove()
    scores = s2ft.score_columns(model, batches[:1], "activation", mods)
    for n in mods:
        torch.testing.assert_close(scores[n], acts[n])
    s2ft.attach(model, cfg, calibration=iter(batches))
    d = model.model.layers[0].mlp.down_proj
    want = sorted(torch.argsort(acts["model.layers.0.mlp.down_proj"])[:18].tolist())
    assert d.idx.tolist() == want


# --------------------------------------------------------------------------- method API
def test_selections_reproducible_and_seed_dependent():
    a, b, c = _tiny(), _tiny(), _tiny()
    s2ft.attach(a, _cfg(seed=1))
    s2ft.attach(b, _cfg(seed=1))
    s2ft.attach(c, _cfg(seed=2, mlp_ratio=0.1))
    assert s2ft.selections(a) == s2ft.selections(b)
    assert s2ft.selections(a) != s2ft.selections(c)
    sel = s2ft.selections(a)
    assert sel["model.layers.0.mlp.down_proj"]["idx"] != sel["model.layers.1.mlp.down_proj"]["idx"]
    assert sel["model.layers.0.mlp.up_proj"] == {"axis": "out", "idx": sel["model.layers.0.mlp.down_proj"]["idx"]}


def test_only_slices_train_and_optimizer_state_is_slice_sized():
    model = _tiny()
    s2ft.attach(model, _cfg())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n, _ in trainable)
    per_layer = (2 * HD) * 64 + HD * 64 + 18 * 64 + 18 * 64  # o cols, v rows, down cols, up rows
    assert count_parameters(model)[0] == 2 * per_layer
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    state = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert state == 2 * 2 * per_layer  # exp_avg + exp_avg_sq, slice-sized


def test_nothing_selected_is_an_error():
    with pytest.raises(ValueError, match="selected nothing"):
        s2ft.attach(_tiny(), _cfg(attn_ratio=0.0, mlp_ratio=0.0))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merge_equals_unmerged(family):
    model = _tiny(family)
    s2ft.attach(model, _cfg(scale=0.5))
    _set_random_deltas(model)
    before = _logits(model, IDS)
    s2ft.merge(model)
    assert not any(isinstance(m, s2ft.S2ftLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, IDS), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_exported_peft_adapter_reproduces_logits(family, tmp_path):
    from peft import PeftModel

    original = _tiny(family)
    model = copy.deepcopy(original)
    cfg = _cfg(attn_ratio=0.75, v_rows=False, mlp_ratio=0.1, up_rows=True, scale=2.0)  # mixed ranks
    s2ft.attach(model, cfg)
    _set_random_deltas(model)
    want = _logits(model, IDS)
    s2ft.export_peft(model, cfg, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded, IDS), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, _logits(_tiny(family), IDS), atol=1e-4)


def test_s2ft_on_quantized_model_matches_dequantized_dense_model():
    from slimtune.quant import dequantize, quantize

    cfg = validate({
        "model": {"preset": "tiny-llama"},
        "method": {"name": "s2ft", "s2ft": {"attn_ratio": 0.5, "v_rows": True, "mlp_ratio": 0.1, "up_rows": True}},
        "quant": {"name": "nf4"},
        "train": {"seed": 4},
    })
    q_model, dense_model = _tiny(), _tiny()
    quantize(q_model, cfg.quant)
    quantize(dense_model, cfg.quant)
    dequantize(dense_model)
    s2ft.attach(q_model, cfg)
    s2ft.attach(dense_model, cfg)
    _set_random_deltas(q_model)
    _set_random_deltas(dense_model)
    q_model(input_ids=IDS, labels=IDS).loss.backward()
    dense_model(input_ids=IDS, labels=IDS).loss.backward()
    for (n, p), (_, p2) in zip(q_model.named_parameters(), dense_model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_logits(q_model, IDS), _logits(dense_model, IDS), rtol=1e-4, atol=1e-5)
