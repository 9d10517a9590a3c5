"""Streaming statistics for one merge stage (the text encoders, or the UNet).

Concepts are taken one after another. During concept ``i``'s pass the hooks feed token matrices
(rows are tokens) here; nothing of the activations is kept beyond fp32 sums:

* per distinct layer input (a *group*: q/k/v share one, all cross-attention k/v share the text
  context): scratch sums ``Xt^T Xt`` and, from iteration 1, either ``Xt^T X`` (d x d) or only
  ``Xt^T (X G)`` and ``Xt^T (Xt G)`` with a thin random ``G``, whose norms' ratio estimates
  ``||X Xt^T|| / ||Xt Xt^T||`` (exactly 1 when the inputs agree), the token count and the input
  energy; emptied after every concept. ``X`` enters only through ``X G`` (or ``X`` itself when
  the cross norms are exact), kept from iteration 0 by the hooks;
* per layer: the system ``M = sum_i lam_i (K_i + a ||K_i|| I)`` (d x d, one per layer whatever
  the number of concepts) and, per concept, the small ``(A_i X_i)^T``-by-``Xt_i`` product (r_i x d).
  The systems are touched once per concept, so they may live in host memory while the scratch
  sums stay next to the activations.

Symmetric sums and systems are kept by their upper triangle (:mod:`.symmetric`), and every
``d x d`` matrix comes from and returns to a :class:`~.buffers.MatrixPool` shared by the stage's
iterations.

*Token space.* A layer input that sees fewer tokens over all concepts than half its width (the
text encoders' 77-token prompts; the UNet's lowest resolutions with few samples) keeps the tokens
themselves instead of ``d x d`` sums: its systems are ``shift I + sum_j w_j Z_j^T Z_j`` and are
solved exactly through a ``T x T`` system (:func:`~.solver.solve_token_space`), which costs less
than the Gram sums and ``d x d`` factorisations it replaces and never more memory. A group that
outgrows the limit is turned into ordinary sums on the spot, and stays so in later iterations.

Layers solved in the row space ``Q`` of their LoRAs keep projected R' x R' sums instead, and
estimate the ridge norms with fixed random probes (``||G||_F^2 = E ||G g||^2 / k``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .buffers import MatrixPool
from .errors import SolverError
from .layers import LayerInfo
from .low_rank import LowRankDelta
from .solver import (NON_FINITE, ConceptTerm, TokenTerm, adaptive_weight, solve_full, solve_subspace,
                     solve_token_space)
from .symmetric import Triangles, add_upper_gram_, upper_gram_frobenius

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

    @property
    def subspace(self) -> bool:
        return self.basis is not None


@dataclass
class LayerWeights:
    """Per-layer, per-concept quantities fixed at iteration 0 (on the concepts' own inputs)."""

    lam: list[float] = field(default_factory=list)
    target_energy: list[float] = field(default_factory=list)  # ||dW_i X_i||^2 / n_i


@dataclass
class _Group:
    """Scratch sums for one distinct layer input; emptied after every concept."""

    dim: int
    gram: torch.Tensor | None = None         # sum Xt^T Xt (full mode: upper blocks; packed if memory is short)
    cross: torch.Tensor | None = None        # sum Xt^T X               (full mode, exact cross norms)
    probe_gram: torch.Tensor | None = None   # sum Xt^T (Xt G)  (d x k) (row-space mode)
    probe_cross: torch.Tensor | None = None  # sum X^T (Xt G)
    tokens: int = 0
    energy: float = 0.0                      # sum ||x||^2 of the concept's own inputs


@dataclass
class _Layer:
    plan: LayerPlan
    system: torch.Tensor | None = None       # M (full mode: d x d, or packed; row space: R' x R')
    rhs: torch.Tensor | None = None          # row space: sum_i s lam B_i A^_i (C^_i + a|C_i| I)
    terms: list[ConceptTerm] = field(default_factory=list)
    numerator: torch.Tensor | None = None    # this concept: (A X)^T Xt (r x d), row space: (Q X)^T (Q Xt)
    proj_gram: torch.Tensor | None = None    # this concept, row space: (Q Xt)^T (Q Xt)
    output_energy: float = 0.0               # this concept: sum ||dW x||^2
    residual: float = 0.0                    # this concept: sum ||D xt - dW x||^2
    # token space: this concept's (A X) tokens per forward call; per folded concept its weight
    # lam / n and term; the ridge shift sum_j lam_j a ||K_j||
    own_chunks: list[torch.Tensor] = field(default_factory=list)
    token_weights: list[float] = field(default_factory=list)
    token_terms: list[TokenTerm] = field(default_factory=list)
    shift: float = 0.0


@dataclass
class _TokenGroup:
    """A layer input kept as tokens: finished concepts' blocks ``Z_j`` and the current concept's
    chunks, at most ``limit`` tokens in all."""

    limit: int
    blocks: list[torch.Tensor] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b.shape[0] for b in self.blocks) + sum(c.shape[0] for c in self.chunks)


