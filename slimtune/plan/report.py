"""The plan as text (the table ``slimtune plan`` prints), as JSON, and as a picture."""
from __future__ import annotations

from pathlib import Path

from slimtune.memory.units import format_bytes

CATEGORY_ORDER = ("weights", "trainable", "grads", "optimizer", "activations", "temporaries", "overhead")
COLORS = {"weights": "#4c72b0", "trainable": "#55a868", "grads": "#c44e52", "optimizer": "#8172b2",
          "activations": "#ccb974", "temporaries": "#64b5cd", "overhead": "#8c8c8c"}


def _run_line(cfg) -> str:
    m, q, p, o, s, t = cfg.method, cfg.quant, cfg.pruning, cfg.optim, cfg.shard, cfg.train
    from slimtune.plan.methods import METHOD_PLANS

    parts = [f"method {m.name} {METHOD_PLANS[m.name].describe(cfg)}".rstrip()]
    if q.name != "none":
        parts.append(f"{q.name} ({q.backend}{', double quant' if q.double_quant else ''})")
    if p.strategy != "none":
        parts.append(f"pruning {p.strategy} {p.ratio}")
    parts.append(f"optim {o.name}{' per-layer' if o.per_layer else ''}")
    parts.append(f"shard {s.strategy}{' + cpu offload' if s.cpu_offload else ''}")
    parts.append(f"seq {cfg.data.max_seq_len} x micro-batch {t.micro_batch_size} (accum {t.grad_accum})")
    parts.append(f"checkpointing {'on' if t.activation_checkpointing else 'off'}")
    parts.append(f"attention {cfg.model.attn_implementation}")
    parts.append("loss: fused/chunked" if cfg.kernels.enabled and cfg.kernels.fused_loss else "loss: full fp32 logits")
    return " | ".join(parts)


