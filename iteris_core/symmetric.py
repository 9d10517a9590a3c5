"""Symmetric matrices: Gram sums computed and kept by their upper part.

The Gram sums and the per-layer systems are symmetric, so half of each ``d x d`` is redundant.

* Full storage (the default): a ``d x d`` matrix whose *upper triangle* is authoritative and whose
  lower part is undefined and never read (the Cholesky factorisation reads the upper triangle
  only). Gram sums are accumulated by block rows, only on and above the diagonal:
  :func:`add_upper_gram_` does 9/16 of the full product's work with 8 block rows.
* Packed storage (when memory is short): the upper triangle as a vector, half the memory. For
  SDXL that half is several gigabytes. Accumulation adds the triangle of each batch's upper Gram
  (computed in a pooled ``d x d`` scratch, one layer at a time); solving unpacks one system at a
  time into a pooled matrix, upper triangle only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


GRAM_BLOCKS = 8  # block rows of an upper Gram sum: (1 + 1/8) / 2 of the full product's work


def gram_block_rows(size: int, blocks: int = GRAM_BLOCKS) -> list[tuple[int, int]]:
    """``(start, stop)`` of the block rows of a ``size x size`` upper Gram sum."""
    step = max(1, -(-size // blocks))
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def add_upper_gram_(accumulator: torch.Tensor, tokens: torch.Tensor, first: bool = False,
                    alpha: float = 1.0) -> torch.Tensor:
    """``accumulator += alpha tokens^T tokens`` on the blocks on and above the diagonal only, in
    place; ``first``: ``accumulator = ...`` instead (its old contents, whatever they are, are ignored).

    The blocks below the diagonal are never written nor read (:func:`upper_gram_frobenius` and
    the solver read the upper part only), so the accumulator never needs zeroing.
    ``tokens`` is ``n x d`` (rows are tokens).
    """
    beta = 0.0 if first else 1.0
    for start, stop in gram_block_rows(accumulator.shape[0]):
        accumulator[start:stop, start:].addmm_(tokens[:, start:stop].T, tokens[:, start:], beta=beta, alpha=alpha)
    return accumulator


def upper_gram_frobenius(accumulator: torch.Tensor) -> float:
    """Frobenius norm of the symmetric matrix whose upper blocks an accumulator holds after
    :func:`add_upper_gram_`: diagonal blocks count once, the blocks right of them twice."""
    total = 0.0
    for start, stop in gram_block_rows(accumulator.shape[0]):
        # in fp64, as the packed storage's norm: the two storages then give the same ridge
        diagonal = float(torch.linalg.vector_norm(accumulator[start:stop, start:stop], dtype=torch.float64)) ** 2
        right = float(torch.linalg.vector_norm(accumulator[start:stop, stop:], dtype=torch.float64)) ** 2
        total += diagonal + 2.0 * right
    return total ** 0.5


_INDEX_CHUNK = 1 << 22


@dataclass(frozen=True)
class Triangle:
    """Index helpers for one matrix size on one device."""

    size: int
    upper: torch.Tensor     # flat (row-major) positions of the entries on and above the diagonal
    diagonal: torch.Tensor  # positions of the diagonal entries in the packed vector

    @staticmethod
    def build(size: int, device: torch.device) -> Triangle:
        rows, columns = torch.triu_indices(size, size, device=device)
        # flat indices, not a boolean mask: gathering and scattering by index is 5-25x faster than
        # masked_select / masked_scatter on the CPU; int32 (4 bytes per packed entry) while the
        # flat positions fit, which they do for any width below 46341
        upper = rows * size + columns
        if size * size <= torch.iinfo(torch.int32).max:
            upper = upper.to(torch.int32)
        diagonal = torch.arange(size, device=device)
        # row i starts after sum_{j<i} (d - j) entries; its diagonal entry is the first of the row
        diagonal = diagonal * size - diagonal * (diagonal - 1) // 2
        return Triangle(size, upper, diagonal)

    @property
    def packed_length(self) -> int:
        return self.size * (self.size + 1) // 2

    def pack(self, matrix: torch.Tensor) -> torch.Tensor:
        """The upper triangle of ``matrix`` (its lower part is not read)."""
        return matrix.reshape(-1).index_select(0, self.upper.to(matrix.device))

    def unpack_upper(self, packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A ``d x d`` matrix whose upper triangle is ``packed`` and whose lower part is undefined,
        the full-storage convention (the solver reads the upper triangle only); ``out``, if given,
        is written."""
        full = torch.empty(self.size, self.size, dtype=packed.dtype, device=packed.device) if out is None else out
        flat, upper = full.view(-1), self.upper.to(packed.device)
        for start in range(0, upper.numel(), _INDEX_CHUNK):   # index_copy_ wants int64: widen by chunks
            end = start + _INDEX_CHUNK
            flat.index_copy_(0, upper[start:end].long(), packed[start:end])
        return full

    def frobenius(self, packed: torch.Tensor) -> float:
        total = float(torch.linalg.vector_norm(packed, dtype=torch.float64)) ** 2
        diagonal = float(torch.linalg.vector_norm(packed[self.diagonal.to(packed.device)], dtype=torch.float64)) ** 2
        return max(2 * total - diagonal, 0.0) ** 0.5

    def add_to_diagonal(self, packed: torch.Tensor, value: float) -> torch.Tensor:
        packed[self.diagonal.to(packed.device)] += value
        return packed


class Triangles:
    """Cache of :class:`Triangle` helpers by (size, device)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], Triangle] = {}

    def __call__(self, size: int, device: torch.device) -> Triangle:
        key = (size, str(device))
        if key not in self._cache:
            self._cache[key] = Triangle.build(size, device)
        return self._cache[key]
