"""Layer inputs kept as ``d x d`` sums: the Gram scratch ``sum Xt^T Xt`` per concept and one system
``M = sum_i lam_i (K_i + a ||K_i|| I)`` per layer, solved by Cholesky (:func:`~..solver.solve_full`).

:class:`DenseInput` keeps full matrices (only their upper blocks computed); :class:`PackedInput`
keeps the upper triangles (half the memory, some time spent packing), for when memory is short.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..low_rank import LowRankDelta
from ..solver import ConceptTerm, solve_full
from ..symmetric import add_upper_gram_, upper_gram_frobenius
from .common import InputStatistics, LayerPlan, LayerSums, accumulate, frobenius, sum_of_squares


@dataclass
class DenseLayer(LayerSums):
    system: torch.Tensor | None = None           # M: full, or a packed triangle
    terms: list[ConceptTerm] = field(default_factory=list)
    numerator: torch.Tensor | None = None        # this concept: (A X)^T Xt (r x d)


class DenseInput(InputStatistics):
    """Full ``d x d`` Gram sums and systems (upper blocks computed, the lower ones never read)."""

    def new_layer(self, plan: LayerPlan) -> DenseLayer:
        return DenseLayer(plan)

    def _reset_scratch(self) -> None:
        super()._reset_scratch()
        self.gram: torch.Tensor | None = None    # sum Xt^T Xt
        self.cross: torch.Tensor | None = None   # sum Xt^T X (exact cross norms)

    # storage of symmetric matrices: overridden by the packed variant ------------------------
    def add_gram(self, tokens: torch.Tensor) -> None:
        """``gram += tokens^T tokens`` (upper blocks, in a pooled matrix). Each batch's product is
        formed on its own and then added, as the packed storage must: both storages sum the same
        numbers in the same order, so a merge does not depend on which one memory called for."""
        pool, device = self.context.pool, self.context.device
        if self.gram is None:
            self.gram = add_upper_gram_(pool.take((self.dim, self.dim), device), tokens, first=True)
            return
        scratch = add_upper_gram_(pool.take((self.dim, self.dim), device), tokens, first=True)
        self.gram.add_(scratch)
        pool.give(scratch)

    def stored_norm(self, stored: torch.Tensor) -> float:
        return upper_gram_frobenius(stored)

    def plus_diagonal(self, stored: torch.Tensor, value: float) -> torch.Tensor:
        stored.diagonal().add_(value)
        return stored

    def store(self, matrix: torch.Tensor) -> torch.Tensor:
        """The storage form of a full matrix whose upper triangle is valid."""
        return matrix

    def full(self, stored: torch.Tensor) -> torch.Tensor:
        """A ``d x d`` matrix with the stored upper triangle."""
        return stored

    def release_full(self, matrix: torch.Tensor) -> None:
        """Done with :meth:`full`'s result (the full variant's systems go back with it)."""
        self.context.pool.give(matrix)

    # -- observations -------------------------------------------------------------------------
    def observe_input(self, tokens: torch.Tensor, own_probe: torch.Tensor | None) -> None:
        """``tokens`` (n x d): ``X`` at iteration 0, ``Xt`` later; ``own_probe``: the kept ``X G``
        (or ``X`` when cross norms are exact) of the same tokens, None at iteration 0."""
        xt32 = tokens.to(self.context.device, torch.float32)
        self.add_gram(xt32)
        self.observe_cross(xt32, own_probe)
        if self.context.first_iteration:
            self.energy += sum_of_squares(xt32)
        self.tokens += xt32.shape[0]

    def observe_cross(self, xt32: torch.Tensor, own_probe: torch.Tensor | None) -> None:
        if own_probe is None or not self.context.exact_cross_norm:
            self.observe_probes(xt32, own_probe)
            return
        first = self.cross is None   # own_probe is X itself: Xt^T X, whose norm is ||X Xt^T||
        if first:
            self.cross = self.context.pool.take((self.dim, self.dim), self.context.device)
        self.cross.addmm_(xt32.T, own_probe.to(self.context.device, torch.float32), beta=0.0 if first else 1.0)

    def observe_layer(self, name: str, own: torch.Tensor | None, merged: torch.Tensor,
                      own_out: torch.Tensor | None, merged_out: torch.Tensor | None) -> None:
        """``own`` = A_i X (n x r, None where the concept has no delta), ``merged`` = Xt (n x d)."""
        layer = self.layers[name]
        if own is not None:
            merged32 = merged.to(self.context.device, torch.float32)
            layer.numerator = accumulate(layer.numerator, own.to(merged32).T @ merged32, self.context.device)
        layer.observe_outputs(own_out, merged_out)

    # -- folding and solving ------------------------------------------------------------------
    def gram_norm(self, tokens: int) -> float:
        return self.stored_norm(self.gram) / tokens   # the token sum: 1/n is folded into the weight

    def cross_norm(self, tokens: int, gram_norm: float) -> float:
        if self.cross is not None:
            return frobenius(self.cross) / tokens
        return super().cross_norm(tokens, gram_norm)

    def fold(self, layer: DenseLayer, concept: int, lam: float, tokens: int, gram_norm: float, cross_norm: float) -> None:
        a = self.context.regularization
        layer.system = self.fold_gram(layer.system, self.gram, lam / tokens, lam * a * gram_norm)
        delta = layer.plan.deltas[concept]
        if delta is not None:
            numerator = (layer.numerator / tokens).to(self.context.system_device)
            layer.terms.append(ConceptTerm(delta, lam, numerator, cross_norm))
        layer.numerator = None

    def fold_gram(self, system: torch.Tensor | None, gram: torch.Tensor, lam: float, shift: float) -> torch.Tensor:
        """``system + lam * gram + shift * I`` in place (a pooled matrix for the first concept), on
        the systems' device."""
        pool, target = self.context.pool, self.context.system_device
        staged = gram
        if gram.device != target:
            staged = pool.take(gram.shape, target).copy_(gram)
        if system is None:
            system = torch.mul(staged, lam, out=pool.take(staged.shape, target))
        else:
            # a product and a sum, each rounded once: not add_(alpha=...), whose fused multiply-add
            # rounds differently in a vector loop's tail, where the full and the packed storage differ
            scaled = torch.mul(staged, lam, out=pool.take(staged.shape, target))
            system.add_(scaled)
            pool.give(scaled)
        if staged is not gram:
            pool.give(staged)
        return self.plus_diagonal(system, shift)

    def drop_concept(self, layer: DenseLayer) -> None:
        super().drop_concept(layer)
        layer.numerator = None

    def release_scratch(self) -> None:
        self.context.pool.give(self.gram)
        self.context.pool.give(self.cross)

    def solve(self) -> dict[str, LowRankDelta]:
        merged = {}
        for name, layer in self.layers.items():
            system = self.full(layer.system)
            merged[name] = solve_full(system, layer.terms, self.context.regularization, name, self.context.pool)
            self.release_full(system)
            layer.system, layer.terms = None, []
        return merged


