"""What every storage of layer-input statistics shares: the layer plans, the concepts' weights,
the stage-wide settings, and the per-input bookkeeping that does not depend on how the big sums
are kept (token counts, input energy, the cross-norm probes, each layer's residual and energy).

One :class:`InputStatistics` subclass holds the statistics of one distinct layer input (a
*group*: q/k/v of an attention read one input, all cross-attention k/v of a UNet the text
context) and of the layers that read it, and solves those layers. Concepts are taken one after
another: during concept ``i``'s pass the hooks feed token matrices (rows are tokens) to
:meth:`InputStatistics.observe_input` and :meth:`InputStatistics.observe_layer`; at the end of
the pass :meth:`InputStatistics.finish_concept` folds the concept into the layers' systems and
empties the scratch sums; after the last concept :meth:`InputStatistics.solve` returns the layers'
merged deltas.

``X`` is what the concept's own model saw, ``Xt`` what the merged model sees on the same tokens
(``Xt = X`` at iteration 0). ``X`` enters the later iterations only through ``X G`` (a few random
probes, or ``X`` itself when cross norms are exact) and ``A_i X``, kept from iteration 0 by the hooks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..buffers import MatrixPool
from ..errors import SolverError
from ..layers import LayerInfo
from ..low_rank import LowRankDelta
from ..solver import NON_FINITE, adaptive_weight
from ..symmetric import Triangles

PROBES = 32  # probe vectors for Frobenius-norm estimates (cross norms, and every norm in row-space mode)
# probe projections X G kept between iterations: they only scale the ridge (1e-4 of the Gram's
# scale), so bf16's 3 digits are plenty and halve the host memory they take
PROBE_DTYPE = torch.bfloat16
TOKEN_FRACTION = 0.5  # token space while a layer input sees at most this many tokens per input channel


@dataclass
class LayerPlan:
    """What the merge knows about one layer before any statistics: its concepts' deltas."""

    name: str
    info: LayerInfo
    group: str
    deltas: list[LowRankDelta | None]    # per concept, at strength; None where it has none
    basis: torch.Tensor | None = None    # (R', d) orthonormal rows: solve in the LoRAs' row space
    ssr: bool = False                    # merged by SSR's router: R x R statistics only (see .ssr)

    @property
    def subspace(self) -> bool:
        return self.basis is not None

    @property
    def shared(self) -> bool:
        """Whether two or more concepts change the layer."""
        return sum(d is not None for d in self.deltas) >= 2


@dataclass
class LayerWeights:
    """Per-layer, per-concept quantities fixed at iteration 0 (on the concepts' own inputs)."""

    lam: list[float] = field(default_factory=list)
    target_energy: list[float] = field(default_factory=list)  # ||dW_i X_i||^2 / n_i


def frobenius(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix))


def sum_of_squares(values: torch.Tensor) -> float:
    """``sum(values ** 2)`` in fp32 as one reduction: no squared copy of an activation-sized tensor."""
    return float(torch.linalg.vector_norm(values, dtype=torch.float32)) ** 2


def accumulate(current: torch.Tensor | None, update: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``current + update`` in place, fp32 on ``device``; takes ownership of ``update`` (a fresh product)."""
    update = update.to(device, torch.float32)
    return update if current is None else current.add_(update)


@dataclass
class StageContext:
    """Settings and state that one iteration's statistics share across all layer inputs."""

    regularization: float
    adaptive: bool
    device: torch.device                 # scratch sums: where the activations are
    system_device: torch.device          # per-layer systems (touched once per concept: may be host memory)
    exact_cross_norm: bool               # False: ||X Xt^T|| from random probes
    weights: dict[str, LayerWeights]     # adaptive weights, fixed at iteration 0
    first_iteration: bool
    seed: int = 0
    pool: MatrixPool = field(default_factory=MatrixPool)
    triangles: Triangles = field(default_factory=Triangles)
    objective: dict[str, float] = field(default_factory=dict)   # lam-weighted residual of the incoming merge
    _probes: dict[int, torch.Tensor] = field(default_factory=dict)

    def probe(self, dim: int) -> torch.Tensor:
        """Fixed Gaussian probe matrix (d x k) for Frobenius-norm estimates: the same for a width in
        every iteration, whatever order the layers ask in (iteration 0's ``X G`` meets a later
        iteration's ``Xt G``)."""
        if dim not in self._probes:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + dim)
            self._probes[dim] = torch.randn(dim, PROBES, generator=generator)
        return self._probes[dim]


@dataclass
class LayerSums:
    """One layer's per-concept sums that every storage keeps alike."""

    plan: LayerPlan
    output_energy: float = 0.0   # this concept, iteration 0: sum ||dW x||^2
    residual: float = 0.0        # this concept, later iterations: sum ||D xt - dW x||^2

    def observe_outputs(self, own_out: torch.Tensor | None, merged_out: torch.Tensor | None) -> None:
        """``own_out`` = dW_i X (None if the concept has no delta here), ``merged_out`` = D Xt (None at
        iteration 0): the output energy of the concept's delta, or the merged model's residual."""
        if merged_out is None:
            if own_out is not None:
                self.output_energy += sum_of_squares(own_out)
        else:
            self.residual += sum_of_squares(merged_out if own_out is None else merged_out.float() - own_out.float())


