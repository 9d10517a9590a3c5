"""Memory the merge plans to use, stated before it starts, and where the statistics go.

The statistics are exact counts: fp32 ``d x d`` systems (one per layer) and Gram scratch sums (one
per distinct layer input), both symmetric and stored as upper triangles, plus a full ``d x d`` per
input for the (non-symmetric) cross term from iteration 1 unless its norm is probed,
reused for every concept; the small per-concept products and factors, and a work matrix per input
width (with, for packed storage, its triangle index) counted with them. Weights are the model's
own parameter bytes. Activations are an analytical estimate of one batch's UNet forward
(the largest forward the merge makes), checked against measured peaks by ``bench/speed.py``.
The concepts' own-side projections that iterations reuse are kept in host memory and counted there.

Placements, tried in order until one fits the free memory of the device:
1. everything next to the activations, cross norms exact;
2. the same with symmetric sums and systems packed as upper triangles (exact, half the memory,
   some time spent packing);
3. packed, with the per-layer systems in host memory (they are touched once per concept);
4. as 3, with the cross norms estimated by random probes instead of a second scratch sum.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass

import torch

from .activation_stats import PROBES, LayerPlan

GB = 1024 ** 3
# bytes of live activations per (row x latent token x base channel) of an SD UNet forward in
# inference, skip connections for the up path included (bench/speed.py measures it)
ACTIVATION_FACTOR = 48
HEADROOM = 0.9   # use at most this fraction of the free memory


@dataclass(frozen=True)
class Placement:
    """Where one merge keeps its statistics."""

    scratch: str             # scratch sums: with the activations
    systems: str             # per-layer systems
    exact_cross_norm: bool   # False: ||X Xt^T||_F from random probes (no second scratch sum)
    packed: bool = False     # symmetric sums and systems kept as upper triangles (half the memory)


@dataclass(frozen=True)
class StageBytes:
    systems: int   # per-layer d x d systems, packed (full mode) or R' x R' (row space)
    scratch: int   # one packed d x d per distinct input
    cross: int     # a second d x d per distinct input, for exact cross norms (iterations >= 1)
    probes: int    # d x k probe sums, when cross norms are probed or in row-space mode
    small: int     # per-concept r x d products, factors
    # per distinct input width: one d x d fp32 work matrix (the Cholesky factor; packed storage also
    # unpacks into one and computes each batch's Gram in one) and, packed, an int64 triangle index
    workspace: int = 0
    indices: int = 0


def stage_bytes(plans: list[LayerPlan], iterations: int) -> StageBytes:
    """Bytes of one stage's statistics (fp32)."""
    systems = small = scratch = cross = probes = 0
    groups: dict[str, LayerPlan] = {}
    widths: set[int] = set()
    for plan in plans:
        d = plan.info.input_dim
        rank = sum(delta.rank for delta in plan.deltas if delta is not None)
        groups.setdefault(plan.group, plan)
        if plan.subspace:
            r = plan.basis.shape[0]
            small += 4 * (3 * r * r + plan.info.out_features * r + r * d)
        else:
            systems += 4 * d * (d + 1) // 2      # symmetric: upper triangle only
            widths.add(d)
            small += 4 * (2 * rank * d + plan.info.out_features * rank)
    for plan in groups.values():
        d = plan.info.input_dim
        if plan.subspace:
            probes += 4 * d * PROBES * 2
        else:
            scratch += 4 * d * (d + 1) // 2      # symmetric Gram sum: upper triangle only
            if iterations > 0:
                cross += 4 * d * d
                probes += 4 * d * PROBES
    return StageBytes(systems, scratch, cross, probes, small, sum(4 * d * d for d in widths),
                      sum(8 * d * (d + 1) // 2 for d in widths))


@dataclass
class MemoryPlan:
    device: str
    placement: Placement
    model_gb: float
    activations_gb: float       # the largest batch's forward (estimate)
    systems_gb: float           # the largest stage's, like the rest
    scratch_gb: float
    cross_gb: float             # exact cross sums, or their probes
    small_gb: float

    @property
    def device_gb(self) -> float:
        total = self.model_gb + self.activations_gb + self.scratch_gb + self.cross_gb + self.small_gb
        if self.placement.systems == self.placement.scratch:
            total += self.systems_gb
        return total

    @property
    def host_gb(self) -> float:
        return self.systems_gb if self.placement.systems != self.placement.scratch else 0.0

    @property
    def total_gb(self) -> float:
        return self.device_gb + self.host_gb

    def describe(self) -> str:
        where = "" if not self.host_gb else f"; systems {self.systems_gb:.2f} GB in host memory"
        systems = f"systems {self.systems_gb:.2f} + " if not self.host_gb else ""
        cross = "exact" if self.placement.exact_cross_norm else "probed"
        return (f"planned memory on {self.device}: {self.device_gb:.2f} GB = model {self.model_gb:.2f} + "
                f"activations {self.activations_gb:.2f} (estimate) + statistics {systems}scratch "
                f"{self.scratch_gb:.2f} + cross {self.cross_gb:.2f} ({cross}) + small {self.small_gb:.3f}{where}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(device_gb=self.device_gb, host_gb=self.host_gb, total_gb=self.total_gb,
                   statistics_gb=self.systems_gb + self.scratch_gb + self.cross_gb + self.small_gb)
        return out


def unet_activation_bytes(latent_tokens: int, base_channels: int, rows: int, heads_tokens_sq: int,
                          bytes_per_value: int, attention_materialised: bool) -> int:
    """Estimate of live activations of one UNet forward on ``rows`` inputs."""
    body = ACTIVATION_FACTOR * rows * latent_tokens * base_channels * bytes_per_value
    attention = rows * heads_tokens_sq * bytes_per_value if attention_materialised else 0
    return body + attention


def activation_estimate(table, height: int, width: int, batch_size: int, guidance: float, dtype: torch.dtype,
                        device_type: str) -> int:
    """Activation bytes of the largest forward a merge makes: ``batch_size`` samples (twice, for
    CFG's two conditionings) through the UNet at ``height x width`` pixels. The CPU's attention
    materialises its score matrices; CUDA's fused attention does not."""
    first = next((info for name, info in table.layers.items() if name.startswith("unet.")), None)
    tokens = (height // 8) * (width // 8)
    rows = batch_size * (2 if guidance > 1 else 1)
    return unet_activation_bytes(tokens, first.out_features if first else 320, rows, 8 * tokens * tokens,
                                 torch.finfo(dtype).bits // 8, attention_materialised=device_type == "cpu")


def _plan(device: torch.device, placement: Placement, stages: list[StageBytes], model_bytes: int,
          activation_bytes: int) -> MemoryPlan:
    def largest(field: str) -> int:
        return max((getattr(s, field) for s in stages), default=0)

    cross = largest("cross") if placement.exact_cross_norm else largest("probes")
    unpack = 1.0 if placement.packed else 2.0   # StageBytes counts symmetric matrices as triangles

    def work(stage: StageBytes) -> int:
        """Work matrices next to the scratch sums: the factor (or, packed, the Gram of each batch,
        the triangle index, and the unpacked system when the systems are kept there too)."""
        if not placement.packed:
            return stage.workspace
        return stage.workspace + stage.indices + (stage.workspace if placement.systems == placement.scratch else 0)

    small = max((s.small + work(s) for s in stages), default=0)
    return MemoryPlan(str(device), placement, model_bytes / GB, activation_bytes / GB,
                      unpack * largest("systems") / GB, unpack * largest("scratch") / GB, cross / GB, small / GB)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory for the CPU (None if unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def choose_plan(device: torch.device, stages: list[list[LayerPlan]], iterations: int, model_bytes: int,
                activation_bytes: int, free_bytes: int | None = None, forced: Placement | None = None,
                exact_cross_norm: bool = True) -> MemoryPlan:
    """The first placement whose device memory fits ``free_bytes`` (the last one if none does;
    the caller then warns). Without ``exact_cross_norm``, every placement probes the cross norms."""
    per_stage = [stage_bytes(plans, iterations) for plans in stages if plans]
    host = "cpu"
    here = str(device)
    options = [forced] if forced else [Placement(here, here, True), Placement(here, here, True, packed=True),
                                       Placement(here, host, True, packed=True),
                                       Placement(here, host, False, packed=True)]
    if device.type == "cpu" and not forced:
        options = [Placement(host, host, True), Placement(host, host, True, packed=True),
                   Placement(host, host, False, packed=True)]
    if not exact_cross_norm and not forced:
        options = list(dict.fromkeys(dataclasses.replace(o, exact_cross_norm=False) for o in options))
    plans = [_plan(device, option, per_stage, model_bytes, activation_bytes) for option in options]
    if free_bytes is None:
        return plans[0]
    for plan in plans:
        needed = plan.device_gb if device.type != "cpu" else plan.total_gb
        if needed * GB <= HEADROOM * free_bytes:
            return plan
    return plans[-1]
