"""Large matrices reused instead of freed and allocated again.

The statistics need ``d x d`` fp32 matrices (Gram scratch sums, per-layer systems, Cholesky
factors) for every layer, every concept and every iteration. On the CPU a freshly allocated matrix
is paid for in page faults the first time it is written: for ``d = 5120`` (100 MB) that costs more
than the Gram product that fills it (measured on a 2-core EPYC: 151 ms to accumulate into a fresh
matrix, 36 ms into a reused one). So the statistics take their matrices from a :class:`MatrixPool`
and give them back when done. On CUDA the caching allocator already reuses blocks; there the pool
changes nothing but the number of allocator calls.
"""

from __future__ import annotations

import torch

_Key = tuple[tuple[int, ...], torch.dtype, str]


class MatrixPool:
    """Spare tensors by (shape, dtype, device). Holding a spare keeps its memory allocated, so a
    pool lives as long as one merge stage and is cleared at its end."""

    def __init__(self) -> None:
        self._spare: dict[_Key, list[torch.Tensor]] = {}

    @staticmethod
    def _key(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> _Key:
        return tuple(shape), dtype, str(torch.device(device))

    def take(self, shape: tuple[int, ...], device: torch.device | str,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A contiguous tensor of that shape; its contents are undefined."""
        spare = self._spare.get(self._key(shape, dtype, device))
        return spare.pop() if spare else torch.empty(shape, dtype=dtype, device=device)

    def zeros(self, shape: tuple[int, ...], device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.take(shape, device, dtype).zero_()

    def give(self, tensor: torch.Tensor | None) -> None:
        """Return a tensor taken from the pool (or any contiguous tensor no one else uses)."""
        if tensor is None:
            return
        if not tensor.is_contiguous():
            tensor = tensor.mT if tensor.mT.is_contiguous() else None
            if tensor is None:
                return
        self._spare.setdefault(self._key(tensor.shape, tensor.dtype, tensor.device), []).append(tensor)

    def clear(self) -> None:
        self._spare.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for spare in self._spare.values() for t in spare)
