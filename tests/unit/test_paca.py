"""PaCA: partial-connection autograd, selection, memory, merge and PEFT export.

References: plain autograd on the full adapted weight, bitsandbytes' own NF4 dequant,
PEFT's LoRA layer (for saved-bytes) and ``PeftModel.from_pretrained`` (for export).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtune.adapters import paca
from slimtune.adapters.common import count_parameters, selection_generator
from slimtune.adapters.partial import column_delta_linear
from slimtune.config import validate
from slimtune.memory import saved_activation_bytes

torch.set_num_threads(1)


# --------------------------------------------------------------------------- helpers
def _cfg(**paca_kw):
    return validate({
        "model": {"preset": "tiny-llama"},
        "method": {"name": "paca", "paca": {"r": 8, **paca_kw}},
        "train": {"seed": 11},
    })


def _tiny(family: str = "llama"):
    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
        return LlamaForCausalLM(conf).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    conf = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    model = Qwen2ForCausalLM(conf).eval()
    with torch.no_grad():  # HF zero-inits biases; make the qkv biases matter
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
    return q.to("cpu")  # quantizes


def _dequant(q) -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, minus model state
    (parameters/buffers in ``exclude``: they exist anyway)."""
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


def _set_random_deltas(model, scale=0.05):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("n_in,n_out,batch,r,scale,bias", [
    (41, 9, (3, 5), 7, 1.0, True),
    (16, 32, (2,), 5, 2.0, False),
    (64, 64, (4, 3), 64, 0.5, True),
    (33, 1, (1,), 1, 1.0, False),
])
def test_column_grads_match_full_weight_autograd(n_in, n_out, batch, r, scale, bias):
    torch.manual_seed(n_in * 100 + n_out)
    base = nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)
    idx = torch.randperm(n_in)[:r]
    if r > 2:
        assert not torch.equal(idx, idx.sort().values)  # exercise unsorted indices
    delta = nn.Parameter(torch.randn(n_out, r))
    x = torch.randn(*batch, n_in, requires_grad=True)
    g_out = torch.randn(*batch, n_out)

    y = column_delta_linear(x, base, delta, idx, scale)
    (y * g_out).sum().backward()

    # reference: plain autograd on the full adapted weight as one leaf
    w_full = base.weight.detach().clone()
    w_full[:, idx] += scale * delta.detach()
    w_full.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w_full, base.bias)
    (y_ref * g_out).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.grad, scale * w_full.grad[:, idx], rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None


def test_nf4_base_matches_dense_base_with_dequantized_weight():
    torch.manual_seed(3)
    lin = nn.Linear(128, 24, bias=True)
    q = _nf4(lin).requires_grad_(False)
    packed_before = q.weight.data.clone()
    dense = nn.Linear(128, 24, bias=True).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(_dequant(q))
        dense.bias.copy_(lin.bias)
    idx = torch.randperm(128)[:10]
    d_q = nn.Parameter(torch.randn(24, 10))
    d_d = nn.Parameter(d_q.detach().clone())
    x_q = torch.randn(2, 7, 128, requires_grad=True)
    x_d = x_q.detach().clone().requires_grad_(True)
    g = torch.randn(2, 7, 24)

    y_q = column_delta_linear(x_q, q, d_q, idx, 1.5)
    y_d = column_delta_linear(x_d, dense, d_d, idx, 1.5)
    (y_q * g).sum().backward()
    (y_d * g).sum().backward()
    torch.testing.assert_close(y_q, y_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_q.grad, x_d.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_q.grad, d_d.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(q.weight.data, packed_before)  # the packed weight is never rewritten


def test_only_gathered_columns_are_saved():
    base = nn.Linear(40, 8).requires_grad_(False)
    idx = torch.randperm(40)[:6]
    delta = nn.Parameter(torch.zeros(8, 6))
    x = torch.randn(5, 40, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        column_delta_linear(x, base, delta, idx, 1.0)
    assert ((5, 6), False) in shapes  # the gathered copy, its own storage
    assert not any(shares for _, shares in shapes)  # nothing aliases the full input


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("n_in,n_out,r_lora", [(256, 256, 8), (352, 128, 8)])
def test_saved_bytes_vs_lora_of_equal_budget(n_in, n_out, r_lora):
    from peft import LoraConfig, get_peft_model

    r_paca = r_lora * (n_in + n_out) // n_out  # equal trainable budget (METHODS.md)
    assert r_paca * n_out == r_lora * (n_in + n_out)
    tokens = (4, 32)

    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(n_in, n_out))
    lora = get_peft_model(copy.deepcopy(holder), LoraConfig(r=r_lora, lora_alpha=r_lora, target_modules=["proj"]))
    lora_layer = lora.base_model.model.proj
    lora_trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)

    holder.requires_grad_(False)
    pl = paca.PacaLinear(holder.proj, paca.select_columns(n_in, r_paca, 0, "proj"))
    assert pl.delta.numel() == lora_trainable

    x = torch.randn(*tokens, n_in, requires_grad=True)  # stands for the upstream activation
    state = lambda m: list(m.parameters()) + list(m.buffers())  # noqa: E731
    b_lora = saved_bytes(lambda: lora_layer(x), state(lora_layer))
    b_paca = saved_bytes(lambda: pl(x), state(pl))
    n_tok = tokens[0] * tokens[1]
    assert b_lora == n_tok * (n_in + r_lora) * 4  # x for dA, x@A^T for dB
    assert b_paca == n_tok * r_paca * 4  # only x[..., idx]
    assert b_paca / b_lora == pytest.approx(r_paca / (n_in + r_lora))
    # the project's memory tracker counts the same bytes as activations, so the same ratio
    t_lora, t_paca = saved_activation_bytes(lora_layer, x), saved_activation_bytes(pl, x)
    assert (t_lora, t_paca) == (b_lora, b_paca)


