"""A linear-time answer to one quadratic step of DTensor's sharding propagation, for long
fake-tensor runs (``slimtune plan --simulate`` of a 70B model sharded with FSDP2).

A foreach op over N DTensors (the optimizer's ``_foreach_*`` ops and the gradient-norm's
``_foreach_norm`` over every trainable parameter) is propagated child by child; for each child
torch 2.13 calls ``_sharding_prop._propagate_use_strided_shard_flag(child, op_schema)``, which
scans all N argument specs of the whole schema (``op_schema.args_spec``: a pytree flatten) to
find ``_StridedShard`` placements. That is N x N work on the first optimizer step: with the
1120 LoRA factors of Llama-70B, about half of a 2-rank FSDP2 simulation.

:func:`fast_strided_shard_flag` answers the scan once per schema when it finds no
``_StridedShard`` placement among the schema's argument specs (the function then returns
without changing anything, so answering it once is the same as answering it N times: it only
mutates specs that carry a ``_StridedShard``, never placements). A schema with a
``_StridedShard`` goes through torch's own function every time. Only sharding propagation runs
differently: it chooses the same shardings, and no tensor is allocated by it. Written here
because torch has no switch for it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

__all__ = ["fast_strided_shard_flag"]


def _has_strided_shard(op_schema, strided_type) -> bool:
    return any(isinstance(p, strided_type) for spec in op_schema.args_spec for p in spec.placements)


@contextlib.contextmanager
def fast_strided_shard_flag() -> Iterator[None]:
    """While active, DTensor's foreach sharding propagation scans a schema's argument specs for
    ``_StridedShard`` once per schema instead of once per list element (see module doc)."""
    from torch.distributed.tensor import _sharding_prop as sp

    original = sp._propagate_use_strided_shard_flag
    last: list = [None, True]  # [the schema last scanned (held, so its id is not reused), has _StridedShard]

    def propagate(op_strategy, op_schema) -> None:
        if last[0] is not op_schema:
            last[0], last[1] = op_schema, _has_strided_shard(op_schema, sp._StridedShard)
        if last[1]:
            original(op_strategy, op_schema)
        # else: torch's function finds no flag among the argument specs and returns unchanged

    sp._propagate_use_strided_shard_flag = propagate
    try:
        yield
    finally:
        sp._propagate_use_strided_shard_flag = original
        last[0] = None


@contextlib.contextmanager
def fast_foreach_strategies() -> Iterator[None]:
    """While active, DTensor's single-dim sharding strategies are computed once per distinct
    per-element schema instead of once per list element.

    The first optimizer step over N DTensors propagates each foreach op element by element: torch
    caches the strategy *function* per element schema but calls it for every element, building a
    ``_PreparedSingleDimStrategy`` and expanding it over the mesh each time (with 1120 LoRA factors
    of Llama-70B, about a third of a 2-rank FSDP2 simulation). Both are functions of their
    arguments -- the element's ``OpSchema`` (compared by value: op, argument specs and tensor
    metadata), the output's tensor metadata and the flags -- so equal arguments get the object the
    first call built. Schemas torch cannot hash (symbolic shapes) go through torch's own code.
    Two per-element steps are made cheaper the same way: the element-wise overload of a foreach op
    is looked up once per op, and the per-element argument lists are rebuilt without pytree (see
    ``_map_plain``).
    A per-element schema keeps the whole ``ScalarList`` of the foreach op (AdamW's N bias
    corrections of ``_foreach_div_`` and ``_foreach_addcdiv_``): rebuilding it for each element (in
    ``_map_plain`` and in ``OpSchema.args_meta`` / ``kwargs_meta``, which torch converts item by
    item in Python) is N x N Python steps per op, about 2 s of the first optimizer step of a 70B
    FSDP2 recipe. A list or tuple of plain numbers is recognised once (by identity; the last 256
    such answers are held, ``_remember``) and copied whole (``_plain_numbers``); the copies are
    equal to torch's.
    Sharding propagation chooses the same shardings; no tensor is allocated by it. Written here
    because torch has no switch for it.
    """
    from torch.distributed.tensor._ops import single_dim_strategy as sds
    from torch.distributed.tensor._ops import utils as ops_utils

    prepared_cls = sds._PreparedSingleDimStrategy
    expand = ops_utils.expand_to_full_mesh_op_strategy
    prepare = _by_value(prepared_cls, lambda info, schema, meta, **kw: (id(info), schema, meta, _items(kw)))
    expand_memo = _by_value(expand, lambda mesh, schema, strategies, **kw: (id(mesh), schema, id(strategies),
                                                                           _items(kw)))

    tree_map_only = sds.tree_map_only
    tuple_strategy = sds.TupleStrategy
    numbers: dict = {}  # id(list or tuple) -> (it, whether it holds plain numbers only): see _plain_numbers

    def map_children(type_or_types, func, tree, is_leaf=None):
        """``tree_map_only(TupleStrategy, ...)`` over the plain containers of an op schema's
        arguments. Per element it would flatten every argument with pytree, a ``ScalarList``
        argument of N numbers included: N x N pytree leaves over the N elements of one foreach op.
        Tuples, lists and dicts are rebuilt with the same types and contents (TupleStrategy
        leaves mapped); anything else pytree might treat as a container goes to torch's function."""
        if type_or_types is not tuple_strategy:
            return tree_map_only(type_or_types, func, tree, is_leaf=is_leaf)
        try:
            return _map_plain(tree, tuple_strategy, func, numbers)
        except _NotPlain:
            return tree_map_only(type_or_types, func, tree, is_leaf=is_leaf)

    resolve = sds._resolve_foreach_elementwise_overload  # a function of the op alone, asked per element
    schema_cls = sds.OpSchema
    meta_properties = {name: schema_cls.__dict__[name] for name in ("args_meta", "kwargs_meta")}

    sds._PreparedSingleDimStrategy = prepare
    ops_utils.expand_to_full_mesh_op_strategy = expand_memo
    sds.tree_map_only = map_children
    sds._resolve_foreach_elementwise_overload = functools.lru_cache(maxsize=None)(resolve)
    schema_cls.args_meta = property(lambda schema: tuple(_to_meta(a, numbers) for a in schema.args_schema))
    schema_cls.kwargs_meta = property(lambda schema: {k: _to_meta(v, numbers) for k, v in schema.kwargs_schema.items()})
    try:
        yield
    finally:
        sds._PreparedSingleDimStrategy = prepared_cls
        ops_utils.expand_to_full_mesh_op_strategy = expand
        sds.tree_map_only = tree_map_only
        sds._resolve_foreach_elementwise_overload = resolve
        for name, prop in meta_properties.items():
            setattr(schema_cls, name, prop)
        numbers.clear()


