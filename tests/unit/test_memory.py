"""The memory tracker (DESIGN rule 5), checked against analytic byte counts, torch's own
MemTracker / FSDPMemTracker, and real-vs-fake execution."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from slimtune.memory import CATEGORIES, MemoryTracker, fake_module, format_bytes, parse_bytes

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def nbytes_of(tensors) -> int:
    """Independent byte count: numel x element size over distinct tensors."""
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- units
def test_format_and_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("24 GiB") == parse_bytes("24Gi") == parse_bytes("24gib") == 24 * 2**30
    assert parse_bytes("1.5TB") == 1_500_000_000_000
    assert parse_bytes("512MB") == 512_000_000
    assert parse_bytes("4096") == 4096 and parse_bytes(77) == 77
    for bad in ("", "GiB", "24 XB", "-3GiB", "24 iB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(24 * 2**30) == "24.00 GiB"
    assert format_bytes(1536 * 2**20) == "1.50 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"
    assert parse_bytes(format_bytes(3 * 2**40).replace(" ", "")) == 3 * 2**40


# --------------------------------------------------------------- storage semantics
def test_storages_counted_once_views_and_frees():
    tr = MemoryTracker()
    with tr:
        x = torch.empty(1000)  # 4000 bytes
        v1, v2 = x.view(10, 100), x[::2]
        x.add_(1.0)  # in place: no new memory
        assert tr.current_bytes == 4000
        y = x.clone()
        assert tr.current_bytes == 8000
        del x, v1
        assert tr.current_bytes == 8000  # v2 still holds the storage
        del v2
        assert tr.current_bytes == 4000
        del y
        assert tr.current_bytes == 0
        z = torch.tensor([1.0, 2.0])  # data built outside the dispatcher, lifted in
        assert tr.current_bytes == 8
        del z
    assert tr.peak_bytes == 8000
    assert tr.peak_breakdown["temporaries"] == 8000


def test_pre_existing_tensors_are_not_counted_by_views():
    outside = torch.empty(256)
    tr = MemoryTracker()
    with tr:
        a = outside.view(16, 16).t()
        outside.mul_(2.0)
        b = outside + 1.0
    assert tr.category_of(a) is None
    assert tr.peak_bytes == b.numel() * 4


def test_storage_resize_is_tracked():
    # FSDP2 frees and re-allocates unsharded parameters with UntypedStorage.resize_, which
    # does not pass through the dispatcher.
    tr = MemoryTracker()
    with tr:
        t = torch.empty(1024)
        t.untyped_storage().resize_(0)
        assert tr.current_bytes == 0
        t.untyped_storage().resize_(8192)
        assert tr.current_bytes == 8192
    assert tr.peak_bytes == 8192
    assert torch.UntypedStorage.resize_.__name__ == "resize_"
    t.untyped_storage().resize_(0)  # after exit: original method restored, nothing tracked
    assert tr.current_bytes == 8192


def test_host_categories_and_phases_give_the_device_peak_over_time():
    """With CPU offload a GPU run keeps some categories, and what its host-side optimizer step
    allocates, in host memory; on one (fake) device the tracker keeps them apart and records the
    peak of the rest over time -- not the overall peak less the host part at that moment."""
    with pytest.raises(ValueError, match="bogus"):
        MemoryTracker(host_categories=("bogus",))
    tr = MemoryTracker(host_categories=("grads",), host_phases=("optimizer",))
    with tr:
        with tr.phase("optimizer"):
            step = torch.empty(1000, dtype=torch.uint8)  # made by the host-side step: host memory
        a = torch.empty(300, dtype=torch.uint8)
        b = torch.empty(200, dtype=torch.uint8)
        assert (tr.device_peak_bytes, tr.device_peak_host_bytes) == (500, 1000)
        tr.register(b, "grads")  # moved to the host (an offloaded gradient)
        c = torch.empty(400, dtype=torch.uint8)
        assert (tr.device_peak_bytes, tr.device_peak_host_bytes) == (700, 1200)
        assert tr.device_peak_breakdown["temporaries"] == 700 and tr.device_peak_breakdown["grads"] == 0
        del step
        tr.register(b, "temporaries")  # back on the device: a new device peak at once
        assert (tr.device_peak_bytes, tr.device_peak_host_bytes) == (900, 0)
        del a, b, c
    assert tr.peak_bytes == 1900  # everything, on the one device the tracker sees
    plain = MemoryTracker()
    with plain:
        x = torch.empty(64, dtype=torch.uint8)
    assert (plain.device_peak_bytes, plain.device_peak_breakdown) == (plain.peak_bytes, plain.peak_breakdown) == \
        (64, {**dict.fromkeys(CATEGORIES, 0), "temporaries": 64})
    del x


# ------------------------------------------------------------- analytic reference
@pytest.mark.parametrize("batch,dim,layers", [(64, 32, 3), (8, 64, 4), (256, 16, 2)])
def test_chain_of_linears_matches_analytic_peak(batch, dim, layers):
    """y = W_L ... W_1 x, loss = y.sum(). Autograd saves each layer's input; in backward, the
    node of layer k holds its saved inputs x, h_1..h_{k-1}, the incoming gradient, its
    grad_input and its grad_weight, while the gradients of layers k+1..L are already stored."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(layers)])
    x = torch.randn(batch, dim)
    P, A, W = layers * dim * dim * 4, batch * dim * 4, dim * dim * 4
    candidates = {"forward": (P + (layers + 1) * A, layers * A + A, 0)}  # (total, acts+out, grads)
    for k in range(layers, 0, -1):
        saved = k * A
        grads = (layers - k + 1) * W
        incoming = 0 if k == layers else A  # the loss gradient is an expanded scalar
        grad_input = 0 if k == 1 else A  # x does not require grad
        candidates[k] = (P + saved + grads + incoming + grad_input, saved, grads)
    where = max(candidates, key=lambda c: candidates[c][0])
    expected_peak, expected_saved, expected_grads = candidates[where]

    tr = MemoryTracker()
    tr.register_model(model)
    with tr:
        with tr.phase("forward"):
            loss = model(x).sum()
        after_forward = tr.current_breakdown
        with tr.phase("backward"):
            loss.backward()
    scalars = 16  # the loss and its unit gradient, 4 bytes each, may be live at the peak
    assert after_forward["activations"] == layers * A + 4  # x, h_1..h_{L-1}, and the loss
    assert after_forward["trainable"] == P and after_forward["weights"] == 0
    assert expected_peak <= tr.peak_bytes <= expected_peak + scalars
    br = tr.peak_breakdown
    assert br["grads"] == expected_grads
    if where != "forward":
        assert expected_saved <= br["activations"] <= expected_saved + scalars
    assert tr.current_breakdown["grads"] == P
    assert tr.phase_peaks["forward"]["peak_bytes"] <= tr.peak_bytes
    assert max(p["peak_bytes"] for p in tr.phase_peaks.values()) == tr.peak_bytes