# --------------------------------------------------------------------------- selection
def test_selection_reproducible_from_seed_and_name():
    cfg = _cfg()
    m1, m2 = _tiny(), _tiny()
    paca.attach(m1, cfg)
    paca.attach(m2, cfg)
    s1, s2 = paca.selections(m1), paca.selections(m2)
    assert s1 == s2 and len(s1) == 2 * 7
    for name, idx in s1.items():
        n_in = m1.get_submodule(name).in_features
        assert idx == torch.randperm(n_in, generator=selection_generator(11, name))[:8].tolist()
        assert len(set(idx)) == 8
    assert len({tuple(v) for v in s1.values()}) > 1  # different modules, different columns
    m3 = _tiny()
    paca.attach(m3, validate({"model": {"preset": "tiny-llama"}, "method": {"name": "paca", "paca": {"r": 8}}, "train": {"seed": 12}}))
    assert paca.selections(m3) != s1


def test_only_deltas_train():
    model = _tiny()
    paca.attach(model, _cfg())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)
    n_train, _ = count_parameters(model)
    expected = sum(m.out_features * 8 for _, m in model.named_modules() if isinstance(m, paca.PacaLinear))
    assert n_train == expected
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_model_grads_match_full_finetune_slices():
    ref = _tiny()
    model = copy.deepcopy(ref)
    paca.attach(model, _cfg(scale=2.0))
    _set_random_deltas(model)
    # reference: the same adapted weights as plain trainable nn.Linear weights
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, paca.PacaLinear):
                ref.get_submodule(name).weight[:, m.idx] += 2.0 * m.delta
    model(input_ids=IDS, labels=IDS).loss.backward()
    ref(input_ids=IDS, labels=IDS).loss.backward()
    for name, m in model.named_modules():
        if isinstance(m, paca.PacaLinear):
            torch.testing.assert_close(m.delta.grad, 2.0 * ref.get_submodule(name).weight.grad[:, m.idx], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- merge / export
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merge_equals_unmerged(family):
    model = _tiny(family)
    paca.attach(model, _cfg(scale=0.5))
    _set_random_deltas(model)
    before = _logits(model, IDS)
    paca.merge(model)
    assert not any(isinstance(m, paca.PacaLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, IDS), before, rtol=1e-5, atol=1e-5)


def test_merge_nf4_base_gives_dense_linear():
    torch.manual_seed(4)
    holder = nn.Sequential()
    holder.add_module("proj", _nf4(nn.Linear(64, 16)))
    holder.requires_grad_(False)
    idx = paca.select_columns(64, 5, 0, "proj")
    holder.proj = paca.PacaLinear(holder.proj, idx, 1.0)
    with torch.no_grad():
        holder.proj.delta.normal_()
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = holder(x)
    paca.merge(holder)
    assert type(holder.proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(holder(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_exported_peft_adapter_reproduces_logits(family, tmp_path):
    from peft import PeftModel

    original = _tiny(family)
    model = copy.deepcopy(original)
    cfg = _cfg(scale=0.7)
    paca.attach(model, cfg)
    _set_random_deltas(model)
    want = _logits(model, IDS)
    paca.export_peft(model, cfg, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded, IDS), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, _logits(_tiny(family), IDS), atol=1e-4)  # the adapter does something


def test_lora_factors_are_exact_column_update():
    model = _tiny()
    paca.attach(model, _cfg(scale=0.3))
    _set_random_deltas(model)
    for name, (a, b) in paca.lora_factors(model).items():
        m = model.get_submodule(name)
        upd = torch.zeros(m.out_features, m.in_features)
        upd[:, m.idx] = 0.3 * m.delta.detach()
        assert a.shape == (8, m.in_features) and b.shape == (m.out_features, 8)
        torch.testing.assert_close(b @ a, upd)


def peft_model_from_factors(original, factors):
    """A PEFT LoRA model built by PEFT itself on ``original``, its A/B set from ``factors``
    (alpha = r per module, so PEFT's scale is 1)."""
    import re

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ranks = {re.escape(n): a.shape[0] for n, (a, _) in factors.items()}
    conf = LoraConfig(r=8, lora_alpha=8, target_modules=list(factors), rank_pattern=ranks, alpha_pattern=ranks)
    pm = get_peft_model(original, conf).eval()
    sd = {}
    for n, (a, b) in factors.items():
        sd[f"base_model.model.{n}.lora_A.weight"] = a
        sd[f"base_model.model.{n}.lora_B.weight"] = b
    res = set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys
    return pm


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_factors_reproduce_logits_in_peft(family):
    original = _tiny(family)
    model = copy.deepcopy(original)
    paca.attach(model, _cfg(scale=0.7))
    _set_random_deltas(model)
    pm = peft_model_from_factors(original, paca.lora_factors(model))
    torch.testing.assert_close(_logits(pm, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao"])
def test_qpaca_on_quantized_model_matches_dequantized_dense_model(backend):
    from slimtune.quant import dequantize, is_quantized_linear, quantize

    cfg = validate({
        "model": {"preset": "tiny-llama"},
        "method": {"name": "paca", "paca": {"r": 8, "scale": 1.5}},
        "quant": {"name": "nf4", "backend": backend},
        "train": {"seed": 11},
    })
    q_model, dense_model = _tiny(), _tiny()  # same init; (torchao's NF4 clone re-quantizes, so no deepcopy)
    quantize(q_model, cfg.quant)
    quantize(dense_model, cfg.quant)
    dequantize(dense_model)
    paca.attach(q_model, cfg)
    paca.attach(dense_model, cfg)
    assert any(is_quantized_linear(m.base) for m in q_model.modules() if isinstance(m, paca.PacaLinear))
    _set_random_deltas(q_model)
    _set_random_deltas(dense_model)
    q_model(input_ids=IDS, labels=IDS).loss.backward()
    dense_model(input_ids=IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(_logits(q_model, IDS), _logits(dense_model, IDS), rtol=1e-4, atol=1e-5)
    for (n, p), (n2, p2) in zip(q_model.named_parameters(), dense_model.named_parameters()):
        if p.requires_grad:
            assert n == n2
            torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-6)
    before = _logits(q_model, IDS)
    paca.merge(q_model)
    assert not any(is_quantized_linear(m) for m in q_model.modules())  # every quantized linear was a target
    torch.testing.assert_close(_logits(q_model, IDS), before, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = _tiny().train()
        paca.attach(model, _cfg())
        _set_random_deltas(model)
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_bf16_base_keeps_fp32_delta_and_grad():
    torch.manual_seed(0)
    base = nn.Linear(48, 20).to(torch.bfloat16).requires_grad_(False)
    pl = paca.PacaLinear(base, paca.select_columns(48, 6, 0, "p"), 1.0)
    with torch.no_grad():
        pl.delta.normal_()
    x = torch.randn(3, 48, dtype=torch.bfloat16, requires_grad=True)
    y = pl(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert pl.delta.dtype == torch.float32 and pl.delta.grad.dtype == torch.float32
    want = x.detach().float()[:, pl.idx].sum(0).expand(20, -1)  # dL/dDelta = 1^T x[:, idx]
    torch.testing.assert_close(pl.delta.grad, want, rtol=2e-2, atol=2e-2)
