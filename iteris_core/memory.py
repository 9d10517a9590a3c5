"""Memory the merge plans to use, stated before it starts.

Statistics are exact counts: fp32 ``d x d`` systems (one per layer), scratch sums (one or two per
distinct layer input, reused for every concept), the small per-concept products and the factors.
Weights are the model's own parameter bytes. Activations are an analytical estimate of one
paired batch's UNet forward (the largest forward the merge makes), calibrated against measured
peaks on the CPU by ``bench/speed.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .activation_stats import PROBES, LayerPlan

GB = 1024 ** 3
# bytes of live activations per (row x latent token x base channel) at the widest level of an SD
# UNet during inference, including skip connections kept for the up path; see bench/speed.py
ACTIVATION_FACTOR = 48


@dataclass
class MemoryPlan:
    device: str
    statistics_device: str
    model_gb: float
    statistics_gb: float     # d x d systems and scratch, fp32, the larger of the two stages
    small_gb: float          # per-concept r x d products and factors
    activations_gb: float    # one paired batch's forward (estimate)

    @property
    def total_gb(self) -> float:
        on_device = self.model_gb + self.activations_gb
        if self.statistics_device == self.device:
            on_device += self.statistics_gb + self.small_gb
        return on_device

    def describe(self) -> str:
        stats_where = "" if self.statistics_device == self.device else f" (on {self.statistics_device})"
        return (f"planned memory on {self.device}: {self.total_gb:.2f} GB = model {self.model_gb:.2f} + "
                f"statistics {self.statistics_gb:.2f}{stats_where} + small {self.small_gb:.3f} + "
                f"activations {self.activations_gb:.2f} (estimate)")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_gb"] = self.total_gb
        return out


def statistics_bytes(plans: list[LayerPlan], iterations: int) -> tuple[int, int]:
    """(big, small) bytes of one stage's statistics: systems and scratch, then the small terms."""
    big = small = 0
    groups: dict[str, LayerPlan] = {}
    for plan in plans:
        d = plan.info.input_dim
        present = [delta for delta in plan.deltas if delta is not None]
        rank = sum(delta.rank for delta in present)
        groups.setdefault(plan.group, plan)
        if plan.subspace:
            r = plan.basis.shape[0]
            small += 4 * (3 * r * r + plan.info.out_features * r + r * d)
        else:
            big += 4 * d * d
            small += 4 * (rank * d + plan.info.out_features * rank + rank * d)
    for plan in groups.values():
        d = plan.info.input_dim
        if plan.subspace:
            small += 4 * d * PROBES * 2
        else:
            big += 4 * d * d * (2 if iterations > 0 else 1)
    return big, small


def unet_activation_bytes(latent_tokens: int, base_channels: int, rows: int, heads_tokens_sq: int,
                          bytes_per_value: int, attention_materialised: bool) -> int:
    """Estimate of live activations of one UNet forward on ``rows`` inputs."""
    body = ACTIVATION_FACTOR * rows * latent_tokens * base_channels * bytes_per_value
    attention = rows * heads_tokens_sq * bytes_per_value if attention_materialised else 0
    return body + attention


def plan_memory(*, device: torch.device, statistics_device: torch.device, model_bytes: int,
                stages: list[list[LayerPlan]], iterations: int, activation_bytes: int) -> MemoryPlan:
    big = small = 0
    for plans in stages:
        b, s = statistics_bytes(plans, iterations)
        big, small = max(big, b), max(small, s)
    return MemoryPlan(str(device), str(statistics_device), model_bytes / GB, big / GB, small / GB,
                      activation_bytes / GB)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on the CPU: the OS decides)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free
