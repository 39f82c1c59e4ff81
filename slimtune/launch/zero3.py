"""``shard.strategy: deepspeed_zero3``: DeepSpeed ZeRO stage 3 through ``deepspeed.initialize``.

* The JSON named by ``shard.deepspeed_config`` (default ``configs/deepspeed/zero3.json``)
  is read and its ``"auto"`` values filled from the run config: micro-batch size,
  accumulation steps, gradient clipping, bf16/fp16 from ``model.dtype``, the
  persistence threshold (10 x hidden size, as transformers fills it).
  ``shard.cpu_offload: true`` forces ``offload_param`` and ``offload_optimizer`` to the CPU.
* On a machine without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported
  and the torch process group (gloo) is reused by ``deepspeed.init_distributed``.
* 4-bit bases: bitsandbytes ``Linear4bit`` whose packed bytes are stored in a float dtype
  (``quant.quant_storage``) so ZeRO can partition them like any parameter.  That dtype
  must equal the run's parameter dtype (``model.dtype``): DeepSpeed casts the module to
  its compute dtype, which would reinterpret the packed bytes otherwise (refused here).
  The quantization state (absmax, code) is a plain attribute of each weight, computed
  identically on every rank from the same weights, and stays whole on every rank.
* Gradient accumulation: ZeRO-3 reduce-scatters gradients into their partitions on every
  backward (it holds no unsharded gradient to accumulate, by design);
  ``set_gradient_accumulation_boundary`` marks the last micro-batch and ``step()`` runs once
  per optimizer step.  DeepSpeed averages gradients over ranks while the loop's loss is
  already divided by the global token count, so the loss is multiplied by the world size.
* Checkpoints are independent of the number of ranks: the full fp32 trainable tensors and
  their optimizer state (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``)
  are gathered, parameter by parameter, and rank 0 writes them by FQN; on load every rank
  reads them and keeps its partition (``safe_set_full_*``).  So N ranks resume on M.
  PaCA / S2FT selections (``<module>.idx``) are written with them and restored on load.
* Evaluation and generation run on all ranks together (each forward gathers layers):
  the loop's ``generate`` calls pass ``synced_gpus``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from slimtune.launch.dist import DistInfo, ensure_process_group
from slimtune.launch.report import build_report, count_bytes, publish
from slimtune.launch.state import TRAINABLE_FILE

log = logging.getLogger("slimtune")

OPTIM_FILE = "optimizer_full.pt"
_REPO = Path(__file__).resolve().parents[2]


def _config_error(msg: str):
    from slimtune.config import ConfigError

    return ConfigError(msg)


def check_config(cfg) -> None:
    if cfg.quant.name != "none":
        if cfg.quant.backend != "bitsandbytes":
            raise _config_error(
                f"shard.strategy=deepspeed_zero3 with quant.name={cfg.quant.name} needs quant.backend=bitsandbytes "
                f"(got {cfg.quant.backend!r}): ZeRO-3 partitions flat float storage, torchao's NF4Tensor is for fsdp2")
        if cfg.quant.quant_storage != cfg.model.dtype:
            raise _config_error(
                f"shard.strategy=deepspeed_zero3 needs quant.quant_storage equal to model.dtype (got quant_storage="
                f"{cfg.quant.quant_storage!r}, model.dtype={cfg.model.dtype!r}): ZeRO partitions the packed 4-bit "
                "bytes as parameters of that dtype, and a different storage dtype would be cast, corrupting them")
    if getattr(cfg.optim, "per_layer", False):
        raise _config_error("optim.per_layer=true is not supported with shard.strategy=deepspeed_zero3 "
                            "(ZeRO-3 owns the gradient partitions and the optimizer step)")


def resolve_path(path: str) -> Path:
    p = Path(path)
    for cand in (p, _REPO / p):
        if cand.is_file():
            return cand
    raise _config_error(f"shard.deepspeed_config={path!r}: no such file (looked in . and {_REPO})")


def _fill(node, key: str, value) -> None:
    if node.get(key, "auto") == "auto":
        node[key] = value


def deepspeed_config(cfg, info: DistInfo, hidden_size: int | None) -> dict:
    """The DeepSpeed config dict: the JSON file with ``auto`` values resolved from ``cfg``."""
    ds = json.loads(resolve_path(cfg.shard.deepspeed_config).read_text())
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 3) != 3:
        raise _config_error(f"{cfg.shard.deepspeed_config}: zero_optimization.stage must be 3 for "
                            f"shard.strategy=deepspeed_zero3 (got {zero.get('stage')})")
    zero["stage"] = 3
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.train.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", cfg.train.grad_accum)
    _fill(ds, "gradient_clipping", cfg.optim.max_grad_norm)
    ds["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
    _fill(ds.setdefault("bf16", {}), "enabled", cfg.model.dtype == "bfloat16")
    _fill(ds.setdefault("fp16", {}), "enabled", cfg.model.dtype == "float16")
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size if hidden_size else 100_000)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        _fill(zero, key, max(1, (hidden_size or 1024) ** 2))
    if cfg.shard.cpu_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # slimtune's optimizers are torch ones (AdamW, bitsandbytes 8-bit): allow them under ZeRO (and offload)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 1 << 30)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise _config_error(f"{cfg.shard.deepspeed_config}: slimtune cannot fill 'auto' for {leftover}; give values")
    return ds


def _walk(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def import_deepspeed(info: DistInfo):
    """Import DeepSpeed on the right accelerator and attach it to the torch process group."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if info.device.type == "cuda" else "cpu")
    # a plain ``python train.py`` run has no launcher environment; DeepSpeed insists on it
    for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
        os.environ.setdefault(key, str(value))
    ensure_process_group(info)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)
    return deepspeed


