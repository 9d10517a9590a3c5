"""The memory plan: exact statistics sizes, the placement chosen for the free memory, and the
full-size targets (3 concepts: SD1.5 within 8 GB, SDXL within 16 GB of GPU memory)."""

from __future__ import annotations

import pytest
import torch

from bench.plans import stages_for as _stages
from iteris_core.memory import GB, Placement, choose_plan, stage_bytes, unet_activation_bytes


def test_sd15_unet_statistics_are_counted_exactly(full_tables):
    _text, unet = _stages(full_tables["sd1"])
    sizes = stage_bytes(unet, iterations=3)
    inputs = {}
    for plan in unet:
        inputs[plan.group] = plan.info.input_dim
    assert len(unet) == 192 and len(inputs) == 129
    assert sizes.cross == sum(4 * d * d for d in inputs.values())
    assert sizes.scratch == sum(4 * d * (d + 1) // 2 for d in inputs.values())     # packed triangles
    assert sizes.systems == sum(4 * p.info.input_dim * (p.info.input_dim + 1) // 2 for p in unet)
    assert stage_bytes(unet, iterations=0).cross == 0      # RegMean never needs the cross sums
    # the d x d statistics do not grow with the number of concepts
    big = lambda s: s.systems + s.scratch + s.cross  # noqa: E731
    assert big(stage_bytes(_stages(full_tables["sd1"], concepts=5)[1], 3)) == big(sizes)


def test_placements_are_tried_in_order(full_tables):
    stages = _stages(full_tables["sd1"])
    cuda = torch.device("cuda")

    def fitting(previous):   # free memory just below what the previous placement needs
        return int((previous.device_gb - 0.05) * GB / 0.9)

    everything = choose_plan(cuda, stages, 3, 2 * GB, GB, free_bytes=None)
    assert everything.placement == Placement("cuda", "cuda", True)
    packed = choose_plan(cuda, stages, 3, 2 * GB, GB, free_bytes=fitting(everything))
    assert packed.placement == Placement("cuda", "cuda", True, packed=True)
    assert packed.systems_gb == pytest.approx(everything.systems_gb / 2, rel=0.01)
    host_systems = choose_plan(cuda, stages, 3, 2 * GB, GB, free_bytes=fitting(packed))
    assert host_systems.placement == Placement("cuda", "cpu", True, packed=True) and host_systems.host_gb > 0
    probed = choose_plan(cuda, stages, 3, 2 * GB, GB, free_bytes=fitting(host_systems))
    assert probed.placement == Placement("cuda", "cpu", False, packed=True)
    assert probed.device_gb < host_systems.device_gb < packed.device_gb < everything.device_gb


def _full_size_plan(table, params: int, side: int, channels: int, free_gb: float):
    activations = unet_activation_bytes((side // 8) ** 2, channels, rows=2 * 2 * 2, heads_tokens_sq=0,
                                        bytes_per_value=2, attention_materialised=False)
    return choose_plan(torch.device("cuda"), _stages(table), 3, 2 * params, activations, int(free_gb * GB))


@pytest.mark.parametrize("architecture, params, side, budget", [
    ("sd1", 860_000_000 + 123_000_000, 512, 8.0),
    ("sdxl", 2_567_000_000 + 123_000_000 + 695_000_000, 1024, 16.0),
])
def test_planned_gpu_memory_for_three_concepts_fits_the_target(full_tables, architecture, params, side, budget):
    plan = _full_size_plan(full_tables[architecture], params, side, 320, budget)
    assert plan.device_gb <= budget, plan.describe()


def test_when_nothing_fits_every_layer_stays_exact_in_groups(full_tables):
    """Below every placement, the layers go in groups that fit, each input's layers together; with
    room in host memory the systems go there (fewer groups), without it they stay on the GPU."""
    stages = _stages(full_tables["sdxl"])
    cuda = torch.device("cuda")
    tight = choose_plan(cuda, stages, 3, 4 * GB, GB, free_bytes=int(9 * GB), exact_cross_norm=False,
                        host_free_bytes=64 * GB)
    assert tight.grouped and tight.placement == Placement("cuda", "cpu", False, packed=True)
    assert tight.device_gb <= 0.9 * 9
    names = [p.name for p in stages[1]]
    placed = [n for group in tight.groups[1] for n in group]
    assert sorted(placed) == sorted(names)                                    # every layer, once
    group_of = {n: i for i, group in enumerate(tight.groups[1]) for n in group}
    inputs = {}
    for plan in stages[1]:
        inputs.setdefault(plan.group, set()).add(group_of[plan.name])
    assert all(len(groups) == 1 for groups in inputs.values())               # an input's layers stay together
    assert 1 < tight.pass_factors[1] < len(tight.groups[1])                 # early groups stop early
    no_host = choose_plan(cuda, stages, 3, 4 * GB, GB, free_bytes=int(9 * GB), exact_cross_norm=False,
                          host_free_bytes=0)
    assert no_host.placement.systems == "cuda" and no_host.host_gb == 0
    assert len(no_host.groups[1]) > len(tight.groups[1])
