"""A faster cache key for ``FakeTensorMode``'s dispatch cache, for long fake-tensor runs
(``slimtune plan --simulate`` of a 70B model: a few hundred thousand fake ops).

``FakeTensorMode`` memoizes each op's output metadata by a key built from its arguments. For
every tensor argument torch builds a ``TensorMetadata`` dataclass and flattens it field by
field (``_prep_args_for_hash`` -> ``extract_tensor_metadata`` -> ``_flatten_into``), which is
about half the time of a cached fake op. :func:`fast_fake_cache_keys` replaces that, while
active, by one tuple per plain (non-symbolic, strided) fake tensor with the same information:
dtype, shape, strides, device, storage offset and size, requires_grad, and the quantized /
conj / neg / inference flags. The memory format that ``TensorMetadata`` also records is a
function of shape and strides (``suggest_memory_format``, ``is_contiguous``), so it is implied.
Every other argument (symbolic or sparse tensors, scalars, containers, foreign or constant fakes)
goes through torch's own code, with its bypass rules. The tuple is tagged with a marker object
no torch key contains, so keys of the two forms never compare equal.

Only the key's computation changes: a cache hit still rebuilds the output from torch's entry,
and a miss still runs the fake kernel. Written here because torch has no switch for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, _BypassDispatchCache

__all__ = ["fast_fake_cache_keys"]

_MARK = object()  # tags a fast tensor entry in a key
_STRIDED = torch.strided
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format})


def _fast_prep_args_for_hash(original):
    def prep(self, result, args, state, id_hashed_objects):
        if isinstance(args, dict) or not isinstance(args, (list, tuple)):
            return original(self, result, args, state, id_hashed_objects)
        result.append(type(args))
        result.append(f"length_{len(args)}")
        for arg in args:
            if type(arg) is FakeTensor and arg.layout is _STRIDED and not arg._has_symbolic_sizes_strides:
                if arg.fake_mode is not self:
                    raise _BypassDispatchCache("not our fake")
                if arg.constant is not None:
                    raise _BypassDispatchCache("constant attribute")
                result.append(_MARK)
                result.append((arg.dtype, tuple(arg.shape), arg.stride(), arg.device, arg.storage_offset(),
                               arg.untyped_storage().nbytes(), arg.requires_grad, arg.is_quantized,
                               arg.is_conj(), arg.is_neg(), arg.is_inference()))
            elif type(arg) in _PLAIN:  # torch's own rule for these: (type, value)
                result.append(type(arg))
                result.append(arg)
            else:  # containers, other tensors, symbolic values, callables: torch's code
                original(self, result, (arg,), state, id_hashed_objects)
        return None

    return prep


@contextlib.contextmanager
def fast_fake_cache_keys() -> Iterator[None]:
    """While active, ``FakeTensorMode`` computes its dispatch-cache keys as described above."""
    original = FakeTensorMode._prep_args_for_hash
    FakeTensorMode._prep_args_for_hash = _fast_prep_args_for_hash(original)
    try:
        yield
    finally:
        FakeTensorMode._prep_args_for_hash = original