def test_tracker_does_not_change_gradients():
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 16))
    model(ids, labels=ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    tr = MemoryTracker()
    tr.register_model(model)
    with tr:
        model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=0, atol=0)


# ------------------------------------------------------------------ categories
def test_frozen_model_under_no_grad_has_no_activations():
    model = tiny_llama().requires_grad_(False)
    ids = torch.randint(0, 300, (2, 32))
    tr = MemoryTracker()
    tr.register_model(model)
    expected_weights = nbytes_of(list(model.parameters()) + list(model.buffers()))
    assert tr.current_breakdown["weights"] == expected_weights
    with tr, tr.phase("forward"), torch.no_grad():
        logits = model(ids).logits
    assert tr.peak_breakdown["activations"] == 0
    assert tr.current_breakdown["activations"] == 0
    assert tr.peak_breakdown["temporaries"] > logits.numel() * 4  # the working set of a layer too
    assert tr.peak_breakdown["trainable"] == tr.peak_breakdown["grads"] == 0


def test_lora_backward_gives_grads_only_to_lora_and_adamw_doubles_them():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LORA_TARGETS))
    ids = torch.randint(0, 300, (2, 32))
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert lora and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(lora, lr=1e-3)
    tr = MemoryTracker()
    tr.register_model(model)
    tr.register_optimizer(opt)
    assert tr.current_breakdown["trainable"] == nbytes_of(lora)
    assert tr.current_breakdown["weights"] == nbytes_of(frozen + list(model.buffers()))
    with tr:
        with tr.phase("forward"):
            loss = model(ids, labels=ids).loss
        with tr.phase("backward"):
            loss.backward()
        assert tr.current_breakdown["grads"] == nbytes_of(lora)
        assert all(tr.category_of(p.grad) == "grads" for p in lora)
        assert all(p.grad is None for p in frozen)
        opt.step()
        # exp_avg and exp_avg_sq per LoRA parameter, plus a 4-byte fp32 step counter each
        assert tr.current_breakdown["optimizer"] == 2 * nbytes_of(lora) + 4 * len(lora)
        opt.zero_grad(set_to_none=True)
        assert tr.current_breakdown["grads"] == 0
    assert "optimizer" in tr.phase_peaks and "backward" in tr.phase_peaks
    assert tr.peak_breakdown["activations"] > 0
    json.dumps(tr.summary())


