"""GaLore AdamW: Adam moments kept in a low-rank projection of each 2-D gradient.

Semantics follow the GaLore paper (arXiv 2403.03507) and its reference package
galore-torch 1.0, which the tests compare against step by step:

* A param group carrying a ``rank`` key is projected; any other group is plain AdamW.
* Per parameter, ``state["step"]`` counts updates.  Before the increment, when the step
  is a multiple of ``update_proj_gap`` (so on the first update too), a new orthonormal
  basis P is taken from the fp32 SVD of the current gradient (``projector.exact_basis``,
  or ``randomized_basis`` when ``svd="randomized"``).  ``proj_type="std"`` projects on
  the right (``G @ P.T``, P = Vh[:r]) if rows >= cols, else on the left
  (``P.T @ G``, P = U[:, :r]).
  From the second basis on, each new basis vector's sign is aligned with the previous
  one (``basis_sign="aligned"``, the default; ``"svd"`` keeps LAPACK's signs exactly as
  galore-torch): see ``projector.align_signs`` for why.
* Adam moments live in the projected shape and are *not* reset when P changes.
* FSDP2 (DTensor row-block parameters): the same update on this rank's rows, with the
  communication of ``slimtune.optim.sharded`` (all-gather on refresh steps only; per step
  nothing for right projections, reduce-scatter + all-gather of r x n for left ones).
* The normalised Adam step is projected back, multiplied by ``scale`` and applied;
  decoupled weight decay ``p -= lr * wd * p`` is applied after the update.

Two state precisions (``bits``):

* ``bits=32``: the update is galore-torch's ``GaLoreAdamW`` formula
  ``p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)`` (eps outside the bias
  correction, as HF's old AdamW), for projected and plain parameters alike.  Written
  by hand because neither ``torch.optim.AdamW`` nor bitsandbytes puts eps there, and
  equality with the reference is the test.
* ``bits=8``: the moments of every tensor with at least ``min_8bit_size`` elements
  (counted in the projected shape) are blockwise 8-bit (block 256, bitsandbytes' signed
  and unsigned dynamic maps).  The update is bitsandbytes' own fused kernel
  ``bitsandbytes.functional.optimizer_update_8bit_blockwise`` (smaller tensors:
  ``optimizer_update_32bit``), i.e. exactly bitsandbytes' AdamW8bit arithmetic, applied
  to the projected gradient.  Why the kernel rather than ``quantize_blockwise`` /
  ``dequantize_blockwise`` around a hand-written update: on CUDA it dequantizes, updates
  and requantizes in one pass without fp32 copies of the moments, and it makes the
  variant equal to galore-torch's ``GaLoreAdamW8bit`` (also tested).  The kernel writes
  ``-lr * adam_step`` into a zero buffer of the projected shape, which is projected back.
  For plain parameters the kernel applies the weight decay itself (before the step, the
  bitsandbytes convention); for projected ones it is applied after, as in galore-torch.

Resume: ``state_dict()`` holds P, the projection side, the step counter and the moments
(uint8 codes + absmax for 8-bit); ``load_state_dict`` keeps every state tensor's dtype
(torch's default would cast uint8 codes to the parameter's float dtype).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from copy import deepcopy
from typing import Any

import torch

from slimtune.optim import projector, sharded

log = logging.getLogger("slimtune")

_BNB_BLOCK = 256  # bitsandbytes' blockwise optimizer block size (CPU and CUDA kernels)

GALORE_GROUP_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd": "exact",
    "oversample": 8,
    "power_iters": 2,
    "seed": 0,
    # "aligned": flip each new basis vector to point the way the previous one did
    # (projector.align_signs); "svd": keep LAPACK's signs, exactly as galore-torch.
    "basis_sign": "aligned",
}


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection on groups that set ``rank`` (see module doc)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        bits: int = 32,
        min_8bit_size: int = 4096,
    ):
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32 (got {bits})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "rank" in group:
                for key, value in GALORE_GROUP_DEFAULTS.items():
                    group.setdefault(key, value)
                if group["basis_sign"] not in ("aligned", "svd"):
                    raise ValueError(f"basis_sign must be aligned or svd (got {group['basis_sign']!r})")
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"GaLore projects 2-D weights only; got a parameter of shape {tuple(p.shape)}")
        self.bits = bits
        self.min_8bit_size = min_8bit_size
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[p]
        state.setdefault("step", 0)
        projected = "rank" in group
        # Under FSDP2 (DTensor p) everything below works on this rank's row block; the
        # communication is in slimtune.optim.sharded (see its module doc).
        grad = self._project(p, group, state) if projected else sharded.local(p.grad)
        state["step"] += 1
        if self.bits == 32:
            self._adam32(p, grad, group, state, projected)
        else:
            self._adam8(p, grad, group, state, projected)

    def _project(self, p: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """This rank's block of the projected gradient (all of it when p is not sharded)."""
        grad = p.grad
        if "side" not in state:
            state["side"] = projector.projection_side(grad.shape, group["proj_type"])
        side = state["side"]
        if "basis" not in state or state["step"] % group["update_proj_gap"] == 0:
            state["basis"] = self._new_basis(p, group, state, side)
        low = projector.project(sharded.local(grad), sharded.local(state["basis"]), side)
        if sharded.is_sharded(p) and side == projector.LEFT:
            low = sharded.reduce_scatter_rows(low, p)  # sum_k P_k^T G_k, this rank's rows of it
        return low

    def _new_basis(self, p: torch.Tensor, group: dict, state: dict, side: str) -> torch.Tensor:
        grad = sharded.full(p.grad) if sharded.is_sharded(p) else p.grad  # all-gather on refresh steps only
        if group["svd"] == "randomized":
            basis = projector.randomized_basis(
                grad, group["rank"], side, seed=group["seed"], step=state["step"],
                oversample=group["oversample"], power_iters=group["power_iters"],
            )
        else:
            basis = projector.exact_basis(grad, group["rank"], side)
        if group["basis_sign"] == "aligned" and "basis" in state:
            previous = state["basis"]
            previous = sharded.full(previous) if sharded.is_sharded(previous) else previous
            basis = projector.align_signs(basis, previous, side)
        if not sharded.is_sharded(p):
            return basis
        basis = sharded.agree(basis, p)
        # right: r x n, replicated (plain tensor); left: m x r, row-sharded like the weight
        return basis if side == projector.RIGHT else sharded.rows_of(basis, p)

    def _state_shape(self, p: torch.Tensor, group: dict, state: dict) -> tuple[int, ...]:
        """Whole (unsharded) shape of the moments: the projected shape or the parameter's."""
        if "rank" in group:
            return projector.projected_shape(p.shape, group["rank"], state["side"])
        return tuple(p.shape)

    def _zeros(self, p, like: torch.Tensor, whole_shape, dtype=None) -> torch.Tensor:
        """A zero state tensor shaped like this rank's ``like``; a Shard(0) DTensor when p is sharded."""
        z = torch.zeros_like(like, dtype=dtype)
        return sharded.wrap_rows(z, p, whole_shape) if sharded.is_sharded(p) else z

    def _back(self, p, update: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """The full-shape update of this rank's rows from its block of the projected update."""
        side = state["side"]
        if sharded.is_sharded(p) and side == projector.LEFT:
            update = sharded.all_gather_rows(update, p, self._state_shape(p, group, state))
        return projector.project_back(update, sharded.local(state["basis"]), side, group["scale"])

    def _adam32(self, p, grad, group, state, projected: bool) -> None:
        if "exp_avg" not in state:
            whole = self._state_shape(p, group, state)
            state["exp_avg"] = self._zeros(p, grad, whole)
            state["exp_avg_sq"] = self._zeros(p, grad, whole)
        exp_avg, exp_avg_sq = sharded.local(state["exp_avg"]), sharded.local(state["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        t = state["step"]
        step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        update = exp_avg / denom
        if projected:
            update = self._back(p, update, group, state)
        w = sharded.local(p)
        w.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            from slimtune.quant.bnb import import_bitsandbytes

            F = import_bitsandbytes().functional

            self._qmaps[device] = (
                F.create_dynamic_map(signed=True).to(device),
                F.create_dynamic_map(signed=False).to(device),
            )
        return self._qmaps[device]

    def _init_state8(self, p, grad: torch.Tensor, group: dict, state: dict) -> None:
        """8-bit (codes + absmax per 256) or 32-bit state, decided on the *whole* tensor's size
        so that every rank and a 1-rank run make the same choice."""
        whole = self._state_shape(p, group, state)
        numel = math.prod(whole)
        is_sharded = sharded.is_sharded(p)
        world = p.device_mesh.size() if is_sharded else 1
        use8 = numel >= self.min_8bit_size
        if use8 and world > 1 and not sharded.blockwise_aligned(whole, world, _BNB_BLOCK):
            # A shard boundary inside a quantization block: the per-block arithmetic of one
            # rank could not be reproduced (nor the absmax vector sharded as Shard(0)), so this
            # tensor keeps exact 32-bit moments instead; rare (needs rows*cols per shard not a
            # multiple of 256) and reported once.
            use8 = False
            log.warning("galore_adamw8bit: state of shape %s does not split into whole 256-blocks over %d ranks; "
                        "it is kept in 32 bit", tuple(whole), world)
        if not use8:
            state["state1"] = self._zeros(p, grad, whole, torch.float32)
            state["state2"] = self._zeros(p, grad, whole, torch.float32)
            return
        state["state1"] = self._zeros(p, grad, whole, torch.uint8)
        state["state2"] = self._zeros(p, grad, whole, torch.uint8)
        blocks = torch.zeros(math.ceil(grad.numel() / _BNB_BLOCK), dtype=torch.float32, device=grad.device)
        total = (math.ceil(numel / _BNB_BLOCK),)
        state["absmax1"] = sharded.wrap_rows(blocks, p, total) if is_sharded else blocks
        state["absmax2"] = sharded.wrap_rows(blocks.clone(), p, total) if is_sharded else blocks.clone()

    def _adam8(self, p, grad, group, state, projected: bool) -> None:
        from slimtune.quant.bnb import import_bitsandbytes

        F = import_bitsandbytes().functional

        grad = grad.contiguous()
        if "state1" not in state:
            self._init_state8(p, grad, group, state)
        s1, s2 = sharded.local(state["state1"]), sharded.local(state["state2"])
        beta1, beta2 = group["betas"]
        w = sharded.local(p)
        # bitsandbytes updates its ``p`` argument in place; for a projected gradient that
        # is a zero buffer which then holds -lr * (Adam step in the projected space).
        target = torch.zeros_like(grad, dtype=p.dtype) if projected else w
        kernel_wd = 0.0 if projected else group["weight_decay"]
        if s1.dtype == torch.uint8:
            qmap1, qmap2 = self._qmap(grad.device)
            F.optimizer_update_8bit_blockwise(
                "adam", grad, target, s1, s2, beta1, beta2, 0.0, 0.0,
                group["eps"], state["step"], group["lr"], qmap1, qmap2,
                sharded.local(state["absmax1"]), sharded.local(state["absmax2"]),
                weight_decay=kernel_wd, gnorm_scale=1.0,
            )
        else:
            F.optimizer_update_32bit(
                "adam", grad, target, s1, beta1, group["eps"], state["step"], group["lr"],
                s2, beta2, 0.0, 0.0, kernel_wd, 1.0,
            )
        if projected:
            w.add_(self._back(p, target, group, state))
            if group["weight_decay"] > 0.0:
                w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    # ------------------------------------------------------------------ resume
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore groups and state, keeping each state tensor's dtype (uint8 codes stay uint8).

        Tensors are copied (the optimizer never shares state with the dict it was given) one by
        one rather than by ``deepcopy`` of the whole dict, which fails on DTensors that
        ``torch.distributed.checkpoint`` has just loaded into.
        """
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError("optimizer state dict does not match this optimizer's parameter groups")
        id_map = {
            saved_id: p for g, s in zip(groups, saved_groups) for saved_id, p in zip(s["params"], g["params"])
        }
        state: defaultdict = defaultdict(dict)
        for saved_id, param_state in state_dict["state"].items():
            p = id_map[saved_id]
            state[p] = {k: v.detach().to(p.device, copy=True) if torch.is_tensor(v) else deepcopy(v)
                        for k, v in param_state.items()}
        for g, s in zip(groups, saved_groups):
            g.update({k: deepcopy(v) for k, v in s.items() if k != "params"})
        self.state = state