def partition_module(module: nn.Module, ds_config: dict, dtype: torch.dtype) -> nn.Module:
    """Partition an existing module's parameters now (``deepspeed.zero.Init(module=...)``), as if it had
    been built inside ZeRO-3's init context: low-memory loading does this one decoder layer at a time.
    ``mem_efficient_linear=False``: do not patch ``torch.nn.functional.linear`` process-wide."""
    import deepspeed

    deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, mem_efficient_linear=False, dtype=dtype)
    return module


class ZeRO3Engine:
    """The engine surface of :class:`slimtune.launch.replicate.ReplicatedEngine`, over DeepSpeed ZeRO-3."""

    name = "deepspeed_zero3"

    def __init__(self, model: nn.Module, cfg, info: DistInfo, build_optimizer):
        check_config(cfg)
        self.cfg, self.info = cfg, info
        self.prune_map = getattr(model, "slimtune_prune_map", None)  # LoRAM: rebuild pruned for export
        deepspeed = import_deepspeed(info)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        self.ds_config = deepspeed_config(cfg, info, hidden)
        # activation checkpointing: HF's non-reentrant checkpointing (set by build_model) composes with
        # ZeRO-3's gather hooks, which re-gather a layer when its recompute runs
        before = getattr(model, "_slimtune_unsharded_bytes", None) or count_bytes(model)
        uneven = sorted(n for n, p in model.named_parameters() if getattr(p, "ds_numel", p.numel()) % info.world_size)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # bitsandbytes' own 4-bit forward would keep each gathered weight alive until its backward
        # (MatMul4Bit saves a view of it); route those bases through a matmul that re-reads it
        from slimtune.quant.bnb import route_forward

        for m in model.modules():
            route_forward(m)
        optimizer = build_optimizer(model, cfg)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.optimizer = optimizer  # the client optimizer: ZeRO steps it on flat fp32 partitions; the scheduler sets its lr
        self.model = self.ds  # the training forward goes through the DeepSpeed engine
        self.module = model
        self.report = build_report(before, count_bytes(model), info, self.name, [], uneven,
                                   getattr(model, "_slimtune_load_report", None))
        publish(self.report, info, cfg.output.dir)

    # -- one optimizer step -------------------------------------------------------------
    def micro_step(self, is_last: bool):
        self.ds.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over ranks; the loop's loss is a share of the global mean already.
        self.ds.backward(loss * self.info.world_size, scale_wrt_gas=False)

    def clip_and_step(self, max_norm: float) -> float:
        clip = self.ds_config.get("gradient_clipping", 0.0)
        if float(max_norm) != float(clip):
            raise ValueError(f"deepspeed clips with gradient_clipping={clip} (from the JSON); the loop asked "
                             f"for {max_norm}; set optim.max_grad_norm and the JSON alike (or 'auto')")
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- checkpoint ----------------------------------------------------------------------
    def _flat_states(self) -> list[dict]:
        """Optimizer state of ZeRO's flat fp32 partitions (one per sub-group).  ZeRO-3 hands the
        client optimizer one flat partition at a time during ``step()``; between steps the client's
        ``param_groups`` are empty and its ``state`` is keyed by those partitions."""
        zero = self.ds.optimizer
        inner = zero.optimizer
        return [inner.state[p] for p in zero.fp32_partitioned_groups_flat if p in inner.state]

    def _state_keys(self) -> tuple[list[str], dict]:
        """Element-wise optimizer states (e.g. exp_avg) and per-group scalars (e.g. step)."""
        states = self._flat_states()
        if not states:
            return [], {}
        elementwise, scalars = [], {}
        for key, value in states[0].items():
            if torch.is_tensor(value) and value.dim() == 1 and value.is_floating_point() and value.numel() > 1:
                elementwise.append(key)
            elif torch.is_tensor(value) and value.numel() == 1:
                scalars[key] = value.item()
            elif isinstance(value, (int, float)):
                scalars[key] = value
            else:
                raise NotImplementedError(
                    f"optimizer state {key!r} ({type(value).__name__}) cannot be gathered per parameter under "
                    f"deepspeed_zero3 checkpoints; use optim.name=adamw")
        return elementwise, scalars

    @torch.no_grad()
    def _init_optimizer_state(self) -> None:
        """Create the optimizer's state before a load writes into it: one step on zero gradients at lr 0
        (what ``torch.distributed.checkpoint``'s ``_init_optim_state`` does for FSDP2), done the way
        ZeRO-3 steps: each flat partition is put into its param group for the call."""
        if self._flat_states():
            return
        zero = self.ds.optimizer
        inner = zero.optimizer
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            group = inner.param_groups[zero.sub_group_to_group_id[i]]
            params, lr, grad = group["params"], group["lr"], flat.grad
            group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
            try:
                inner.step()
            finally:
                group["params"], group["lr"], flat.grad = params, lr, grad

    def _gather_full(self):
        """Collective: whole fp32 trainable tensors and their optimizer states, by FQN (every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        keys, scalars = self._state_keys()
        tensors, states = {}, {}
        for name, p in self.named:
            full = safe_get_full_fp32_param(p)
            tensors[name] = full.detach().reshape(p.ds_shape).cpu().contiguous()
            states[name] = {k: safe_get_full_optimizer_state(p, k).detach().reshape(p.ds_shape).cpu().contiguous()
                            for k in keys}
        return tensors, states, scalars

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from slimtune.adapters.partial import selection_state

        tensors, states, scalars = self._gather_full()
        if self.info.is_main:
            # PaCA / S2FT selections (``<module>.idx``, int64) beside their deltas: ZeRO does not partition
            # buffers, so rank 0's are the run's.  A resume must not re-derive them (a score computed again
            # may break a tie differently, or the config may have changed): load_state puts these back.
            tensors.update(selection_state(self.module))
            save_file(tensors, str(Path(folder) / TRAINABLE_FILE))
            torch.save({"state": states, "scalars": scalars, "world_size": self.info.world_size},
                       Path(folder) / OPTIM_FILE)

    def load_state(self, folder: Path) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / OPTIM_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {OPTIM_FILE}; this checkpoint was not written by "
                                    f"shard.strategy=deepspeed_zero3 (resume it with the strategy that wrote it)")
        tensors = load_file(str(folder / TRAINABLE_FILE))
        saved = torch.load(folder / OPTIM_FILE, map_location="cpu", weights_only=False)
        missing = [n for n, _ in self.named if n not in tensors]
        if missing:
            raise KeyError(f"{folder}: checkpoint lacks trainable parameters: {missing[:5]}")
        from slimtune.adapters.partial import load_selections, selections_from_state

        load_selections(self.module, selections_from_state(tensors))  # every rank: buffers are whole
        params = [p for _, p in self.named]
        # the model's own (compute-dtype) partitions: rank 0 writes the whole tensors, ZeRO re-partitions them
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if self.info.is_main:
                with torch.no_grad():
                    for name, p in self.named:
                        p.copy_(tensors[name].to(p.dtype))
        device = self.info.device
        self._init_optimizer_state()
        for name, p in self.named:  # ZeRO's fp32 master partitions and optimizer states
            safe_set_full_fp32_param(p, tensors[name].to(device))
            for key, value in saved["state"][name].items():
                safe_set_full_optimizer_state(p, value.to(device), key)
        for st in self._flat_states():
            for key, value in saved["scalars"].items():
                st[key] = torch.tensor(value, dtype=st[key].dtype) if torch.is_tensor(st.get(key)) else value

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: whole fp32 trainable tensors by FQN (rank 0; {} elsewhere)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.named:
            full = safe_get_full_fp32_param(p).detach().reshape(p.ds_shape)
            if self.info.is_main:
                out[name] = full.cpu()
        return out

    def engine_buffers(self) -> dict[str, list[torch.Tensor]]:
        """What DeepSpeed's ZeRO-3 optimizer allocates for itself when the engine is built and keeps
        for the whole run, by memory category: the fp32 master partitions (when they are not the
        module's own partitions) under ``optimizer``; the flat buffer of gradient partitions and
        the reduce buckets under ``grads``.  Memory trackers register them (the client optimizer's
        state, which ``register_optimizer`` sees, does not include them)."""
        zero = self.ds.optimizer
        flat16 = {id(t) for t in getattr(zero, "fp16_partitioned_groups_flat", [])}
        masters = [t for t in getattr(zero, "fp32_partitioned_groups_flat", []) if id(t) not in flat16]
        buffers = [getattr(zero, "grad_partitions_flat_buffer", None)]
        buffers += [b.buffer for b in getattr(zero, "ipg_buckets", {}).values()]
        return {"optimizer": masters, "grads": [t for t in buffers if isinstance(t, torch.Tensor)]}

    def close(self) -> None:
        """Let go of the run.  DeepSpeed keeps every engine it builds alive for the life of the process:
        the module sits in ``parameter_offload.FWD_MODULE_STACK``, and the class-level ``lru_cache`` of
        ``PartitionedParameterCoordinator.__params_to_release`` holds every coordinator and module it
        was called with; neither is ever cleared.  So every engine built in a process (the trainer's,
        a test's, ``plan.simulate.measure_real``'s) stayed alive with its partitions until interpreter
        exit, where tearing it down can race gloo's worker threads (a SIGABRT at exit, "terminate called
        without an active exception", was seen once in CI).  Here: ``DeepSpeedEngine.destroy`` (hooks,
        ZeRO optimizer), then this module out of the stack, then the cache emptied (it only memoizes
        a pure look-up: other live engines recompute their entries)."""
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        self.ds.destroy()
        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK
                                                 if m is not self.module]
        release = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
        # the cache sits under instrument_w_nvtx's wrapper (a closure, no __wrapped__)
        for fn in [release, *(c.cell_contents for c in getattr(release, "__closure__", None) or ())]:
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()

    # -- eval / export ---------------------------------------------------------------------
    def unwrapped(self) -> nn.Module:
        """The module; its forward gathers partitions, so all ranks must run it together."""
        return self.module

    def export_model(self) -> nn.Module | None:
        from slimtune.launch.gather import rebuild_on_rank0, selection_buffers

        state = self.trainable_state_dict()
        if self.info.is_main:  # buffers are not partitioned by ZeRO-3: every rank holds them whole
            state.update(selection_buffers(self.module))
        return rebuild_on_rank0(self.cfg, state, self.info.is_main, self.prune_map)
