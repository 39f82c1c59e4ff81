"""Interpreter-level speed-ups of ``slimtune plan --simulate``: overheads of Python, torch and
the garbage collector that nothing the tracker counts depends on (split out of
``plan.simulate``, which enters them; tests/unit/test_simulate_speed.py checks that a simulation
is byte-identical with and without them)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock


def _plain_tracker_dispatch():
    """``MemoryTracker.__torch_dispatch__`` without the ``torch._disable_dynamo`` wrapper that
    ``TorchDispatchMode`` puts around every subclass's dispatch (so that a compiled region never
    traces into it). Nothing is compiled while simulating (every tensor is fake; bitsandbytes'
    compiled CPU kernels never run), and the wrapper -- two Python frames and four eval-frame
    calls -- ran for each of the ~1M dispatches of a 70B simulation, about 4% of it. Real runs
    keep the wrapper: the patch lasts for the simulation only.

    Each op (other than ``prim.device``) is handled with subclass ``__torch_function__`` off
    (``DisableTorchFunctionSubclass``): at the dispatch level no ``__torch_function__`` has
    anything left to do, but every tensor attribute the tracker and the memo read (``dtype``,
    ``shape``, ``stride()``, ``untyped_storage()``...) first asks whether the tensor's class
    overrides it -- for a ``FakeTensor`` (which does not) that question cost 2-3x the read. A
    wrapper subclass (DTensor, NF4) is sent back to its own ``__torch_dispatch__`` as before, and
    a memo miss runs ``FakeTensorMode`` on plain fakes, whose ``__torch_function__`` is torch's
    disabled one either way. Per op this saved about 1-2 us of 14-34 (tracker or untracked mode
    with the memo; minimum of 15 alternating runs of each, in ad-hoc micro-benchmarks of mul,
    detach and view that are not in the repository) -- a few percent of a simulation."""
    import torch

    from slimtune.memory import MemoryTracker

    wrapped = MemoryTracker.__dict__["__torch_dispatch__"]
    plain = getattr(wrapped, "__wrapped__", wrapped)
    no_subclass_tf = torch._C.DisableTorchFunctionSubclass

    device_op = torch.ops.prim.device.default

    def dispatch(self, func, types, args=(), kwargs=None):
        if func is device_op:  # answered at once (no tensor attribute read): no context needed
            return plain(self, func, types, args, kwargs)
        with no_subclass_tf():
            return plain(self, func, types, args, kwargs)

    return mock.patch.object(MemoryTracker, "__torch_dispatch__", dispatch)


class _PositionalBinding:
    """What ``Signature.bind(*args).apply_defaults()`` gives for a signature of positional
    parameters without defaults called with exactly those (or of ``*args`` alone): ``args`` as
    given, no keywords."""

    __slots__ = ("args",)
    kwargs: dict = {}

    def __init__(self, args: tuple) -> None:
        self.args = args

    def apply_defaults(self) -> None:
        return None


class _FastSignature:
    """A function's ``inspect.Signature`` whose ``bind`` answers the plain positional case itself
    (DeepSpeed's Functions: ``forward(outputs)``, ``forward(ctx, *args)``...) and hands every
    other call to the real ``bind``."""

    def __init__(self, sig) -> None:
        import inspect

        params = list(sig.parameters.values())
        plain = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY
        self._sig = sig
        self._star = [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL]
        self._n = len(params) if all(p.kind in plain and p.default is p.empty for p in params) else -1

    def bind(self, *args, **kwargs):
        if not kwargs and (self._star or len(args) == self._n):
            return _PositionalBinding(args)
        return self._sig.bind(*args, **kwargs)


class _CachedSignatures:
    """``inspect`` for ``torch.autograd.function``: ``signature`` memoized per function, with the
    plain positional ``bind`` answered directly (see :func:`_cached_torch_lookups`); every other
    attribute is the module's own."""

    def __init__(self, real) -> None:
        import functools

        self._real = real
        self.signature = functools.lru_cache(maxsize=None)(lambda fn: _FastSignature(real.signature(fn)))

    def __getattr__(self, name):
        return getattr(self._real, name)


def _cached_torch_lookups() -> list:
    """Two of torch's per-call look-ups answered from a memo while simulating, with the same
    answers (nothing registers dispatch rules or redefines a function during a simulation):

    * ``simple_registry.find_torch_dispatch_rule(op, type)``, which the dispatcher asks for every
      op that reaches a Python mode or subclass (a string property and two dict look-ups each);
    * ``inspect.signature`` of an autograd Function's ``forward``, which ``Function.apply``
      recomputes on every call of a Function with ``setup_context`` -- DeepSpeed applies two such
      Functions to every module's output in every pass, a few percent of a ZeRO-3 simulation.
      A ``Signature`` is immutable, so one per function serves every call."""
    import inspect

    import torch._library.simple_registry as registry
    import torch.autograd.function as function

    original = registry.find_torch_dispatch_rule
    rules: dict = {}
    # torch's C++ keeps the function it first finds under this name: when a process's first Python
    # dispatch happens inside a simulation, ``find_rule`` stays in use after it, and must then
    # answer as torch does (rules registered later included)
    simulating = [False]

    @contextlib.contextmanager
    def while_simulating():
        simulating[0] = True
        try:
            yield
        finally:
            simulating[0] = False

    def find_rule(op, cls):
        if not simulating[0]:
            return original(op, cls)
        key = (id(op), id(cls))  # ids, not the ops: an OpOverload hashes in Python
        hit = rules.get(key)
        if hit is None:
            hit = rules[key] = (op, cls, original(op, cls))  # op and cls held: their ids stay theirs
        return hit[2]

    return [while_simulating(), mock.patch.object(registry, "find_torch_dispatch_rule", find_rule),
            mock.patch.object(function, "inspect", _CachedSignatures(inspect))]


@contextlib.contextmanager
def _no_full_collections() -> Iterator[None]:
    """No automatic full (oldest-generation) garbage collection while simulating, and for the whole
    ``slimtune plan`` command (``plan.cli.run``: its imports and the build made six more, about 1 s
    of a ZeRO-3 recipe). Each one walks every object of the 70B build -- modules, hooks, engine
    state, fake tensors -- about 0.3 s, eight of them in a ZeRO-3 recipe; the young generations,
    where the simulation's short-lived cycles die, are collected as before. Peaks, breakdowns and
    phases of every 70B recipe were compared with and without: byte-identical (docs/planner.md)."""
    import gc

    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)