class PackedInput(DenseInput):
    """As :class:`DenseInput`, with the Gram sums and systems kept as packed upper triangles."""

    def _triangle(self, device: torch.device):
        return self.context.triangles(self.dim, device)

    def add_gram(self, tokens: torch.Tensor) -> None:
        # the upper blocks in a pooled scratch, then their triangle
        pool, device = self.context.pool, self.context.device
        scratch = add_upper_gram_(pool.take((self.dim, self.dim), device), tokens, first=True)
        self.gram = accumulate(self.gram, self.store(scratch), device)
        pool.give(scratch)

    def stored_norm(self, stored: torch.Tensor) -> float:
        return self._triangle(stored.device).frobenius(stored)

    def plus_diagonal(self, stored: torch.Tensor, value: float) -> torch.Tensor:
        return self._triangle(stored.device).add_to_diagonal(stored, value)

    def store(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._triangle(matrix.device).pack(matrix)

    def full(self, stored: torch.Tensor) -> torch.Tensor:
        out = self.context.pool.take((self.dim, self.dim), stored.device)
        return self._triangle(stored.device).unpack_upper(stored, out=out)

    def release_scratch(self) -> None:
        # packed sums are made fresh by each batch's product; only the cross scratch is pooled
        self.context.pool.give(self.cross)
