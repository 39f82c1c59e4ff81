"""The analytic estimate: one rank's memory peak from the config and the architecture's shapes.

No torch model is built. The static part (frozen weights, trainable parameters, gradients,
optimizer state) comes from the parameter inventory (``plan.spec``), the sharding table
(``plan.sharding``) and the optimizer table's own ``state_bytes``; activations come from the
op-by-op ledger of ``plan.activations``. The peak is the largest of the moments a step goes
through (loss forward, loss backward, the last layer's backward, the optimizer step), each
composed of what is alive then; the report shows the composition of the largest one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from slimtune.plan import activations as act
from slimtune.plan.methods import METHOD_PLANS, compute_dtype, factor_dtype
from slimtune.plan.sharding import SHARD_PLANS, param_bytes
from slimtune.plan.spec import BYTES, Inventory, ModelSpec, inventory, model_spec

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Assumptions:
    """What the planner cannot see and assumes (stated in every report).

    ``cuda_context``: the CUDA context, cuBLAS/cuDNN handles and kernel images loaded by one
    process (PyTorch on Ampere/Hopper with lazy module loading measures roughly 0.4-0.6 GiB;
    0.5 GiB is assumed). ``comm_buffers``: NCCL's per-process buffers when ranks talk
    (a few channels x 4 MiB per peer; 0.25 GiB assumed when world > 1). ``fragmentation``:
    the caching allocator reserves more than it hands out (block rounding, fragmentation);
    the planner adds this fraction of the allocated peak (10% assumed; compare
    ``torch.cuda.max_memory_reserved`` with ``max_memory_allocated`` on your own runs).
    """

    cuda_context: int = GiB // 2
    comm_buffers: int = GiB // 4
    fragmentation: float = 0.10


@dataclass
class Item:
    key: str  # machine name
    label: str  # what the table prints
    bytes: int
    category: str  # weights | trainable | grads | optimizer | activations | temporaries | overhead


@dataclass
class Estimate:
    items: list[Item]  # composition of one rank's GPU memory at the peak moment
    moment: str  # which moment of the step is the peak
    moments: dict[str, int]  # allocated bytes at each moment considered
    allocated_peak: int
    per_rank_peak: int  # allocated peak + overheads
    activations_no_ckpt: int
    activations_ckpt: int
    host: dict[str, int]  # host RAM per rank (offload) and for loading
    notes: list[str] = field(default_factory=list)
    world: int = 1

    def by_category(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in self.items:
            out[it.category] = out.get(it.category, 0) + it.bytes
        return out

    def largest(self) -> Item:
        return max(self.items, key=lambda it: it.bytes)


# --------------------------------------------------------------------------- static part
def _static(inv: Inventory, cfg, world: int, device: str) -> dict:
    shard = SHARD_PLANS[cfg.shard.strategy]
    offload, opt_offload = shard.offloads(cfg, world)  # parameters / optimizer state on the CPU
    weights: dict[str, int] = {}
    trainable = 0
    trainable_whole = 0
    shapes_local: list[tuple[str, tuple[int, ...]]] = []
    grad_units: dict = {}  # local gradient bytes by where backward produces them: "head", layer i, "embed"
    tdtype = None
    zero3 = cfg.shard.strategy == "deepspeed_zero3"
    train_dtype = factor_dtype(cfg) if zero3 else None
    host = 0
    for p in inv.params:
        loc = shard.local(p, cfg, world)
        nbytes = loc["data"] + loc["constants"]
        if p.trainable:
            e_whole = BYTES[p.dtype]
            if zero3:  # DeepSpeed casts the module to bf16/fp16; fp32 masters live in the optimizer
                e_loc = BYTES[train_dtype]
                nbytes = math.ceil(p.numel / world) * e_loc
            trainable += 0 if offload else nbytes
            host += nbytes if offload else 0
            trainable_whole += p.numel * e_whole
            tdtype = p.dtype
            shapes_local.append((p.name, _local_shape(p, cfg, world)))
            where = "embed" if "embed_tokens" in p.name else ("head" if p.layer is None else p.layer)
            grad_units[where] = grad_units.get(where, 0) + math.prod(shapes_local[-1][1]) * BYTES[p.dtype]
            continue
        if p.nf4:
            label_p = f"4-bit packed ({cfg.quant.backend})"
            label_c = "4-bit constants (absmax, code)"
            consts = loc["constants"]
            if offload:
                host += loc["data"]
                if zero3:  # the quantization state stays on the GPU, whole
                    weights[label_c] = weights.get(label_c, 0) + consts
                else:
                    host += consts
                continue
            weights[label_p] = weights.get(label_p, 0) + loc["data"]
            weights[label_c] = weights.get(label_c, 0) + consts
            continue
        label = "buffers" if p.buffer else f"frozen {p.dtype}"
        if offload and not p.buffer:
            host += nbytes
            continue
        weights[label] = weights.get(label, 0) + nbytes
    from slimtune.optim import OPTIMIZERS

    ocfg = cfg.optim
    if zero3 and shapes_local:
        # one flat fp32 master partition per param group, a copy of the module's partition: made in
        # 16 bit, and in fp32 too (DeepSpeed 0.19 compares the tensor's device with a device *name*
        # to decide whether it may share it, which never matches, so it always copies)
        flat = sum(math.prod(s) for _, s in shapes_local)
        masters = 4 * flat
        opt = OPTIMIZERS[ocfg.name].state_bytes([("flat", (flat,))], ocfg, 4) - 4 + masters
        # gradients land in the flat buffer of this rank's gradient partitions through the reduce
        # bucket (both in the module dtype, allocated when the engine is built, alive throughout)
        grads = 0
        grads_static = flat * BYTES[train_dtype] + _zero3_grad_bucket(cfg, world, flat)
    else:
        opt = OPTIMIZERS[ocfg.name].state_bytes(shapes_local, ocfg, BYTES[tdtype or "float32"]) if shapes_local else 0
        grads = sum(math.prod(s) for _, s in shapes_local) * BYTES[tdtype or "float32"]
        grads_static = 0
    if opt_offload:
        host += opt + grads + grads_static
        opt_gpu, grads_gpu, grads_static = 0, 0, 0
    else:
        opt_gpu, grads_gpu = opt, grads
    largest_param = max((math.prod(s) * BYTES[tdtype or "float32"] for _, s in shapes_local), default=0)
    if opt_offload or zero3:
        grad_units = {}  # gradients leave the GPU (offload) or land in ZeRO's flat partitions
    # gradients held between the micro-batches of an accumulation step: FSDP2 skips the
    # reduce-scatter (set_requires_gradient_sync(False)) and keeps each parameter's unsharded
    # gradient, in reduce_dtype when mixed precision differs from it; others keep their grads
    acc = grads_gpu
    if cfg.shard.strategy == "fsdp2" and world > 1:
        numel = sum(p.numel for p in inv.params if p.trainable)
        e = BYTES[cfg.shard.reduce_dtype] if cfg.shard.param_dtype else BYTES[tdtype or "float32"]
        acc = numel * e
    return {"weights": weights, "trainable": trainable, "grads": grads_gpu, "optimizer": opt_gpu, "grad_units": grad_units,
            "grads_static": grads_static,
            "grads_accumulated": acc,
            "grads_whole": trainable_whole, "host": host, "largest_param": largest_param, "opt_offload": opt_offload,
            "shapes_local": shapes_local, "trainable_dtype": tdtype or "float32"}


def _zero3_grad_bucket(cfg, world: int, flat: int) -> int:
    """ZeRO-3 reduces gradients through one contiguous bucket of ``reduce_bucket_size`` elements
    (``auto``: hidden^2), in the module dtype, allocated whole when the engine is built."""
    ds = _ds_config(cfg, world)
    return int(ds["zero_optimization"].get("reduce_bucket_size", 5e8)) * BYTES[factor_dtype(cfg)]


def _ds_config(cfg, world: int) -> dict:
    from slimtune.plan.sharding import zero3_config

    return zero3_config(cfg, world)


def _local_shape(p, cfg, world: int) -> tuple[int, ...]:
    if world == 1 or cfg.shard.strategy == "none":
        return p.shape
    if cfg.shard.strategy == "fsdp2":
        return (math.ceil(p.shape[0] / world), *p.shape[1:])
    return (math.ceil(p.numel / world),)


# --------------------------------------------------------------------------- activations
def _activation_parts(spec: ModelSpec, inv: Inventory, cfg, sh: act.Shape, fused_loss: bool) -> dict:
    mp = METHOD_PLANS[cfg.method.name]
    norms_train = mp.trains_norms(cfg)
    emb_train = mp.trains_embeddings(cfg)
    xg = emb_train
    per_layer: list[int] = []
    last = None
    for i in range(spec.num_layers):
        led = act.Ledger()
        xg = act.decoder_layer(led, sh, spec, i, inv.adapted, xg, norms_train)
        per_layer.append(led.total)
        last = led
    final = act.Ledger()
    act.norm(final, sh, spec.hidden, xg, norms_train, "final_norm")
    head_role = inv.adapted.get("lm_head")
    head_keeps = bool(head_role and head_role.saves_input) and not spec.tie_embeddings
    if head_keeps:
        final.add("lm_head.input", sh.E * sh.T * spec.hidden)
    embed_ids = 8 * sh.T if emb_train else 0  # the embedding keeps the token ids for its gradient
    down = sum(v for k, v in last.saved.items() if ".down_proj." in k) if last else 0
    return {
        "layers": per_layer,
        "rotary": act.rotary_bytes(spec, sh),
        "final": final.total,
        "loss": act.loss_saved(spec, sh, fused_loss, head_keeps),
        "embed_ids": embed_ids,
        "last_down": down,
    }


def _mlp_backward_work(spec: ModelSpec, inv: Inventory, cfg, sh: act.Shape, i: int) -> int:
    """Working bytes of layer ``i``'s MLP backward beyond its saved activations, at its worst
    moment: the incoming gradient of the layer output (T x hidden) plus either down_proj's
    backward (its (T x inter) input gradient, a second one from a LoRA path before autograd
    adds them, and for a 4-bit base the dequantized weight ``dY @ W`` needs) or the
    ``silu(gate) * up`` backward (the product's gradient and the two gradients it yields)."""
    d = spec.layers[i]
    T, E = sh.T, sh.E
    dy = E * T * spec.hidden
    inter = E * T * d.inter
    role = inv.adapted.get(f"model.layers.{i}.mlp.down_proj")
    partials = 2 if (role is not None and role.lora_r) else 1
    deq = dequant_bytes(cfg, spec.hidden * d.inter, E)
    return dy + max(partials * inter + deq, 3 * inter)


def _mlp_weight_grads(inv: Inventory, cfg, world: int, i: int) -> int:
    """Weight gradients of layer ``i``'s MLP alive during its backward (before the next layers'):
    each ``param.grad`` in its own dtype; under FSDP2 unsharded (whole, in the all-gather
    dtype) until the unit's reduce-scatter -- also with CPU offload: the unsharded parameters
    are on the GPU, so autograd produces their gradients there, and only the reduce-scattered
    shard goes to the host. Not with per-layer steps (a step frees each one), nor under ZeRO-3
    (its hooks move each into the reduce bucket as it is produced, counted there)."""
    if cfg.optim.per_layer or cfg.shard.strategy == "deepspeed_zero3":
        return 0
    out = 0
    for p in inv.params:
        if p.trainable and p.layer == i and ".mlp." in p.name:
            e = BYTES[p.dtype]
            if cfg.shard.strategy == "fsdp2" and world > 1 and cfg.shard.param_dtype:
                e = BYTES[cfg.shard.param_dtype]
            out += p.numel * e
    return out


def _fsdp2_reduce(inv: Inventory, cfg) -> tuple[dict, dict, int]:
    """FSDP2's gradients per unit (``"root"`` and each layer index): the unsharded gradients
    autograd produces (in the all-gather dtype) and the reduce-scatter input ``foreach_reduce``
    copies them into (in ``reduce_dtype``), and the root's unsharded gradients made at the head
    (lm_head, final norm), held from the loss's backward until the root's own reduce-scatter at
    the very end (the embedding's comes last)."""
    grads: dict = {}
    inputs: dict = {}
    held = 0
    red = BYTES[cfg.shard.reduce_dtype]
    for p in inv.params:
        if not p.trainable:
            continue
        e = BYTES[cfg.shard.param_dtype or p.dtype]
        unit = "root" if p.layer is None else p.layer
        grads[unit] = grads.get(unit, 0) + p.numel * e
        inputs[unit] = inputs.get(unit, 0) + p.numel * red
        if p.layer is None and "embed_tokens" not in p.name:
            held += p.numel * e
    return grads, inputs, held


def _fsdp2_reduce_moments(inv: Inventory, cfg, world: int, spec: ModelSpec, sh: act.Shape, parts: dict, A: int,
                          G_acc: int, ckpt: bool, grad_units: dict) -> dict[str, dict[str, int]]:
    """The moments around FSDP2's reduce-scatters (less the static part and the batch). A layer's
    ``post_backward`` reshards it, then copies its unsharded gradients into a reduce-scatter input
    that FSDP2 keeps until the next unit's ``post_backward``; its ``pre_backward`` gathers it (the
    copy-out from the flat all-gather buffer) and prefetches the previous layer (a new flat
    buffer). So at the end of a layer's backward it holds its parameters and gradients unsharded,
    the previous layer's flat all-gather buffer and the next layer's reduce-scatter input; at a
    reduce-scatter the unit's own input is new (the previous one is let go first). The head's gradients are held unsharded
    until the end; later layers' gradients are sharded. Three moments: the last layer's
    reduce-scatter (most activations left), the end of the second layer's backward (every later
    layer's gradient sharded, the first prefetched) and the root's reduce-scatter at the end of
    backward (its unsharded gradients, the embedding's included)."""
    from slimtune.plan.sharding import unit_bytes

    grads, inputs, held = _fsdp2_reduce(inv, cfg)
    ub = unit_bytes(inv.params, cfg, world)
    root, layers = ub["root"], ub["layers"]
    last = spec.num_layers - 1
    # each unit's sharded gradients on this rank (``_static``'s grad_units: none on the GPU with
    # offload; the root's split into "head" and "embed")
    local: dict = {}
    for k, v in grad_units.items():
        unit = "root" if k in ("head", "embed") else k
        local[unit] = local.get(unit, 0) + v
    dy = sh.E * sh.T * spec.hidden
    kept = _ckpt_layer_bytes(spec, sh) if ckpt else None  # what one layer keeps for backward
    a_last = A - parts["loss"] - parts["final"] - (kept if ckpt else parts["layers"][last])
    second = min(1, last)
    a_second = parts["rotary"] + parts["embed_ids"] + (0 if second == 0 else kept if ckpt else parts["layers"][0])
    later = sum(v for k, v in local.items() if k != "root" and k > second)
    return {
        "backward (last layer reduce-scatter)": {
            "grads": G_acc or held, "activations": a_last, "dy": dy, "reduce": grads.get(last, 0) + inputs.get(last, 0),
            "gathered": root + layers.get(last - 1, 0)},
        "backward (second layer)": {
            "grads": G_acc or later + held, "activations": a_second, "dy": dy,
            "reduce": grads.get(second, 0) + inputs.get(second + 1, 0),
            "gathered": root + layers.get(second, 0) + layers.get(second - 1, 0)},
        "backward (root reduce-scatter)": {
            "grads": G_acc or sum(v for k, v in local.items() if k != "root"), "activations": 0, "dy": 0,
            "reduce": grads.get("root", 0) + inputs.get("root", 0), "gathered": 0},
    }


def dequant_bytes(cfg, n: int, E: int) -> int:
    """Transient bytes of dequantizing one 4-bit weight of ``n`` elements for a matmul.

    bitsandbytes (``dequantize_4bit``; its CUDA ``gemm_4bit`` falls back to the same for training
    batches): the dense weight in the compute dtype and the fp32 absmax of double quantization.
    torchao (``NF4Tensor.get_original_weight``, plain torch ops): both nibble halves as int64
    indices (8 bytes per weight, kept to the end), the looked-up and scaled halves and their
    interleaved result in the compute dtype (3 x E bytes per weight)."""
    if cfg.quant.name == "none":
        return 0
    if cfg.quant.backend == "torchao":
        return (8 + 3 * E) * n
    return E * n + 4 * math.ceil(n / cfg.quant.block_size)


def _ckpt_layer_bytes(spec: ModelSpec, sh: act.Shape) -> int:
    """What non-reentrant checkpointing keeps per layer between forward and backward: the
    layer's input hidden states (position embeddings are shared, counted once)."""
    return sh.E * sh.T * spec.hidden


# --------------------------------------------------------------------------- estimate
def estimate(cfg, world: int = 1, device: str = "cuda", assumptions: Assumptions = Assumptions(),
             spec: ModelSpec | None = None) -> Estimate:
    """One rank's memory for ``cfg`` on ``world`` ranks. ``device``: "cuda" (adds the CUDA context,
    communication buffers and allocator overhead, CUDA kernel choices) or "cpu" (what the memory
    tracker measures on a CPU run: allocated bytes only)."""
    spec = spec or model_spec(cfg)
    inv = inventory(spec, cfg)
    notes: list[str] = []
    st = _static(inv, cfg, world, device)
    E = BYTES[compute_dtype(cfg)]
    sh = act.Shape(b=cfg.train.micro_batch_size, s=cfg.data.max_seq_len, E=E, masked=cfg.data.packing,
                   eager=cfg.model.attn_implementation == "eager")
    fused = cfg.kernels.enabled and cfg.kernels.fused_loss
    from slimtune.kernels.ce import chunk_tokens_for

    chunk = cfg.kernels.loss_chunk_tokens or chunk_tokens_for(sh.T, spec.vocab, spec.hidden)
    parts = _activation_parts(spec, inv, cfg, sh, fused)
    ckpt = cfg.train.activation_checkpointing
    shared = parts["rotary"] + parts["final"] + parts["loss"] + parts["embed_ids"]
    a_full = sum(parts["layers"]) + shared
    a_ckpt = spec.num_layers * _ckpt_layer_bytes(spec, sh) + shared
    A = a_ckpt if ckpt else a_full
    loss_fwd, loss_bwd = act.loss_transients(spec, sh, fused, chunk, liger=fused and device == "cuda")
    batch = 3 * 8 * sh.T * cfg.train.grad_accum - parts["embed_ids"]  # ids, labels, mask of every micro-batch
    weights = sum(st["weights"].values())
    S = weights + st["trainable"] + st["optimizer"] + st["grads_static"]
    per_layer_opt = cfg.optim.per_layer
    G = st["grads"]
    G_acc = st["grads_accumulated"] if cfg.train.grad_accum > 1 else 0
    G_step = G if not per_layer_opt else min(G, st["largest_param"])
    last = spec.num_layers - 1
    mlp_work = _mlp_backward_work(spec, inv, cfg, sh, last)
    mlp_grads = 0 if G_acc else _mlp_weight_grads(inv, cfg, world, last)  # accumulated grads include them
    # at the last layer's MLP backward the loss, the final norm and down_proj's saved inputs are gone;
    # with checkpointing the layer's own activations are back (recomputed) next to the kept inputs
    a_layer = A - parts["loss"] - parts["final"] - (0 if ckpt else parts["last_down"])
    recompute = parts["layers"][last] - parts["last_down"] if ckpt else 0
    gathered = _gathered(inv, cfg, world, spec, E)
    opt_temp = _optimizer_temp(cfg, st, device, spec)
    # the first layer's backward: every later layer's (and the head's) gradient exists, only layer
    # 0's activations (or checkpointed input, recomputed) remain
    gu = st["grad_units"]
    g_before_first = G_acc or (0 if per_layer_opt else sum(v for k, v in gu.items() if k not in (0, "embed")))
    a_first = (parts["layers"][0] if not ckpt else _ckpt_layer_bytes(spec, sh)) + parts["rotary"] + parts["embed_ids"]
    first = (g_before_first + a_first + (parts["layers"][0] if ckpt else 0) + _mlp_backward_work(spec, inv, cfg, sh, 0)
             + batch + gathered["backward (first layer)"])
    # per-layer steps run inside backward: a weight's step (and GaLore's SVD) happens right after
    # autograd produced its gradient, next to the layer's activations, the incoming gradient and
    # the (T x inter) input gradient computed with it
    step_in_bwd = 0
    if per_layer_opt:
        step_in_bwd = (S + G_acc + a_layer + recompute + E * sh.T * (spec.hidden + spec.layers[last].inter) + G_step
                       + opt_temp["bytes"] + batch + gathered["backward (last layer)"])
    # the last layer's forward: every layer's activations but the loss's, and a 4-bit weight being
    # dequantized (the largest of the layer)
    d_last = spec.layers[last]
    deq_fwd = dequant_bytes(cfg, spec.hidden * max(d_last.inter, d_last.n_q * spec.head_dim), E)
    moments = {
        "forward (last layer)": S + G_acc + A - parts["loss"] - parts["final"] + deq_fwd + batch + gathered["forward (last layer)"],
        "forward (loss)": S + G_acc + A + loss_fwd + batch + gathered["forward (loss)"],
        "backward (loss)": S + G_acc + A + loss_bwd + batch + gathered["backward (loss)"],
        "backward (last layer)": (S + G_acc + mlp_grads + a_layer + recompute + mlp_work + batch
                                  + gathered["backward (last layer)"]),
        "backward (first layer)": S + first,
        "optimizer step": S + G_step + opt_temp["bytes"] + batch,
    }
    if per_layer_opt:
        moments["backward (per-layer step)"] = step_in_bwd
    rs_parts = _fsdp2_reduce_moments(inv, cfg, world, spec, sh, parts, A, G_acc, ckpt, gu) \
        if cfg.shard.strategy == "fsdp2" and not per_layer_opt else {}
    for name, part in rs_parts.items():
        moments[name] = S + sum(part.values()) + batch
    moment = max(moments, key=moments.get)
    allocated = moments[moment]
    # ----- the composition of the peak moment
    items: list[Item] = []
    for label, n in st["weights"].items():
        items.append(Item("weights." + label, label, n, "weights"))
    items.append(Item("trainable", "trainable parameters", st["trainable"], "trainable"))
    items.append(Item("optimizer", f"optimizer state ({cfg.optim.name})", st["optimizer"], "optimizer"))
    items.append(Item("grad_partitions", "gradient partitions and reduce bucket (ZeRO-3)", st["grads_static"], "grads"))
    act_label = "activations (checkpointed layer inputs)" if ckpt else "activations (saved for backward)"
    if moment in rs_parts:
        part = rs_parts[moment]
        items += [Item("grads", "gradients", part["grads"], "grads"),
                  Item("activations", act_label, part["activations"], "activations"),
                  Item("dy", "gradient of the layer input", part["dy"], "temporaries"),
                  Item("reduce", "unsharded gradients and reduce-scatter inputs (fsdp2)", part["reduce"],
                       "temporaries"),
                  Item("gathered", "gathered parameters (fsdp2)", part["gathered"], "temporaries")]
    else:
        grads_now = {"optimizer step": G_step, "backward (first layer)": g_before_first, "backward (last layer)": G_acc + mlp_grads,
                     "backward (per-layer step)": G_acc + G_step}.get(moment, G_acc)
        items.append(Item("grads", "gradients", grads_now, "grads"))
        if moment != "optimizer step":
            a_now = {"backward (last layer)": a_layer, "backward (first layer)": a_first, "backward (per-layer step)": a_layer,
                     "forward (last layer)": A - parts["loss"] - parts["final"]}.get(moment, A)
            items.append(Item("activations", act_label, a_now, "activations"))
            if moment == "forward (loss)":
                items.append(Item("logits", "logits and loss (forward)", loss_fwd, "temporaries"))
            elif moment == "forward (last layer)":
                items.append(Item("dequant", "dequantized 4-bit weight (largest)", deq_fwd, "temporaries"))
            elif moment == "backward (loss)":
                items.append(Item("logits", "logits and loss (backward)", loss_bwd, "temporaries"))
            elif moment in ("backward (last layer)", "backward (per-layer step)"):
                if recompute:
                    items.append(Item("recompute", "recomputed layer (checkpointing)", recompute, "temporaries"))
                if moment == "backward (last layer)":
                    items.append(Item("layer_work", "layer backward working set", mlp_work, "temporaries"))
                else:
                    items.append(Item("layer_work", "layer backward working set",
                                      E * sh.T * (spec.hidden + spec.layers[last].inter), "temporaries"))
                    items.append(Item("opt_temp", opt_temp["label"] + " (per-layer step in backward)", opt_temp["bytes"],
                                      "temporaries"))
            else:
                if ckpt:
                    items.append(Item("recompute", "recomputed layer (checkpointing)", parts["layers"][0], "temporaries"))
                items.append(Item("layer_work", "layer backward working set", _mlp_backward_work(spec, inv, cfg, sh, 0),
                                  "temporaries"))
            g = gathered.get(moment, gathered["backward (last layer)"])
            if g:
                items.append(Item("gathered", f"gathered parameters ({cfg.shard.strategy})", g, "temporaries"))
        elif opt_temp["bytes"]:
            items.append(Item("opt_temp", opt_temp["label"], opt_temp["bytes"], "temporaries"))
    items.append(Item("batch", "token ids, labels, mask", batch, "temporaries"))
    items = [it for it in items if it.bytes]
    overhead = 0
    if device == "cuda":
        frag = int(allocated * assumptions.fragmentation)
        items.append(Item("context", "CUDA context (assumed)", assumptions.cuda_context, "overhead"))
        items.append(Item("allocator", f"allocator overhead ({assumptions.fragmentation:.0%} assumed)", frag, "overhead"))
        overhead = assumptions.cuda_context + frag
        if world > 1:
            items.append(Item("comm", "NCCL buffers (assumed)", assumptions.comm_buffers, "overhead"))
            overhead += assumptions.comm_buffers
    host = {"offload": st["host"], "loading": _loading_host_bytes(inv, cfg, world)}
    return Estimate(items=items, moment=moment, moments=moments, allocated_peak=allocated,
                    per_rank_peak=allocated + overhead, activations_no_ckpt=a_full, activations_ckpt=a_ckpt,
                    host=host, notes=notes, world=world)


def _gathered(inv: Inventory, cfg, world: int, spec: ModelSpec, E: int) -> dict[str, int]:
    """Unsharded parameter bytes held at each moment of the step (sharding engines only)."""
    moments = ("forward (last layer)", "forward (loss)", "backward (loss)", "backward (last layer)",
               "backward (first layer)")
    if cfg.shard.strategy == "none":
        return dict.fromkeys(moments, 0)
    from slimtune.plan.sharding import unit_bytes, zero3_residency

    if cfg.shard.strategy == "deepspeed_zero3":
        return zero3_residency(inv.params, inv.adapted, cfg, world, spec.num_layers)
    u = unit_bytes(inv.params, cfg, world)
    last = u["layers"].get(spec.num_layers - 1, 0)
    prev = u["layers"].get(spec.num_layers - 2, 0)
    # FSDP2: the root unit and the last layer stay gathered from their forward into backward; the
    # last layer's backward runs while the previous layer's all-gather (prefetch) lands
    # (at the first layer's backward every later layer is resharded again: the root and layer 0)
    fwd, bwd = u["root"] + last, u["root"] + last + prev
    out = {m: (fwd if m.startswith("forward") or m == "backward (loss)" else bwd) for m in moments}
    out["backward (first layer)"] = u["root"] + u["layers"].get(0, 0)
    return out


def _optimizer_temp(cfg, st: dict, device: str, spec: ModelSpec) -> dict:
    """Transient bytes inside ``optimizer.step()`` on the GPU: none when the optimizer state is
    offloaded (the step runs on the host, next to it)."""
    name = cfg.optim.name
    if st["opt_offload"]:
        return {"bytes": 0, "label": ""}
    if cfg.shard.strategy == "deepspeed_zero3" and st["shapes_local"]:
        # ZeRO-3 steps one flat fp32 partition per group: the gradient partitions are flattened
        # and converted to fp32 first (``_prepare_fp32_grad_for_sub_group``), then torch's AdamW
        # computes the denominator over the flat tensor: ``exp_avg_sq.sqrt() / c`` (two
        # transient flat tensors) on CPU, one ``_foreach_sqrt`` buffer on CUDA
        flat4 = 4 * sum(math.prod(s) for _, s in st["shapes_local"])
        adam = (1 if device == "cuda" else 2) * flat4 if name == "adamw" else 0
        return {"bytes": flat4 + adam, "label": "ZeRO-3 fp32 gradient partition and AdamW step buffers"}
    if name.startswith("galore"):
        from slimtune.optim import is_galore_target

        worst = 0
        for pname, shape in st["shapes_local"]:
            if len(shape) == 2 and is_galore_target(pname, shape, cfg.optim.galore):
                m, n = shape
                k = min(m, n)
                svd = 4 * (m * k + k + k * n) + (4 * m * n if st["trainable_dtype"] != "float32" else 0)
                back = 2 * BYTES[st["trainable_dtype"]] * m * n  # projected-back update and its scaled copy
                worst = max(worst, svd + back)
        return {"bytes": worst, "label": "GaLore SVD workspace and update"}
    if name == "adamw":
        if device == "cuda" and not cfg.optim.per_layer:
            # torch picks the foreach implementation on CUDA: one sqrt(exp_avg_sq) list for all params
            return {"bytes": st["trainable"], "label": "AdamW foreach buffers"}
        return {"bytes": st["largest_param"], "label": "AdamW step buffer"}
    return {"bytes": 0, "label": ""}


def _loading_host_bytes(inv: Inventory, cfg, world: int) -> int:
    """Host RAM per rank while loading: ``models.load_model`` reads the whole, unpruned model in
    ``model.dtype`` on every rank before pruning and quantizing; ``shard.low_memory_load`` reads
    one decoder layer at a time next to the rank's shards."""
    from slimtune.plan.spec import model_spec

    whole_cfg = cfg.model_copy(update={"pruning": cfg.pruning.model_copy(update={"strategy": "none"}),
                                       "quant": cfg.quant.model_copy(update={"name": "none"})})
    whole = inventory(model_spec(whole_cfg), whole_cfg)
    base = [p for p in whole.params if not p.buffer and not p.trainable or p.name.endswith(".weight")]
    dense = sum(p.numel * BYTES[cfg.model.dtype] for p in whole.params if not p.buffer and ".lora_" not in p.name
                and not p.name.endswith((".delta", ".idx")))
    if cfg.shard.low_memory_load:
        per_layer = max((sum(p.numel * BYTES[cfg.model.dtype] for p in base if p.layer == i)
                         for i in {p.layer for p in base if p.layer is not None}), default=0)
        return per_layer + sum(param_bytes(p, cfg)["data"] for p in inv.params) // world
    return dense
