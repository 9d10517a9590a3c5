"""Memory the merge plans to use, stated before it starts, and where the statistics go.

The statistics are exact counts: fp32 ``d x d`` systems (one per layer) and Gram scratch sums (one
per distinct layer input), both symmetric and stored as upper triangles, plus a full ``d x d`` per
input for the (non-symmetric) cross term from iteration 1 unless its norm is probed,
reused for every concept; the small per-concept products and factors, and a work matrix per input
width (with, for packed storage, its triangle index) counted with them. Weights are the model's
own parameter bytes. Activations are an analytical estimate of one batch's UNet forward
(the largest forward the merge makes), checked against measured peaks by ``bench/speed.py``.
The concepts' own-side projections that iterations reuse are kept in host memory: the engine
reports their measured size, :func:`own_side_bytes` estimates it from token counts. SSR's
statistics are two ``R x R`` sums per layer two or more LoRAs change (``R`` their summed rank)
and the layer's stacked factors, counted as small; it keeps no ``d x d`` matrix.

Placements, tried in order until one fits the free memory of the device:
1. everything next to the activations, cross norms exact;
2. the same with symmetric sums and systems packed as upper triangles (exact, half the memory,
   some time spent packing);
3. packed, with the per-layer systems in host memory (they are touched once per concept);
4. as 3, with the cross norms estimated by random probes instead of a second scratch sum.
When none fits (or a statistics budget says so), every layer is still solved exactly: the layers
go in groups that fit, each group with its own passes over the same stored samples, a pass
stopping after its group's last layer.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field

import torch

from .errors import SettingsError
from .statistics import PROBES, LayerPlan

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
    # unpacks into one and computes each batch's Gram in one) and, packed, an int32 triangle index
    workspace: int = 0
    indices: int = 0


def _index_bytes(d: int) -> int:
    """Bytes per entry of a packed triangle's index (:class:`~.symmetric.Triangle`)."""
    return 4 if d * d <= 2 ** 31 - 1 else 8


