"""Repeat a pure tensor function's allocations without running its ops, for long fake-tensor
runs (``slimtune plan --simulate``: torchao's NF4 dequantization runs 9 times per linear per
optimizer step -- forward, checkpoint recompute and backward of 3 micro-batches -- 20-odd fake
ops each, a quarter of a 70B FSDP2 simulation).

:func:`replay_pure_calls` wraps a method whose output and allocations depend only on the
shapes, strides, dtypes and devices of its tensor inputs (a key function says which). The
first call with a key runs for real while the active :class:`MemoryTracker` records its
bookkeeping events (each allocation's size, category and device, each release, in order).
Later calls with that key repeat those events on the tracker (:meth:`MemoryTracker.replay_add`
/ :meth:`~MemoryTracker.replay_free`: the same sequence steps, current bytes and peaks) and
create only the returned tensor, with one ``empty_strided`` at the point of the trace where
the real call allocated it. So the tracker's state after the call -- live bytes by category,
total and phase peaks and their breakdowns -- is the one the real ops give.

A call is run for real (and not recorded) when grad mode is on (the tracker marks phases that
build a graph) or outside a fake mode. Without a tracker of the current fake mode (the
untracked first micro-batch) a repeated call only creates its output: nothing is counted there
either way. A call whose trace has something a replay cannot repeat (a resize, a category
change, a release of a storage the call did not create, an output that is not one whole fresh
storage) is not kept, and the next call with that key is recorded again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from slimtune.memory.tracker import MemoryTracker, active_fake_mode

__all__ = ["replay_pure_calls"]

_UNREPLAYABLE = object()  # a trace that cannot be repeated


def _active_tracker() -> MemoryTracker | None:
    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, MemoryTracker):
            return mode
    return None


def _trace(events: list, out: torch.Tensor):
    """The events as replay steps, or _UNREPLAYABLE. Steps: ("add", local index, nbytes,
    category, device), ("out",) where the output's storage was allocated, ("free", index)."""
    st = out.untyped_storage()
    if out.storage_offset() != 0 or not out.is_contiguous() or st.nbytes() != out.numel() * out.element_size():
        return _UNREPLAYABLE
    # Storage keys are addresses, so a storage freed inside the call can hand its key to a later
    # one -- the output's among them: the output is the one allocation still alive at the end.
    local, steps = {}, []
    for ev in events:
        if ev[0] == "add":
            _, key, n, category, device = ev
            local[key] = index = len(steps)  # unique: the step's own position
            steps.append(("add", index, n, category, device))
        elif ev[0] == "free" and ev[1] in local:
            steps.append(("free", local.pop(ev[1])))
        else:  # resize, retag, or the release of a storage from outside the call
            return _UNREPLAYABLE
    if list(local) != [st._cdata]:
        return _UNREPLAYABLE  # something else the call allocated outlives it, or the output was not new
    index = local[st._cdata]
    if steps[index][3] != "temporaries":
        return _UNREPLAYABLE
    steps[index] = ("out",)
    return steps


def _make_output(like: tuple):
    shape, stride, dtype, device = like
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


@contextlib.contextmanager
def replay_pure_calls(owner: type, name: str, key: Callable) -> Iterator[dict]:
    """While active, ``owner.name`` (a method) is recorded once per ``key(self)`` and replayed
    afterwards (see module doc). Yields the trace table (key -> steps), for tests."""
    real = getattr(owner, name)
    traces: dict = {}

    def wrapper(self, *args, **kwargs):
        tracker = _active_tracker()
        fake = active_fake_mode()
        if args or kwargs or torch.is_grad_enabled() or fake is None:
            return real(self, *args, **kwargs)
        k = (key(self), tracker is not None and tracker._fake_on_entry is fake)
        entry = traces.get(k)
        if entry is None:
            if k[1]:
                with tracker.record_events() as events:
                    out = real(self)
                steps = _trace(events, out)
            else:
                out = real(self)
                steps = ()  # untracked: only the output is made
            if steps is not _UNREPLAYABLE:  # else: recorded again next time (an outside release, say)
                traces[k] = (steps, (tuple(out.shape), out.stride(), out.dtype, out.device))
            return out
        steps, like = entry
        if not k[1]:
            return _make_output(like)
        live: dict = {}
        out = None
        for step in steps:
            if step[0] == "add":
                live[step[1]] = tracker.replay_add(step[2], step[3], step[4])
            elif step[0] == "free":
                tracker.replay_free(live.pop(step[1]))
            else:
                out = _make_output(like)
        return out

    setattr(owner, name, wrapper)
    try:
        yield traces
    finally:
        setattr(owner, name, real)
