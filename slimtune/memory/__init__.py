"""Memory measurement shared by tests, benchmarks and the planner (DESIGN rule 5)."""

from slimtune.memory.fake import fake_module
from slimtune.memory.fast_dtensor import fast_foreach_strategies, fast_strided_shard_flag
from slimtune.memory.fast_fake import fast_fake_cache_keys
from slimtune.memory.fast_ops import fast_fake_ops
from slimtune.memory.replay import replay_pure_calls
from slimtune.memory.saved import saved_activation_bytes
from slimtune.memory.tracker import CATEGORIES, MemoryTracker, collect_tensors, tensor_storages
from slimtune.memory.units import format_bytes, parse_bytes

__all__ = [
    "CATEGORIES",
    "MemoryTracker",
    "collect_tensors",
    "fake_module",
    "fast_fake_cache_keys",
    "fast_fake_ops",
    "fast_foreach_strategies",
    "fast_strided_shard_flag",
    "format_bytes",
    "parse_bytes",
    "replay_pure_calls",
    "saved_activation_bytes",
    "tensor_storages",
]