def test_optimizer_phase_without_registration():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tr = MemoryTracker()
    tr.register_model(model)
    trainable = nbytes_of(list(model.parameters()))
    with tr:
        model(torch.randn(4, 32)).sum().backward()
        assert tr.current_breakdown["grads"] == trainable
        with tr.phase("optimizer"):
            opt.step()
    assert tr.current_breakdown["optimizer"] == 2 * trainable + 4 * len(list(model.parameters()))


def test_saved_on_ctx_counts_as_activation_at_forward_exit():
    class KeepOnCtx(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.kept = x.exp()  # kept without save_for_backward, as some libraries do
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * ctx.kept

    x = torch.randn(100, requires_grad=True)
    tr = MemoryTracker()
    with tr:
        with tr.phase("forward"):
            y = KeepOnCtx.apply(x)
            z = y + 1.0  # add saves nothing for backward
        assert tr.current_breakdown["activations"] == 3 * 400  # ctx.kept, y and z
        z.sum().backward()
        del y, z  # ctx (and ctx.kept) lives as long as the graph node does
        assert tr.current_breakdown["activations"] == 0


def test_quantization_constants_count_as_weights():
    import bitsandbytes as bnb

    lin = nn.Linear(256, 128, bias=False)
    q = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # quantizes
    qs = q.weight.quant_state
    state = qs.as_dict(packed=False)
    constants = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    offset = qs.offset.numel() * qs.offset.element_size()  # as_dict turns the 0-d offset tensor into a float
    tr = MemoryTracker()
    tr.register_model(q)
    assert tr.current_breakdown["weights"] == 256 * 128 // 2 + constants + offset


# ------------------------------------------------------- against torch's trackers
def test_peak_matches_torch_memtracker_without_frozen_params():
    from torch.distributed._tools.mem_tracker import MemTracker

    ids = torch.randint(0, 300, (2, 32))

    def two_steps(model, opt, between=None):
        for _ in range(2):
            if between is not None:
                between()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            del loss

    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference = MemTracker()
    reference.track_external(model, opt, ids)
    with reference:
        two_steps(model, opt, reference.reset_mod_stats)
    ref_peak = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tr = MemoryTracker()
    tr.register_model(model)
    tr.register_optimizer(opt)
    with tr:
        two_steps(model, opt)
    assert abs(tr.peak_bytes - ref_peak) <= 0.001 * ref_peak, (tr.peak_bytes, ref_peak)
    params = nbytes_of(list(model.parameters()))
    assert tr.peak_breakdown["trainable"] == params
    assert tr.peak_breakdown["optimizer"] == 2 * params + 4 * len(list(model.parameters()))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches_torch_memtracker(reentrant):
    from torch.distributed._tools.mem_tracker import MemTracker

    ids = torch.randint(0, 300, (2, 64))

    def build(checkpointing):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def tracked(checkpointing):
        model, opt = build(checkpointing)
        tr = MemoryTracker()
        tr.register_model(model)
        tr.register_optimizer(opt)
        with tr:
            with tr.phase("forward"):
                loss = model(ids, labels=ids).loss
            kept = tr.current_breakdown["activations"]
            loss.backward()
            opt.step()
        return tr.peak_bytes, kept

    model, opt = build(True)
    reference = MemTracker()
    reference.track_external(model, opt, ids)
    with reference:
        model(ids, labels=ids).loss.backward()
        opt.step()
    ref_peak = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    peak, kept = tracked(True)
    _, kept_without = tracked(False)
    assert abs(peak - ref_peak) <= 0.005 * ref_peak, (peak, ref_peak)
    assert kept < kept_without / 2


def test_fsdp2_fake_process_group_matches_fsdp_memtracker():
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))  # before entering FakeTensorMode
        with FakeTensorMode():
            x = torch.randn(64, 256)

            def build():
                torch.manual_seed(0)
                blocks = [nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)) for _ in range(3)]
                m = nn.Sequential(*blocks)
                for block in m:
                    fully_shard(block, mesh=mesh)
                fully_shard(m, mesh=mesh)
                return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

            def two_steps(m, opt, between=None):
                for _ in range(2):
                    if between is not None:
                        between()
                    m(x).pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()

            m, opt = build()
            reference = FSDPMemTracker(m, opt)
            reference.track_inputs((x,))
            with reference:
                two_steps(m, opt, reference.reset_mod_stats)
            ref_peak = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

            m, opt = build()
            tr = MemoryTracker()
            tr.register_model(m)
            tr.register_optimizer(opt)
            with tr:
                two_steps(m, opt)
    finally:
        dist.destroy_process_group()
    full = 3 * (256 * 512 + 512 + 512 * 256 + 256) * 4
    assert tr.peak_breakdown["trainable"] == full // 2  # one rank's shard of two
    assert abs(tr.peak_bytes - ref_peak) <= 0.001 * ref_peak, (tr.peak_bytes, ref_peak)


