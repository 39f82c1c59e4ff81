"""The one memory tracker (DESIGN rule 5): live storage bytes over time, by category, with peaks.

Why not torch's own trackers: ``torch.distributed._tools.mem_tracker.MemTracker`` registers grad
hooks on every parameter and fails on frozen ones (METHODS.md), and neither it nor
``FSDPMemTracker`` has the categories the planner needs (frozen vs trainable weights,
activations saved for backward vs transient buffers). This tracker follows the same approach
(a ``TorchDispatchMode`` that sees every op's outputs, weak references on storages to see them
die, a patched ``UntypedStorage.resize_`` for FSDP2's in-place frees); the tests compare its
peak with ``MemTracker`` on a model without frozen parameters.

What is counted
    Untyped storages, each once (views share a storage), by ``nbytes()`` (rounded up to 512
    bytes on CUDA, the caching allocator's smallest block). A storage becomes tracked when an
    op creates it inside the tracked region (outputs aliasing an input are not new memory), or
    when it is registered explicitly (``register``, ``register_model``,
    ``register_optimizer``). A storage stops counting when it is freed (a weak reference's callback
    on the storage: PyTorch keeps one Python object per storage for as long as the storage
    lives, so the callback runs exactly when the memory is released, also for fake and meta
    tensors) or shrinks (``resize_``).

Categories
    weights      frozen parameters, buffers and quantization constants (``register_model``)
    trainable    parameters with ``requires_grad`` (``register_model``)
    grads        ``param.grad`` of registered trainable parameters (post-accumulate-grad hook,
                 and a sweep at every phase exit and optimizer step, which catches gradients
                 that sharders assign directly, as FSDP2 does)
    optimizer    optimizer state (``register_optimizer``: present state now, state created in
                 ``step()`` via step hooks; without registration: allocations made inside a
                 ``phase("optimizer")`` that survive it)
    activations  tensors autograd saves for backward (a ``saved_tensors_hooks`` pack hook sees
                 each one; views of parameters are not activations), and tensors created
                 inside a ``phase("forward")`` that built an autograd graph and are still
                 alive when it ends (which covers what custom autograd functions keep on
                 ``ctx`` and the layer inputs that non-reentrant activation checkpointing
                 holds); a forward under ``torch.no_grad()`` leaves no activations
    temporaries  everything else created in the tracked region (working buffers, gradients of
                 activations, dequantized weights, FSDP all-gather buffers, logits not saved)

    With non-reentrant activation checkpointing, what the recomputation saves is held by the
    checkpoint's own saved-tensor hooks and counts as temporaries; with reentrant checkpointing
    it counts as activations. Totals are the same either way.

    When a storage changes category later (a backward output becoming ``param.grad``, a
    step's allocation becoming optimizer state), the recorded peaks it was alive for are
    re-attributed too, so ``peak_breakdown`` names what each byte turned out to be.

Fake and meta tensors
    Works unchanged on FakeTensorMode and meta tensors, so a 70B-shaped model can be "run"
    without memory. Nesting order: enter ``FakeTensorMode`` first, then the tracker::

        with FakeTensorMode():
            model = build()                  # fake parameters
            tracker = MemoryTracker()
            tracker.register_model(model)
            with tracker:
                ...

    (with the tracker outside, the fake mode answers ops before the tracker sees them). A model
    built on the meta device gets fake parameters from ``slimtune.memory.fake_module``; prefer a
    real fake device (cpu, cuda) to "meta", whose SDPA falls back to the math kernel. Ops
    run under a different fake mode than the one active at entry (DTensor's sharding
    propagation) are not counted; wrapper subclasses (DTensor, torchao NF4) are let through
    so that the ops on their inner tensors are what is counted. ``prim.device`` (which fake
    tensors ask for most ops: about 60% of dispatches) is answered in place, and views are
    passed on without bookkeeping (their output shares an input's storage).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.fake_tensor import _device_handler as _fake_device  # FakeTensorMode's prim.device answer
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass_type,
)

from slimtune.memory.fast_ops import built_fresh, call_op
from slimtune.memory.units import format_bytes

__all__ = ["CATEGORIES", "MemoryTracker", "collect_tensors", "tensor_storages"]

CATEGORIES = ("weights", "trainable", "grads", "optimizer", "activations", "temporaries")

# Phase name -> (category given at phase exit to the phase's surviving allocations, whether
# that needs the phase to have built an autograd graph). The one table of phase rules.
_PHASE_EXIT_RULES = {
    "forward": ("activations", True),
    "optimizer": ("optimizer", False),
}
# Ops whose output is new memory even though it aliases the input: torch.tensor(...) builds the
# data outside the dispatcher and hands it through lift_fresh.
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_CUDA_BLOCK = 512  # CUDACachingAllocator rounds every block up to 512 bytes
_DEVICE_OP = torch.ops.prim.device.default
_FAKE_SLOT = torch._C._TorchDispatchModeKey.FAKE


def active_fake_mode() -> Any:
    """The active ``FakeTensorMode`` or None: ``torch._guards.active_fake_mode`` in one call
    (every fake mode is held in the mode stack's one FAKE slot); the tracker asks it per op."""
    return torch._C._get_dispatch_mode(_FAKE_SLOT)


@functools.lru_cache(maxsize=None)
def _is_wrapper_type(cls: type) -> bool:
    return is_traceable_wrapper_subclass_type(cls)


def tensor_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The untyped storages behind a tensor, looking inside wrapper subclasses (DTensor, NF4).

    Written here rather than taken from torch.distributed._tools.common_utils because that
    helper raises on storage-less layouts (sparse, nested) instead of skipping them.
    """
    if not _is_wrapper_type(type(t)):  # the common case, once per op output
        try:
            return [t.untyped_storage()]
        except (RuntimeError, NotImplementedError, TypeError):
            return []
    found, stack = [], [t]
    while stack:
        obj = stack.pop()
        if _is_wrapper_type(type(obj)):
            attrs, _ = obj.__tensor_flatten__()
            stack.extend(v for v in (getattr(obj, a) for a in attrs) if isinstance(v, torch.Tensor))
            continue
        try:
            found.append(obj.untyped_storage())
        except (RuntimeError, NotImplementedError, TypeError):
            continue
    return found


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs (tensors, nested tuples / lists / dicts):
    ``tree_flatten`` without its per-node registry lookups."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    found, stack = [], [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, (tuple, list)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
    return found


def collect_tensors(obj: Any, _depth: int = 0) -> list[torch.Tensor]:
    """Tensors in a (nested) container or plain object: optimizer state entries, bitsandbytes
    QuantState (absmax, code, nested state2), GaLore projectors (ortho_matrix)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if obj is None or _depth > 4 or isinstance(obj, (str, bytes, int, float, bool, type, torch.dtype)):
        return []
    if isinstance(obj, nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, torch.optim.Optimizer):
        return collect_tensors(list(obj.state.values()), _depth + 1)
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return []
    out: list[torch.Tensor] = []
    for item in items:
        out.extend(collect_tensors(item, _depth + 1))
    return out


class _Rec:
    """One live storage."""

    __slots__ = ("nbytes", "category", "device", "seq", "made_on_host")

    def __init__(self, nbytes: int, category: str, device: str, seq: int):
        self.nbytes, self.category, self.device, self.seq = nbytes, category, device, seq
        self.made_on_host = False  # created inside a ``host_phases`` phase (see MemoryTracker)


class _Peak:
    __slots__ = ("bytes", "breakdown", "seq")

    def __init__(self, nbytes: int, breakdown: dict[str, int], seq: int):
        self.bytes, self.breakdown, self.seq = nbytes, breakdown, seq


class _Frame:
    """One open phase."""

    __slots__ = ("name", "rule", "allocated", "graph")

    def __init__(self, name: str):
        self.name = name
        self.rule = _PHASE_EXIT_RULES.get(name)
        self.allocated: list[tuple[int, _Rec]] = []
        self.graph = False  # an op ran with grad mode on, or autograd saved a tensor


def _release_callback(tracker_ref: weakref.ref, key: int, rec: _Rec):
    """The callback of the weak reference to a counted storage: it runs when the storage is
    freed. A plain ``weakref.ref`` held by the tracker (``_refs``), not ``weakref.finalize``: a
    finalizer's registry and bookkeeping cost about 1 us more per allocation, a few hundred
    thousand of them in a 70B simulation; the callback neither holds the storage nor the tracker."""

    def released(_ref) -> None:
        tracker = tracker_ref()
        if tracker is not None:
            tracker._on_free(key, rec)

    return released


def _unpack(x: torch.Tensor) -> torch.Tensor:
    return x


class MemoryTracker(TorchDispatchMode):
    """Track live storage bytes by category and record peaks (total, by category, per phase).

    Args:
        device: count only storages on this device type ("cuda", "cpu", ...); None counts all.
            Under FakeTensorMode the tensor's fake device is used.
        track_saved_tensors: install the saved-tensors pack hook that labels activations.
        cuda_rounding: round CUDA storages up to 512 bytes as the caching allocator does.
        host_categories, host_phases: what a run keeps in host memory although the tracker sees
            it on one device (a simulation on fake CPU tensors of a GPU run with CPU offload): the
            storages of these categories, and the storages created while one of these phases is
            open (an optimizer step that runs on the host). ``device_peak_bytes`` /
            ``device_peak_breakdown`` are then the peak of everything else, over time -- not the
            overall peak less the host part at that moment, which can be another moment.

    Use::

        tracker = MemoryTracker()
        tracker.register_model(model)
        tracker.register_optimizer(optimizer)
        with tracker:
            with tracker.phase("forward"):
                loss = model(**batch).loss
            with tracker.phase("backward"):
                loss.backward()
            optimizer.step()            # labelled "optimizer" by the step hooks
        tracker.peak_bytes, tracker.peak_breakdown, tracker.summary()
    """

    def __init__(self, device: str | None = None, track_saved_tensors: bool = True, cuda_rounding: bool = True,
                 host_categories: tuple[str, ...] = (), host_phases: tuple[str, ...] = ()):
        super().__init__()
        unknown = set(host_categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown memory categories {sorted(unknown)}; expected some of {CATEGORIES}")
        self._host_categories, self._host_phases = frozenset(host_categories), frozenset(host_phases)
        self._split = bool(self._host_categories or self._host_phases)
        self._host_current = dict.fromkeys(CATEGORIES, 0)
        self._host_total = 0
        self._device_peak = _Peak(0, dict.fromkeys(CATEGORIES, 0), 0)
        self._device_peak_host = 0
        self._device = device
        self._track_saved = track_saved_tensors
        self._cuda_rounding = cuda_rounding
        self._live: dict[int, _Rec] = {}
        self._refs: dict[int, weakref.ref] = {}  # key -> weak reference to the live storage (see _add)
        self._self_ref = weakref.ref(self)
        self._current = dict.fromkeys(CATEGORIES, 0)
        self._total = 0
        self._seq = 0
        self._peak = _Peak(0, dict.fromkeys(CATEGORIES, 0), 0)
        self._phase_peaks: dict[str, _Peak] = {}
        self._frames: list[_Frame] = []
        self._hook_frames: dict[int, _Frame] = {}  # optimizer id -> frame opened by its pre-step hook
        self._grad_params: list[weakref.ref] = []
        self._optimizers: list[weakref.ref] = []
        self._handles: list[Any] = []
        self._depth = 0
        self._fake_on_entry: Any = None
        self._saved_ctx: Any = None
        self._prev_resize: Any = None
        self._recorder: list | None = None  # see record_events()
        self._synthetic = 0

    # ------------------------------------------------------------------ report
    @property
    def peak_bytes(self) -> int:
        return self._peak.bytes

    @property
    def peak_breakdown(self) -> dict[str, int]:
        """Bytes per category at the moment of the peak."""
        return dict(self._peak.breakdown)

    @property
    def device_peak_bytes(self) -> int:
        """Peak of the bytes not in host memory (``host_categories`` / ``host_phases``); without
        them, the peak."""
        return self._device_peak.bytes if self._split else self._peak.bytes

    @property
    def device_peak_breakdown(self) -> dict[str, int]:
        return dict(self._device_peak.breakdown if self._split else self._peak.breakdown)

    @property
    def device_peak_host_bytes(self) -> int:
        """Bytes in host memory at the moment of ``device_peak_bytes``."""
        return self._device_peak_host if self._split else 0

    @property
    def current_bytes(self) -> int:
        return self._total

    @property
    def current_breakdown(self) -> dict[str, int]:
        return dict(self._current)

    @property
    def phase_peaks(self) -> dict[str, dict[str, Any]]:
        """Per phase name: the peak of live bytes while that phase was open, and its breakdown.
        Ops run by the autograd engine count for "backward" even without an explicit phase."""
        return {
            name: {"peak_bytes": pk.bytes, "peak_breakdown": dict(pk.breakdown)}
            for name, pk in self._phase_peaks.items()
        }

    def category_of(self, t: torch.Tensor) -> str | None:
        """Category of the (first) storage behind ``t``, or None when it is not tracked."""
        for st in tensor_storages(t):
            rec = self._live.get(st._cdata)
            if rec is not None:
                return rec.category
        return None

    def summary(self) -> dict[str, Any]:
        """JSON-friendly report (all figures in bytes)."""
        return {
            "device": self._device or "all",
            "peak_bytes": self.peak_bytes,
            "peak_breakdown": self.peak_breakdown,
            "current_bytes": self.current_bytes,
            "current_breakdown": self.current_breakdown,
            "phases": self.phase_peaks,
            "live_storages": len(self._live),
        }

    def report(self) -> str:
        """A small text table of the peak and per-phase peaks."""
        lines = [f"peak {format_bytes(self.peak_bytes)} (current {format_bytes(self.current_bytes)})"]
        width = max(len(c) for c in CATEGORIES)
        for cat in CATEGORIES:
            lines.append(f"  {cat:<{width}}  {format_bytes(self._peak.breakdown[cat]):>12}")
        for name, pk in self._phase_peaks.items():
            lines.append(f"  phase {name}: peak {format_bytes(pk.bytes)}")
        return "\n".join(lines)

    def reset_peak(self) -> None:
        """Start peak tracking afresh from the current live bytes (e.g. to measure step 2 alone)."""
        self._peak = _Peak(self._total, dict(self._current), self._seq)
        self._device_peak, self._device_peak_host = self._device_now(), self._host_total
        self._phase_peaks = {}
        for name in self._active_phase_names():
            self._phase_peaks[name] = _Peak(self._total, dict(self._current), self._seq)

    # ------------------------------------------------------------ registration
    def register(self, obj: Any, category: str) -> None:
        """Count the storages of tensors in ``obj`` (a tensor, module, optimizer or container)
        under ``category``; storages already tracked are moved to ``category``."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown memory category {category!r}; expected one of {CATEGORIES}")
        for t in collect_tensors(obj):
            self._register_tensor(t, category)

    def register_model(self, model: nn.Module) -> None:
        """Frozen parameters, buffers and quantization constants -> weights; parameters with
        requires_grad -> trainable (their gradients will be tagged grads); existing grads -> grads."""
        for p in model.parameters():
            category = "trainable" if p.requires_grad else "weights"
            self._register_tensor(p, category)
            ds_shard = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3 keeps the local partition here
            if isinstance(ds_shard, torch.Tensor):
                self._register_tensor(ds_shard, category)
            for t in collect_tensors(getattr(p, "quant_state", None)):
                self._register_tensor(t, "weights")
            if p.requires_grad:
                self._watch_grad(p)
        for b in model.buffers():
            self._register_tensor(b, "weights")

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Its state now and the state its ``step()`` creates later -> optimizer; its parameters'
        gradients -> grads. Each step is tracked as phase "optimizer"."""
        self._optimizers.append(weakref.ref(optimizer))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if isinstance(p, torch.Tensor) and p.requires_grad:
                    self._watch_grad(p)
        self._tag_optimizer_state(optimizer)
        if self._depth > 0:
            self._hook_optimizer(optimizer)

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[MemoryTracker]:
        """Label a region; per-phase peaks are kept by name. "forward" and "optimizer" also
        decide the category of what they leave alive (see the module docstring)."""
        frame = self._open(name)
        try:
            yield self
        finally:
            self._close(frame)

    def _open(self, name: str) -> _Frame:
        frame = _Frame(name)
        self._frames.append(frame)
        self._update_peaks()
        return frame

    def _close(self, frame: _Frame) -> None:
        if frame in self._frames:
            self._frames.remove(frame)
        if frame.rule is not None:
            category, needs_graph = frame.rule
            if frame.graph or not needs_graph:
                for key, rec in frame.allocated:
                    if self._live.get(key) is rec and rec.category == "temporaries":
                        self._retag(rec, category)
        self._sweep_grads()

    def _active_phase_names(self) -> list[str]:
        names = []
        for frame in self._frames:
            if frame.name not in names:
                names.append(frame.name)
        if "backward" not in names and torch._C._current_graph_task_id() != -1:
            names.append("backward")
        return names

    # ---------------------------------------------------------- context manager
    def __enter__(self) -> MemoryTracker:
        if self._depth == 0:
            self._fake_on_entry = active_fake_mode()
            self._patch_resize()
            if self._track_saved:
                self._saved_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
                self._saved_ctx.__enter__()
            self._install_hooks()
            self._sweep_grads()
            super().__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for frame in self._hook_frames.values():
            self._close(frame)
        self._hook_frames = {}
        if self._saved_ctx is not None:
            self._saved_ctx.__exit__(*exc)
            self._saved_ctx = None
        self._unpatch_resize()
        self._sweep_grads()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is _DEVICE_OP:
            # Fake tensors ask ``prim.device`` for most ops (about 60% of dispatches under
            # FakeTensorMode). It allocates nothing: answer it here as FakeTensorMode's own
            # handler does rather than passing it down the mode stack.
            a = args[0]
            if type(a) is FakeTensor:
                return _fake_device(args)
            return func(*args)
        for t in types:
            if t is not FakeTensor and _is_wrapper_type(t):
                return NotImplemented  # let DTensor / NF4 unwrap; their inner ops come back here
        kwargs = kwargs or {}
        out = call_op(func, args, kwargs)
        if active_fake_mode() is not self._fake_on_entry:
            return out  # e.g. DTensor's shape propagation under its own fake mode
        if torch.is_grad_enabled():
            for frame in self._frames:
                frame.graph = True
        fresh = func is _LIFT_FRESH  # (identity: an OpOverload hashes in Python)
        if func.is_view and not fresh:
            return out  # its output shares an input's storage: never new memory (see below)
        if type(out) is FakeTensor and built_fresh():
            # the memo built this output on a new storage (a functional op's recipe): not tracked
            # yet, and no input's storage -- the general loop below would find exactly that
            st = out.untyped_storage()
            self._add(st, out.device.type, "temporaries")
            return out
        input_keys: set[int] | None = None
        for t in _tensors_in(out):
            for st in tensor_storages(t):
                key = st._cdata
                rec = self._live.get(key)
                if rec is not None:
                    size = self._size(st, rec.device)
                    if size != rec.nbytes:
                        self._resize(rec, size)
                    continue
                if not fresh:
                    if input_keys is None:
                        input_keys = {s._cdata for a in _tensors_in((args, kwargs)) for s in tensor_storages(a)}
                    if key in input_keys:
                        continue  # a view or in-place result of an untracked (pre-existing) tensor
                self._add(st, t.device.type, "temporaries")
        return out

    # --------------------------------------------------------------- record / replay
    @contextlib.contextmanager
    def record_events(self) -> Iterator[list]:
        """Collect the bookkeeping events of the enclosed code: ``("add", key, nbytes,
        category, device)``, ``("free", key)``, and ``("resize",)`` / ``("retag",)`` (which
        :meth:`replay_add` / :meth:`replay_free` cannot repeat). Used by
        ``slimtune.memory.replay`` to repeat a call's allocations without running its ops."""
        outer, self._recorder = self._recorder, []
        try:
            yield self._recorder
        finally:
            events, self._recorder = self._recorder, outer
            if outer is not None:
                outer.extend(events)

    def replay_add(self, nbytes: int, category: str, device: str) -> tuple[int, _Rec] | None:
        """What :meth:`_add` does for a storage of ``nbytes`` (already sized by :meth:`_size`)
        that exists only as a number: same sequence step, same current and peak bookkeeping."""
        if not self._counts(device):
            return None
        self._synthetic -= 1
        key = self._synthetic  # storage keys (``_cdata``) are addresses: never negative
        return key, self._register(key, nbytes, category, device)

    def replay_free(self, entry: tuple[int, _Rec] | None) -> None:
        if entry is not None:
            self._on_free(*entry)

    # --------------------------------------------------------------- internals
    def _size(self, st: torch.UntypedStorage, device: str) -> int:
        n = st.nbytes()
        if device == "cuda" and self._cuda_rounding and n > 0:
            n = math.ceil(n / _CUDA_BLOCK) * _CUDA_BLOCK
        return n

    def _counts(self, device: str) -> bool:
        return self._device is None or device == self._device or device == "meta"

    def _add(self, st: torch.UntypedStorage, device: str, category: str) -> None:
        if not self._counts(device):
            return
        key = st._cdata
        n = self._size(st, device)
        if self._recorder is not None:
            self._recorder.append(("add", key, n, category, device))
        rec = self._register(key, n, category, device)
        # replaces the reference of a storage this key counted before (its rec is then no longer live)
        self._refs[key] = weakref.ref(st, _release_callback(self._self_ref, key, rec))

    def _register(self, key: int, nbytes: int, category: str, device: str) -> _Rec:
        """Count ``nbytes`` live under ``key`` (a real storage or a replayed one)."""
        self._seq += 1
        rec = _Rec(nbytes, category, device, self._seq)
        if self._split:
            rec.made_on_host = any(frame.name in self._host_phases for frame in self._frames)
            if self._on_host(rec):
                self._count_host(category, nbytes)
        self._live[key] = rec
        self._current[category] += nbytes
        self._total += nbytes
        for frame in self._frames:
            if frame.rule is not None:
                frame.allocated.append((key, rec))
        self._update_peaks()
        return rec

    def _on_free(self, key: int, rec: _Rec) -> None:
        if self._live.get(key) is not rec:
            return
        del self._live[key]
        self._refs.pop(key, None)
        self._seq += 1
        if self._split and self._on_host(rec):
            self._count_host(rec.category, -rec.nbytes)
        self._current[rec.category] -= rec.nbytes
        self._total -= rec.nbytes
        if self._recorder is not None:
            self._recorder.append(("free", key))

    def _resize(self, rec: _Rec, size: int) -> None:
        if self._recorder is not None:
            self._recorder.append(("resize",))
        delta = size - rec.nbytes
        if self._split and self._on_host(rec):
            self._count_host(rec.category, delta)
        rec.nbytes = size
        self._seq += 1
        self._current[rec.category] += delta
        self._total += delta
        if delta > 0:
            self._update_peaks()

    def _retag(self, rec: _Rec, category: str) -> None:
        old = rec.category
        if old == category:
            return
        if self._recorder is not None:
            self._recorder.append(("retag",))
        self._current[old] -= rec.nbytes
        self._current[category] += rec.nbytes
        # Re-attribute the recorded peaks this storage was alive for (it is alive now and was
        # created at rec.seq, so it was alive at any peak recorded since; the device peak only
        # where it was not in host memory, which it was since its creation or never).
        was_host = self._split and self._on_host(rec)
        peaks = (self._peak, *self._phase_peaks.values(), *(() if was_host else (self._device_peak,)))
        for pk in peaks:
            if rec.seq <= pk.seq:
                moved = min(rec.nbytes, pk.breakdown[old])
                pk.breakdown[old] -= moved
                pk.breakdown[category] += moved
        if was_host:
            self._count_host(old, -rec.nbytes)
        rec.category = category
        if self._split and self._on_host(rec):
            self._count_host(category, rec.nbytes)
        elif was_host:
            self._update_peaks()  # back from the host: on the device from now on

    def _on_host(self, rec: _Rec) -> bool:
        return rec.made_on_host or rec.category in self._host_categories

    def _count_host(self, category: str, nbytes: int) -> None:
        """Add ``nbytes`` (negative: take them out) to the host part of ``category``."""
        self._host_current[category] += nbytes
        self._host_total += nbytes

    def _device_now(self) -> _Peak:
        host = self._host_current
        return _Peak(self._total - self._host_total, {c: n - host[c] for c, n in self._current.items()}, self._seq)

    def _update_peaks(self) -> None:
        total = self._total
        if total > self._peak.bytes:
            self._peak = _Peak(total, dict(self._current), self._seq)
        if self._split and total - self._host_total > self._device_peak.bytes:
            self._device_peak, self._device_peak_host = self._device_now(), self._host_total
        if self._frames or torch._C._current_graph_task_id() != -1:
            for name in self._active_phase_names():
                pk = self._phase_peaks.get(name)
                if pk is None or total > pk.bytes:
                    self._phase_peaks[name] = _Peak(total, dict(self._current), self._seq)

    def _register_tensor(self, t: torch.Tensor, category: str) -> None:
        for st in tensor_storages(t):
            rec = self._live.get(st._cdata)
            if rec is not None:
                self._retag(rec, category)
            else:
                self._add(st, t.device.type, category)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A saved tensor is an activation unless it is (a view of) a parameter. Return a
        # detached alias: returning ``t`` itself would make saved outputs reference their own
        # grad_fn, a cycle that only the garbage collector frees.
        for frame in self._frames:
            frame.graph = True
        base = t._base if t._base is not None else t
        if not (isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)):
            if active_fake_mode() is self._fake_on_entry:
                for st in tensor_storages(t):
                    rec = self._live.get(st._cdata)
                    if rec is None:
                        self._add(st, t.device.type, "activations")  # e.g. an input batch made before entry
                    elif rec.category == "temporaries":
                        self._retag(rec, "activations")
        return t.detach()

    def _watch_grad(self, p: torch.Tensor) -> None:
        if any(ref() is p for ref in self._grad_params):
            return
        self._grad_params.append(weakref.ref(p))
        if p.grad is not None:
            self._register_tensor(p.grad, "grads")
        if self._depth > 0:
            self._hook_grad(p)

    def _hook_grad(self, p: torch.Tensor) -> None:
        if p.is_leaf and p.requires_grad:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._register_tensor(p.grad, "grads")

    def _sweep_grads(self) -> None:
        alive = []
        for ref in self._grad_params:
            p = ref()
            if p is None:
                continue
            alive.append(ref)
            if p.grad is not None:
                self._register_tensor(p.grad, "grads")
        self._grad_params = alive

    def _hook_optimizer(self, opt: torch.optim.Optimizer) -> None:
        self._handles.append(opt.register_step_pre_hook(self._on_step_pre))
        self._handles.append(opt.register_step_post_hook(self._on_step_post))

    def _on_step_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._sweep_grads()
        self._hook_frames[id(opt)] = self._open("optimizer")

    def _on_step_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        frame = self._hook_frames.pop(id(opt), None)
        if frame is not None:
            self._close(frame)
        self._tag_optimizer_state(opt)

    def _tag_optimizer_state(self, opt: torch.optim.Optimizer) -> None:
        for t in collect_tensors(list(opt.state.values())):
            self._register_tensor(t, "optimizer")

    def _install_hooks(self) -> None:
        for ref in self._grad_params:
            p = ref()
            if p is not None:
                self._hook_grad(p)
        alive = []
        for ref in self._optimizers:
            opt = ref()
            if opt is not None:
                alive.append(ref)
                self._hook_optimizer(opt)
        self._optimizers = alive

    def _patch_resize(self) -> None:
        # ``UntypedStorage.resize_`` (how FSDP2 frees and re-allocates unsharded parameters)
        # does not pass through TorchDispatchMode, so it is wrapped while the tracker is active.
        prev = torch.UntypedStorage.resize_
        tracker_ref = weakref.ref(self)

        @functools.wraps(prev)
        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = prev(st, size)
            tracker = tracker_ref()
            if tracker is not None and tracker._depth > 0:
                tracker._on_storage_resize(st)
            return out

        self._prev_resize = prev
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]

    def _unpatch_resize(self) -> None:
        if self._prev_resize is not None:
            torch.UntypedStorage.resize_ = self._prev_resize  # type: ignore[method-assign]
            self._prev_resize = None

    def _on_storage_resize(self, st: torch.UntypedStorage) -> None:
        rec = self._live.get(st._cdata)
        if rec is not None:
            size = self._size(st, rec.device)
            if size != rec.nbytes:
                self._resize(rec, size)
        elif st.nbytes() > 0:
            self._add(st, st.device.type, "temporaries")