def render_text(plan) -> str:
    est, cfg = plan.estimate, plan.cfg
    lines = [f"slimtune plan: {plan.source} on {plan.world} rank(s) ({plan.nodes} node(s) x {plan.gpus} GPU) "
             f"with {format_bytes(plan.gpu_mem)} each",
             f"model: {plan.spec.model_type}, {plan.spec.num_layers} layers, hidden {plan.spec.hidden}, "
             f"vocab {plan.spec.vocab} ({plan.spec.source})",
             f"run: {_run_line(cfg)}", "",
             f"one rank's GPU memory at its peak ({est.moment}):"]
    largest = est.largest()
    width = max(len(it.label) for it in est.items) + 2
    allocated = 0
    for cat in CATEGORY_ORDER:
        for it in (i for i in est.items if i.category == cat):
            mark = "   <- largest" if it is largest else ""
            lines.append(f"  {cat:<12}{it.label:<{width}}{format_bytes(it.bytes):>12}{mark}")
            if cat != "overhead":
                allocated += it.bytes
        if cat == "temporaries":
            lines.append(f"  {'':<12}{'allocated (what torch.cuda.max_memory_allocated sees)':<{width}}"
                         f"{format_bytes(allocated):>12}")
    pct = 100.0 * est.per_rank_peak / plan.gpu_mem
    lines.append(f"  {'TOTAL':<12}{'per-rank peak':<{width}}{format_bytes(est.per_rank_peak):>12}   "
                 f"of {format_bytes(plan.gpu_mem)} ({pct:.0f}%)")
    if plan.fits:
        lines.append(f"verdict: FITS ({format_bytes(plan.gpu_mem - est.per_rank_peak)} to spare per GPU)")
    else:
        lines.append(f"verdict: DOES NOT FIT ({format_bytes(est.per_rank_peak - plan.gpu_mem)} over per GPU)")
    lines.append("")
    lines.append(f"activations: {format_bytes(est.activations_ckpt)} with activation checkpointing, "
                 f"{format_bytes(est.activations_no_ckpt)} without (this run: "
                 f"{'on' if cfg.train.activation_checkpointing else 'off'})")
    lines.append("moments of a step (allocated): " + ", ".join(
        f"{k} {format_bytes(v)}" for k, v in est.moments.items()))
    lines.append(f"host RAM per rank: {format_bytes(est.host['offload'])} offloaded state; "
                 f"{format_bytes(est.host['loading'])} while loading")
    if plan.simulated is not None:
        sim = plan.simulated
        ratio = est.allocated_peak / sim.peak_bytes if sim.peak_bytes else float("nan")
        lines.append("")
        lines.append(f"simulated ({sim.world} fake ranks, fake tensors, 2 training steps, {sim.seconds:.0f} s): "
                     f"tracked peak {format_bytes(sim.peak_bytes)} allocated; analytic / simulated = {ratio:.3f}")
        lines.append("  by category: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in sim.breakdown.items() if v))
        if plan.simulated_fits is not None:
            lines.append(f"  simulated per-rank peak with the same overheads: {format_bytes(plan.simulated_peak)} -> "
                         f"{'FITS' if plan.simulated_fits else 'DOES NOT FIT'}")
    lines.append("")
    lines.append("assumptions: " + plan.assumptions_text())
    for note in est.notes + (plan.simulated.notes if plan.simulated is not None else []):
        lines.append(f"note: {note}")
    if plan.advice:
        lines.append("")
        if plan.fits:
            lines.append("room to spare; changes that still fit:")
        elif any(v.fits for v in plan.advice):
            lines.append("advice (cheapest changes that fit, re-planned analytically):")
        else:
            lines.append("no combination of up to three changes fits; the closest single changes:")
        for v in plan.advice:
            ranks = f" on {plan.world * v.world_factor} ranks" if v.world_factor != 1 else ""
            ovr = " ".join(v.overrides)
            lines.append(f"  - {v.label}{ranks}: {format_bytes(v.per_rank_peak)} per rank "
                         f"({'fits' if v.fits else 'does not fit'}; {v.why})" + (f"\n      {ovr}" if ovr else ""))
    return "\n".join(lines)


def to_json(plan) -> dict:
    est = plan.estimate
    out = {
        "config": plan.source,
        "world_size": plan.world,
        "gpus_per_node": plan.gpus,
        "nodes": plan.nodes,
        "gpu_mem_bytes": plan.gpu_mem,
        "per_rank_peak_bytes": est.per_rank_peak,
        "allocated_peak_bytes": est.allocated_peak,
        "fits": plan.fits,
        "peak_moment": est.moment,
        "largest": est.largest().key,
        "breakdown": {it.key: {"label": it.label, "category": it.category, "bytes": it.bytes} for it in est.items},
        "by_category": est.by_category(),
        "moments": est.moments,
        "activations": {"checkpointing": est.activations_ckpt, "no_checkpointing": est.activations_no_ckpt},
        "host_bytes": est.host,
        "assumptions": plan.assumptions_dict(),
        "notes": list(est.notes),
        "advice": [{"change": v.label, "overrides": v.overrides, "world_size": plan.world * v.world_factor,
                    "per_rank_peak_bytes": v.per_rank_peak, "fits": v.fits} for v in plan.advice],
        "simulated": None,
    }
    if plan.simulated is not None:
        sim = plan.simulated
        out["simulated"] = {"peak_bytes": sim.peak_bytes, "breakdown": sim.breakdown, "world_size": sim.world,
                            "seconds": sim.seconds, "per_rank_peak_bytes": plan.simulated_peak,
                            "fits": plan.simulated_fits, "notes": sim.notes}
    return out


def plot(plan, path: str) -> None:
    """Stacked bars per category: the run and each advised variant, with the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("this run", plan.estimate)] + [(v.label, v.estimate) for v in plan.advice if v.estimate is not None]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(bars)), 5))
    gib = float(1 << 30)
    for x, (_, est) in enumerate(bars):
        bottom = 0.0
        cats = est.by_category()
        for cat in CATEGORY_ORDER:
            h = cats.get(cat, 0) / gib
            if h:
                ax.bar(x, h, bottom=bottom, color=COLORS[cat], label=cat if x == 0 else None, width=0.6)
                bottom += h
    ax.axhline(plan.gpu_mem / gib, color="black", linestyle="--", label=f"budget {format_bytes(plan.gpu_mem)}")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([label if len(label) < 28 else label[:26] + "..." for label, _ in bars], rotation=15,
                       ha="right", fontsize=8)
    ax.set_ylabel("GiB per rank")
    ax.set_title(f"{Path(str(plan.source)).name}: per-rank peak by component ({plan.world} ranks)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