# ------------------------------------------------------------ fake and meta tensors
def _llama_layer_step(layer, rope, hidden, seq, tracker, make_input):
    x = make_input(1, seq, hidden)
    pos = torch.arange(seq, device=x.device)[None]
    with tracker:
        with tracker.phase("forward"):
            cos, sin = rope(x, pos)
            out = layer(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            loss = out.float().pow(2).mean()
        with tracker.phase("backward"):
            loss.backward()
    return tracker.summary()


def _lora_layer(cfg, device):
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device(device):
        layer = LlamaDecoderLayer(cfg, layer_idx=0).to(torch.bfloat16)
        rope = LlamaRotaryEmbedding(cfg)
    layer.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=16, target_modules=LORA_TARGETS), layer)
    return layer, rope


def _llama_cfg(hidden, inter, heads, kv_heads):
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=1,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def test_fake_tensors_track_exactly_what_real_tensors_do():
    cfg = _llama_cfg(128, 352, 4, 2)
    seq = 64

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)

    layer, rope = _lora_layer(cfg, "cpu")
    tr = MemoryTracker()
    tr.register_model(layer)
    real = _llama_layer_step(layer, rope, 128, seq, tr, randn)

    layer, rope = _lora_layer(cfg, "meta")
    fake_mode = FakeTensorMode()
    fake_module(layer, fake_mode)
    fake_module(rope, fake_mode)
    with fake_mode:  # FakeTensorMode outside, tracker inside
        tr = MemoryTracker()
        tr.register_model(layer)
        fake = _llama_layer_step(layer, rope, 128, seq, tr, randn)
    assert fake == real
    assert real["peak_breakdown"]["activations"] > 0 and real["current_breakdown"]["grads"] > 0


def test_meta_tensors_track_exactly_what_real_tensors_do():
    def run(device):
        torch.manual_seed(0)
        with torch.device(device):
            model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48))
            x = torch.randn(16, 48)
        tr = MemoryTracker()
        tr.register_model(model)
        with tr:
            with tr.phase("forward"):
                loss = model(x).square().mean()
            loss.backward()
        return tr.summary()

    assert run("meta") == run("cpu")


def test_llama70b_decoder_layer_with_lora_under_fake_tensors():
    """One Llama-3.1-70B decoder layer (hidden 8192, 64 heads, 8 KV heads, intermediate 28672),
    bf16 frozen base + LoRA r=16 on all linears, sequence 2048: forward and backward under
    FakeTensorMode, nothing allocated."""
    h, inter, heads, kv, r, s = 8192, 28672, 64, 8, 16, 2048
    dh, hkv = h // heads, kv * (h // heads)
    start = time.perf_counter()
    layer, rope = _lora_layer(_llama_cfg(h, inter, heads, kv), "meta")
    fake_mode = FakeTensorMode()
    fake_module(layer, fake_mode)
    fake_module(rope, fake_mode)
    with fake_mode:
        tr = MemoryTracker()
        tr.register_model(layer)
        summary = _llama_layer_step(
            layer, rope, h, s, tr, lambda *shape: torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
        )
    elapsed = time.perf_counter() - start
    assert elapsed < 30, elapsed

    base = 2 * (h * h + h * hkv + h * hkv + h * h + 3 * h * inter + 2 * h)  # bf16 q,k,v,o,gate,up,down,norms
    shapes = [(h, h), (h, hkv), (h, hkv), (h, h), (h, inter), (h, inter), (inter, h)]
    lora = 2 * sum(r * (i + o) for i, o in shapes)
    br = summary["peak_breakdown"]
    assert br["weights"] == base == 1_711_308_800
    assert br["trainable"] == lora
    assert summary["current_breakdown"]["grads"] == lora

    # What autograd keeps for backward (bf16 unless noted), one layer with SDPA (flash path):
    rms = 4 * s * h + 2 * s * h + 4 * s  # fp32 upcast input, bf16 normalised output, fp32 rsqrt
    rope_tables = 2 * (2 * s * dh)  # cos, sin
    attention = 2 * s * h + 2 * 2 * s * hkv + 2 * s * h + 4 * s * heads  # q, k, v, output, logsumexp
    mlp = 4 * (2 * s * inter)  # gate out, up out, silu(gate), silu(gate)*up
    lora_mid = 7 * 2 * s * r  # x @ A^T, saved by B
    loss_input = 4 * s * h  # out.float(), saved by pow
    layer_output = 2 * s * h  # alive at the start of backward
    expected = 2 * rms + rope_tables + attention + mlp + lora_mid + loss_input + layer_output
    assert abs(br["activations"] - expected) <= 0.01 * expected, (br["activations"], expected)
    assert summary["peak_bytes"] < 3 * 2**30


