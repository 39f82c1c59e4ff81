"""A per-op memo of fake-tensor outputs, for long fake-tensor runs (``slimtune plan --simulate``
of a 70B model: a few hundred thousand fake ops, most of them the same op on tensors of the same
layout, layer after layer).

``FakeTensorMode`` already caches an op's output metadata, but a cache hit still goes through the
whole mode (its dispatch, cache-key validation, and a general ``FakeTensor`` constructor): about
half the time of a 70B simulation. Its key also holds every input's storage offset and size, so
DeepSpeed's flat-buffer slices (every parameter at its own offset) miss on every call.

:func:`fast_fake_ops` memoizes ops the tracker and the untracked first micro-batch dispatch, one
level above the fake mode: the first call of an op with a given key runs through
``FakeTensorMode`` as before, and what it returned is recorded; later calls with that key build
the same outputs directly. Which ops, and what a key holds:

* ``aten`` / ``prims`` ops, and ``bitsandbytes`` ops (their fake kernels read shapes only), whose
  output metadata depends on the inputs' metadata only: not tagged ``dynamic_output_shape``,
  ``data_dependent_output`` or ``inplace_view``, not ``set_`` / ``resize_`` / ``lift_fresh`` /
  ``_local_scalar_dense``, no ``out=`` arguments.
* Functional ops (no alias in their schema): each output must be a new storage of exactly its
  ``empty_strided`` size at offset 0 (what ``FakeTensorMode``'s own cache hits build); the key
  holds each input's dtype, shape, strides, fake device, requires_grad and conj/neg/inference
  flags -- not its storage offset or size, which a functional op's output cannot depend on.
* Foreach ops (``_foreach_*``), in place or returning new tensors: per element, each element's
  layout keyed on its own; the fake mode runs once with one element of each layout not seen yet.
* In-place ops on their first argument (``add_``, ``copy_``, ``uniform_``...): the output is
  that argument, as ``FakeTensorMode`` returns it.
* ``out=`` ops: the output is the ``out`` argument, memoized only where the recorded call did not
  resize it (the key holds its layout but not its storage offset: ``out`` is resized only when
  its shape differs from the result's, which the inputs' layouts set).
* View ops (and ``_unsafe_view``, whose schema says otherwise): the output shares the aliased
  input's storage. For the views in ``_RELATIVE_VIEWS`` the output's offset is the input's plus a
  constant of the key (recorded); for other views the key also holds the inputs' storage offsets
  and sizes. A view's first call with a key runs its meta kernel directly (:meth:`_Memo._view`).
* ``c10d`` collectives (fake process group) on fakes of the mode: their kernel runs directly under
  the mode's kernel invocation, as the mode itself would run it (they return their input tensors
  and a completed Work), without the mode's per-call argument checks.
* A ``torch.Generator`` argument (LoRA's seeded init, ``kaiming_uniform_(generator=...)``) is keyed
  by its device: a random op's output metadata never depends on the generator's state, and a fake
  op draws nothing from it.
* Only while ``fake_mode`` is the active fake mode (a factory op has no fake input to tell).
* Any other argument (a ``FakeTensor`` of another mode or with a constant, a real tensor, a
  wrapper subclass, a symbolic size, a process group) sends the call to the fake
  mode unmemoized. An op whose recorded output does not fit its kind (a functional output that
  aliases an input or is not a fresh dense storage, a view of something else) is never memoized.

A memoized output is the same tensor a cache hit gives: ``torch.empty_strided`` on the meta
device (``set_`` onto the input's storage for a view), wrapped as a ``FakeTensor`` with the
attributes ``FakeTensor.__new__`` gave the recorded output. tests/unit/test_simulate_speed.py
checks outputs op by op and whole simulations byte for byte against runs without it. Written
here because torch has no switch for a cheaper fake-tensor cache hit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

__all__ = ["also_memoize", "built_fresh", "call_op", "fast_fake_ops"]

_FUNCTIONAL, _INPLACE, _OUT, _VIEW, _COLLECTIVE = "functional", "inplace", "out", "view", "collective"
_VOID = "void"
_NAMESPACES = frozenset({"aten", "prims", "bitsandbytes", "fsdp"})
_SKIP_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output, torch.Tag.inplace_view)
_SKIP_NAMES = frozenset({"set_", "resize_", "resize_as_", "_resize_output_", "lift_fresh", "lift_fresh_copy",
                         "_local_scalar_dense", "item", "as_strided_", "record_stream"})
# views whose output offset is the (first) input's offset plus something set by shapes, strides and
# arguments alone (not ``as_strided``: its offset argument is absolute)
_RELATIVE_VIEWS = frozenset({"view", "_unsafe_view", "slice", "select", "narrow", "unsqueeze", "squeeze",
                             "transpose", "t", "permute", "expand", "alias", "detach", "split",
                             "split_with_sizes", "unbind", "_reshape_alias"})
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format})
_GENERATOR = torch.Generator
_STRIDED = torch.strided
_META = torch.device("meta")
_FAKE_SLOT = torch._C._TorchDispatchModeKey.FAKE
_UNKEYED = object()  # an argument the memo does not key: the call goes to the fake mode

_ACTIVE: list = [None]  # the memo in use (one per simulation)
_ALSO: dict = {}  # id(mode) -> mode: further fake modes whose ops the memo in use answers (also_memoize)


def _kind(func) -> str | None:
    """The op's memo kind, or None where it is not memoized."""
    if not isinstance(func, torch._ops.OpOverload):
        return None
    if func.namespace == "c10d":
        returns = func._schema.returns
        return _COLLECTIVE if returns and "Work" in str(returns[-1].type) else None
    if func.namespace not in _NAMESPACES:
        return None
    if any(tag in func.tags for tag in _SKIP_TAGS) or func._opname in _SKIP_NAMES:
        return None
    schema = func._schema
    if func is torch.ops.aten._unsafe_view.default:
        return _VIEW  # its schema says a new tensor, but its output shares the input's storage
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if written and not schema.returns:  # writes its tensor (list) arguments, returns nothing
        tensor_like = (torch.TensorType.get(), torch.ListType(torch.TensorType.get()))
        return _VOID if all(a.type in tensor_like for a in written) else None
    if written:
        ret = schema.returns
        if len(written) != 1 or len(ret) != 1 or ret[0].alias_info is None or not ret[0].alias_info.is_write \
                or not isinstance(written[0].type, torch.TensorType):
            return None
        if written[0] is schema.arguments[0] and not written[0].kwarg_only:
            return _INPLACE
        if written[0].kwarg_only and written[0].name == "out":
            return _OUT
        return None
    if any(r.alias_info is not None for r in schema.returns):
        return _VIEW
    return _FUNCTIONAL


