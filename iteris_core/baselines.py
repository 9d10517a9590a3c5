"""Merges that need no model run: linear average, concatenation (stacked loaders) and TIES.

Each takes, per concept, its deltas at strength, and returns one delta per layer. Linear and
concatenation are exact low-rank sums (rank sum r_i). TIES works on dense deltas (trim to the top
``density`` of each delta's entries by magnitude, elect a sign per entry by the summed mass,
average the entries that agree) and is factorised back to a LoRA of the chosen rank.
"""

from __future__ import annotations

import torch

from .low_rank import LowRankDelta, factorize_exact, stack, truncate

ConceptDeltas = list[dict[str, LowRankDelta]]


def _layer_names(concepts: ConceptDeltas) -> list[str]:
    names: list[str] = []
    for deltas in concepts:
        names.extend(n for n in deltas if n not in names)
    return names


def weighted_sum(concepts: ConceptDeltas, weights: list[float]) -> dict[str, LowRankDelta]:
    """``sum_i w_i dW_i`` per layer, as the exact stacked LoRA."""
    merged = {}
    for name in _layer_names(concepts):
        parts = [d[name].scaled(w) for d, w in zip(concepts, weights) if name in d]
        merged[name] = stack(parts)
    return merged


def linear_merge(concepts: ConceptDeltas) -> dict[str, LowRankDelta]:
    """The average of the deltas (each concept weighs 1/N): the paper's "linear merging"."""
    return weighted_sum(concepts, [1.0 / len(concepts)] * len(concepts))


def concat_merge(concepts: ConceptDeltas) -> dict[str, LowRankDelta]:
    """The sum of the deltas: exactly what chaining LoraLoaders does."""
    return weighted_sum(concepts, [1.0] * len(concepts))


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest."""
    keep = max(1, int(round(density * delta.numel())))
    if keep >= delta.numel():
        return delta.clone()
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_dense(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of dense deltas: trim, elect sign, disjoint mean."""
    trimmed = torch.stack([trim(d.double(), density) for d in deltas])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1)
    return (total / count).float()


def ties_merge(concepts: ConceptDeltas, density: float, rank: int | None) -> tuple[dict[str, LowRankDelta], dict[str, float]]:
    """TIES per layer, factorised to ``rank`` (default: the sum of the input ranks at that layer).
    Returns the deltas and each layer's relative factorisation error."""
    merged, errors = {}, {}
    for name in _layer_names(concepts):
        present = [d[name] for d in concepts if name in d]
        dense = ties_dense([p.dense() for p in present], density)
        exact = factorize_exact(dense)
        if exact is None:
            continue
        target = rank if rank is not None else sum(p.rank for p in present)
        result = truncate(exact, target)
        merged[name] = result.delta
        errors[name] = result.relative_error
    return merged, errors
