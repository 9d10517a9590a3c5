"""Layer inputs kept as their tokens: for an input that sees fewer tokens over all concepts than
half its width (the text encoders' prompts, a UNet's lowest resolutions with few samples, a DiT's
modulation Linears), the tokens themselves cost less than ``d x d`` sums. A layer's system is
``shift I + sum_j w_j Z_j^T Z_j`` and is solved exactly through a ``T x T`` system
(:func:`~..solver.solve_token_space`), for less time and memory than the sums and factorisations it
replaces. An input that outgrows the limit becomes a :class:`~.dense.DenseInput` on the spot (see
:meth:`TokenSpaceInput.to_dense`) and stays so in later iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..low_rank import LowRankDelta
from ..solver import ConceptTerm, TokenTerm, solve_token_space
from ..symmetric import add_upper_gram_
from .common import InputStatistics, LayerPlan, LayerSums, frobenius, sum_of_squares
from .dense import DenseInput, DenseLayer


@dataclass
class TokenLayer(LayerSums):
    own_chunks: list[torch.Tensor] = field(default_factory=list)    # this concept's (A X) rows per call
    weights: list[float] = field(default_factory=list)              # per folded concept: lam / n
    terms: list[TokenTerm] = field(default_factory=list)
    shift: float = 0.0                                              # sum_j lam_j a ||K_j||


class TokenSpaceInput(InputStatistics):
    """Finished concepts' token blocks ``Z_j`` and the current concept's chunks, at most ``limit``
    tokens in all."""

    def __init__(self, context, group: str, plans: list[LayerPlan], limit: int):
        self.limit = limit
        self.blocks: list[torch.Tensor] = []
        self.block_grams: list[torch.Tensor] = []   # Z_j Z_j^T: the product's diagonal blocks
        super().__init__(context, group, plans)

    def new_layer(self, plan: LayerPlan) -> TokenLayer:
        return TokenLayer(plan)

    def _reset_scratch(self) -> None:
        super()._reset_scratch()
        self.chunks: list[torch.Tensor] = []

    @property
    def total(self) -> int:
        return sum(b.shape[0] for b in self.blocks) + sum(c.shape[0] for c in self.chunks)

    def fits(self, rows: int) -> bool:
        """Whether ``rows`` more tokens stay within the limit."""
        return self.total + rows <= self.limit

    # -- observations -------------------------------------------------------------------------
    def observe_input(self, tokens: torch.Tensor, own_probe: torch.Tensor | None) -> None:
        xt32 = tokens.to(self.context.device, torch.float32)
        self.chunks.append(xt32.clone())   # the activation may be reused once the hook returns
        self.observe_probes(xt32, own_probe)
        if self.context.first_iteration:
            self.energy += sum_of_squares(xt32)
        self.tokens += xt32.shape[0]

    def observe_layer(self, name: str, own: torch.Tensor | None, merged: torch.Tensor,
                      own_out: torch.Tensor | None, merged_out: torch.Tensor | None) -> None:
        """``own`` = A_i X (n x r, None where the concept has no delta); ``merged`` (the tokens) is
        kept once, by :meth:`observe_input`."""
        layer = self.layers[name]
        if own is not None:
            layer.own_chunks.append(own.to(self.context.device, torch.float32).clone())
        layer.observe_outputs(own_out, merged_out)

    # -- folding and solving ------------------------------------------------------------------
    def gram_norm(self, tokens: int) -> float:
        self.blocks.append(torch.cat(self.chunks))   # this concept's block Z_i
        self.chunks = []
        block = self.blocks[-1]
        self.block_grams.append(block @ block.T)
        return frobenius(self.block_grams[-1]) / tokens    # ||Z^T Z|| = ||Z Z^T||

    def fold(self, layer: TokenLayer, concept: int, lam: float, tokens: int, gram_norm: float, cross_norm: float) -> None:
        layer.weights.append(lam / tokens)
        layer.shift += lam * self.context.regularization * gram_norm
        delta = layer.plan.deltas[concept]
        if delta is not None:
            coefficients = torch.cat(layer.own_chunks).T.div_(tokens).to(self.context.system_device)
            layer.terms.append(TokenTerm(delta, lam, coefficients, cross_norm, len(self.blocks) - 1))
        layer.own_chunks = []

    def drop_concept(self, layer: TokenLayer) -> None:
        super().drop_concept(layer)
        layer.own_chunks = []

    def solve(self) -> dict[str, LowRankDelta]:
        stacked = torch.cat(self.blocks).to(self.context.system_device)
        product = self._token_gram(stacked.device)   # Z Z^T, shared by the input's layers
        sizes = [b.shape[0] for b in self.blocks]
        merged = {name: solve_token_space(stacked, sizes, layer.weights, layer.shift, product, layer.terms,
                                          self.context.regularization, name)
                  for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.weights, layer.terms = [], []
        return merged

    def _token_gram(self, device: torch.device) -> torch.Tensor:
        """``Z Z^T`` of the stacked blocks: the diagonal blocks are the concepts' own ``Z_j Z_j^T``,
        already formed for their norms, so only the blocks above the diagonal are multiplied (for
        two concepts, a quarter of the product; it is the largest cost of a wide token-space input)."""
        sizes = [b.shape[0] for b in self.blocks]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        total = sum(sizes)
        product = torch.empty(total, total, dtype=torch.float32, device=device)
        for i, (block, gram) in enumerate(zip(self.blocks, self.block_grams)):
            a, b = starts[i], starts[i] + sizes[i]
            product[a:b, a:b] = gram
            for j in range(i + 1, len(self.blocks)):
                c, d = starts[j], starts[j] + sizes[j]
                product[a:b, c:d] = block @ self.blocks[j].T
                product[c:d, a:b] = product[a:b, c:d].T
        return product

    # -- leaving token space ------------------------------------------------------------------
    def to_dense(self, dense_class: type[DenseInput]) -> DenseInput:
        """The same statistics as ordinary sums: the current concept's chunks into the Gram scratch
        and its layers' numerators, the folded concepts into their systems and terms."""
        dense = dense_class(self.context, self.group, [layer.plan for layer in self.layers.values()])
        dense.reached, dense.tokens, dense.energy = self.reached, self.tokens, self.energy
        dense.probe_gram, dense.probe_cross = self.probe_gram, self.probe_cross
        for chunk in self.chunks:
            dense.add_gram(chunk)
        device, pool = self.context.system_device, self.context.pool
        for name, layer in self.layers.items():
            target: DenseLayer = dense.layers[name]
            target.output_energy, target.residual = layer.output_energy, layer.residual
            if layer.own_chunks:
                if len(layer.own_chunks) != len(self.chunks):
                    raise RuntimeError(f"layer {name} saw {len(layer.own_chunks)} calls, its input group "
                                       f"{self.group!r} {len(self.chunks)}")
                for own, merged in zip(layer.own_chunks, self.chunks):
                    target.numerator = own.T @ merged if target.numerator is None else target.numerator.add_(own.T @ merged)
            if layer.weights:
                system = pool.take((self.dim, self.dim), device)
                for k, (block, weight) in enumerate(zip(self.blocks, layer.weights)):
                    add_upper_gram_(system, block.to(device), first=k == 0, alpha=weight)
                stored = dense.store(system)   # packing reads the upper triangle only
                if stored is not system:
                    pool.give(system)
                target.system = dense.plus_diagonal(stored, layer.shift)
            target.terms = [ConceptTerm(t.delta, t.lam, t.coefficients @ self.blocks[t.block].to(t.coefficients),
                                        t.cross_norm) for t in layer.terms]
        return dense