def _layout(t) -> tuple:
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes(), t.dtype)


def _layouts(values) -> list:
    """:func:`_layout` of every tensor in nested lists / tuples / dict values, in order."""
    out, stack = [], [values]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            out.append(_layout(v))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
    return out


class _Memo:
    def __init__(self, fake_mode) -> None:
        self.mode = fake_mode
        # keyed by id(func), not func: an OpOverload hashes in Python (a call per look-up); the
        # entry holds the op, so its id stays its own
        self.kinds: dict = {}  # id(func) -> (kind | None, relative view?, func)
        self.outputs: dict = {}  # (id(func), key) -> recipe | None (not memoizable)
        self.hits = 0
        self.misses = 0
        self.others: dict = {}  # id(mode) -> _Memo of a mode registered by :func:`also_memoize`
        # the last call's output was built here from a functional recipe: new storages that no
        # input shares and nothing tracks yet (:func:`built_fresh`)
        self.fresh = False

    # ---------------------------------------------------------------- keys
    def _key(self, kind, relative, args, kwargs):
        parts: list = []
        offsets = kind is _VIEW and not relative
        if self._walk(args, parts, offsets) is _UNKEYED:
            return _UNKEYED
        if kwargs:
            for name, value in kwargs.items():
                parts.append(name)
                if self._walk((value,), parts, offsets) is _UNKEYED:
                    return _UNKEYED
        return tuple(parts)

    def _walk(self, values, parts: list, with_offsets: bool):
        mode = self.mode
        for v in values:
            tv = type(v)
            if tv is FakeTensor:
                if v.fake_mode is not mode or v.constant is not None or v.layout is not _STRIDED \
                        or v._has_symbolic_sizes_strides:
                    return _UNKEYED
                # ``_fake_device``: what the ``fake_device`` property returns, without its call
                entry = (v.dtype, tuple(v.shape), v.stride(), v._fake_device, v.requires_grad, v.is_conj(),
                         v.is_neg(), v.is_inference())
                if with_offsets:
                    entry += (v.storage_offset(), v.untyped_storage().nbytes())
                parts.append(entry)
            elif tv in _PLAIN:
                parts.append((tv, v))
            elif tv is _GENERATOR:  # outputs' metadata never depends on its state (a random op's values do)
                parts.append((tv, v.device))
            elif tv is list or tv is tuple:
                parts.append((tv, len(v)))
                if self._walk(v, parts, with_offsets) is _UNKEYED:
                    return _UNKEYED
            else:
                return _UNKEYED
        return None

    # ---------------------------------------------------------------- recording
    def _record(self, kind, relative, args, kwargs, out, layout_before):
        """The recipe that rebuilds ``out`` for another call with the same key, or None."""
        if kind is _VOID:  # kept only where no tensor argument changed its layout
            return (_VOID,) if out is None and layout_before == _layouts((args, kwargs)) else None
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else out
        if not isinstance(outs, (tuple, list)) or not outs:
            return None
        if kind is _INPLACE:
            return (_INPLACE,) if single and out is args[0] else None
        if kind is _OUT:  # kept only where the call did not resize ``out`` (the key holds its layout)
            dest = kwargs["out"]
            return (_OUT,) if single and out is dest and layout_before == _layout(dest) else None
        source = args[0] if args and type(args[0]) is FakeTensor else None
        inputs = set()
        if kind is _FUNCTIONAL:
            stack = [args]
            while stack:
                for a in stack.pop():
                    if isinstance(a, torch.Tensor):
                        inputs.add(a.untyped_storage()._cdata)
                    elif isinstance(a, (list, tuple)):
                        stack.append(a)
        items = []
        for t in outs:
            if type(t) is not FakeTensor or t.fake_mode is not self.mode or t.constant is not None \
                    or t.layout is not _STRIDED or t._has_symbolic_sizes_strides:
                return None
            st = t.untyped_storage()
            shape, stride = tuple(t.shape), t.stride()
            if kind is _FUNCTIONAL:
                size = torch._prims_common.compute_required_storage_length(shape, stride, 0) * t.element_size()
                if st._cdata in inputs or t.storage_offset() != 0 or st.nbytes() != size:
                    return None
                inputs.add(st._cdata)  # two outputs on one storage: not memoized either
                offset = 0
            else:  # a view of the first argument
                if source is None or st._cdata != source.untyped_storage()._cdata:
                    return None
                offset = t.storage_offset() - source.storage_offset() if relative else t.storage_offset()
            # a view with the source's own layout (detach, alias, a same-shape view...): the key fixes
            # the source's layout, so every later call's output has it too
            alias = kind is _VIEW and shape == tuple(source.shape) and stride == source.stride() \
                and t.dtype == source.dtype and t.is_conj() == source.is_conj() and t.is_neg() == source.is_neg() \
                and t.storage_offset() == source.storage_offset() and t.fake_device == source.fake_device
            items.append((shape, stride, t.dtype, t.requires_grad, t.is_conj(), t.is_neg(), offset,
                          t.fake_device, dict(t.__dict__), alias))
        return (kind, single, tuple(items), relative)

    # ---------------------------------------------------------------- building
    def _build(self, recipe, args, kwargs):
        kind = recipe[0]
        if kind is _VOID:
            return None
        if kind is _INPLACE:
            return args[0]
        if kind is _OUT:
            return kwargs["out"]
        _, single, items, relative = recipe
        source = args[0] if kind is _VIEW else None
        mark = torch._C._set_warn_deprecated_on_mutable_data_ptr if self.mode._allow_unsafe_data_ptr_access \
            else torch._C._set_throw_on_mutable_data_ptr
        make, empty = torch.Tensor._make_subclass, torch.empty_strided
        outs = []
        with torch._C._DisableTorchDispatch():
            for shape, stride, dtype, requires_grad, conj, neg, offset, device, attrs, alias in items:
                if alias:
                    # ``_make_subclass`` detaches what it is given (a shallow copy: the source's
                    # storage, sizes, strides and offset): the view itself, in one call
                    elem = source
                else:
                    elem = empty(shape, stride, dtype=dtype, device=_META)  # requires_grad: set by make
                    if conj:
                        torch._C._set_conj(elem, True)
                    if neg:
                        torch._C._set_neg(elem, True)
                    if source is not None:
                        start = source.storage_offset() + offset if relative else offset
                        elem.set_(source.untyped_storage(), start, shape, stride)
                t = make(FakeTensor, elem, requires_grad, dispatch_device=True, device_for_backend_keys=device)
                mark(t)
                t.__dict__.update(attrs)
                outs.append(t)
        return outs[0] if single else tuple(outs)

    def _view(self, func, args, kwargs):
        """A view op's first call with its key, made as ``FakeTensorMode`` makes a view: the op's meta
        kernel under the mode's kernel invocation, each output wrapped by ``FakeTensor``'s constructor
        on the input's fake device -- without the mode's dispatch, device checks and cache. A view
        keyed with integer arguments (DeepSpeed's ``narrow`` of a flat buffer at every parameter's
        offset, once per parameter) misses the memo every time; through the mode, such a call
        took about 1 ms."""
        source = args[0] if args and type(args[0]) is FakeTensor else None
        if source is None:
            return func(*args, **kwargs)
        with in_kernel_invocation_manager(self.mode):
            raw = func(*args, **kwargs)
        with torch._C._DisableTorchDispatch():
            if isinstance(raw, torch.Tensor):
                return FakeTensor(self.mode, raw, source.fake_device)
            return type(raw)(FakeTensor(self.mode, r, source.fake_device) for r in raw)

    def _elements(self, func, kind, args, kwargs, empty):
        """A foreach call's per-element keys: ``(lists, known, sigs, new)`` -- the positions of its
        per-element list arguments; this memo's entry for the op and its other arguments (``empty()``
        the first time); each element's layout; one element index per layout the entry lacks --
        or None where the call cannot be keyed (it then goes to the fake mode whole)."""
        lists = [i for i, a in enumerate(args) if type(a) is list or type(a) is tuple]
        if kwargs or not lists or len({len(args[i]) for i in lists}) != 1:
            return None
        shared: list = []
        if self._walk([a for i, a in enumerate(args) if i not in lists], shared, False) is _UNKEYED:
            return None
        key = (id(func), kind, tuple(shared))
        known = self.outputs.get(key)
        if known is None:
            known = self.outputs[key] = empty()
        sigs, new = [], {}  # each element's layout; new layout -> index of one element with it
        for j in range(len(args[lists[0]])):
            parts: list = []
            if self._walk([args[i][j] for i in lists], parts, False) is _UNKEYED:
                return None
            sig = tuple(parts)
            sigs.append(sig)
            if sig not in known and sig not in new:
                new[sig] = j
        return lists, known, sigs, new

    def _foreach_void(self, func, args, kwargs):
        """An in-place foreach op (``_foreach_addcmul_``...: nothing returned, nothing allocated) on
        fakes: what ``FakeTensorMode`` does with it is check each element on its own (each
        ``self[i]`` with ``tensor1[i]``, ``scalars[i]``... through the elementwise meta function, about
        0.5 ms per element). Elements are checked once per distinct layout: the call goes to the
        fake mode with only the elements whose layout this memo has not seen, one of each. DTensor's
        sharding propagation runs such ops over all of a model's LoRA tensors (1120 for 70B) once
        per optimizer step kind; they have about a dozen distinct layouts."""
        keyed = self._elements(func, _VOID, args, kwargs, set)
        if keyed is None:
            return func(*args, **kwargs)
        lists, seen, _, new = keyed
        if new:
            picked = list(new.values())
            sub = [[a[j] for j in picked] if i in lists else a for i, a in enumerate(args)]
            before = _layouts(sub)
            out = func(*sub)
            self.misses += 1
            if out is not None or _layouts(sub) != before:
                return func(*args, **kwargs)  # not the op this path assumes: run it whole
            seen.update(new)
        else:
            self.hits += 1
        return None

    def _foreach_functional(self, func, args, kwargs):
        """A functional foreach op (``_foreach_sqrt``, ``_foreach_norm``...: one new tensor per
        element, each computed from that element alone) on fakes: each output is built from a
        recipe of its element's layout. The fake mode checks and computes every element on its own
        (about 0.5 ms each); here it runs once per layout this memo has not seen, with one element
        of each, and those outputs give the recipes. Adam's and the gradient clipping's foreach ops
        over a 70B model's 1120 LoRA tensors have about a dozen layouts."""
        keyed = self._elements(func, _FUNCTIONAL, args, kwargs, dict)
        if keyed is None:
            return func(*args, **kwargs)
        lists, recipes, sigs, new = keyed
        if new:
            picked = list(new.values())
            out = func(*[[a[j] for j in picked] if i in lists else a for i, a in enumerate(args)])
            self.misses += 1
            if type(out) is not list or len(out) != len(picked):
                return func(*args, **kwargs)  # not the op this path assumes: run it whole
            found = {}
            for (sig, j), o in zip(new.items(), out):
                recipe = self._record(_FUNCTIONAL, False, [args[i][j] for i in lists], {}, o, None)
                if recipe is None:
                    return func(*args, **kwargs)  # e.g. an output aliasing its element: run it whole
                found[sig] = recipe
            recipes.update(found)
        else:
            self.hits += 1
        return [self._build(recipes[sig], (), {}) for sig in sigs]

    # ---------------------------------------------------------------- collectives
    def _fakes_of_mode(self, values) -> bool | None:
        """True when every tensor in ``values`` is a plain fake of this mode; None otherwise."""
        for v in values:
            tv = type(v)
            if tv is FakeTensor:
                if v.fake_mode is not self.mode or v.constant is not None:
                    return None
            elif tv is list or tv is tuple:
                if self._fakes_of_mode(v) is None:
                    return None
            elif isinstance(v, torch.Tensor):
                return None
        return True

    def _collective(self, func, args, kwargs):
        """A ``c10d`` collective on fakes of this mode: its meta kernel under the fake mode's kernel
        invocation, as ``FakeTensorMode`` runs it (the fake process group's kernels return their
        input tensors and a completed Work; nothing is allocated), without the mode's per-call
        checks and cache-key work. Anything else goes through the fake mode."""
        if self._fakes_of_mode(args) is None or self._fakes_of_mode(kwargs.values()) is None:
            return func(*args, **kwargs)
        with in_kernel_invocation_manager(self.mode):
            out = func(*args, **kwargs)
        if self._fakes_of_mode(out if isinstance(out, (list, tuple)) else (out,)) is None:
            raise RuntimeError(f"{func} returned a tensor that is not a fake of the simulation's mode")
        self.hits += 1
        return out

    # ---------------------------------------------------------------- call
    def __call__(self, func, args, kwargs):
        self.fresh = False
        mode = torch._C._get_dispatch_mode(_FAKE_SLOT)
        if mode is not self.mode:
            if _ALSO and id(mode) in _ALSO:  # a mode of :func:`also_memoize`: its own memo
                other = self.others.get(id(mode))
                if other is None:
                    other = self.others[id(mode)] = _Memo(mode)
                return other(func, args, kwargs)
            return func(*args, **kwargs)  # e.g. a factory call under ``unset_fake_temporarily``
        known = self.kinds.get(id(func))
        if known is None:
            kind = _kind(func)
            # second slot: a relative view, or a foreach op among the void or functional ones (per element)
            known = self.kinds[id(func)] = (
                kind, func._opname in _RELATIVE_VIEWS if kind is _VIEW
                else kind in (_VOID, _FUNCTIONAL) and func._opname.startswith("_foreach_"), func)
        kind, relative, _ = known
        if kind is None:
            return func(*args, **kwargs)
        if kind is _COLLECTIVE:
            return self._collective(func, args, kwargs)
        if relative and kind is not _VIEW:
            return self._foreach_void(func, args, kwargs) if kind is _VOID else \
                self._foreach_functional(func, args, kwargs)
        key = self._key(kind, relative, args, kwargs)
        if key is _UNKEYED:
            return func(*args, **kwargs)
        key = (id(func), key)
        recipe = self.outputs.get(key, _UNKEYED)
        if recipe is _UNKEYED:
            layout_before = _layout(kwargs["out"]) if kind is _OUT else \
                _layouts((args, kwargs)) if kind is _VOID else None
            out = self._view(func, args, kwargs) if kind is _VIEW else func(*args, **kwargs)
            self.misses += 1
            self.outputs[key] = self._record(kind, relative, args, kwargs, out, layout_before)
            return out
        if recipe is None:
            return func(*args, **kwargs)
        self.hits += 1
        self.fresh = recipe[0] is _FUNCTIONAL
        return self._build(recipe, args, kwargs)


