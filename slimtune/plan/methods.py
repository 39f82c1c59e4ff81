"""The planner's method table: for each ``method.name``, the trainable parameters it adds (or
unfreezes) and what each linear it touches keeps for backward.

One entry per method, the same names as ``slimtune.adapters.METHODS``; nothing else in the
planner branches on method names. What each role saves is read from the method's code:

* ``lora`` (``adapters/lora.py``): ``F.linear(F.linear(h, A.to(dt)), B.to(dt))`` keeps the input
  h (for A's gradient), the (tokens x r) middle product (for B's), the cast copy of B, and the
  cast copy of A when h needs a gradient (casts exist only when the factors' fp32 differs from
  the compute dtype).
* ``paca`` / ``s2ft`` input columns (``adapters/partial.py``): a gathered (tokens x k) copy
  ``x[..., idx]``; output rows: the full input x.
* ``full``: every linear keeps its input (for the weight gradient); norms keep their
  normalised input; the embedding keeps the token ids.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

from slimtune.plan.spec import Linear, Param, _matches


@dataclass(frozen=True)
class Role:
    """What one linear keeps for backward, beyond what the frozen base keeps (nothing)."""

    trainable: bool = False  # its output needs a gradient even when its input does not
    saves_input: bool = False  # keeps the whole input (weight / LoRA-A / row-delta gradient)
    gathered: int = 0  # keeps a gathered copy of this many input columns
    lora_r: int = 0  # keeps a (tokens x r) middle product
    cast_a: int = 0  # elements of a compute-dtype copy of A (kept when the input needs a gradient)
    cast_b: int = 0  # elements of a compute-dtype copy of B (always kept)
    # the frozen base runs inside the method's own autograd.Function (``adapters/partial.py``):
    # ZeRO-3's module hooks never fetch it for backward; the backward gathers it explicitly
    # (``GatheredParameters``), reads a dense copy and releases it
    regathers_base: bool = False


FROZEN = Role()


@dataclass(frozen=True)
class MethodPlan:
    name: str
    # (params, linears, cfg, spec) -> {module FQN: Role}; appends/marks trainable params in place
    attach: Callable
    trains_norms: Callable  # cfg -> bool (norm weights trainable)
    trains_embeddings: Callable  # cfg -> bool
    # (cfg, notes) -> (cfg to attach with, context manager): what ``plan --simulate`` needs to run
    # the method's real ``attach`` on fake tensors
    simulation: Callable = lambda cfg, notes: (cfg, contextlib.nullcontext())
    describe: Callable = lambda cfg: ""  # the method's size setting, for the report


def _targets(linears: list[Linear], cfg) -> list[Linear]:
    return [lin for lin in linears if _matches(lin.name, cfg.method.target_modules)]


def _attach_full(params: list[Param], linears, cfg, spec) -> dict[str, Role]:
    emb = cfg.method.train_embeddings
    for p in params:
        if p.buffer:
            continue
        is_emb = "embed_tokens" in p.name or "lm_head" in p.name
        p.trainable = emb or not is_emb
    roles = {}
    for lin in linears:
        trains = emb or lin.name != "lm_head"
        roles[lin.name] = Role(trainable=True, saves_input=True) if trains else FROZEN
    return roles


def _attach_lora(params: list[Param], linears, cfg, spec) -> dict[str, Role]:
    lc = cfg.method.lora
    fdt = factor_dtype(cfg)
    cast = _compute_dtype(cfg) != fdt  # LoRALinear casts its factors to the input dtype
    roles = {}
    for lin in _targets(linears, cfg):
        params.append(Param(lin.name + ".lora_A", (lc.r, lin.inp), "float32", trainable=True, layer=lin.layer))
        params.append(Param(lin.name + ".lora_B", (lin.out, lc.r), "float32", trainable=True, layer=lin.layer))
        roles[lin.name] = Role(trainable=True, saves_input=True, lora_r=lc.r,
                               cast_a=lc.r * lin.inp if cast else 0, cast_b=lin.out * lc.r if cast else 0)
    return roles


def _attach_paca(params: list[Param], linears, cfg, spec) -> dict[str, Role]:
    r = cfg.method.paca.r
    roles = {}
    for lin in _targets(linears, cfg):
        k = min(r, lin.inp)
        params.append(Param(lin.name + ".delta", (lin.out, k), "float32", trainable=True, layer=lin.layer))
        params.append(Param(lin.name + ".idx", (k,), "int64", buffer=True, layer=lin.layer))
        roles[lin.name] = Role(trainable=True, gathered=k, regathers_base=True)
    return roles


def _s2ft_count(ratio: float, n: int) -> int:
    # the same rule as slimtune.adapters.s2ft._count
    return 0 if ratio <= 0 else min(n, max(1, int(math.floor(ratio * n + 0.5))))


def _attach_s2ft(params: list[Param], linears, cfg, spec) -> dict[str, Role]:
    s2 = cfg.method.s2ft
    hd = spec.head_dim
    by_name = {lin.name: lin for lin in linears}
    roles = {}

    def add(lin: Linear, axis: str, k: int):
        if k <= 0:
            return
        shape = (lin.out, k) if axis == "in" else (k, lin.inp)
        params.append(Param(lin.name + ".delta", shape, "float32", trainable=True, layer=lin.layer))
        params.append(Param(lin.name + ".idx", (k,), "int64", buffer=True, layer=lin.layer))
        roles[lin.name] = (Role(trainable=True, gathered=k, regathers_base=True) if axis == "in"
                          else Role(trainable=True, saves_input=True, regathers_base=True))

    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        d = spec.layers[i]
        if s2.attn_ratio > 0:
            o = by_name[p + "self_attn.o_proj"]
            if s2.v_rows:
                units = _s2ft_count(s2.attn_ratio, d.n_kv)
                add(o, "in", units * (d.n_q // d.n_kv) * hd)
                add(by_name[p + "self_attn.v_proj"], "out", units * hd)
            else:
                add(o, "in", _s2ft_count(s2.attn_ratio, d.n_q) * hd)
        if s2.mlp_ratio > 0:
            k = _s2ft_count(s2.mlp_ratio, d.inter)
            add(by_name[p + "mlp.down_proj"], "in", k)
            if s2.up_rows:
                add(by_name[p + "mlp.up_proj"], "out", k)
    return roles


def _compute_dtype(cfg) -> str:
    """The dtype activations are computed in: the model dtype, or FSDP2's mixed-precision
    ``param_dtype`` (DeepSpeed's bf16/fp16 follows the model dtype)."""
    if cfg.shard.strategy == "fsdp2" and cfg.shard.param_dtype:
        return cfg.shard.param_dtype
    return cfg.model.dtype


def factor_dtype(cfg) -> str:
    """The dtype a trainable fp32 part is used in during forward: FSDP2 all-gathers it in
    ``param_dtype``; DeepSpeed casts the whole module to bf16/fp16 (keeping fp32 masters in
    the optimizer); otherwise it stays fp32."""
    if cfg.shard.strategy == "fsdp2" and cfg.shard.param_dtype:
        return cfg.shard.param_dtype
    if cfg.shard.strategy == "deepspeed_zero3" and cfg.model.dtype != "float32":
        return cfg.model.dtype
    return "float32"


def _no(cfg) -> bool:
    return False


def _s2ft_simulation(cfg, notes: list[str]):
    """S2FT reads the values of its random unit choice (it sorts them): draw them for real
    (outside the fake mode: a seeded CPU ``randperm`` over head/channel counts). Scored
    selections need activations, so the same counts are chosen at random (same shapes)."""
    from unittest import mock

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from slimtune.adapters import s2ft

    s2 = cfg.method.s2ft
    if s2.selection != "random":
        notes.append(f"method.s2ft.selection={s2.selection} scores need values; the same number of heads and "
                     "channels was chosen at random (identical shapes)")
        cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={
            "s2ft": s2.model_copy(update={"selection": "random"})})})
    real_pick = s2ft._pick

    def pick(*args, **kwargs):
        with unset_fake_temporarily():
            return real_pick(*args, **kwargs)

    return cfg, mock.patch.object(s2ft, "_pick", pick)


METHOD_PLANS: dict[str, MethodPlan] = {
    "full": MethodPlan("full", _attach_full, lambda cfg: True, lambda cfg: cfg.method.train_embeddings,
                       describe=lambda cfg: "all weights" + ("" if cfg.method.train_embeddings else " but embeddings")),
    "lora": MethodPlan("lora", _attach_lora, _no, _no, describe=lambda cfg: f"r={cfg.method.lora.r}"),
    "paca": MethodPlan("paca", _attach_paca, _no, _no, describe=lambda cfg: f"r={cfg.method.paca.r} columns"),
    "s2ft": MethodPlan("s2ft", _attach_s2ft, _no, _no, _s2ft_simulation,
                       describe=lambda cfg: f"attn {cfg.method.s2ft.attn_ratio}, mlp {cfg.method.s2ft.mlp_ratio}"),
}


def compute_dtype(cfg) -> str:
    return _compute_dtype(cfg)
