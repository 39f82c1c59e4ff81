"""Bytes a module's forward keeps for its backward, measured by the tracker."""
from __future__ import annotations

import torch
from torch import nn

from slimtune.memory.tracker import MemoryTracker


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes in category ``activations`` (what autograd saves for backward) alive right after
    ``module(x)``, the module's parameters and buffers registered as weights / trainable.  ``x``
    is first made a non-leaf (an upstream activation), as it would be inside a model: the tracker
    takes leaves that need a gradient for parameters."""
    h = x * 1.0
    tracker = MemoryTracker()
    tracker.register_model(module)
    with tracker:
        out = module(h)
        nbytes = tracker.current_breakdown["activations"]
    del out
    return nbytes
