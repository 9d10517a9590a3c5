"""SSR-Merge's statistics and solve (Subspace Signal Routing for Training-Free LoRA Merging in
Diffusion Models, ICML 2026; public code: nagara214/SSR-Merge, ``ssr_merge/core.py``).

SSR keeps every LoRA's factors and fits only a small router between them. For a layer that
``N' >= 2`` concepts change (``k`` runs over them, in concept order), with concept ``k``'s delta
``dW_k = s_k B_k A_k`` (``s_k`` = strength x alpha / rank):

    A = [A_1; ...; A_N']              (R x d, R = sum r_k; each down matrix as its file stores it)
    B = [s_1 B_1, ..., s_N' B_N']     (o x R; the scale and the strength go with the up matrices)

Over the tokens ``x`` of concept ``k``'s own pass (its LoRA applied to the whole model), with
``z = A x`` and ``z_k = A_k x`` (concept ``k``'s rows of ``z``):

    G += z z^T          for the tokens of every concept with a delta on the layer
    Q[k rows] += z_k z^T  for concept k's own tokens only
    n += tokens

then ``R = (Q / n) (G / n + lam I)^-1`` in fp64 (``n`` is the total token count, ``lam`` an
absolute ridge: the merge's ``regularization``), and the merged delta is ``(B R) A``: a LoRA of
rank ``R`` whose down matrix is the stacked down matrices. As in the reference code, the
concepts without a delta on a layer add nothing to its sums, and a layer only one concept changes
is that concept's delta, unchanged (no statistics). Conv layers, which the reference skips (it
hooks Linear layers only), are handled as the rest of the engine handles them: a token is one
output position's input patch, and ``z`` is the conv of the input with the stacked down matrices
as kernels (:meth:`~iteris_core.adapter_hooks.LayerOps.project`). The statistics per layer are two
``R x R`` sums: nothing of the input width ``d`` is kept but ``A`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SolverError
from ..low_rank import LowRankDelta
from ..solver import NON_FINITE
from .common import LayerPlan, LayerWeights

PASSTHROUGH = "ssr, one LoRA (unchanged)"
ROUTED = "ssr"


def ssr_router(gram: torch.Tensor, guide: torch.Tensor, tokens: int, regularization: float, layer: str) -> torch.Tensor:
    """``R = (Q / n) (G / n + lam I)^-1`` in fp64, from the sums ``G`` (``gram``) and ``Q``
    (``guide``) over ``n`` tokens. ``G`` is symmetric positive semi-definite, so the system is
    solved through its Cholesky factor; errors name the layer and say what to change."""
    if tokens <= 0:
        raise SolverError(layer, "no token reached the layer: there is no router to fit")
    system = gram.to("cpu", torch.float64) / tokens
    system = system + regularization * torch.eye(system.shape[0], dtype=torch.float64)
    rhs = guide.to("cpu", torch.float64) / tokens
    if not (torch.isfinite(system).all() and torch.isfinite(rhs).all()):
        raise SolverError(layer, NON_FINITE)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise SolverError(layer, "its projection Gram G is singular (the LoRAs' down matrices are linearly "
                          "dependent on the samples, or fewer tokens than their summed rank reached it) and the "
                          "regularisation is 0: raise the regularisation")
    # R G' = Q'  <=>  G' R^T = Q'^T, G' symmetric
    return torch.cholesky_solve(rhs.T, factor).T


@dataclass
class SsrLayer:
    """One layer's stacked factors and its two ``R x R`` sums."""

    name: str
    concepts: list[int]          # the concepts with a delta here, in concept order
    offsets: list[int]           # concept j's rows of A are offsets[j]:offsets[j + 1]
    down: torch.Tensor           # A (R x d), fp32 on the CPU
    up: torch.Tensor             # B with the scales folded in (o x R), fp32 on the CPU
    gram: torch.Tensor           # sum z z^T (R x R), fp32, where the activations are
    guide: torch.Tensor          # Q (R x R)
    tokens: int = 0
    _down_on: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_plan(cls, plan: LayerPlan, device: torch.device) -> SsrLayer:
        present = [(k, d) for k, d in enumerate(plan.deltas) if d is not None]
        offsets = [0]
        for _k, delta in present:
            offsets.append(offsets[-1] + delta.rank)
        rank = offsets[-1]
        down = torch.cat([d.down.float().cpu() for _k, d in present])
        up = torch.cat([(d.up.float() * d.scale).cpu() for _k, d in present], dim=1)
        zeros = lambda: torch.zeros(rank, rank, dtype=torch.float32, device=device)  # noqa: E731
        return cls(plan.name, [k for k, _d in present], offsets, down, up, zeros(), zeros())

    def down_on(self, device: torch.device) -> torch.Tensor:
        """``A`` in fp32 on ``device`` (cast once per device)."""
        if device not in self._down_on:
            self._down_on[device] = self.down.to(device)
        return self._down_on[device]

    def observe(self, concept: int, z: torch.Tensor) -> None:
        """Add one call's projections ``z = A x`` (tokens x R) of ``concept``'s own pass."""
        j = self.concepts.index(concept)
        z = z.to(self.gram.device, torch.float32)
        self.gram.addmm_(z.T, z)
        start, stop = self.offsets[j], self.offsets[j + 1]
        self.guide[start:stop].addmm_(z[:, start:stop].T, z)
        self.tokens += z.shape[0]

    def solve(self, regularization: float) -> LowRankDelta:
        """The merged delta ``(B R) A``."""
        router = ssr_router(self.gram, self.guide, self.tokens, regularization, self.name)
        return LowRankDelta((self.up.double() @ router).float(), self.down, 1.0)