def built_fresh() -> bool:
    """Whether the last :func:`call_op` built its output(s) from a functional op's recipe: each a
    new storage of its own, made by ``empty_strided`` in this call. The tracker then skips its
    search of the inputs' storages, which could only confirm that."""
    memo = _ACTIVE[0]
    return memo is not None and memo.fresh


def call_op(func, args, kwargs):
    """``func(*args, **kwargs)``, through the active :func:`fast_fake_ops` memo if there is one."""
    memo = _ACTIVE[0]
    if memo is None:
        return func(*args, **kwargs)
    return memo(func, args, kwargs)


@contextlib.contextmanager
def fast_fake_ops(fake_mode) -> Iterator[_Memo]:
    """While active, :func:`call_op` (the tracker's and the simulation's dispatch) memoizes the fake
    ops of ``fake_mode`` as described above. Yields the memo (hits / misses, for tests)."""
    memo = _Memo(fake_mode)
    previous, _ACTIVE[0] = _ACTIVE[0], memo
    try:
        yield memo
    finally:
        _ACTIVE[0] = previous


@contextlib.contextmanager
def also_memoize(mode) -> Iterator[None]:
    """While entered, the :func:`fast_fake_ops` memo in use also answers the ops of another fake
    mode, in a memo of that mode's own (its outputs are that mode's fakes; the tracker, which
    counts only its own mode's, sees none of them). ``plan.fsdp2_sim.own_propagation_mode``:
    DTensor's sharding propagation, whose fake tensors are one ``empty_strided`` per element of
    every input and whose in-place foreach ops run over all of a model's LoRA tensors (1120 for a
    70B model, about a dozen layouts)."""
    _ALSO[id(mode)] = mode
    try:
        yield
    finally:
        del _ALSO[id(mode)]