class _Dequant:
    """A pure function of its tensor's layout, shaped like torchao's NF4 dequantization:
    intermediates of several sizes, locals released at return, output made in the middle."""

    runs = 0

    def __init__(self, packed: torch.Tensor):
        self.packed = packed

    def expand(self) -> torch.Tensor:
        _Dequant.runs += 1
        hi = (self.packed >> 4).to(torch.long)
        lo = (self.packed & 15).to(torch.long)
        scaled = hi.to(torch.bfloat16) * 2
        out = torch.stack([scaled, lo.to(torch.bfloat16)], dim=-1).reshape(-1)
        del scaled
        extra = out.float().sum()
        return out + extra.to(torch.bfloat16)


def test_replay_trace_finds_the_output_when_a_freed_storage_hands_it_its_address():
    """Storage keys are addresses: a storage freed inside the call can hand its key to the
    output (torchao's dequantization did, on every 70B FSDP2 weight, so no call was replayed).
    The output is the one allocation alive at the end, whatever key it shares."""
    from slimtune.memory.replay import _UNREPLAYABLE, _trace

    with FakeTensorMode():
        out = torch.empty(16)
    key = out.untyped_storage()._cdata
    reused = [("add", key, 8, "temporaries", "cpu"), ("add", 7, 32, "temporaries", "cpu"), ("free", key),
              ("add", key, 64, "temporaries", "cpu"), ("free", 7)]
    assert _trace(reused, out) == [("add", 0, 8, "temporaries", "cpu"), ("add", 1, 32, "temporaries", "cpu"),
                                   ("free", 0), ("out",), ("free", 1)]
    assert _trace(reused[:-1], out) is _UNREPLAYABLE  # a second allocation outlives the call
    assert _trace(reused[:3], out) is _UNREPLAYABLE  # the output's storage was not made by the call
    assert _trace([("add", key, 64, "activations", "cpu")], out) is _UNREPLAYABLE
    assert _trace([("add", key, 64, "temporaries", "cpu"), ("free", 99)], out) is _UNREPLAYABLE


def test_replayed_calls_track_what_the_real_calls_do():
    """``replay_pure_calls``: a pure method run 6 times, in phases, between other allocations,
    with and without a grad-disabled region: the tracker's peak, breakdown, phase peaks, live
    bytes and sequence are those of the real calls, and later calls were answered by replay."""
    from slimtune.memory import replay_pure_calls

    def run(replay: bool):
        FakeTensorMode.cache.clear()
        with FakeTensorMode():
            objs = [_Dequant(torch.empty(4096 + 512 * (i % 2), dtype=torch.uint8)) for i in range(3)]
            w = torch.empty(64, 64, requires_grad=True)
            tracker = MemoryTracker()
            tracker.register(w, "trainable")
            calls = []
            with contextlib.ExitStack() as stack:
                if replay:
                    traces = stack.enter_context(replay_pure_calls(_Dequant, "expand", lambda s: tuple(s.packed.shape)))
                with tracker:
                    keep = []
                    for step in range(2):
                        with tracker.phase("forward"), torch.no_grad():
                            for o in objs:
                                keep.append(o.expand())
                                calls.append(tracker.current_bytes)
                        with tracker.phase("backward"):
                            y = (w * 2).sum()
                            with torch.no_grad():
                                big = objs[1].expand()
                            y.backward()
                            del big
                        keep.clear()
                if replay:
                    assert len(traces) == 2 and all(isinstance(v, tuple) for v in traces.values())
            return tracker.peak_bytes, tracker.peak_breakdown, tracker.phase_peaks, tracker._seq, calls

    _Dequant.runs = 0
    real = run(False)
    assert _Dequant.runs == 8
    _Dequant.runs = 0
    replayed = run(True)
    assert _Dequant.runs == 2  # one real (recorded) call per layout; the other 6 were replayed
    assert replayed == real
    assert real[0] > 0
