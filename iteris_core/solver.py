"""Per-layer closed forms of IterIS (pure tensor functions).

For one layer with concept deltas ``dW_i = s_i B_i A_i``, token-averaged statistics
``K_i = Xt_i Xt_i^T / n_i`` and ``C_i = X_i Xt_i^T / n_i`` and weights ``lam_i``, the merged delta is

    D = [sum_i lam_i dW_i (C_i + a ||C_i||_F I)] [sum_i lam_i (K_i + a ||K_i||_F I)]^-1
      = [B_1 ... B_N] [P_1; ...; P_N],   P_i = s_i lam_i (A_i C_i + a ||C_i|| A_i) M^-1

(``M`` the bracket on the right), so the up matrices are kept and only the down matrices are
solved: an exact LoRA of rank ``sum r_i``. ``M`` is symmetric positive definite whenever the
ridge is on; it is solved by Cholesky, never inverted, from its upper triangle alone (the
statistics accumulate only that part; see :mod:`.symmetric`).

Layers whose input is too wide for a ``d x d`` system (3x3 convs, when asked) are solved in the
row space ``Q`` of the concepts' down matrices: ``D = U Q`` with ``U`` from an ``R x R`` system
built from projected statistics. It is the exact minimiser of the same objective over deltas
with that row space, and equals the full solution when ``N = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .buffers import MatrixPool
from .errors import SolverError
from .low_rank import LowRankDelta


def ridge(gram: torch.Tensor, coefficient: float, norm: float | None = None) -> torch.Tensor:
    """``G + a ||G||_F I`` (the paper's Frobenius-scaled ridge); ``norm`` overrides ``||G||_F``."""
    scale = coefficient * (float(torch.linalg.matrix_norm(gram)) if norm is None else norm)
    return gram + scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


NON_FINITE = ("its statistics contain NaN or infinite values: the model produced non-finite activations "
              "(fp16 overflow? run in fp32 or bf16)")


def cholesky_solve_right(rhs: torch.Tensor, system: torch.Tensor, layer: str,
                         pool: MatrixPool | None = None) -> torch.Tensor:
    """``rhs @ system^-1`` for a symmetric positive definite ``system`` of which only the upper
    triangle is read, with errors that name the layer and say what to change. ``pool`` lends the
    factor's memory."""
    if not torch.isfinite(rhs).all():
        raise SolverError(layer, NON_FINITE)
    pool = pool or MatrixPool()
    # fp32 like the statistics (fp64 is slow on CPUs and 1/32 speed on consumer GPUs); fp64 only if
    # fp32 cannot factor a nearly singular system
    for dtype in (torch.promote_types(system.dtype, torch.float32), torch.float64):
        matrix = system.to(dtype)
        # column-major, as LAPACK and cuSOLVER write it: no copy of the factor
        factor = pool.take(matrix.shape, matrix.device, dtype).mT
        info = torch.empty((), dtype=torch.int32, device=matrix.device)
        torch.linalg.cholesky_ex(matrix, upper=True, out=(factor, info))
        if int(info) == 0:
            # LAPACK stops at a NaN or non-positive pivot, which catches any NaN and an infinity off the
            # diagonal; an infinite diagonal entry gives an infinite pivot, seen here (a scan of d values)
            finite = bool(torch.isfinite(factor.diagonal()).all())
            solution = torch.cholesky_solve(rhs.to(dtype).T, factor, upper=True).T.to(rhs.dtype)
            pool.give(factor)
            if not finite or not torch.isfinite(solution).all():
                raise SolverError(layer, NON_FINITE)
            return solution
        pool.give(factor)
    if not torch.isfinite(system.triu()).all():
        raise SolverError(layer, NON_FINITE)
    raise SolverError(layer, "its Gram system is singular (no sample reached the layer, or the "
                      "regularisation is 0 with fewer tokens than the layer's input width); raise the "
                      "regularisation or add samples")


@dataclass
class ConceptTerm:
    """One concept's part of one layer's system (full mode).

    ``numerator`` is ``A_i C_i`` = ``(A_i X_i) Xt_i^T / n_i`` (r x d): the only place the cross
    statistics enter, so ``C_i`` itself (d x d) is never needed beyond its norm.
    """

    delta: LowRankDelta
    lam: float
    numerator: torch.Tensor
    cross_norm: float


def merged_rhs(term: ConceptTerm, regularization: float) -> torch.Tensor:
    """``s lam (A C + a ||C|| A)``: the concept's rows of the right-hand side (r x d)."""
    down = term.delta.down.to(term.numerator)
    return (term.numerator + regularization * term.cross_norm * down) * (term.delta.scale * term.lam)


def solve_full(system: torch.Tensor, terms: list[ConceptTerm], regularization: float, layer: str,
               pool: MatrixPool | None = None) -> LowRankDelta:
    """Exact merged LoRA of a layer: up = [B_1 ... B_N], down = [P_1; ...; P_N] (``system``: upper
    triangle read)."""
    rhs = torch.cat([merged_rhs(t, regularization) for t in terms], dim=0)
    down = cholesky_solve_right(rhs, system, layer, pool)
    up = torch.cat([t.delta.up.to(down) for t in terms], dim=1)
    return LowRankDelta(up.float(), down.float(), 1.0)


@dataclass
class TokenTerm:
    """One concept's part of a layer solved in token space: ``coefficients`` = ``(A_i X_i^T) / n_i``
    (r x n_i), so that its numerator ``A_i C_i`` is ``coefficients @ Z_i`` with ``Z_i`` its block
    of merged-model tokens."""

    delta: LowRankDelta
    lam: float
    coefficients: torch.Tensor
    cross_norm: float
    block: int          # which token block (concept) the coefficients belong to


def solve_token_space(tokens: torch.Tensor, sizes: list[int], weights: list[float], shift: float,
                      token_gram: torch.Tensor, terms: list[TokenTerm], regularization: float,
                      layer: str) -> LowRankDelta:
    """Exact merged LoRA of a layer whose system ``M = shift I + sum_j w_j Z_j^T Z_j`` has fewer
    tokens than its width: the same solution as :func:`solve_full`, through a ``T x T`` system.

    ``tokens`` stacks the blocks ``Z_j`` (``sizes[j]`` rows each, ``T`` in all), ``token_gram`` is
    ``tokens @ tokens.T``. With ``Z = diag(sqrt w) tokens`` and ``G = Z Z^T``, each concept's
    right-hand side is ``U_i Z + W_i`` (``U_i`` from its coefficients, ``W_i`` the ridge part), and
    ``(U Z + W) M^-1 = W / shift + (U - W Z^T / shift) (shift I + G)^-1 Z``
    (push-through and Woodbury identities). The ``T x T`` system, whose ridge is small next to
    ``G``, is formed and solved in fp64; the products with the ``T x d`` tokens stay in their fp32
    (the precision of the statistics themselves), so no ``d``-wide copy is made.
    """
    if shift <= 0:
        raise SolverError(layer, "its Gram system is singular (the regularisation is 0 with fewer tokens than "
                          "the layer's input width); raise the regularisation or add samples")
    scale = torch.cat([torch.full((n,), w ** 0.5, dtype=torch.float64) for n, w in zip(sizes, weights)])
    scale = scale.to(tokens.device)
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    small = token_gram.double() * scale[:, None] * scale[None, :]
    small.diagonal().add_(shift)
    ridge_rows = torch.cat([t.delta.down.to(tokens) * (t.delta.scale * t.lam * regularization * t.cross_norm)
                            for t in terms])
    token_rows = torch.zeros(ridge_rows.shape[0], tokens.shape[0], dtype=torch.float64, device=tokens.device)
    row = 0
    for t in terms:
        start, size = starts[t.block], sizes[t.block]
        token_rows[row:row + t.delta.rank, start:start + size] = (
            t.coefficients.to(token_rows) * (t.delta.scale * t.lam / weights[t.block] ** 0.5))
        row += t.delta.rank
    coupling = token_rows - (ridge_rows @ tokens.T).double() * scale[None, :] / shift
    solved = cholesky_solve_right(coupling, small, layer)
    down = ridge_rows / shift + (solved * scale[None, :]).to(tokens) @ tokens
    up = torch.cat([t.delta.up.to(down) for t in terms], dim=1)
    return LowRankDelta(up.float(), down.float(), 1.0)


def row_space_basis(deltas: list[LowRankDelta]) -> torch.Tensor:
    """Orthonormal rows ``Q`` (R' x d) spanning every concept's down matrix (R' <= sum r_i)."""
    stacked = torch.cat([d.down.double() for d in deltas], dim=0)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    tol = float(s.max()) * max(stacked.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    return vh[s > tol].float()


def solve_subspace(system: torch.Tensor, rhs: torch.Tensor, basis: torch.Tensor, layer: str) -> LowRankDelta:
    """Merged LoRA restricted to the row space ``basis``: ``U = rhs M^-1``, ``D = U Q``."""
    up = cholesky_solve_right(rhs, system, layer)
    return LowRankDelta(up.float(), basis.to(up).float(), 1.0)


def closed_form_dense(deltas: list[torch.Tensor], inputs: list[torch.Tensor], merged_inputs: list[torch.Tensor],
                      weights: list[float], regularization: float) -> torch.Tensor:
    """Reference dense IterIS solution from raw token matrices (``X_i``, ``Xt_i`` are d x n_i).
    Forms every d x d matrix; for tests and small problems only."""
    d = inputs[0].shape[0]
    lhs = torch.zeros(d, d, dtype=torch.float64)
    rhs = torch.zeros(deltas[0].shape[0], d, dtype=torch.float64)
    for dw, x, xt, lam in zip(deltas, inputs, merged_inputs, weights):
        x, xt, dw = x.double(), xt.double(), dw.double()
        n = x.shape[1]
        k, c = xt @ xt.T / n, x @ xt.T / n
        lhs += lam * ridge(k, regularization)
        rhs += lam * dw @ ridge(c, regularization)
    return cholesky_solve_right(rhs, lhs, "reference")


def adaptive_weight(delta_frobenius_sq: float, output_energy: float, input_dim: int, input_energy: float) -> float:
    """The paper's ``lam_i = ||dW_i||_F^2 / ||dW_i X_i||_F^2`` (per token). A concept without a
    delta at this layer gets the same expression for an isotropic delta, ``d / tr(X X^T)``, so that
    it still pulls the merged layer towards "no change" on its own inputs."""
    if delta_frobenius_sq > 0 and output_energy > 1e-30 * delta_frobenius_sq:
        return delta_frobenius_sq / output_energy
    return input_dim / max(input_energy, 1e-30)
