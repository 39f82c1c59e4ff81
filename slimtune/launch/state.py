"""Checkpoint formats of the engines, and one reader for the trained tensors of any of them.

* ``none`` (replicated): ``trainable.safetensors`` + ``optimizer.pt`` written by rank 0.
* ``fsdp2``: a ``torch.distributed.checkpoint`` (DCP) folder ``dcp/`` holding
  ``{"model": trainable tensors and buffers (so also ``<module>.idx``) by FQN, "optim": optimizer
  state by FQN}``, each rank
  writing its own shards.  DCP's load plans reshard, so N ranks' checkpoint loads on M.
* ``deepspeed_zero3``: ``trainable.safetensors`` (full fp32 trainable tensors, and the PaCA /
  S2FT selections ``<module>.idx`` as int64) and ``optimizer_full.pt`` (full optimizer state by
  FQN), gathered and written by rank 0.
  Independent of the number of ranks, so it also loads on M ranks.

:func:`read_trainable_tensors` returns the trained tensors (full, by FQN) of any of them
in one process without a process group, e.g. for ``slimtune merge``.
"""
from __future__ import annotations

from pathlib import Path

import torch

DCP_DIR = "dcp"
TRAINABLE_FILE = "trainable.safetensors"


def read_trainable_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint folder, whole, keyed by parameter FQN (CPU)."""
    folder = Path(folder)
    if (folder / TRAINABLE_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / TRAINABLE_FILE))
    if (folder / DCP_DIR).is_dir():
        import warnings

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        # DCP keeps the nesting of the saved dict: {"model": {fqn: tensor}, "optim": ...}; reading it in
        # one process without a process group is intended here (DCP warns that it assumes so)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            loaded = _load_state_dict_from_keys({"model"}, checkpoint_id=str(folder / DCP_DIR))
        return {k: v for k, v in loaded["model"].items()}
    raise FileNotFoundError(f"{folder}: no {TRAINABLE_FILE} and no {DCP_DIR}/ (not a slimtune checkpoint?)")
