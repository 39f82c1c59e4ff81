"""GaLore projection math as small functions of (gradient, basis P).

Semantics follow the GaLore paper and the reference package galore-torch
(``GaLoreProjector`` with ``proj_type`` std/left/right), written here as plain
functions so that the same math applies to a row-block shard of a gradient
(FSDP2 shards parameters with ``torch.chunk(dim=0)``):

* right projection (P is r x n, rows of Vh): ``G @ P.T`` is row-local, so a row block
  ``G[i:j]`` projects to ``(G @ P.T)[i:j]`` without communication;
* left projection (P is m x r, columns of U): ``P.T @ G`` is a sum over row blocks,
  ``sum_k P[rows_k].T @ G[rows_k]`` (one all-reduce of an r x n partial product);
* the right basis can be computed from the n x n Gram matrix ``G.T @ G`` (an all-reduce
  of per-shard Gram matrices) with :func:`right_basis_from_gram`.

Why hand-written: galore-torch keeps this math inside a stateful class that needs the
full gradient; the sharded variant needs the pieces separately.
"""
from __future__ import annotations

import hashlib

import torch

RIGHT = "right"
LEFT = "left"


def projection_side(shape: tuple[int, ...] | torch.Size, proj_type: str) -> str:
    """Which side a (m x n) gradient is projected on.

    ``std`` (galore-torch's default): right if m >= n else left, so the projected
    moments are max(m, n) x r.  ``left`` / ``right`` force one side.
    """
    m, n = int(shape[0]), int(shape[1])
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type in (LEFT, RIGHT):
        return proj_type
    raise ValueError(f"proj_type must be std, left or right (got {proj_type!r})")


def basis_shape(shape, rank: int, side: str) -> tuple[int, int]:
    """Shape of the orthonormal basis P (rank is capped by the matrix's smaller dimension)."""
    m, n = int(shape[0]), int(shape[1])
    r = min(rank, m, n)
    return (r, n) if side == RIGHT else (m, r)


def projected_shape(shape, rank: int, side: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments)."""
    m, n = int(shape[0]), int(shape[1])
    r = min(rank, m, n)
    return (m, r) if side == RIGHT else (r, n)


def exact_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-``rank`` singular subspace of ``grad`` by a full fp32 SVD, in the gradient's dtype.

    right: ``Vh[:rank]`` (r x n); left: ``U[:, :rank]`` (m x r).
    """
    u, _, vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    basis = vh[:rank, :] if side == RIGHT else u[:, :rank]
    return basis.to(grad.dtype).contiguous()


def _sketch_seed(seed: int, step: int, shape) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{tuple(shape)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def randomized_basis(
    grad: torch.Tensor, rank: int, side: str, *, seed: int, step: int, oversample: int = 8, power_iters: int = 2
) -> torch.Tensor:
    """Approximate top-``rank`` singular subspace with ``torch.svd_lowrank`` (Halko et al.).

    The Gaussian sketch is drawn inside ``torch.random.fork_rng`` from a seed derived from
    (seed, step, shape), so it does not disturb the training RNG streams, is identical on
    every rank and in per-layer mode, and is reproduced exactly on resume.
    """
    m, n = grad.shape
    r = min(rank, m, n)
    q = min(r + oversample, m, n)
    devices = [grad.device] if grad.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_sketch_seed(seed, step, grad.shape))
        u, _, v = torch.svd_lowrank(grad.detach().float(), q=q, niter=power_iters)
    basis = v[:, :r].T if side == RIGHT else u[:, :r]
    return basis.to(grad.dtype).contiguous()


def right_basis_from_gram(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Right basis (r x n) from the Gram matrix ``G.T @ G`` (n x n).

    The eigenvectors of GᵀG are the right singular vectors of G, so this equals
    ``exact_basis(G, rank, "right")`` up to the sign of each row.  Under FSDP2 the Gram
    matrix is the all-reduced sum of per-shard ``G_k.T @ G_k``, so no rank needs the full G.
    """
    evals, evecs = torch.linalg.eigh(gram.float())  # ascending
    order = torch.argsort(evals, descending=True)[:rank]
    return evecs[:, order].T.to(gram.dtype).contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Low-rank gradient: ``G @ P.T`` (right) or ``P.T @ G`` (left).

    For a row block of G, pass the whole P (right) or the matching row block of P
    (left, then sum the partial products over blocks).
    """
    if side == RIGHT:
        return grad @ basis.T
    return basis.T @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str, scale: float) -> torch.Tensor:
    """Full-shape update ``scale * (low @ P)`` (right) or ``scale * (P @ low)`` (left).

    For a row block: right needs the block of ``low`` rows; left the block of P rows.
    """
    full = low @ basis if side == RIGHT else basis @ low
    return full * scale


def align_signs(new: torch.Tensor, old: torch.Tensor, side: str) -> torch.Tensor:
    """``new`` with each basis vector's sign flipped where it points away from the same-index
    vector of ``old`` (rows of a right basis, columns of a left one).

    An SVD fixes each singular vector only up to sign, and LAPACK's choice jumps under
    rounding-level changes of the matrix (a 1e-7 relative perturbation of a real gradient
    flipped one of eight vectors here).  Because GaLore keeps the Adam moments across a
    refresh, a flipped vector reverses that coordinate's momentum, so the raw-SVD trajectory
    is not a continuous function of the gradients: two runs that sum the same gradient in a
    different order (FSDP2's reduce-scatter vs one rank) part after the second refresh.
    Aligning each new vector with the previous one makes the trajectory independent of the
    SVD's sign choices (flipping any vector of the first basis flips its moment coordinates
    and every later aligned vector with it, leaving the updates unchanged) and keeps each
    momentum coordinate pointing the way it pointed before the refresh.
    """
    dots = (new.float() * old.float()).sum(dim=1 if side == RIGHT else 0)
    flip = torch.where(dots < 0, -1.0, 1.0).to(new.dtype)
    return new * (flip[:, None] if side == RIGHT else flip[None, :])
