"""``kernels.apply``: a QLoRA / QPaCA / S2FT tiny Llama routed through the fused ops (Triton,
interpreted) gives the logits and gradients of the same model through its own modules."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.adapters import get_method
from slimtune.config import KernelsConfig, validate
from slimtune.kernels import apply, force_triton, remove
from slimtune.kernels.apply import _RegatheredColumn, _RegatheredLora
from slimtune.quant import quantize
from slimtune.quant.bnb import _Zero3AwareForward


def qmodel(method: str, dtype=torch.float32, extra=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300)).to(dtype)
    cdt = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg = validate({
        "model": {"preset": "tiny-llama"},
        "method": {"name": method, **(extra or {})},
        "quant": {"name": "nf4", "compute_dtype": cdt},
        "train": {"seed": 5},
    })
    quantize(model, cfg.quant)
    get_method(method).attach(model, cfg)
    with torch.no_grad():  # non-zero trainable parts, so their contribution is checked
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def own_forward(module) -> bool:
    """An instance-level forward other than the one every bitsandbytes base gets from quantization
    (``slimtune.quant.bnb.route_forward``, which the ZeRO-3 engine installs)."""
    fwd = module.__dict__.get("forward")
    return fwd is not None and not isinstance(fwd, _Zero3AwareForward)


IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "method,extra,expected,launches",
    # launches: one forward kernel per fused module; one grad-input kernel per fused module
    # whose input needs a gradient (not q/k/v: the frozen embedding's output needs none);
    # one gathered-gradient kernel per column delta.
    [
        ("lora", {"lora": {"r": 4, "alpha": 8.0}}, {"LoRALinear": 7}, 7 + 4),
        ("paca", {"paca": {"r": 8, "scale": 1.5}}, {"PacaLinear": 7}, 7 + 4 + 7),
        ("s2ft", {"target_modules": ["o_proj", "down_proj", "v_proj"], "s2ft": {"attn_ratio": 0.5, "mlp_ratio": 0.1}},
         {"S2ftLinear": 2}, 2 + 1 + 2),  # o_proj's input (attention output) needs no gradient
    ],
)
def test_fused_model_equals_module_forward(method, extra, expected, launches, monkeypatch):
    import slimtune.kernels.nf4 as nf4

    launched = []
    real = nf4._kernels
    monkeypatch.setattr(nf4, "_kernels", lambda t: launched.append(t.shape) or real(t))
    model = qmodel(method, extra=extra)
    ref_logits, ref_grads = loss_and_grads(copy.deepcopy(model))
    counts = apply(model, KernelsConfig(enabled=True))
    assert counts == expected  # S2FT: only the input-column slices (o_proj, down_proj) are fused
    with force_triton():
        logits, grads = loss_and_grads(model)
    assert len(launched) == launches  # the Triton kernels really ran
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)
    remove(model)
    assert not any(own_forward(m) for m in model.modules())


def test_disabled_is_a_no_op():
    model = qmodel("lora", extra={"lora": {"r": 4}})
    assert apply(model, KernelsConfig(enabled=False)) == {}
    assert not any(own_forward(m) for m in model.modules())


def test_bf16_qlora_model(triton_path):
    model = qmodel("lora", dtype=torch.bfloat16, extra={"lora": {"r": 4}})
    ref_logits, ref_grads = loss_and_grads(copy.deepcopy(model))
    apply(model, KernelsConfig(enabled=True))
    logits, grads = loss_and_grads(model)
    assert (logits.float() - ref_logits.float()).abs().max() <= 0.02 * ref_logits.float().abs().max()
    for n in grads:
        err = (grads[n].float() - ref_grads[n].float()).abs().max() / ref_grads[n].float().abs().max()
        assert err <= 0.05, (n, err)


def test_regathered_paths_equal_op_paths(triton_path):
    """The ZeRO-3 variants (weight fetched again in backward) compute what the ops compute."""
    model = qmodel("lora", extra={"lora": {"r": 4}})
    m = model.model.layers[0].mlp.down_proj
    paca_model = qmodel("paca", extra={"paca": {"r": 8}})
    pm = paca_model.model.layers[0].mlp.down_proj
    x = torch.randn(5, 176, generator=torch.Generator().manual_seed(0))
    for run, mod in (
        (lambda xx: _RegatheredLora.apply(xx, m.lora_A, m.lora_B, None, m.base, float(m.scale)), m),
        (lambda xx: _RegatheredColumn.apply(xx, pm.delta, pm.idx, pm.base, float(pm.scale)), pm),
    ):
        results = []
        for fn in (run, mod.forward):
            mod.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            y = fn(xx)
            y.square().sum().backward()
            results.append([y.detach(), xx.grad] + [p.grad for p in mod.parameters() if p.requires_grad])
        for got, exp in zip(*results):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_features,compute_dtype,bias", [(128, torch.float32, False), (96, torch.bfloat16, True)])
def test_released_weight_route_equals_bitsandbytes(in_features, compute_dtype, bias):
    """``quant.bnb``'s ZeRO-3 route (bitsandbytes' forward in an autograd function that keeps the
    module, not a view of the weight; backward dequantizes again) gives bitsandbytes' output and
    input gradient bit for bit.  96 in-features: blocks straddle rows, slimtune's own CPU decode."""
    from slimtune.config import QuantConfig
    from slimtune.quant.bnb import _ReleasedWeightMatmul, quantize_linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, 48, bias=bias)
    cdt = "bfloat16" if compute_dtype == torch.bfloat16 else "float32"
    m = quantize_linear(dense, QuantConfig(name="nf4", compute_dtype=cdt))
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, in_features)
    dy = torch.randn(2, 5, 48)
    out = []
    for fn in (lambda t: m(t), lambda t: _ReleasedWeightMatmul.apply(t, m, type(m).forward)):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward(dy)
        out.append((y.detach(), xx.grad))
    (y_ref, g_ref), (y, g) = out
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    assert y.dtype == x.dtype and g.dtype == x.dtype