def _frobenius(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix))


def sum_of_squares(values: torch.Tensor) -> float:
    """``sum(values ** 2)`` in fp32 as one reduction: no squared copy of an activation-sized tensor."""
    return float(torch.linalg.vector_norm(values, dtype=torch.float32)) ** 2


class StageStatistics:
    """One iteration's statistics for a set of layers, and their solution.

    At iteration 0 pass ``weights=None``: the concepts' adaptive weights are computed from their
    own inputs and kept in :attr:`weights` for the later iterations, which pass them back.
    """

    def __init__(self, plans: list[LayerPlan], *, regularization: float, adaptive: bool,
                 device: torch.device | str = "cpu", weights: dict[str, LayerWeights] | None = None,
                 seed: int = 0, system_device: torch.device | str | None = None, exact_cross_norm: bool = True,
                 packed: bool = False, pool: MatrixPool | None = None, token_fraction: float = TOKEN_FRACTION,
                 dense_groups: set[str] | None = None):
        self.regularization = regularization
        self.adaptive = adaptive
        self.device = torch.device(device)                   # scratch sums: where the activations are
        self.system_device = torch.device(system_device) if system_device is not None else self.device
        self.exact_cross_norm = exact_cross_norm              # False: ||X Xt^T|| from random probes
        self.first_iteration = weights is None
        self.weights: dict[str, LayerWeights] = {} if weights is None else weights
        self.layers = {p.name: _Layer(p) for p in plans}
        self.group_members: dict[str, list[str]] = {}
        for p in plans:
            self.group_members.setdefault(p.group, []).append(p.name)
        self.groups = {g: _Group(self.layers[m[0]].plan.info.input_dim) for g, m in self.group_members.items()}
        self.objective: dict[str, float] = {}   # lam-weighted residual of the incoming merged model
        self.reached: set[str] = set()          # layer inputs some concept's samples ran
        self.seed = seed
        self._probes: dict[int, torch.Tensor] = {}
        # when memory is short, Gram sums and full-mode systems are kept as upper triangles only
        self.packed = packed
        self.triangles = Triangles()
        self.pool = pool if pool is not None else MatrixPool()
        # groups that needed d x d sums (learnt in iteration 0: every iteration sees as many tokens)
        self.dense_groups: set[str] = set(dense_groups or ())
        self.token_groups: dict[str, _TokenGroup] = {}
        if token_fraction > 0 and not exact_cross_norm:
            for group, members in self.group_members.items():
                if group not in self.dense_groups and not self.layers[members[0]].plan.subspace:
                    dim = self.layers[members[0]].plan.info.input_dim
                    self.token_groups[group] = _TokenGroup(int(token_fraction * dim))

    # -- helpers ---------------------------------------------------------------------------------
    def probe(self, dim: int) -> torch.Tensor:
        """Fixed Gaussian probe matrix (d x k) for Frobenius-norm estimates: the same for a width in
        every iteration, whatever order the layers ask in (iteration 0's ``X G`` meets a later
        iteration's ``Xt G``)."""
        if dim not in self._probes:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + dim)
            self._probes[dim] = torch.randn(dim, PROBES, generator=generator)
        return self._probes[dim]

    def _add(self, current: torch.Tensor | None, update: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """``current + update``, in place; takes ownership of ``update`` (always a fresh product)."""
        update = update.to(device or self.device, torch.float32)
        return update if current is None else current.add_(update)

    # symmetric storage: a full matrix, or its packed upper triangle --------------------------
    def _store(self, dim: int, matrix: torch.Tensor) -> torch.Tensor:
        return self.triangles(dim, matrix.device).pack(matrix) if self.packed else matrix

    def _gram_norm(self, dim: int, stored: torch.Tensor) -> float:
        return self.triangles(dim, stored.device).frobenius(stored) if self.packed else upper_gram_frobenius(stored)

    def _plus_diagonal(self, dim: int, stored: torch.Tensor, value: float) -> torch.Tensor:
        if self.packed:
            return self.triangles(dim, stored.device).add_to_diagonal(stored, value)
        stored.diagonal().add_(value)
        return stored

    def _full(self, dim: int, stored: torch.Tensor) -> torch.Tensor:
        """A ``d x d`` matrix with the stored upper triangle (packed: unpacked into a pooled matrix)."""
        if not self.packed:
            return stored
        return self.triangles(dim, stored.device).unpack_upper(stored, out=self.pool.take((dim, dim), stored.device))

    def is_subspace_group(self, group: str) -> bool:
        return self.layers[self.group_members[group][0]].plan.subspace

    # -- observations ----------------------------------------------------------------------------
    def needs_own_probes(self, group: str, concept: int) -> bool:
        """Whether a later iteration needs the concept's own projections ``X G`` of this input:
        only for the cross norms of layers that carry the concept's delta."""
        return any(self.layers[n].plan.deltas[concept] is not None for n in self.group_members[group])

    def own_probe(self, tokens: torch.Tensor) -> torch.Tensor:
        """What a later iteration needs of the concept's own input rows ``X`` (n x d) for the cross
        norm: ``X G`` (n x k), or ``X`` itself when the cross norms are exact."""
        if self.exact_cross_norm:
            return tokens
        return tokens.float() @ self.probe(tokens.shape[1]).to(tokens.device)

    def observe_group(self, group: str, tokens: torch.Tensor, own_probe: torch.Tensor | None) -> None:
        """Full mode. ``tokens`` (n x d) are what the pass's model saw: ``X`` at iteration 0 (the
        concept's own model), ``Xt`` later (the merged model). ``own_probe`` is :meth:`own_probe`
        of the concept's own rows for the same tokens, kept from iteration 0 (None at iteration 0,
        where Xt = X, and where no member layer needs a cross norm)."""
        g = self.groups[group]
        xt32 = tokens.to(self.device, torch.float32)
        token_group = self.token_groups.get(group)
        if token_group is not None and token_group.total + xt32.shape[0] > token_group.limit:
            self._leave_token_space(group)
            token_group = None
        if token_group is not None:
            token_group.chunks.append(xt32.clone())   # the activation may be reused once the hook returns
        else:
            self._add_gram(g, xt32)
        if own_probe is not None:
            own32 = own_probe.to(self.device, torch.float32)
            if self.exact_cross_norm:    # own_probe is X itself: Xt^T X, whose norm is ||X Xt^T||
                first = g.cross is None
                if first:
                    g.cross = self.pool.take((g.dim, g.dim), self.device)
                g.cross.addmm_(xt32.T, own32, beta=0.0 if first else 1.0)
            else:
                # the same probes, rounded as the kept X G was, on X Xt^T and on Xt Xt^T: their norms'
                # ratio is exactly 1 when X = Xt
                probed = (xt32 @ self.probe(g.dim).to(self.device)).to(own_probe.dtype).float()
                g.probe_cross = self._add(g.probe_cross, xt32.T @ own32)
                g.probe_gram = self._add(g.probe_gram, xt32.T @ probed)
        elif self.first_iteration:
            g.energy += sum_of_squares(xt32)
        g.tokens += xt32.shape[0]

    def _add_gram(self, g: _Group, tokens: torch.Tensor) -> None:
        """``g.gram += tokens^T tokens``: upper blocks in a pooled matrix, or a packed triangle."""
        if self.packed:   # the upper blocks in a pooled scratch, then their triangle
            scratch = add_upper_gram_(self.pool.take((g.dim, g.dim), self.device), tokens, first=True)
            g.gram = self._add(g.gram, self._store(g.dim, scratch))
            self.pool.give(scratch)
            return
        first = g.gram is None
        if first:
            g.gram = self.pool.take((g.dim, g.dim), self.device)
        add_upper_gram_(g.gram, tokens, first=first)

    def observe_group_probes(self, group: str, gram_probe: torch.Tensor, cross_probe: torch.Tensor | None,
                             energy: float, tokens: int) -> None:
        """Row-space mode: ``Xt^T (Xt G)`` and ``X^T (Xt G)`` (d x k), computed by the hook."""
        g = self.groups[group]
        g.probe_gram = self._add(g.probe_gram, gram_probe)
        if cross_probe is not None:
            g.probe_cross = self._add(g.probe_cross, cross_probe)
        g.energy += energy
        g.tokens += tokens

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

    def observe_layer(self, name: str, own_proj: torch.Tensor | None, merged: torch.Tensor,
                      own_out: torch.Tensor | None = None, merged_out: torch.Tensor | None = None) -> None:
        """Layer sums. Full mode: ``own_proj`` = (A_i X)^T rows (n x r) of the concept's delta
        (None if it has none here) and ``merged`` = Xt (n x d). Row-space mode: ``own_proj`` =
        Q X (None at iteration 0) and ``merged`` = Q Xt (n x R'). ``own_out`` = dW_i X (n x o,
        None if the concept has no delta here) and ``merged_out`` = D Xt (n x o) give the output
        energy (iteration 0) and the residual of the merged model (later iterations)."""
        layer = self.layers[name]
        merged32 = merged.to(self.device, torch.float32)
        if layer.plan.subspace:
            layer.proj_gram = self._add(layer.proj_gram, merged32.T @ merged32)
        if own_proj is not None:
            own32 = own_proj.to(self.device, torch.float32)
            if layer.plan.group in self.token_groups:
                layer.own_chunks.append(own32.clone())
            else:
                layer.numerator = self._add(layer.numerator, own32.T @ merged32)
        if merged_out is None:
            if own_out is not None:
                layer.output_energy += sum_of_squares(own_out)
        else:
            layer.residual += sum_of_squares(merged_out if own_out is None else merged_out.float() - own_out.float())

    # -- concept boundaries ----------------------------------------------------------------------
    def finish_concept(self, concept: int) -> None:
        """Fold the current concept's sums into every layer's system and empty the scratch."""
        for group_name, members in self.group_members.items():
            g = self.groups[group_name]
            if g.tokens == 0:
                # the concept's samples never ran these layers (a vision tower beside a text encoder):
                # nothing of this concept to fold; a layer no concept reaches is left out of the merge
                for name in members:
                    if self.first_iteration:
                        weights = self.weights.setdefault(name, LayerWeights())
                        weights.lam.append(0.0)
                        weights.target_energy.append(0.0)
                    layer = self.layers[name]
                    layer.numerator, layer.own_chunks, layer.output_energy, layer.residual = None, [], 0.0, 0.0
                continue
            self.reached.add(group_name)
            n = g.tokens
            if self.is_subspace_group(group_name):
                root_k = PROBES ** 0.5
                gram, gram_norm = None, _frobenius(g.probe_gram) / n / root_k
                cross_norm = gram_norm if g.probe_cross is None else _frobenius(g.probe_cross) / n / root_k
            else:
                tokens = self.token_groups.get(group_name)
                if tokens is not None:
                    gram = torch.cat(tokens.chunks)   # this concept's block Z_i
                    tokens.chunks = []
                    tokens.blocks.append(gram)
                    gram_norm = _frobenius(gram @ gram.T) / n    # ||Z^T Z|| = ||Z Z^T||
                else:
                    gram = g.gram   # the token sum: 1/n is folded into the weights in _finish_layer
                    gram_norm = self._gram_norm(g.dim, gram) / n
                if g.cross is not None:
                    cross_norm = _frobenius(g.cross) / n
                elif g.probe_cross is not None:   # exact ||K|| times the probed ratio ||C|| / ||K||
                    cross_norm = gram_norm * _frobenius(g.probe_cross) / max(_frobenius(g.probe_gram), 1e-30)
                else:
                    cross_norm = gram_norm
            if not all(map(math.isfinite, (gram_norm, cross_norm, g.energy))):
                raise SolverError(members[0], NON_FINITE + f" (concept {concept + 1})")
            for name in members:
                self._finish_layer(self.layers[name], concept, n, g.energy / n, gram, gram_norm, cross_norm)
            if not self.packed and g.gram is not None:   # packed sums are made fresh by each batch's product
                self.pool.give(g.gram)
            self.pool.give(g.cross)
            self.groups[group_name] = _Group(g.dim)

    def _concept_weight(self, plan: LayerPlan, concept: int, energy: float, output_energy: float) -> float:
        delta = plan.deltas[concept]
        if not self.adaptive:
            return 1.0
        if delta is None:
            return adaptive_weight(0.0, 0.0, plan.info.input_dim, energy)
        return adaptive_weight(delta.frobenius_sq(), output_energy, plan.info.input_dim, energy)

    def _finish_layer(self, layer: _Layer, concept: int, tokens: int, energy: float, gram_sum: torch.Tensor | None,
                      gram_norm: float, cross_norm: float) -> None:
        """Fold one layer's share of the concept: ``gram_sum`` is ``sum Xt^T Xt`` over the
        concept's ``tokens`` (full mode), ``gram_norm`` the norm of its mean ``K``."""
        plan, a = layer.plan, self.regularization
        delta = plan.deltas[concept]
        if self.first_iteration:
            output_energy = layer.output_energy / tokens
            weights = self.weights.setdefault(plan.name, LayerWeights())
            weights.lam.append(self._concept_weight(plan, concept, energy, output_energy))
            weights.target_energy.append(output_energy)
        else:
            previous = self.objective.get(plan.name, 0.0)
            self.objective[plan.name] = previous + self.weights[plan.name].lam[concept] * layer.residual / tokens
        lam = self.weights[plan.name].lam[concept]

        systems = self.system_device
        if plan.subspace:
            proj_gram = layer.proj_gram / tokens
            eye = torch.eye(proj_gram.shape[0], device=self.device)
            layer.system = self._add(layer.system, lam * (proj_gram + a * gram_norm * eye), systems)
            if delta is not None:
                cross = proj_gram if layer.numerator is None else layer.numerator / tokens
                basis = plan.basis.to(self.device)
                coords = delta.down.to(self.device) @ basis.T           # A^ = A Q^T (r x R')
                rows = (delta.up.to(self.device) @ coords) @ (cross + a * cross_norm * eye)
                layer.rhs = self._add(layer.rhs, rows * (delta.scale * lam), systems)
        elif plan.group in self.token_groups:
            layer.token_weights.append(lam / tokens)
            layer.shift += lam * a * gram_norm
            if delta is not None:
                coefficients = torch.cat(layer.own_chunks).T.div_(tokens).to(systems)
                layer.token_terms.append(TokenTerm(delta, lam, coefficients, cross_norm, concept))
            layer.own_chunks = []
        else:
            layer.system = self._fold_gram(plan.info.input_dim, layer.system, gram_sum, lam / tokens,
                                           lam * a * gram_norm)
            if delta is not None:
                numerator = (layer.numerator / tokens).to(systems)
                layer.terms.append(ConceptTerm(delta, lam, numerator, cross_norm))
        layer.numerator = layer.proj_gram = None
        layer.output_energy = layer.residual = 0.0

    def _fold_gram(self, dim: int, system: torch.Tensor | None, gram: torch.Tensor, lam: float,
                   shift: float) -> torch.Tensor:
        """``system + lam * gram + shift * I`` in place (a pooled matrix for the first concept), on
        the systems' device."""
        target = self.system_device
        staged = gram
        if gram.device != target:
            staged = self.pool.take(gram.shape, target).copy_(gram)
        if system is None:
            system = torch.mul(staged, lam, out=self.pool.take(staged.shape, target))
        else:
            system.add_(staged, alpha=lam)
        if staged is not gram:
            self.pool.give(staged)
        return self._plus_diagonal(dim, system, shift)

    def _leave_token_space(self, group: str) -> None:
        """Turn a token-space group into ordinary sums: the current concept's chunks into the Gram
        scratch and its members' numerators, the folded concepts into their systems and terms."""
        tokens = self.token_groups.pop(group)
        self.dense_groups.add(group)
        g = self.groups[group]
        for chunk in tokens.chunks:
            self._add_gram(g, chunk)
        for name in self.group_members[group]:
            layer = self.layers[name]
            if layer.own_chunks:
                if len(layer.own_chunks) != len(tokens.chunks):
                    raise RuntimeError(f"layer {name} saw {len(layer.own_chunks)} calls, its input group "
                                       f"{group!r} {len(tokens.chunks)}")
                for own, merged in zip(layer.own_chunks, tokens.chunks):
                    layer.numerator = self._add(layer.numerator, own.T @ merged)
            layer.own_chunks = []
            if layer.token_weights:
                system = self.pool.take((g.dim, g.dim), self.system_device)
                for k, (block, weight) in enumerate(zip(tokens.blocks, layer.token_weights)):
                    add_upper_gram_(system, block.to(self.system_device), first=k == 0, alpha=weight)
                if self.packed:
                    full, system = system, self._store(g.dim, system)   # packing reads the upper triangle only
                    self.pool.give(full)
                layer.system = self._plus_diagonal(g.dim, system, layer.shift)
            layer.terms = [ConceptTerm(t.delta, t.lam, t.coefficients @ tokens.blocks[t.block].to(t.coefficients),
                                       t.cross_norm) for t in layer.token_terms]
            layer.token_weights, layer.token_terms, layer.shift = [], [], 0.0

    @property
    def unreached_layers(self) -> list[str]:
        """Layers that no concept's samples ran (left out of the merge)."""
        return [name for name, layer in self.layers.items() if layer.plan.group not in self.reached]

    @property
    def token_space_layers(self) -> list[str]:
        """Layers whose systems are (still) kept in token space."""
        return [name for group in self.token_groups for name in self.group_members[group]]

    # -- results ---------------------------------------------------------------------------------
    def relative_objective(self) -> dict[str, float]:
        """Per layer: weighted residual of the incoming merged model over the weighted energy of the
        concepts' own deltas (0 = the merged layer reproduces every concept exactly)."""
        out = {}
        for name, value in self.objective.items():
            w = self.weights[name]
            reference = sum(l * e for l, e in zip(w.lam, w.target_energy))
            out[name] = value / reference if reference > 0 else 0.0
        return out

    def solve(self) -> dict[str, LowRankDelta]:
        """Solve every layer and release the systems."""
        merged = {}
        token_products: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in self.layers.items():
            plan = layer.plan
            if plan.group not in self.reached:
                continue
            tokens = self.token_groups.get(plan.group)
            if tokens is not None:
                if plan.group not in token_products:   # Z and Z Z^T, shared by the group's layers
                    stacked = torch.cat(tokens.blocks).to(self.system_device)
                    token_products[plan.group] = stacked, stacked @ stacked.T
                stacked, product = token_products[plan.group]
                merged[name] = solve_token_space(stacked, [b.shape[0] for b in tokens.blocks], layer.token_weights,
                                                 layer.shift, product, layer.token_terms, self.regularization, name)
                layer.token_weights, layer.token_terms = [], []
            elif plan.subspace:
                merged[name] = solve_subspace(layer.system, layer.rhs, plan.basis, name)
            else:
                system = self._full(plan.info.input_dim, layer.system)
                merged[name] = solve_full(system, layer.terms, self.regularization, name, self.pool)
                self.pool.give(system)
            layer.system = layer.rhs = None
            layer.terms = []
        return merged
