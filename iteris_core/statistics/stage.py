"""One iteration's statistics for a stage's layers (the text encoders, or the denoiser), and their
solution: one :class:`~.common.InputStatistics` per distinct layer input, in the storage its size
calls for, behind the calls the hooks make.

Storage per input: row space where the plan asks for it (an explicit approximation); token space
while the input sees fewer tokens over all concepts than ``token_fraction`` of its width (unless
cross norms are exact); else ``d x d`` sums, packed as upper triangles when memory is short. Every
``d x d`` matrix comes from and returns to a :class:`~..buffers.MatrixPool` shared by the stage's
iterations; the per-layer systems are touched once per concept, so they may live in host memory
while the scratch sums stay next to the activations.
"""

from __future__ import annotations

import torch

from ..buffers import MatrixPool
from ..low_rank import LowRankDelta
from .common import TOKEN_FRACTION, InputStatistics, LayerPlan, LayerWeights, StageContext
from .dense import DenseInput, PackedInput
from .row_space import RowSpaceInput
from .token_space import TokenSpaceInput


class StageStatistics:
    """One iteration's statistics for a set of layers, and their solution.

    At iteration 0 pass ``weights=None``: the concepts' adaptive weights are computed from their
    own inputs and kept in :attr:`weights` for the later iterations, which pass them back.
    ``dense_groups`` are the inputs that left token space in an earlier iteration (every iteration
    sees as many tokens).
    """

    def __init__(self, plans: list[LayerPlan], *, regularization: float, adaptive: bool,
                 device: torch.device | str = "cpu", weights: dict[str, LayerWeights] | None = None,
                 seed: int = 0, system_device: torch.device | str | None = None, exact_cross_norm: bool = True,
                 packed: bool = False, pool: MatrixPool | None = None, token_fraction: float = TOKEN_FRACTION,
                 dense_groups: set[str] | None = None):
        device = torch.device(device)
        self.context = StageContext(regularization, adaptive, device,
                                    torch.device(system_device) if system_device is not None else device,
                                    exact_cross_norm, {} if weights is None else weights, weights is None, seed,
                                    pool if pool is not None else MatrixPool())
        self.dense_class = PackedInput if packed else DenseInput
        self.dense_groups: set[str] = set(dense_groups or ())
        members: dict[str, list[LayerPlan]] = {}
        for plan in plans:
            members.setdefault(plan.group, []).append(plan)
        self.inputs: dict[str, InputStatistics] = {
            group: self._storage(group, group_plans, token_fraction) for group, group_plans in members.items()}
        self.layers = {name: storage.layers[name] for storage in self.inputs.values() for name in storage.layers}

    def _storage(self, group: str, plans: list[LayerPlan], token_fraction: float) -> InputStatistics:
        if plans[0].subspace:
            return RowSpaceInput(self.context, group, plans)
        if token_fraction > 0 and not self.context.exact_cross_norm and group not in self.dense_groups:
            return TokenSpaceInput(self.context, group, plans, int(token_fraction * plans[0].info.input_dim))
        return self.dense_class(self.context, group, plans)

    # -- what the hooks ask ----------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, LayerWeights]:
        return self.context.weights

    @property
    def exact_cross_norm(self) -> bool:
        return self.context.exact_cross_norm

    def probe(self, dim: int) -> torch.Tensor:
        return self.context.probe(dim)

    def is_subspace_group(self, group: str) -> bool:
        return isinstance(self.inputs[group], RowSpaceInput)

    def needs_own_probes(self, group: str, concept: int) -> bool:
        return self.inputs[group].needs_own_probes(concept)

    def own_probe(self, tokens: torch.Tensor) -> torch.Tensor:
        """What a later iteration needs of the concept's own input rows ``X`` (n x d) for the cross
        norm: ``X G`` (n x k), or ``X`` itself when the cross norms are exact."""
        if self.context.exact_cross_norm:
            return tokens
        return tokens.float() @ self.context.probe(tokens.shape[1]).to(tokens.device)

    def observe_group(self, group: str, tokens: torch.Tensor, own_probe: torch.Tensor | None) -> None:
        """Full-token modes: the input's rows ``tokens`` (``X`` at iteration 0, ``Xt`` later) and the
        kept :meth:`own_probe` of the concept's rows for the same tokens (None at iteration 0)."""
        storage = self.inputs[group]
        if isinstance(storage, TokenSpaceInput) and not storage.fits(tokens.shape[0]):
            storage = self.inputs[group] = storage.to_dense(self.dense_class)
            self.layers.update(storage.layers)
            self.dense_groups.add(group)
        storage.observe_input(tokens, own_probe)

    def observe_group_probes(self, group: str, gram_probe: torch.Tensor, cross_probe: torch.Tensor | None,
                             energy: float, tokens: int) -> None:
        """Row-space mode: ``Xt^T (Xt G)`` and ``Xt^T (X G)`` (d x k), computed by the hook."""
        self.inputs[group].observe_probes_of_call(gram_probe, cross_probe, energy, tokens)

    def observe_layer(self, name: str, own: torch.Tensor | None, merged: torch.Tensor,
                      own_out: torch.Tensor | None = None, merged_out: torch.Tensor | None = None) -> None:
        """Layer sums: ``own`` = the concept's ``A_i X`` rows (or ``Q X`` in row space), ``merged`` =
        ``Xt`` (or ``Q Xt``), ``own_out`` = dW_i X, ``merged_out`` = D Xt (None at iteration 0)."""
        self.inputs[self.layers[name].plan.group].observe_layer(name, own, merged, own_out, merged_out)

    def own_output(self, name: str, concept: int, own_proj: torch.Tensor) -> torch.Tensor:
        """``dW_i X`` (n x o) from the kept ``A_i X`` rows (n x r)."""
        delta = self.layers[name].plan.deltas[concept]
        return own_proj.float() @ (delta.up * delta.scale).T.to(own_proj.device)

    def own_output_from_coords(self, name: str, concept: int, coords: torch.Tensor) -> torch.Tensor:
        """Row-space mode: ``dW_i X`` from the kept coordinates ``Q X`` (n x R'): the concept's down
        matrix lies in the row space, ``A_i = (A_i Q^T) Q``."""
        plan = self.layers[name].plan
        delta = plan.deltas[concept]
        down_in_basis = delta.down @ plan.basis.T
        return coords.float() @ (delta.up @ down_in_basis).T.mul(delta.scale).to(coords.device)

    # -- concept boundaries and results ----------------------------------------------------------
    def finish_concept(self, concept: int) -> None:
        """Fold the current concept's sums into every layer's system and empty the scratch."""
        for storage in self.inputs.values():
            storage.finish_concept(concept)

    @property
    def token_space_layers(self) -> list[str]:
        """Layers whose systems are (still) kept in token space."""
        return [name for s in self.inputs.values() if isinstance(s, TokenSpaceInput) for name in s.layers]

    @property
    def unreached_layers(self) -> list[str]:
        """Layers that no concept's samples ran (left out of the merge)."""
        return [name for s in self.inputs.values() if not s.reached for name in s.layers]

    def relative_objective(self) -> dict[str, float]:
        """Per layer: weighted residual of the incoming merged model over the weighted energy of the
        concepts' own deltas (0 = the merged layer reproduces every concept exactly)."""
        out = {}
        for name, value in self.context.objective.items():
            w = self.context.weights[name]
            reference = sum(l * e for l, e in zip(w.lam, w.target_energy))
            out[name] = value / reference if reference > 0 else 0.0
        return out

    def solve(self) -> dict[str, LowRankDelta]:
        """Solve every reached layer and release the systems."""
        merged = {}
        for storage in self.inputs.values():
            if storage.reached:
                merged.update(storage.solve())
        return merged
