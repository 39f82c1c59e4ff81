"""Per-rank bytes of parameters under each ``shard.strategy`` (one table, as ``launch.SHARDERS``).

Each entry answers, for one parameter of the run's inventory: how many of its bytes one rank
keeps on the GPU between steps (``local``), and how many it holds unsharded while its unit
computes (``gathered``). The rules are the engines' own:

* ``none``: every rank holds everything.
* ``fsdp2`` (``launch/fsdp2.py``): ``fully_shard`` splits dim 0 into ``world`` chunks of
  ``ceil(rows / world)`` rows (padded); torchao NF4 weights shard their packed codes and
  scalers when every inner tensor splits evenly, otherwise stay whole on every rank
  (``ignored_params``); decoder layers are units, the rest (embeddings, final norm, lm_head)
  is the root unit, which stays gathered from its forward to the end of backward
  (FSDP2 does not reshard the root after forward). ``cpu_offload`` keeps the shards, their
  gradients and the optimizer step on the CPU.
* ``deepspeed_zero3`` (``launch/zero3.py``): every parameter is flattened and partitioned
  into ``ceil(numel / world)`` elements; bitsandbytes' quantization state (absmax, code) is a
  plain attribute, whole on every rank. ``cpu_offload`` puts partitions and optimizer state on
  the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from slimtune.plan.spec import BYTES, Param, nf4_layout


def param_bytes(p: Param, cfg) -> dict[str, int]:
    """Whole-tensor bytes of a parameter: ``data`` and (4-bit) ``constants``."""
    if p.nf4:
        lay = nf4_layout(p.numel, cfg.quant, p.dtype)
        return {"data": lay["packed"], "constants": lay["constants"]}
    return {"data": p.nbytes, "constants": 0}


@dataclass(frozen=True)
class ShardPlan:
    name: str
    local: Callable[[Param, object, int], dict[str, int]]  # (param, cfg, world) -> {"data", "constants"}
    offloads: Callable[[object, int], tuple[bool, bool]]  # (cfg, world) -> (parameters, optimizer state) on the CPU
    gathers: bool  # parameters are gathered per unit for compute


def _none_local(p: Param, cfg, world: int) -> dict[str, int]:
    return param_bytes(p, cfg)


def _fsdp2_nf4_shards(p: Param, cfg, world: int) -> bool:
    """torchao's split rule (``launch.fsdp2.nf4_splits_evenly``), from shapes: rows, packed
    codes, per-block scalers and per-scaler-block factors must all divide by ``world``."""
    from slimtune.quant.ao import scaler_block_size

    rows = p.shape[0]
    blocks = p.numel // cfg.quant.block_size
    factors = blocks // scaler_block_size(p.numel, cfg.quant.block_size)
    return rows % world == 0 and (p.numel // 2) % world == 0 and blocks % world == 0 and factors % world == 0


def _fsdp2_local(p: Param, cfg, world: int) -> dict[str, int]:
    whole = param_bytes(p, cfg)
    if world == 1:
        return whole
    if p.nf4:
        if not _fsdp2_nf4_shards(p, cfg, world):
            return whole  # kept whole on every rank (launch.fsdp2.unshardable_params)
        e = BYTES[p.dtype]
        replicated = e + 16 * e  # scaler mean and NF4 table stay whole on each shard
        return {"data": whole["data"] // world, "constants": (whole["constants"] - replicated) // world + replicated}
    if p.buffer:
        return whole
    rows = p.shape[0]
    rest = p.numel // rows if rows else 0
    return {"data": math.ceil(rows / world) * rest * BYTES[p.dtype], "constants": 0}


def _zero3_local(p: Param, cfg, world: int) -> dict[str, int]:
    whole = param_bytes(p, cfg)
    if world == 1 or p.buffer or (not p.trainable and zero3_persists(p, cfg, world)):
        return whole
    if p.nf4:
        storage = BYTES[cfg.quant.quant_storage]
        elems = math.ceil(whole["data"] / storage)
        return {"data": math.ceil(elems / world) * storage, "constants": whole["constants"]}
    return {"data": math.ceil(p.numel / world) * BYTES[p.dtype], "constants": 0}


def zero3_config(cfg, world: int) -> dict:
    """The DeepSpeed config the engine would use (``launch.zero3.deepspeed_config``: the JSON
    with its ``auto`` values filled from the run config)."""
    from slimtune.launch.dist import DistInfo
    from slimtune.launch.zero3 import deepspeed_config
    from slimtune.plan.spec import hf_config

    conf, _ = hf_config(cfg.model)
    return deepspeed_config(cfg, DistInfo(world_size=world), conf.hidden_size)


def _zero3_offloads(cfg, world: int) -> tuple[bool, bool]:
    zero = zero3_config(cfg, world)["zero_optimization"]
    on_cpu = lambda key: (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return on_cpu("offload_param"), on_cpu("offload_optimizer")


SHARD_PLANS: dict[str, ShardPlan] = {
    "none": ShardPlan("none", _none_local, lambda cfg, world: (False, False), False),
    "fsdp2": ShardPlan("fsdp2", _fsdp2_local, lambda cfg, world: (cfg.shard.cpu_offload,) * 2, True),
    "deepspeed_zero3": ShardPlan("deepspeed_zero3", _zero3_local, _zero3_offloads, True),
}


def _gather_bytes(p: Param, cfg, world: int) -> int:
    """Bytes of a parameter's unsharded copy while its unit computes: FSDP2 all-gathers
    ``ceil(rows / world) * world`` rows in ``shard.param_dtype`` (4-bit weights: their packed
    codes and constants); ZeRO-3 gathers the whole tensor in its storage dtype."""
    if p.nf4:
        whole = param_bytes(p, cfg)
        return whole["data"] + whole["constants"]
    e = BYTES[p.dtype]
    if cfg.shard.strategy == "fsdp2":
        if cfg.shard.param_dtype and p.dtype in ("float32", "bfloat16", "float16"):
            e = BYTES[cfg.shard.param_dtype]
        rows = p.shape[0]
        return math.ceil(rows / world) * world * (p.numel // rows) * e
    if cfg.shard.strategy == "deepspeed_zero3" and p.trainable and cfg.model.dtype != "float32":
        e = BYTES[cfg.model.dtype]
    return p.numel * e


def unit_bytes(params: list[Param], cfg, world: int) -> dict:
    """Unsharded bytes per FSDP unit: ``root`` (everything outside decoder layers) and each layer."""
    root, layers = 0, {}
    for p in params:
        if p.buffer:
            continue
        n = _gather_bytes(p, cfg, world)
        if p.layer is None:
            root += n
        else:
            layers[p.layer] = layers.get(p.layer, 0) + n
    return {"root": root, "layers": layers}


# --------------------------------------------------------------------------- ZeRO-3 residency
def _no_grad_input(cfg) -> set[str]:
    """Linears whose input needs no gradient: layer 0's q/k/v read the (normalised) embeddings,
    which need none when neither embeddings nor norms train."""
    from slimtune.plan.methods import METHOD_PLANS

    mp = METHOD_PLANS[cfg.method.name]
    if mp.trains_embeddings(cfg) or mp.trains_norms(cfg):
        return set()
    return {f"model.layers.0.self_attn.{n}_proj" for n in "qkv"}


def zero3_residency(params: list[Param], adapted: dict, cfg, world: int, num_layers: int) -> dict[str, int]:
    """Gathered (unpartitioned) parameter bytes one ZeRO-3 rank holds at each moment of a step.

    DeepSpeed's ``PartitionedParameterCoordinator`` (after the first step has recorded the trace
    of module fetches) releases a module's parameters after its forward unless the same parameter
    is fetched again within ``stage3_max_reuse_distance`` elements of later fetches: a
    parameter is fetched again in backward only when its module's output needs a gradient (ZeRO's
    backward hooks sit on module outputs). So a layer's weights stay gathered from forward to
    backward when (a) its module is re-fetched and (b) the elements fetched in between (the later
    layers' forward, the head's forward and backward, the later layers' backward) are below the
    distance; tiny models keep everything, a 70B model releases everything but the head.
    4-bit bases are parameters like the others: bitsandbytes' own ``MatMul4Bit`` would keep a view
    of the gathered weight on its autograd context (so every 4-bit weight stayed gathered from
    forward to backward, 34 GiB per rank for a 70B model), but slimtune routes their forward
    through a function that keeps nothing and reads the weight ZeRO-3 re-fetches for backward
    (``quant.bnb.route_forward``). Bases a method runs inside its own autograd.Function
    (``Role.regathers_base``) are released after forward and gathered again, one at a time, in
    backward, next to a dense copy of that weight (``adapters/partial._dense_weight``).
    Parameters of at most ``stage3_param_persistence_threshold`` elements are never partitioned
    (counted as weights). Prefetching adds up to ``stage3_prefetch_bucket_size`` elements of the
    next module while anything is released.
    Returns bytes for the moments ``forward (last layer)``, ``forward (loss)``, ``backward (loss)``,
    ``backward (last layer)`` and ``backward (first layer)``."""
    from slimtune.plan.methods import compute_dtype

    zero = zero3_config(cfg, world)["zero_optimization"]
    reuse = zero.get("stage3_max_reuse_distance", 1e9)
    bucket = zero.get("stage3_prefetch_bucket_size", 5e7)
    no_grad_in = _no_grad_input(cfg)
    E = BYTES[compute_dtype(cfg)]
    last = num_layers - 1
    rows = []  # (unit, gathered bytes, ds numel, refetched in backward, explicit, dense copy bytes[, kept])
    for p in params:
        if p.buffer or zero3_persists(p, cfg, world):
            continue
        module = p.name.rsplit(".", 1)[0]
        role = adapted.get(module)
        if p.nf4:
            nbytes = param_bytes(p, cfg)["data"]  # the constants stay whole on every rank (weights)
            numel = math.ceil(nbytes / BYTES[cfg.quant.quant_storage])
        else:
            nbytes, numel = _gather_bytes(p, cfg, world), p.numel
        unit = p.layer if p.layer is not None else ("embed" if "embed_tokens" in p.name else "head")
        grad_in = module not in no_grad_in and unit != "embed"
        explicit = not p.trainable and role is not None and role.regathers_base
        refetched = p.trainable or (grad_in and not explicit)
        copy = E * p.numel if explicit and not p.nf4 else 0  # dequantized 4-bit: in the layer's working set
        rows.append((unit, nbytes, numel, refetched, explicit, copy))
    fwd = {}  # elements fetched per unit in forward (all) and in backward (re-fetched ones)
    bwd = {}
    for unit, _, numel, refetched, *_ in rows:
        fwd[unit] = fwd.get(unit, 0) + numel
        bwd[unit] = bwd.get(unit, 0) + (numel if refetched else 0)

    def distance(unit) -> float:
        if unit == "head":
            return 0
        later = [j for j in range(num_layers) if unit == "embed" or j > unit]
        return (sum(fwd.get(j, 0) + bwd.get(j, 0) for j in later) + fwd.get("head", 0) + bwd.get("head", 0))

    kept = {}  # unit -> bytes still gathered after its forward
    for i, (unit, nbytes, _, refetched, *_) in enumerate(rows):
        if refetched and distance(unit) < reuse:
            kept[unit] = kept.get(unit, 0) + nbytes
            rows[i] = rows[i] + (True,)
        else:
            rows[i] = rows[i] + (False,)

    def one_at_a_time(unit, refetched_only: bool = False) -> int:
        """The largest weight of ``unit`` gathered for its compute and released after it."""
        return max((r[1] for r in rows if r[0] == unit and not r[6] and (r[3] or not refetched_only)
                    and not r[4]), default=0)

    def regather(unit) -> int:  # the largest base gathered again in backward, with its dense copy
        return max((r[1] + r[5] for r in rows if r[0] == unit and r[4]), default=0)

    released = any(not r[6] for r in rows)
    e_pref = BYTES[cfg.quant.quant_storage] if cfg.quant.name != "none" else BYTES[cfg.model.dtype]
    prefetch = int(min(bucket, max(fwd.values(), default=0)) * e_pref) if released else 0
    k = sum(kept.values()) - kept.get("head", 0)  # kept outside the head
    head = sum(r[1] for r in rows if r[0] == "head")
    return {
        # the last layer computing: the kept weights, one released weight at a time, the prefetch
        "forward (last layer)": k + one_at_a_time(last) + prefetch,
        "forward (loss)": k + head,
        "backward (loss)": k + head + prefetch,
        # the head is released after its backward; the last layer's re-fetched weights come back
        # one module at a time (a base of Role.regathers_base with its dense copy)
        "backward (last layer)": k + max(one_at_a_time(last, True), regather(last)) + prefetch,
        # every later layer is released again; layer 0's kept weights are still there
        "backward (first layer)": (kept.get("embed", 0) + kept.get(0, 0) + max(one_at_a_time(0, True), regather(0))),
    }


def zero3_persists(p: Param, cfg, world: int) -> bool:
    """ZeRO-3 keeps parameters of at most ``stage3_param_persistence_threshold`` elements whole
    on every rank (never partitioned, never gathered)."""
    if cfg.shard.strategy != "deepspeed_zero3" or world == 1 or p.buffer or p.nf4:
        return False
    key = (id(cfg), world)
    if key not in _PERSIST:
        _PERSIST.clear()
        _PERSIST[key] = (cfg, zero3_config(cfg, world)["zero_optimization"].get("stage3_param_persistence_threshold", 1e5))
    return p.numel <= _PERSIST[key][1]


_PERSIST: dict = {}  # (id(cfg), world) -> (cfg kept alive so the id stays its own, threshold)
