"""Symmetric matrices stored as their upper triangle (row-major, diagonal included).

The Gram sums and the per-layer systems are symmetric, so half of each ``d x d`` is redundant;
for SDXL that half is several gigabytes. Accumulation adds the triangle of each batch's Gram
(computed in full, one layer at a time, then dropped); solving unpacks one system at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Triangle:
    """Index helpers for one matrix size on one device."""

    size: int
    mask: torch.Tensor      # (d, d) bool, True on and above the diagonal
    diagonal: torch.Tensor  # positions of the diagonal entries in the packed vector

    @staticmethod
    def build(size: int, device: torch.device) -> Triangle:
        mask = torch.ones(size, size, dtype=torch.bool, device=device).triu()
        rows = torch.arange(size, device=device)
        # row i starts after sum_{j<i} (d - j) entries; its diagonal entry is the first of the row
        diagonal = rows * size - rows * (rows - 1) // 2
        return Triangle(size, mask, diagonal)

    @property
    def packed_length(self) -> int:
        return self.size * (self.size + 1) // 2

    def pack(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.masked_select(self.mask)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.size, self.size, dtype=packed.dtype, device=packed.device)
        full.masked_scatter_(self.mask.to(packed.device), packed)
        full = full + full.T
        full.diagonal().sub_(packed[self.diagonal.to(packed.device)])
        return full

    def frobenius(self, packed: torch.Tensor) -> float:
        diagonal = packed[self.diagonal.to(packed.device)]
        return float((2 * packed.double().pow(2).sum() - diagonal.double().pow(2).sum()).clamp_min(0).sqrt())

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
