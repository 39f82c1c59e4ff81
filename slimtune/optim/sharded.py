"""GaLore on FSDP2 row-block shards: the communication around ``projector``'s math.

FSDP2 (``fully_shard``) makes every parameter and gradient a ``DTensor`` sharded on dim 0
over a 1-D mesh: rank k holds the row block ``G_k = torch.chunk(G, W, dim=0)[k]``.
``GaLoreAdamW`` works on the local blocks and calls these helpers where ranks must talk.
What travels, per projected m x n weight with rank r on W ranks:

* **Basis refresh** (every ``update_proj_gap`` steps only): the full gradient is
  all-gathered (``full_tensor``, m*n values), every rank takes the same SVD as a 1-rank run
  would (exact or randomized, same seed), and rank 0's basis is broadcast (r*n or m*r
  values) so that replicated state is bitwise identical on every rank even where two
  devices' SVDs could differ in the last bit.  Why not the all-reduced Gram matrix
  ``sum_k G_kᵀ G_k`` (``projector.right_basis_from_gram``, n*n values), although it moves
  less when m > 2n (ring all-reduce ~2n² vs all-gather m*n): its eigenvectors carry other
  signs than LAPACK's SVD, and the sign of a basis row matters once the moments (kept
  across refreshes) meet the next basis, so the run would leave galore-torch's trajectory;
  it also squares the condition number in fp32; and the gather happens once per
  ``update_proj_gap`` steps, i.e. m*n/gap per step amortized, small next to the m*n
  reduce-scatter of the gradient FSDP2 already does every step.  The left basis has no
  such shortcut at all (G Gᵀ needs every pair of row blocks).
* **Right projection** (m >= n under ``proj_type: std``, P = Vh[:r] is r x n):
  ``G_k Pᵀ`` is the k-th row block of ``G Pᵀ`` and ``N_k P`` the k-th row block of the
  update, so there is **no communication between refreshes**.  P is replicated (r x n on
  every rank, a plain tensor); the moments (m x r) are row-sharded like the weight.
* **Left projection** (m < n, P = U[:, :r] is m x r): ``Pᵀ G = sum_k P_kᵀ G_k``.  Each rank
  forms its r x n partial product and a reduce-scatter leaves rank k the k-th row block of
  the projected gradient; Adam runs on that block (moments r x n, row-sharded), and an
  all-gather of the r x n normalised step lets each rank apply ``P_k N`` to its rows.
  Reduce-scatter + all-gather move what one all-reduce would (2 r*n per step) while the
  moments stay sharded.  P itself is row-sharded (rank k keeps P_k).  ``proj_type: right``
  avoids this per-step traffic for every weight, at the price of leaving galore-torch's
  choice of side (a different, equally valid, trajectory).

So every side gives the 1-rank trajectory up to floating-point summation order.
Sharded state tensors are ``DTensor`` s (``Shard(0)`` of their whole shape), so
``torch.distributed.checkpoint`` writes each rank's block and reshards on load; replicated
ones are plain tensors (DCP writes them once).

Why hand-written: no public GaLore implementation runs on FSDP or ZeRO shards (see
../shared/METHODS.md); the collectives are DTensor's own (``redistribute``, ``full_tensor``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (the tensor itself when it is not a DTensor)."""
    return t.to_local() if is_sharded(t) else t


def check_row_sharded(p: torch.Tensor, name: str = "") -> None:
    """GaLore's sharded path handles FSDP2's layout only: ``Shard(0)`` on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"GaLore on DTensor {name or 'parameters'} needs Shard(0) on a 1-D mesh (FSDP2's layout); "
                         f"got placements {p.placements} on a {p.device_mesh.ndim}-D mesh")


def chunk_sizes(rows: int, world: int) -> list[int]:
    """Rows of each rank under ``torch.chunk(dim=0)`` (DTensor ``Shard(0)`` / FSDP2)."""
    step = math.ceil(rows / world) if rows else 0
    return [max(0, min(step, rows - j * step)) for j in range(world)]


def blockwise_aligned(shape: Sequence[int], world: int, block: int) -> bool:
    """Whether row-sharding ``shape`` over ``world`` ranks cuts its row-major elements only at
    ``block`` boundaries *and* gives every rank the ``torch.chunk`` share of the blocks.

    Then blockwise 8-bit state (one absmax per ``block`` values) is the same per-block
    arithmetic as on one rank, and the absmax vector is itself a valid ``Shard(0)`` DTensor.
    """
    rows, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
    sizes = chunk_sizes(rows, world)
    offsets = [sum(sizes[:j]) * cols for j in range(world)]
    if any(off % block for off, n in zip(offsets, sizes) if n):
        return False
    blocks = [math.ceil(n * cols / block) for n in sizes]
    return blocks == chunk_sizes(math.ceil(rows * cols / block), world)


def wrap_rows(local_tensor: torch.Tensor, like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A ``Shard(0)`` DTensor of global ``shape`` on ``like``'s mesh whose block here is ``local_tensor``."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local_tensor, like.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def full(t: torch.Tensor) -> torch.Tensor:
    """All-gather a sharded tensor (the whole tensor on every rank)."""
    return t.full_tensor()


def agree(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank of ``like``'s mesh (broadcast)."""
    import torch.distributed as dist

    mesh = like.device_mesh
    group = mesh.get_group()
    t = t.contiguous()
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t


def rows_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's row block of a replicated ``whole`` tensor, as a ``Shard(0)`` DTensor."""
    mesh = like.device_mesh
    sizes = chunk_sizes(whole.shape[0], mesh.size())
    k = mesh.get_local_rank()
    start = sum(sizes[:k])
    return wrap_rows(whole[start:start + sizes[k]].contiguous(), like, whole.shape)


def reduce_scatter_rows(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``partial`` (same shape on every rank) over the mesh; return this rank's row block."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    summed = DTensor.from_local(partial, like.device_mesh, [Partial()], run_check=False)
    return summed.redistribute(like.device_mesh, [Shard(0)]).to_local()


def all_gather_rows(block: torch.Tensor, like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The whole tensor of global ``shape`` from each rank's row block ``block``."""
    return wrap_rows(block, like, shape).full_tensor()