class InputStatistics(ABC):
    """The statistics of one layer input and the layers that read it, in one storage mode."""

    def __init__(self, context: StageContext, group: str, plans: list[LayerPlan]):
        self.context = context
        self.group = group
        self.dim = plans[0].info.input_dim
        self.layers = {p.name: self.new_layer(p) for p in plans}
        self.reached = False             # some concept's samples ran this input
        self._reset_scratch()

    # -- per layer state ----------------------------------------------------------------------
    @abstractmethod
    def new_layer(self, plan: LayerPlan) -> LayerSums:
        """The storage's per-layer state."""

    def _reset_scratch(self) -> None:
        """Empty the per-concept sums shared by every mode."""
        self.tokens = 0
        self.energy = 0.0          # sum ||x||^2 of the concept's own inputs (iteration 0)
        self.probe_gram: torch.Tensor | None = None    # sum Xt^T (Xt G)  (d x k)
        self.probe_cross: torch.Tensor | None = None   # sum Xt^T (X G)

    # -- observations -------------------------------------------------------------------------
    def needs_own_probes(self, concept: int) -> bool:
        """Whether a later iteration needs the concept's own projections ``X G`` of this input:
        only for the cross norms of layers that carry the concept's delta."""
        return any(layer.plan.deltas[concept] is not None for layer in self.layers.values())

    @abstractmethod
    def observe_layer(self, name: str, own: torch.Tensor | None, merged: torch.Tensor,
                      own_out: torch.Tensor | None, merged_out: torch.Tensor | None) -> None:
        """A layer's share of one call (see the subclasses for what ``own`` and ``merged`` are)."""

    # -- concept boundaries -------------------------------------------------------------------
    def finish_concept(self, concept: int) -> None:
        """Fold the current concept into every layer's system and empty the scratch; an input the
        concept's samples never ran gets nothing of it."""
        if self.tokens == 0:
            for layer in self.layers.values():
                if self.context.first_iteration:
                    weights = self.context.weights.setdefault(layer.plan.name, LayerWeights())
                    weights.lam.append(0.0)
                    weights.target_energy.append(0.0)
                self.drop_concept(layer)
            self._reset_scratch()
            return
        self.reached = True
        n = self.tokens
        gram_norm = self.gram_norm(n)
        cross_norm = self.cross_norm(n, gram_norm)
        if not all(map(math.isfinite, (gram_norm, cross_norm, self.energy))):
            raise SolverError(next(iter(self.layers)), NON_FINITE + f" (concept {concept + 1})")
        for layer in self.layers.values():
            lam = self._weigh(layer, concept, n)
            self.fold(layer, concept, lam, n, gram_norm, cross_norm)
            layer.output_energy = layer.residual = 0.0
        self.release_scratch()
        self._reset_scratch()

    def _weigh(self, layer: LayerSums, concept: int, tokens: int) -> float:
        """The concept's weight at this layer: computed at iteration 0 (the paper's ``lam_i``, or 1),
        read back later, when the merged model's residual enters the objective."""
        plan, context = layer.plan, self.context
        if context.first_iteration:
            output_energy = layer.output_energy / tokens
            weights = context.weights.setdefault(plan.name, LayerWeights())
            weights.lam.append(self._concept_weight(plan, concept, self.energy / tokens, output_energy))
            weights.target_energy.append(output_energy)
        else:
            previous = context.objective.get(plan.name, 0.0)
            context.objective[plan.name] = previous + context.weights[plan.name].lam[concept] * layer.residual / tokens
        return context.weights[plan.name].lam[concept]

    def _concept_weight(self, plan: LayerPlan, concept: int, energy: float, output_energy: float) -> float:
        delta = plan.deltas[concept]
        if not self.context.adaptive:
            return 1.0
        if delta is None:
            return adaptive_weight(0.0, 0.0, plan.info.input_dim, energy)
        return adaptive_weight(delta.frobenius_sq(), output_energy, plan.info.input_dim, energy)

    @abstractmethod
    def gram_norm(self, tokens: int) -> float:
        """``||K||_F`` of the concept's mean Gram ``Xt^T Xt / n``."""

    def cross_norm(self, tokens: int, gram_norm: float) -> float:
        """``||C||_F`` of the mean cross term ``X Xt^T / n``: exact ``||K||`` times the probed ratio
        ``||C^T G|| / ||K G||`` (exactly 1 when the inputs agree), or ``||K||`` at iteration 0."""
        if self.probe_cross is None:
            return gram_norm
        return gram_norm * frobenius(self.probe_cross) / max(frobenius(self.probe_gram), 1e-30)

    @abstractmethod
    def fold(self, layer: LayerSums, concept: int, lam: float, tokens: int, gram_norm: float, cross_norm: float) -> None:
        """Add the concept's part to the layer's system and right-hand side."""

    def drop_concept(self, layer: LayerSums) -> None:
        """Forget what a pass that never reached the input left in the layer's state."""
        layer.output_energy = layer.residual = 0.0

    def release_scratch(self) -> None:
        """Give pooled scratch matrices back (after the concept is folded)."""

    @abstractmethod
    def solve(self) -> dict[str, LowRankDelta]:
        """The merged delta of every layer (after the last concept), releasing the systems."""

    def observe_probes(self, xt32: torch.Tensor, own_probe: torch.Tensor | None) -> None:
        """The cross-norm probes of a full-token call: ``Xt^T (X G)`` and ``Xt^T (Xt G)``, the
        latter rounded as the kept ``X G`` was, so that their ratio is exactly 1 when X = Xt."""
        if own_probe is None:
            return
        own32 = own_probe.to(self.context.device, torch.float32)
        probed = (xt32 @ self.context.probe(self.dim).to(self.context.device)).to(own_probe.dtype).float()
        self.probe_cross = accumulate(self.probe_cross, xt32.T @ own32, self.context.device)
        self.probe_gram = accumulate(self.probe_gram, xt32.T @ probed, self.context.device)
