"""Deltas of LyCORIS adapters (LoHa, LoKr, Tucker LoCon) and of DoRA.

The formulas follow the adapters' forward passes, which LyCORIS and ComfyUI's weight adapters
(``comfy/weight_adapter/{lora,loha,lokr,base}.py``) agree on. LyCORIS 4.1.3's own
``get_diff_weight`` applies alpha/dim twice for LoHa and LoKr; its forward pass does not, and that
is what a user sees, so that is what is used here.

LoHa and LoKr have exact low-rank factors that follow from their structure (a Hadamard product of
two rank-r matrices has rank <= r^2 through the Khatri-Rao product of the factors; a Kronecker
product's factors are the Kronecker products of its parts' factors), so no large matrix is ever
decomposed; :func:`~iteris_core.low_rank.compress` then trims them to their numerical rank.
"""

from __future__ import annotations

import torch

from .low_rank import LowRankDelta


def tucker_up(core: torch.Tensor, factor_in: torch.Tensor, factor_out: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv kernel from a Tucker core: ``W[p, r, k, l] = sum_ij core[i,j,k,l]
    factor_in[j, r] factor_out[i, p]`` (LyCORIS' CP/Tucker layout for LoHa and LoKr)."""
    return torch.einsum("ijkl,jr,ip->prkl", core.float(), factor_in.float(), factor_out.float())


def lora_down_with_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """LoCon with a Tucker middle: effective down kernel ``D[p, c, k, l] = sum_j mid[p,j,k,l] down[j,c]``.
    ``down`` is (r, in, 1, 1), ``mid`` is (r, r, kh, kw); the result is (r, in, kh, kw)."""
    return torch.einsum("pjkl,jc->pckl", mid.float(), down.float().reshape(down.shape[0], -1))


def loha_dense(parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LoHa: ``(w1_a w1_b) * (w2_a w2_b) * alpha / rank`` (Hadamard product), Tucker when t1/t2 exist."""
    rank = parts["w1_b"].shape[0]
    if "t1" in parts:
        m1 = tucker_up(parts["t1"], parts["w1_b"], parts["w1_a"])
        m2 = tucker_up(parts["t2"], parts["w2_b"], parts["w2_a"])
    else:
        m1 = parts["w1_a"].float() @ parts["w1_b"].float()
        m2 = parts["w2_a"].float() @ parts["w2_b"].float()
    scale = alpha / rank if alpha is not None else 1.0
    return m1 * m2 * scale


def lokr_dense(parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LoKr: ``kron(w1, w2) * alpha / dim``; alpha applies only when a factor is split into a/b
    (a whole-matrix LoKr stores its dim, e.g. 10000, as alpha and ignores it)."""
    dim = None
    if "w1" in parts:
        w1 = parts["w1"].float()
    else:
        dim = parts["w1_b"].shape[0]
        w1 = parts["w1_a"].float() @ parts["w1_b"].float()
    if "w2" in parts:
        w2 = parts["w2"].float()
    else:
        dim = parts["w2_b"].shape[0]
        if "t2" in parts:
            w2 = tucker_up(parts["t2"], parts["w2_b"], parts["w2_a"])
        else:
            w2 = parts["w2_a"].float() @ parts["w2_b"].float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
    return torch.kron(w1, w2) * scale


def dora_delta(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The change DoRA makes to a weight: ``m * (W0 + dW) / ||W0 + dW|| - W0``.

    The norm is taken per output row when ``magnitude`` has one entry per output (kohya/LyCORIS
    ``wd_on_out``, PEFT's ``lora_magnitude_vector``), per input column otherwise. DoRA's delta
    depends on the base weight and is in general full rank.
    """
    w0 = base.float().reshape(base.shape[0], -1)
    combined = w0 + delta.float().reshape(w0.shape)
    m = magnitude.float().reshape(-1)
    eps = torch.finfo(torch.float32).eps
    if m.numel() == w0.shape[0]:
        norm = combined.norm(dim=1, keepdim=True) + eps
        adapted = combined * (m[:, None] / norm)
    elif m.numel() == w0.shape[1]:
        norm = combined.norm(dim=0, keepdim=True) + eps
        adapted = combined * (m[None, :] / norm)
    else:
        raise ValueError(f"DoRA magnitude has {m.numel()} entries; the weight is {tuple(w0.shape)}")
    return adapted - w0


def _flat(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.float().reshape(matrix.shape[0], -1)


def _factor_small(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors (P, Q) of a small dense matrix, P @ Q = matrix, by SVD at numerical rank."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = s > (float(s.max()) * max(matrix.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0)
    if not bool(keep.any()):
        keep[:1] = True
    return (u[:, keep] * s[keep]).float(), vh[keep].float()


def loha_factors(parts: dict[str, torch.Tensor], alpha: float | None) -> LowRankDelta | None:
    """LoHa ``(w1_a w1_b) * (w2_a w2_b)`` as exact factors: up columns are products of up columns
    (Khatri-Rao), down rows products of down rows. None for Tucker LoHa (use :func:`loha_dense`)."""
    if "t1" in parts or "t2" in parts:
        return None
    a1, b1 = parts["w1_a"].float(), _flat(parts["w1_b"])
    a2, b2 = parts["w2_a"].float(), _flat(parts["w2_b"])
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    scale = alpha / parts["w1_b"].shape[0] if alpha is not None else 1.0
    return LowRankDelta(up, down, scale)


def lokr_factors(parts: dict[str, torch.Tensor], alpha: float | None) -> LowRankDelta:
    """LoKr ``kron(w1, w2)`` as exact factors ``kron(P1, P2) @ kron(Q1, Q2)`` of its parts' factors
    (conv kernels flattened over their input: kron with a flattened w2 is the flattened kron)."""
    dim = None
    if "w1" in parts:
        p1, q1 = _factor_small(_flat(parts["w1"]))
    else:
        dim = parts["w1_b"].shape[0]
        p1, q1 = parts["w1_a"].float(), _flat(parts["w1_b"])
    if "w2" in parts:
        p2, q2 = _factor_small(_flat(parts["w2"]))
    elif "t2" in parts:
        dim = parts["w2_b"].shape[0]
        p2, q2 = _factor_small(_flat(tucker_up(parts["t2"], parts["w2_b"], parts["w2_a"])))
    else:
        dim = parts["w2_b"].shape[0]
        p2, q2 = parts["w2_a"].float(), _flat(parts["w2_b"])
    scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
    return LowRankDelta(torch.kron(p1, p2), torch.kron(q1, q2), scale)
