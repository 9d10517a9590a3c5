"""Low-rank deltas: the one form in which every adapter enters the merge and the merge leaves.

A layer's delta is ``dW = scale * up @ down`` with ``up`` (out x r) and ``down`` (r x d), where
``d`` is the layer's input width (channels x kernel area for a conv). Dense deltas (LoHa, LoKr,
DoRA, full diffs) are factorised exactly by SVD at their numerical rank, so the merge's formulas
apply unchanged. An optional, lossy truncation to a target rank goes through QR of both factors
and an SVD of the small core, and reports what it lost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankDelta:
    """``dW = scale * up @ down``; tensors are fp32 on the CPU unless moved on purpose."""

    up: torch.Tensor    # (out, r)
    down: torch.Tensor  # (r, d)
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LowRankDelta needs up (out, r) and down (r, d), got {tuple(self.up.shape)} "
                             f"and {tuple(self.down.shape)}")

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    def dense(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale

    def frobenius_sq(self) -> float:
        """||dW||_F^2 from the small Gram matrices, without forming dW."""
        up, down = self.up.double(), self.down.double()
        return float(torch.trace((up.T @ up) @ (down @ down.T))) * self.scale ** 2

    def scaled(self, factor: float) -> LowRankDelta:
        return dataclasses.replace(self, scale=self.scale * factor)

    def folded(self) -> LowRankDelta:
        """Same delta with the scale moved into ``up`` (scale 1)."""
        return LowRankDelta(self.up * self.scale, self.down, 1.0)


def numerical_rank_tolerance(singular_values: torch.Tensor, shape: tuple[int, int]) -> float:
    """Singular values below this are rounding noise of an fp32 matrix of this shape."""
    if singular_values.numel() == 0:
        return 0.0
    return float(singular_values.max()) * max(shape) * torch.finfo(torch.float32).eps


def factorize_exact(dense: torch.Tensor) -> LowRankDelta | None:
    """Exact low-rank factors of a dense delta (None if it is zero): ``up = U S``, ``down = V^T``
    restricted to the singular values above the fp32 rounding level."""
    matrix = dense.reshape(dense.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s > numerical_rank_tolerance(s, tuple(matrix.shape))
    if not bool(keep.any()):
        return None
    return LowRankDelta((u[:, keep] * s[keep]).float(), vh[keep].float(), 1.0)


def compress(delta: LowRankDelta) -> LowRankDelta | None:
    """The same delta at its numerical rank (None if it is zero), never forming the dense matrix.

    Works through the small Gram matrices (fp64 ``eigh`` of r x r) and matrix products only, which
    are fast where a QR of a tall ``d x r`` factor is not: ``up = Q_u W`` with ``Q_u`` orthonormal,
    then the SVD of ``W down`` from its Gram. Components below ``sqrt(r)`` fp32 rounding of the
    largest singular value are dropped (the factors themselves carry that much rounding).
    """
    up, down = delta.up.double(), delta.down.double()
    eig_u, vec_u = torch.linalg.eigh(up.T @ up)
    keep_u = eig_u > float(eig_u.max()) * 1e-24 if eig_u.numel() else eig_u > 0
    if not bool(keep_u.any()):
        return None
    root = eig_u[keep_u].sqrt()
    basis_u = (up @ vec_u[:, keep_u]) / root                      # o x k, orthonormal columns
    core = (root[:, None] * vec_u[:, keep_u].T) @ down            # k x d, up @ down = basis_u @ core
    eig_c, vec_c = torch.linalg.eigh(core @ core.T)
    sigma = eig_c.clamp_min(0).sqrt().flip(0)
    vec_c = vec_c.flip(1)
    tolerance = float(sigma[0]) * 4 * delta.rank ** 0.5 * torch.finfo(torch.float32).eps
    keep = sigma > tolerance
    if not bool(keep.any()) or float(sigma[0]) == 0.0:
        return None
    new_up = (basis_u @ vec_c[:, keep]) * (sigma[keep] * delta.scale)
    new_down = (vec_c[:, keep].T @ core) / sigma[keep, None]
    return LowRankDelta(new_up.float(), new_down.float(), 1.0)


@dataclass(frozen=True)
class Truncation:
    delta: LowRankDelta
    relative_error: float  # ||dW - dW_k||_F / ||dW||_F


def truncate(delta: LowRankDelta, rank: int) -> Truncation:
    """Best rank-``rank`` approximation (Eckart-Young) of a low-rank delta, computed through QR of
    both factors and an SVD of the r x r core, never forming the dense matrix."""
    if rank >= delta.rank:
        return Truncation(delta, 0.0)
    qu, ru = torch.linalg.qr(delta.up.double())
    qd, rd = torch.linalg.qr(delta.down.double().T)
    core = (ru @ rd.T) * delta.scale
    uc, sc, vch = torch.linalg.svd(core)
    total = float((sc ** 2).sum())
    lost = float((sc[rank:] ** 2).sum())
    up = (qu @ uc[:, :rank]) * sc[:rank]
    down = vch[:rank] @ qd.T
    error = (lost / total) ** 0.5 if total > 0 else 0.0
    return Truncation(LowRankDelta(up.float(), down.float(), 1.0), error)


def stack(deltas: list[LowRankDelta]) -> LowRankDelta:
    """The sum of deltas as one LoRA of rank sum(r_i): ``[s_1 B_1 ... s_N B_N] @ [A_1; ...; A_N]``."""
    up = torch.cat([d.up * d.scale for d in deltas], dim=1)
    down = torch.cat([d.down for d in deltas], dim=0)
    return LowRankDelta(up, down, 1.0)