def _items(kwargs: dict) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(kwargs.items()))


def _by_value(fn, key_of):
    """``fn`` answered once per ``key_of(*args, **kwargs)``; the arguments are held with the
    answer (so the ``id``s in a key stay theirs). Arguments torch cannot hash (symbolic shapes)
    go to ``fn`` every time."""
    answers: dict = {}

    def call(*args, **kwargs):
        try:
            key = key_of(*args, **kwargs)
            hit = answers.get(key)
        except TypeError:
            return fn(*args, **kwargs)
        if hit is None:
            hit = answers[key] = (fn(*args, **kwargs), args)
        return hit[0]

    return call


class _NotPlain(Exception):
    """A value that is neither a plain container nor a known leaf (see ``_map_plain``)."""


@functools.cache
def _leaf_types() -> frozenset:
    import torch
    from torch.distributed.tensor._op_schema import OpStrategy

    return frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                      torch.memory_format, OpStrategy})


def _plain_numbers(x, numbers: dict) -> bool:
    """Whether the exact list or tuple ``x`` holds only ints, floats and bools, answered once per
    object: ``numbers`` maps ``id(x)`` to ``(x, answer)`` (holding ``x``, so the id stays its own). A
    foreach op's ``ScalarList`` is asked about once per element of the op; nothing in sharding
    propagation changes such a list in place."""
    entry = numbers.get(id(x))
    if entry is None or entry[0] is not x:
        entry = _remember(numbers, x, all(type(v) in (int, float, bool) for v in x))
    return entry[1]


def _copy_numbers(x, numbers: dict):
    """A copy of ``x`` (plain numbers, same type), known to :func:`_plain_numbers` as such: the
    per-element schema built with it is converted next (``args_meta``)."""
    copy = type(x)(x)
    _remember(numbers, copy, True)
    return copy


_REMEMBERED = 256  # lists held at most: each element's copies are asked about right after they are made


def _remember(numbers: dict, x, answer: bool) -> tuple:
    """Record ``answer`` for ``x``; past ``_REMEMBERED`` lists the record starts over (a list asked
    about again is checked again), so the copies of a 70B optimizer step's ScalarLists (N of N
    numbers per foreach op) are not all held."""
    if len(numbers) >= _REMEMBERED:
        numbers.clear()
    entry = numbers[id(x)] = (x, answer)
    return entry


def _map_plain(x, tuple_strategy, func, numbers: dict | None = None):
    """``func`` applied to every ``tuple_strategy`` in ``x`` through exact tuples, lists and dicts;
    raises ``_NotPlain`` on any other type that is not a known leaf (pytree may know it as a node).
    ``numbers``: the cache of :func:`_plain_numbers` (one per ``fast_foreach_strategies`` context)."""
    numbers = {} if numbers is None else numbers
    t = type(x)
    if t is tuple_strategy:
        return func(x)
    if t is tuple:
        return tuple(_map_plain(v, tuple_strategy, func, numbers) for v in x)
    if t is list:
        if _plain_numbers(x, numbers):
            return _copy_numbers(x, numbers)  # a ScalarList: numbers are leaves pytree maps to themselves
        return [_map_plain(v, tuple_strategy, func, numbers) for v in x]
    if t is dict:
        return {k: _map_plain(v, tuple_strategy, func, numbers) for k, v in x.items()}
    if t in _leaf_types():
        return x
    raise _NotPlain(t)


def _to_meta(item, numbers: dict):
    """One argument of ``OpSchema.args_meta`` / ``kwargs_meta`` as torch 2.13 converts it
    (``OpStrategy`` -> its tensor meta, ``TupleStrategy`` -> a tuple of its children's, lists and
    tuples rebuilt with their own type, anything else as it is), with an exact list or tuple of
    plain numbers copied whole instead of item by item."""
    from torch.distributed.tensor._op_schema import OpStrategy, TupleStrategy

    if isinstance(item, OpStrategy):
        return item.tensor_meta
    if isinstance(item, TupleStrategy):
        return tuple(_to_meta(child, numbers) for child in item.children)
    if isinstance(item, (list, tuple)):
        if (type(item) is list or type(item) is tuple) and _plain_numbers(item, numbers):
            return _copy_numbers(item, numbers)
        return type(item)([_to_meta(child, numbers) for child in item])
    return item
