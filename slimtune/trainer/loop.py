"""The training loop.  It knows nothing about which method, quantizer or sharder is in use:
each axis is looked up in its table and called as a plain function of (model, config).

Flow: config -> models.load -> quant -> method.attach -> shard -> optim -> loop
(accumulation, clipping, schedule, eval, logs, checkpoints) -> export.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimtune.config import RunConfig, dump_config

log = logging.getLogger("slimtune")


@dataclass
class RunResult:
    output_dir: str
    step: int
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    interrupted: bool = False


class _StopFlag:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread (e.g. called from a test thread)
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        log.warning("received %s: will save a checkpoint after this step and exit", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def should_stop(self) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())


def build_model(cfg: RunConfig, device, calibration=None, prune_map=None) -> tuple[torch.nn.Module, object]:
    """Everything before sharding: load, prune (LoRAM), quantize, attach the method.  The planner
    reuses it.

    ``calibration``: iterable of collated batches (identical on every rank) for methods that
    choose what to train from data.  ``prune_map``: the PruneMap of the checkpoint a run resumes
    from, applied as stored instead of choosing units again.  The PruneMap in force (or None)
    is left on the model as ``model.slimtune_prune_map``.
    """
    if cfg.shard.low_memory_load:  # meta build; each layer is loaded, quantized, attached and sharded in turn
        from slimtune.launch.lowmem import build_model_low_memory

        return build_model_low_memory(cfg, device)
    from slimtune.adapters import get_method
    from slimtune.pruning import load_pruned_model
    from slimtune.quant import QUANTIZERS

    # LoRAM: prune first, then quantize the small model (QLoRAM); a cached aligned model is
    # loaded directly, without reading the original weights.
    model, tokenizer, pm = load_pruned_model(cfg, device, prune_map)
    QUANTIZERS[cfg.quant.name](model, cfg.quant)
    get_method(cfg.method.name).attach(model, cfg, calibration=calibration)
    from slimtune.kernels import apply as apply_kernels

    apply_kernels(model, cfg.kernels)  # fused NF4/LoRA/partial-connection ops when kernels.enabled
    model.slimtune_prune_map = pm
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _prepare_output(cfg: RunConfig, is_main: bool) -> Path:
    out = Path(cfg.output.dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    return out


def _fetch_step_batches(sampler, records, collate_fn, accum: int, device):
    batches = []
    for _ in range(accum):
        idx = sampler.next_batch()
        batch = collate_fn([records[i] for i in idx])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def optimizer_step(engine, batches: list[dict], global_tokens: float, cfg: RunConfig, phase=None):
    """One optimizer step over ``batches`` (the micro-batches of this rank): forward and backward of
    each under the engine's ``micro_step`` (gradient sync on the last only), then clipping and
    the optimizer step.  Returns (this rank's summed token loss as a float64 tensor, grad norm).

    The loss is normalised by ``global_tokens``, the label-token count of the whole step over all
    ranks, so the gradient is the same for any split into micro-batches and ranks.  ``phase``:
    an optional ``name -> context manager`` (the memory tracker's) wrapped around forward and
    backward; the benchmark harness uses it.  The scheduler is the caller's to step."""
    from slimtune.trainer.loss import token_loss_sum

    phase = phase or (lambda name: contextlib.nullcontext())
    loss_total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        with engine.micro_step(is_last=i == len(batches) - 1):
            with phase("forward"):
                loss_sum, _ = token_loss_sum(engine.model, batch, cfg.kernels)
            with phase("backward"):
                engine.backward(loss_sum / max(global_tokens, 1.0))
        loss_total += loss_sum.detach().double()
    grad_norm = engine.clip_and_step(cfg.optim.max_grad_norm)
    return loss_total, grad_norm


class MemoryPlanError(RuntimeError):
    """The planner says the run cannot fit the GPU; the message is its table with advice."""


def startup_memory_check(cfg: RunConfig, world_size: int, gpu_mem_bytes: int) -> None:
    """The analytic plan of this run on ``world_size`` GPUs of ``gpu_mem_bytes``; raises
    :class:`MemoryPlanError` with the planner's table (and its advice) when it does not fit.
    ``train.skip_memory_check=true`` turns it off (the planner can be wrong for models or
    settings it does not know)."""
    if cfg.train.skip_memory_check:
        return
    from slimtune.plan import check_fits

    fits, table = check_fits(cfg, world_size, gpu_mem_bytes)
    if not fits:
        raise MemoryPlanError(
            "the memory planner says this run does not fit the GPU (set train.skip_memory_check=true to "
            "start it anyway):\n" + table)
    log.info("memory plan: fits %.1f GiB per GPU", gpu_mem_bytes / 2**30)


def _gpu_memory_bytes(device) -> int | None:
    """Total memory of the run's CUDA device; None off CUDA (the check only runs on a GPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def train(cfg: RunConfig) -> RunResult:
    from slimtune.data import BatchSampler, build_datasets, collate
    from slimtune.launch import SHARDERS, init_distributed
    from slimtune.launch.dist import all_reduce_sum
    from slimtune.optim import build_optimizer, build_scheduler
    from slimtune.trainer import checkpoint as ckpt
    from slimtune.trainer.evaluate import eval_accuracy, eval_loss
    from slimtune.trainer.export import export_run
    from slimtune.trainer.metrics import MetricsLogger

    info = init_distributed()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed + info.rank)
    out_dir = _prepare_output(cfg, info.is_main)

    # Data before the model: a bad data file fails fast, before heavy work.
    model_tokenizer_only = _tokenizer_for(cfg)
    data = build_datasets(cfg, model_tokenizer_only)
    if info.is_main:
        log.info("data: %s", data.stats)

    # Before any weight is read: does the run fit this GPU? (analytic plan, instant)
    gpu_mem = _gpu_memory_bytes(info.device)
    if gpu_mem is not None:
        startup_memory_check(cfg, info.world_size, gpu_mem)

    pad_id = model_tokenizer_only.pad_token_id
    resume_from = ckpt.resolve_resume(cfg.output.dir, cfg.train.resume)
    stored_map = _stored_prune_map(resume_from)
    model, tokenizer = build_model(cfg, info.device, prune_map=stored_map,
                                   calibration=_calibration_batches(data.train, cfg, pad_id, info.device))
    prune_map = getattr(model, "slimtune_prune_map", None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before sharding partitions them
    tokenizer = tokenizer or model_tokenizer_only
    engine = SHARDERS[cfg.shard.strategy](model, cfg, info, build_optimizer)
    # the engine and the metrics files are let go on every way out (an error, a stop), not only at
    # the normal end: DeepSpeed keeps engines alive for the life of the process otherwise (ZeRO3Engine.close)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(engine.close)
        scheduler = build_scheduler(engine.optimizer, cfg)
        collate_fn = lambda b: collate(b, pad_id)  # noqa: E731

        sampler = BatchSampler(len(data.train), cfg.train.micro_batch_size, seed=cfg.train.seed,
                               shuffle=cfg.data.shuffle, rank=info.rank, world_size=info.world_size)
        start_step, tokens_seen = 0, 0
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, engine, info.rank)
            start_step = state["step"]
            tokens_seen = state.get("tokens_seen", 0)
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            if info.is_main:
                log.info("resumed from %s at step %d", resume_from, start_step)

        if info.is_main:
            log.info("trainable parameters: %d", trainable)
        metrics = MetricsLogger(str(out_dir), info.is_main, cfg.train.tensorboard, cfg.train.progress_bar,
                                cfg.train.max_steps, start_step)
        cleanup.callback(metrics.close)
        result = RunResult(output_dir=str(out_dir), step=start_step)

        def run_eval(step: int) -> dict:
            rec = {"step": step}
            m = engine.unwrapped()
            if data.eval:
                rec["eval_loss"] = eval_loss(m, data.eval, collate_fn, cfg.train.eval_batch_size, info.rank,
                                             info.world_size, info.device, cfg.kernels)
            if data.eval_prompts:
                rec["eval_accuracy"] = eval_accuracy(m, tokenizer, data.eval_prompts, cfg.data.max_new_tokens,
                                                     cfg.train.eval_batch_size, info.rank, info.world_size, info.device)
            metrics.log(rec)
            return rec

        def trainer_state(step: int) -> dict:
            return {"step": step, "tokens_seen": tokens_seen, "scheduler": scheduler.state_dict(),
                    "sampler": sampler.state_dict(), "world_size": info.world_size}

        if start_step == 0 and cfg.train.eval_at_ends and (data.eval or data.eval_prompts):
            result.eval["initial"] = run_eval(0)

        step = start_step
        steps_this_process = 0
        model.train()
        with _StopFlag() as stop:
            while step < cfg.train.max_steps:
                t0 = time.perf_counter()
                batches = _fetch_step_batches(sampler, data.train, collate_fn, cfg.train.grad_accum, info.device)
                n_tok = torch.tensor([float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))])
                global_tokens = float(all_reduce_sum(n_tok).item())
                lr = scheduler.get_last_lr()[0]  # the lr this step uses
                loss_total, grad_norm = optimizer_step(engine, batches, global_tokens, cfg)
                scheduler.step()
                step += 1
                steps_this_process += 1
                tokens_seen += int(global_tokens)
                loss = float(all_reduce_sum(loss_total.clone()).item()) / max(global_tokens, 1.0)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
                result.losses.append(loss)
                dt = time.perf_counter() - t0
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    metrics.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                 "tokens": int(global_tokens), "tokens_per_s": global_tokens / dt, "step_time_s": dt})
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                    run_eval(step)
                stopping = stop.should_stop() or (
                    cfg.train.stop_after_steps is not None and steps_this_process >= cfg.train.stop_after_steps)
                periodic = cfg.train.save_every and step % cfg.train.save_every == 0
                if periodic or stopping or step == cfg.train.max_steps:
                    ckpt.save_checkpoint(cfg.output.dir, step, engine, trainer_state(step), cfg.train.keep_last,
                                         info.rank, extra=prune_map.save if prune_map is not None else None)
                if stopping:
                    result.interrupted = True
                    break
        result.step = step
        if step >= cfg.train.max_steps and not result.interrupted:
            if cfg.train.eval_at_ends and (data.eval or data.eval_prompts):
                result.eval["final"] = run_eval(step)
            full_model = engine.export_model()
            export_run(full_model, tokenizer, cfg, out_dir, info, prune_map=prune_map)
            if prune_map is not None and cfg.pruning.recover_at_end:
                result.eval.update(_recover_and_evaluate(full_model, tokenizer, cfg, prune_map, out_dir, info, data,
                                                         step, metrics, collate_fn))
    return result


def _stored_prune_map(checkpoint_dir):
    from slimtune.pruning import PruneMap
    from slimtune.pruning.prune_map import MAP_NAME

    if checkpoint_dir is not None and (checkpoint_dir / MAP_NAME).is_file():
        return PruneMap.load(checkpoint_dir)
    return None


def _recover_and_evaluate(model, tokenizer, cfg, prune_map, out_dir, info, data, step, metrics, collate_fn) -> dict:
    """LoRAM's last stage: recover the trained (pruned-shape) adapter to the original model, write it
    as a PEFT folder, and evaluate the *original, unpruned* model with it, logged beside the pruned
    model's figures (keys ``recovered_eval_loss`` / ``recovered_eval_accuracy``)."""
    from slimtune.launch.dist import barrier, broadcast_object
    from slimtune.pruning import build_recovered_model, export_recovered
    from slimtune.trainer.evaluate import eval_accuracy, eval_loss

    state = None
    if info.is_main:
        export_recovered(model, cfg, prune_map, out_dir / "recovered", tokenizer)
        from slimtune.pruning import trained_state

        state = trained_state(model)
    barrier()
    if not (cfg.pruning.eval_recovered and (data.eval or data.eval_prompts)):
        return {}
    state = broadcast_object(state)
    original, _ = build_recovered_model(cfg, prune_map, state, device=info.device)
    rec = {"step": step}
    if data.eval:
        rec["recovered_eval_loss"] = eval_loss(original, data.eval, collate_fn, cfg.train.eval_batch_size,
                                               info.rank, info.world_size, info.device)
    if data.eval_prompts:
        rec["recovered_eval_accuracy"] = eval_accuracy(original, tokenizer, data.eval_prompts, cfg.data.max_new_tokens,
                                                       cfg.train.eval_batch_size, info.rank, info.world_size,
                                                       info.device)
    metrics.log(rec)
    return {"recovered": rec}


def _calibration_batches(records, cfg: RunConfig, pad_id: int, device):
    """The first records in file order, in micro-batches: the same on every rank, so a
    data-driven selection is identical across ranks (DESIGN rule 2)."""
    from slimtune.data import collate

    mb = cfg.train.micro_batch_size
    for start in range(0, len(records) - mb + 1, mb):
        batch = collate([records[i] for i in range(start, start + mb)], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def _tokenizer_for(cfg: RunConfig):
    from slimtune.models import load_tokenizer

    return load_tokenizer(cfg.model)


def setup_logging(rank: int | None = None) -> None:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Import-time chatter of optional CUDA extensions that cannot load on a CPU box.
    for noisy in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
