"""``shard.strategy: none``: every rank holds the whole model; trainable gradients
are all-reduced once per optimizer step (data parallel).

Why not ``DistributedDataParallel``: only the small trainable part needs a
reduce, once per optimizer step (after the last micro-batch), and the loss is
already normalised by the *global* token count, so a plain bucketed SUM
all-reduce is exact and keeps this engine the same shape as the sharded ones.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from slimtune.launch.dist import DistInfo


class ReplicatedEngine:
    """The engine surface the loop uses (FSDP2 / ZeRO-3 engines provide the same)."""

    name = "none"

    def __init__(self, model: nn.Module, cfg, info: DistInfo, build_optimizer):
        self.info = info
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg)
        if info.distributed:
            self._broadcast_trainable()
            if hasattr(self.optimizer, "grad_reduce"):
                # per-layer optimizers step inside grad hooks: reduce each grad there, before its step
                self.optimizer.grad_reduce = lambda g: dist.all_reduce(g, op=dist.ReduceOp.SUM)

    def _broadcast_trainable(self) -> None:
        # Same init on every rank already (seeded), but make it exact: rank 0 wins.
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def micro_step(self, is_last: bool):
        """Context for one micro-batch's forward+backward."""
        from slimtune.optim import set_sync

        set_sync(self.optimizer, is_last)  # per-layer optimizers step in grad hooks, on the last micro-batch only
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _reduce_grads(self) -> None:
        if not self.info.distributed:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def clip_and_step(self, max_norm: float) -> float:
        """Reduce gradients, clip to ``max_norm`` (0 = no clipping), step, zero grads.

        Returns the pre-clip global gradient norm.
        """
        from slimtune.optim import clip_grad_norm_

        self._reduce_grads()
        norm = float(clip_grad_norm_(self.optimizer, max_norm))  # per-layer mode: clipped in the hooks
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoint / export ------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by FQN (what a checkpoint stores for the model)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in state]
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)

    def save_state(self, folder) -> None:
        """Write model (trainable part) and optimizer state into ``folder`` (rank 0; replicas are equal)."""
        from safetensors.torch import save_file

        if self.info.is_main:
            from slimtune.adapters.partial import selection_state

            state = {n: t.detach().contiguous().cpu() for n, t in self.trainable_state_dict().items()}
            state.update(selection_state(self.model))  # PaCA/S2FT idx: a scored selection is not re-derivable
            save_file(state, str(folder / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, folder) -> None:
        from safetensors.torch import load_file

        from slimtune.adapters.partial import load_selections, selections_from_state

        tensors = load_file(str(folder / "trainable.safetensors"), device=str(self.info.device))
        selections = selections_from_state(tensors)
        load_selections(self.model, selections)
        self.load_trainable_state_dict({k: v for k, v in tensors.items()
                                        if not (k.endswith(".idx") and k[: -len(".idx")] in selections)})
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.info.device, weights_only=False))

    def engine_buffers(self) -> dict[str, list[torch.Tensor]]:
        """Buffers the engine keeps for the whole run outside the model and the optimizer's state
        (by memory category, for trackers): none here."""
        return {}

    def close(self) -> None:
        """Release what the engine holds beyond the run (nothing here; see ZeRO3Engine.close)."""

    def unwrapped(self) -> nn.Module:
        """The full model (for export and eval); already whole here."""
        return self.model

    def export_model(self) -> nn.Module:
        """The model to export (whole on every rank here; export writes from rank 0)."""
        return self.model
