"""``shard.strategy: fsdp2``: PyTorch ``fully_shard`` per decoder layer, then the root.

* Parameters are ``DTensor`` s sharded on dim 0 over a 1-D mesh of all ranks; each
  decoder layer is one all-gather / reduce-scatter unit, the root holds the rest
  (embeddings, final norm, lm_head).
* 4-bit bases use the torchao backend (``quant.backend: torchao``): its ``NF4Tensor``
  implements FSDP2's ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` hooks, so the
  shards are packed 4-bit bytes and the all-gather moves them.  A 4-bit weight whose
  inner tensors do not split evenly into ``world_size`` chunks is kept whole on every
  rank (``ignored_params``) and reported, never split across block boundaries.
  bitsandbytes' ``Linear4bit`` has no FSDP2 hooks (its ``quant_state`` would be lost
  in the all-gather), so it is refused with a message.
* Mixed precision through ``MixedPrecisionPolicy``; ``shard.cpu_offload`` through
  ``CPUOffloadPolicy`` (parameters, gradients and the optimizer step on the CPU).
* Activation checkpointing: each decoder layer is wrapped in a non-reentrant
  ``checkpoint_wrapper`` *before* ``fully_shard``, so FSDP's hooks sit outside the
  recomputed region (the recompute in backward finds the layer already gathered).
  HF's own ``gradient_checkpointing_enable`` (set by ``build_model``) is switched off.
* Gradient accumulation: ``set_requires_gradient_sync(False)`` on every micro-batch
  but the last, so gradients are reduce-scattered once per optimizer step.  The loop
  divides each rank's loss sum by the *global* token count, so the reduction must be
  a sum: the gradient divide factor is set to 1.
* Clipping: ``torch.nn.utils.clip_grad_norm_`` over the DTensor gradients (the norm
  is a DTensor reduced over ranks; ``full_tensor()`` gives the global value).
* Checkpoints: ``torch.distributed.checkpoint`` of ``get_state_dict(model, optimizer,
  ignore_frozen_params=True)`` (trainable tensors and optimizer state by FQN); DCP
  reshards on load, so N ranks' checkpoint resumes on M ranks.
* Export: the trainable tensors are gathered whole to rank 0 (``full_state_dict=True,
  cpu_offload=True``) and loaded into a rebuilt model (:mod:`slimtune.launch.gather`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from slimtune.launch.dist import DistInfo, ensure_process_group
from slimtune.launch.report import build_report, count_bytes, publish
from slimtune.launch.state import DCP_DIR

log = logging.getLogger("slimtune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config_error(msg: str):
    from slimtune.config import ConfigError

    return ConfigError(msg)


def check_config(cfg) -> None:
    """Refuse combinations FSDP2 cannot run correctly, before any model work."""
    if cfg.quant.name != "none" and cfg.quant.backend != "torchao":
        raise _config_error(
            f"shard.strategy=fsdp2 with quant.name={cfg.quant.name} needs quant.backend=torchao (got "
            f"{cfg.quant.backend!r}): bitsandbytes' Linear4bit has no FSDP2 all-gather hooks and its quant_state "
            "would not survive sharding; torchao's NF4Tensor shards its packed bytes")
    if getattr(cfg.optim, "per_layer", False):
        raise _config_error("optim.per_layer=true is not supported with shard.strategy=fsdp2 (FSDP2 assigns reduced "
                            "gradients to the shards, so per-parameter post-accumulate hooks never fire)")


def make_mesh(info: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(info)
    return init_device_mesh(info.device.type, (info.world_size,))


def fsdp_kwargs(cfg, mesh) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    scfg = cfg.shard
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[scfg.param_dtype] if scfg.param_dtype else None,
                              reduce_dtype=DTYPES[scfg.reduce_dtype])
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if scfg.cpu_offload else OffloadPolicy()
    return {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}


def _is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def nf4_splits_evenly(t: torch.Tensor, world: int) -> bool:
    """torchao's NF4 split cuts each inner tensor into ``world`` equal chunks along dim 0; a
    chunk boundary inside a quantization (or scaler) block would mix two blocks' constants."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import _INNER_TENSOR_NAMES_FOR_SHARDING

    if t.dim() != 2 or t.size(0) % world:
        return False
    return all(getattr(t, name).numel() % world == 0 for name in _INNER_TENSOR_NAMES_FOR_SHARDING)