class SsrStatistics:
    """SSR's statistics of one stage's layers (or of one group of them), with the interface the
    merge loop and the hooks use for :class:`~.stage.StageStatistics`: the hooks find the layers
    that need statistics in :attr:`layers`, and feed each call's ``z = A x`` to :meth:`observe`."""

    def __init__(self, plans: list[LayerPlan], regularization: float, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.regularization = regularization
        self.layers: dict[str, SsrLayer] = {}              # changed by >= 2 concepts: routed
        self.passthrough: dict[str, LowRankDelta] = {}     # changed by one concept: kept as it is
        for plan in plans:
            present = [d for d in plan.deltas if d is not None]
            if len(present) == 1:
                self.passthrough[plan.name] = present[0]
            elif present:
                self.layers[plan.name] = SsrLayer.from_plan(plan, device)
        # what the loop reads of every statistics object: SSR has no weights, token space or objective
        self.weights: dict[str, LayerWeights] = {}
        self.token_space_layers: list[str] = []
        self.dense_groups: set[str] = set()

    # -- what the hooks ask ----------------------------------------------------------------------
    def wants(self, name: str, concept: int) -> bool:
        """Whether ``concept``'s pass feeds the layer's sums: only the concepts with a delta on it."""
        return concept in self.layers[name].concepts

    def stacked_down(self, name: str, device: torch.device) -> torch.Tensor:
        """The layer's stacked down matrices ``A`` (R x d, fp32) on ``device``."""
        return self.layers[name].down_on(device)

    def observe(self, name: str, concept: int, z: torch.Tensor) -> None:
        """One call's projections ``z = A x`` (tokens x R) of the layer's input in ``concept``'s pass."""
        self.layers[name].observe(concept, z)

    # -- concept boundaries and results ----------------------------------------------------------
    def finish_concept(self, concept: int) -> None:
        """Nothing to fold (the sums run over every concept): check that the concept's pass left
        finite sums, so that a non-finite activation is named at the layer that saw it."""
        for name, layer in self.layers.items():
            if concept in layer.concepts and not bool(torch.isfinite(layer.gram).all()):
                raise SolverError(name, NON_FINITE + f" (concept {concept + 1})")

    @property
    def unreached_layers(self) -> list[str]:
        """Routed layers that no concept's samples ran (left out of the merge)."""
        return [name for name, layer in self.layers.items() if layer.tokens == 0]

    @property
    def modes(self) -> dict[str, str]:
        """How each layer is merged, for the report."""
        return {**{name: ROUTED for name in self.layers}, **{name: PASSTHROUGH for name in self.passthrough}}

    def relative_objective(self) -> dict[str, float]:
        """SSR does not evaluate an objective on the merged model (it never runs it)."""
        return {}

    def solve(self) -> dict[str, LowRankDelta]:
        """The merged delta of every reached routed layer, and the passed-through ones."""
        merged = dict(self.passthrough)
        for name, layer in self.layers.items():
            if layer.tokens:
                merged[name] = layer.solve(self.regularization)
        return merged
