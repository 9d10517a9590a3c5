"""Layers solved in the row space ``Q`` of their LoRAs (an explicit, approximate option): projected
``R' x R'`` sums instead of ``d x d`` ones, every Frobenius norm estimated with fixed random probes
(``||G||_F^2 = E ||G g||^2 / k``). It is the exact minimiser of the objective over deltas with that
row space, and equals the full solution for a single concept (:func:`~..solver.solve_subspace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..low_rank import LowRankDelta
from ..solver import solve_subspace
from .common import PROBES, InputStatistics, LayerPlan, LayerSums, accumulate, frobenius


@dataclass
class RowSpaceLayer(LayerSums):
    system: torch.Tensor | None = None      # sum_i lam_i (Q K_i Q^T + a ||K_i|| I)   (R' x R')
    rhs: torch.Tensor | None = None         # sum_i s lam B_i A^_i (C^_i + a ||C_i|| I)
    numerator: torch.Tensor | None = None   # this concept: (Q X)^T (Q Xt)
    proj_gram: torch.Tensor | None = None   # this concept: (Q Xt)^T (Q Xt)


class RowSpaceInput(InputStatistics):
    """One layer input whose layers are solved in their LoRAs' row spaces."""

    def new_layer(self, plan: LayerPlan) -> RowSpaceLayer:
        return RowSpaceLayer(plan)

    def observe_probes_of_call(self, gram_probe: torch.Tensor, cross_probe: torch.Tensor | None, energy: float,
                               tokens: int) -> None:
        """``Xt^T (Xt G)`` and, in later iterations, ``Xt^T (X G)`` (d x k), computed by the hook
        (a conv's patches need not be unfolded for them)."""
        device = self.context.device
        self.probe_gram = accumulate(self.probe_gram, gram_probe, device)
        if cross_probe is not None:
            self.probe_cross = accumulate(self.probe_cross, cross_probe, device)
        self.energy += energy
        self.tokens += tokens

    def observe_layer(self, name: str, own: torch.Tensor | None, merged: torch.Tensor,
                      own_out: torch.Tensor | None, merged_out: torch.Tensor | None) -> None:
        """``own`` = Q X (None at iteration 0), ``merged`` = Q Xt (n x R')."""
        layer, device = self.layers[name], self.context.device
        merged32 = merged.to(device, torch.float32)
        layer.proj_gram = accumulate(layer.proj_gram, merged32.T @ merged32, device)
        if own is not None:
            layer.numerator = accumulate(layer.numerator, own.to(merged32).T @ merged32, device)
        layer.observe_outputs(own_out, merged_out)

    def gram_norm(self, tokens: int) -> float:
        return frobenius(self.probe_gram) / tokens / PROBES ** 0.5

    def cross_norm(self, tokens: int, gram_norm: float) -> float:
        return gram_norm if self.probe_cross is None else frobenius(self.probe_cross) / tokens / PROBES ** 0.5

    def fold(self, layer: RowSpaceLayer, concept: int, lam: float, tokens: int, gram_norm: float,
             cross_norm: float) -> None:
        a, device, systems = self.context.regularization, self.context.device, self.context.system_device
        proj_gram = layer.proj_gram / tokens
        eye = torch.eye(proj_gram.shape[0], device=device)
        layer.system = accumulate(layer.system, lam * (proj_gram + a * gram_norm * eye), systems)
        delta = layer.plan.deltas[concept]
        if delta is not None:
            cross = proj_gram if layer.numerator is None else layer.numerator / tokens
            coords = delta.down.to(device) @ layer.plan.basis.to(device).T      # A^ = A Q^T (r x R')
            rows = (delta.up.to(device) @ coords) @ (cross + a * cross_norm * eye)
            layer.rhs = accumulate(layer.rhs, rows * (delta.scale * lam), systems)
        layer.numerator = layer.proj_gram = None

    def drop_concept(self, layer: RowSpaceLayer) -> None:
        super().drop_concept(layer)
        layer.numerator = layer.proj_gram = None

    def solve(self) -> dict[str, LowRankDelta]:
        merged = {name: solve_subspace(layer.system, layer.rhs, layer.plan.basis, name)
                  for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.system = layer.rhs = None
        return merged