def stage_bytes(plans: list[LayerPlan], iterations: int) -> StageBytes:
    """Bytes of one stage's statistics (fp32)."""
    systems = small = scratch = cross = probes = 0
    groups: dict[str, LayerPlan] = {}
    widths: set[int] = set()
    for plan in plans:
        d = plan.info.input_dim
        rank = sum(delta.rank for delta in plan.deltas if delta is not None)
        if plan.ssr:
            if plan.shared:   # G and Q, the stacked down (R x d) and up (o x R) matrices; none if passed through
                small += 4 * (2 * rank * rank + rank * d + plan.info.out_features * rank)
            continue
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
                      sum(_index_bytes(d) * d * (d + 1) // 2 for d in widths))


@dataclass
class MemoryPlan:
    device: str
    placement: Placement
    model_gb: float
    activations_gb: float       # the largest batch's forward (estimate)
    systems_gb: float           # the largest stage's (largest group's, when grouped), like the rest
    scratch_gb: float
    cross_gb: float             # exact cross sums, or their probes
    small_gb: float
    # per stage (text, then denoiser): its layers in the groups merged one after another, each
    # with its own passes (one group: everything at once), and the passes per iteration relative
    # to one full pass (a pass for an early group stops after its last layer)
    groups: list[list[list[str]]] = field(default_factory=list)
    pass_factors: list[float] = field(default_factory=list)
    budget_gb: float | None = None   # statistics budget the grouping had to meet

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

    @property
    def statistics_gb(self) -> float:
        """Statistics kept at once (the largest group's), wherever they are."""
        return self.systems_gb + self.scratch_gb + self.cross_gb + self.small_gb

    @property
    def grouped(self) -> bool:
        return any(len(stage) > 1 for stage in self.groups)

    def describe(self) -> str:
        where = "" if not self.host_gb else f"; systems {self.systems_gb:.2f} GB in host memory"
        systems = f"systems {self.systems_gb:.2f} + " if not self.host_gb else ""
        cross = "exact" if self.placement.exact_cross_norm else "probed"
        text = (f"planned memory on {self.device}: {self.device_gb:.2f} GB = model {self.model_gb:.2f} + "
                f"activations {self.activations_gb:.2f} (estimate) + statistics {systems}scratch "
                f"{self.scratch_gb:.2f} + cross {self.cross_gb:.2f} ({cross}) + small {self.small_gb:.3f}{where}")
        if self.grouped:
            counts = " and ".join(f"{len(g)}" for g in self.groups if g)
            factors = " and ".join(f"{f:.2f}x" for f, g in zip(self.pass_factors, self.groups) if g)
            text += (f"; every layer exact within the {self.budget_gb:.2f} GB statistics budget: the layers are merged "
                     f"in {counts} groups, each iteration making {factors} the passes of one full pass")
        return text

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(device_gb=self.device_gb, host_gb=self.host_gb, total_gb=self.total_gb,
                   statistics_gb=self.statistics_gb, group_counts=[len(g) for g in self.groups])
        out.pop("groups")   # layer lists: the report's per-layer table says where each layer went
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


def _statistics_bytes(plan: MemoryPlan, device: torch.device) -> float:
    """What counts against a statistics budget: the statistics on the device (all of them on the CPU)."""
    total = plan.scratch_gb + plan.cross_gb + plan.small_gb
    if device.type == "cpu" or plan.placement.systems == plan.placement.scratch:
        total += plan.systems_gb
    return total * GB


def _inputs(plans: list[LayerPlan]) -> list[list[LayerPlan]]:
    """The plans by layer input, in the order of each input's last layer in the model: consecutive
    inputs make a group whose pass can stop after its last layer, and an input read all through the
    model (SD's cross-attention k/v all read the text) goes with the layers at its end."""
    by_input: dict[str, list[LayerPlan]] = {}
    last: dict[str, int] = {}
    for index, plan in enumerate(plans):
        by_input.setdefault(plan.group, []).append(plan)
        last[plan.group] = index
    return [by_input[group] for group in sorted(by_input, key=last.__getitem__)]


def statistics_bytes(device: torch.device, placement: Placement, plans: list[LayerPlan], iterations: int) -> float:
    """Bytes the statistics of these layers take against a budget, in this placement."""
    return _statistics_bytes(_plan(device, placement, [stage_bytes(plans, iterations)], 0, 0), device)


def largest_input_bytes(device: torch.device, placement: Placement, plans: list[LayerPlan], iterations: int) -> float:
    """The smallest statistics budget that can work: the largest single layer input's statistics."""
    return max((statistics_bytes(device, placement, members, iterations) for members in _inputs(plans)), default=0.0)


def group_layers(device: torch.device, placement: Placement, plans: list[LayerPlan], iterations: int,
                 budget: float) -> list[list[str]]:
    """Consecutive layers, input by input, in groups whose statistics stay within ``budget`` bytes
    (the layers reading one input stay together: they share its sums)."""
    groups: list[list[LayerPlan]] = []
    current: list[LayerPlan] = []

    def size(members: list[LayerPlan]) -> float:
        return statistics_bytes(device, placement, members, iterations)

    for members in _inputs(plans):
        if current and size(current + members) > budget:
            groups.append(current)
            current = []
        if size(members) > budget:
            raise SettingsError(f"the statistics budget of {budget / GB:.2f} GB is smaller than one layer input's "
                                f"statistics ({size(members) / GB:.2f} GB, {members[0].name}): raise the budget, or "
                                "solve the widest layers approximately in their LoRAs' row space (row_space_width)")
        current = current + members
    if current:
        groups.append(current)
    return [[p.name for p in group] for group in groups]


def pass_factor(plans: list[LayerPlan], groups: list[list[str]], early_stop: bool) -> float:
    """Passes per iteration relative to one full pass: a group's pass costs the share of the model
    up to its last layer (by weight size, the proxy for compute), or a whole pass without early stop."""
    if not early_stop:
        return float(len(groups))
    sizes = [p.info.out_features * p.info.input_dim for p in plans]
    total = float(sum(sizes)) or 1.0
    position = {p.name: i for i, p in enumerate(plans)}
    return sum(sum(sizes[: max(position[n] for n in group) + 1]) / total for group in groups)


def own_side_bytes(plans: list[LayerPlan], tokens: dict[str, int], concept: int = 0, exact_cross_norm: bool = False,
                   value_bytes: int = 2) -> int:
    """Host bytes iteration 0 keeps of concept ``concept``'s own passes for the later iterations, per
    call whose layer inputs carry ``tokens[group]`` token rows: ``A_i X`` of each layer it changes
    (``value_bytes`` per value, the model's compute dtype) and, per layer input, the probe
    projections ``X G`` (bf16), or ``X`` itself when the cross norms are exact."""
    total = 0
    seen: set[str] = set()
    for plan in plans:
        rows = tokens.get(plan.group, 0)
        delta = plan.deltas[concept]
        total += 0 if delta is None else rows * delta.rank * value_bytes
        if plan.group not in seen:
            seen.add(plan.group)
            total += rows * (plan.info.input_dim * value_bytes if exact_cross_norm else PROBES * 2)
    return total


def _grouped(device: torch.device, placement: Placement, stages: list[list[LayerPlan]], iterations: int,
             model_bytes: int, activation_bytes: int, budget: float) -> MemoryPlan:
    """Every layer exact: the stages' layers in groups whose statistics fit ``budget``."""
    groups = [group_layers(device, placement, stage, iterations, budget) if stage else [] for stage in stages]
    by_name = {p.name: p for stage in stages for p in stage}
    largest = [max((stage_bytes([by_name[n] for n in group], iterations) for group in stage_groups),
                   key=lambda b: b.systems + b.scratch + b.cross + b.probes + b.small) for stage_groups in groups
               if stage_groups]
    plan = _plan(device, placement, largest, model_bytes, activation_bytes)
    plan.groups = groups
    plan.pass_factors = [pass_factor(stage, stage_groups, early_stop=(i == len(stages) - 1)) if stage else 0.0
                         for i, (stage, stage_groups) in enumerate(zip(stages, groups))]
    plan.budget_gb = budget / GB
    return plan


def choose_plan(device: torch.device, stages: list[list[LayerPlan]], iterations: int, model_bytes: int,
                activation_bytes: int, free_bytes: int | None = None, forced: Placement | None = None,
                exact_cross_norm: bool = True, budget_bytes: int | None = None,
                host_free_bytes: int | None = None) -> MemoryPlan:
    """The first placement whose statistics fit: within ``budget_bytes`` when given, else within
    the ``free_bytes`` left after the model and activations. When none fits, every layer is still
    solved exactly: the layers are merged in groups that fit (packed statistics), each group with
    its own passes, with the systems in host memory when the host has room for the largest
    group's and that makes fewer groups. Without ``exact_cross_norm``, every placement probes the
    cross norms. The stage list is (text encoders, denoiser); only the denoiser's passes stop
    early. ``host_free_bytes``: the host's free memory (default: measured now)."""
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
    one_group = [[[p.name for p in stage]] if stage else [] for stage in stages]
    for plan in plans:
        plan.groups, plan.pass_factors = one_group, [1.0 if stage else 0.0 for stage in stages]
    if budget_bytes is None and free_bytes is None:
        return plans[0]
    budget = budget_bytes if budget_bytes is not None else HEADROOM * free_bytes - model_bytes - activation_bytes
    if device.type != "cpu" and host_free_bytes is None:
        host_free_bytes = available_bytes(torch.device("cpu"))

    def host_has_room(plan: MemoryPlan) -> bool:
        return not plan.host_gb or host_free_bytes is None or plan.host_gb * GB <= HEADROOM * host_free_bytes

    for plan in plans:
        if host_has_room(plan) and _statistics_bytes(plan, device) <= budget:
            plan.budget_gb = budget / GB
            return plan
    # every layer exact: groups of layers, in the most compact placement, systems by the scratch or
    # (on a GPU, where the host has room) in host memory, whichever needs fewer groups
    if forced:
        candidates = [dataclasses.replace(forced, packed=True)]
    else:
        candidates = [Placement(here, here, exact_cross_norm, True)]
        if device.type != "cpu":
            candidates.append(Placement(here, host, exact_cross_norm, True))
    grouped = []
    for placement in candidates:
        try:
            plan = _grouped(device, placement, stages, iterations, model_bytes, activation_bytes, budget)
        except SettingsError:
            if placement is candidates[-1] and not grouped:
                raise
            continue
        if host_has_room(plan):
            grouped.append(plan)
    if not grouped:
        raise SettingsError(f"the layers' statistics do not fit the {budget / GB:.2f} GB budget in any grouping "
                            "whose systems the host has room for: free host memory, or raise the budget")
    return min(grouped, key=lambda plan: (sum(len(g) for g in plan.groups), plan.host_gb))