def unshardable_params(module: nn.Module, world: int) -> dict[str, nn.Parameter]:
    """NF4 weights FSDP2 must leave alone.  On one rank that is all of them: there is nothing to
    split, and FSDP2's 1-rank path hands torchao's ``fsdp_post_all_gather`` the padded shard
    instead of its ``fsdp_pre_all_gather`` outputs (torch 2.13 / torchao 0.18), which fails."""
    return {n: p for n, p in module.named_parameters() if _is_nf4(p) and (world == 1 or not nf4_splits_evenly(p, world))}


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_layer(layer: nn.Module, cfg, kwargs: dict, world: int) -> nn.Module:
    """Wrap one decoder layer for activation checkpointing (if on) and ``fully_shard`` it."""
    from torch.distributed.fsdp import fully_shard

    if cfg.train.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        layer = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    ignored = set(unshardable_params(layer, world).values())
    fully_shard(layer, reshard_after_forward=cfg.shard.reshard_after_forward, ignored_params=ignored or None,
                **kwargs)
    return layer


def _disable_hf_checkpointing(model: nn.Module) -> None:
    if getattr(model, "is_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def clean_fqn(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


class FSDP2Engine:
    """The engine surface of :class:`slimtune.launch.replicate.ReplicatedEngine`, over FSDP2."""

    name = "fsdp2"

    def __init__(self, model: nn.Module, cfg, info: DistInfo, build_optimizer):
        from torch.distributed.fsdp import fully_shard

        from slimtune.models import decoder_layers

        check_config(cfg)
        self.cfg, self.info = cfg, info
        self.prune_map = getattr(model, "slimtune_prune_map", None)  # LoRAM: rebuild pruned for export
        mesh = make_mesh(info)
        kwargs = fsdp_kwargs(cfg, mesh)
        world = info.world_size
        layers = decoder_layers(model)
        before = getattr(model, "_slimtune_unsharded_bytes", None) or count_bytes(model)
        replicated = sorted(clean_fqn(n) for n in unshardable_params(model, world)) if world > 1 else []
        _disable_hf_checkpointing(model)
        for i in range(len(layers)):
            if not is_sharded(layers[i]):  # low-memory loading shards layers while it loads them
                layers[i] = shard_layer(layers[i], cfg, kwargs, world)
        root_ignored = set(unshardable_params(model, world).values())
        fully_shard(model, ignored_params=root_ignored or None, **kwargs)
        for m in model.modules():  # sum, not mean: the loss is already divided by the global token count
            if is_sharded(m):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg)
        padded = sorted(clean_fqn(n) for n, p in model.named_parameters()
                        if type(p).__name__ == "DTensor" and p.dim() > 0 and p.shape[0] % world)
        self.report = build_report(before, count_bytes(model), info, self.name, replicated, padded,
                                   getattr(model, "_slimtune_load_report", None))
        publish(self.report, info, cfg.output.dir)

    # -- one optimizer step -------------------------------------------------------------
    def micro_step(self, is_last: bool):
        """Reduce-scatter gradients only after the last micro-batch of a step."""
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            if max_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            else:
                norm = torch.nn.utils.get_total_norm(grads)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        else:
            norm = float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoint ----------------------------------------------------------------------
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, **kw)

    def save_state(self, folder: Path) -> None:
        """Collective: every rank writes its shards of trainable tensors and optimizer state (DCP)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(folder) / DCP_DIR))

    def load_state(self, folder: Path) -> None:
        """Collective: load a DCP checkpoint written by any number of ranks (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(folder) / DCP_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"{folder}: no {DCP_DIR}/ folder; this checkpoint was not written by "
                                    f"shard.strategy=fsdp2 (resume it with the strategy that wrote it)")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        # strict=False: the frozen base is not in the checkpoint (dcp.load above already failed loudly
        # if a trainable tensor or optimizer state was missing from it)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._options(strict=False))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by FQN, whole, on rank 0 only (collective; other ranks get {})."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._options(full_state_dict=True, cpu_offload=True))

    def engine_buffers(self) -> dict[str, list[torch.Tensor]]:
        """Buffers the engine keeps for the whole run outside the model and the optimizer's state
        (by memory category, for trackers): none here."""
        return {}

    def close(self) -> None:
        """Release what the engine holds beyond the run (nothing: FSDP2's state lives on the module)."""

    # -- eval / export ---------------------------------------------------------------------
    def unwrapped(self) -> nn.Module:
        """The sharded model: its forward (and ``generate`` with ``synced_gpus``) gathers layers."""
        return self.model

    def export_model(self) -> nn.Module | None:
        """Collective: a whole model holding the trained tensors, on rank 0 (None elsewhere)."""
        from slimtune.launch.gather import rebuild_on_rank0

        return rebuild_on_rank0(self.cfg, self.trainable_state_dict(), self.info.is_main, self.prune_map)
