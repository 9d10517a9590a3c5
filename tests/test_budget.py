"""Exact merges in any memory budget: when the statistics do not fit at once, the layers are merged
in groups, each with its own passes over the same samples (a denoiser pass for an early group
stops after that group's last layer), and the merged LoRA is the one an unlimited budget gives.

The reference is the same merge with one group; "equal" is within 1e-5 of each layer's delta.
"""

from __future__ import annotations

import pytest
import torch

from iteris_core import Concept, MergeSettings, SamplingSettings, SettingsError, merge_loras
from iteris_core.api import _prepare
from iteris_core.backends.tiny import random_lora_deltas
from iteris_core.iteris import IterisLoop
from iteris_core.lora_normalize import NormalizedLora
from iteris_core.memory import GB, Placement, group_layers, largest_input_bytes

SAMPLING = SamplingSettings(samples_per_prompt=1, timesteps=2, steps=3, batch_size=2, seed=1, guidance=5.0)
SETTINGS = MergeSettings(iterations=2, tolerance=0.0, sampling=SAMPLING)


def _concepts(backend) -> list[Concept]:
    table = backend.layer_table()
    return [Concept(NormalizedLora(f"lora{seed}", random_lora_deltas(table, seed, rank=3, scale=0.3)), [prompt],
                    negative_prompt="blurry")
            for seed, prompt in ((11, "a photo of sks dog"), (12, "a painting in xyz style"))]


def _largest_input_bytes(loop: IterisLoop, placement: Placement) -> dict[str, float]:
    """Per stage, the smallest budget there is: its largest single layer input's statistics."""
    return {stage: largest_input_bytes(torch.device("cpu"), placement, plans, SETTINGS.effective_iterations)
            for stage, plans in zip(("text", "unet"), loop.stage_plans())}


def _assert_equal(grouped: dict, reference: dict) -> None:
    assert set(grouped) == set(reference)
    for name, delta in reference.items():
        error = (grouped[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-5, (name, float(error))


@pytest.mark.parametrize("token_fraction", [0.0, 0.5], ids=["dense", "token-space"])
@pytest.mark.parametrize("groups_per_stage", ["smallest", "three"])
def test_grouped_layers_give_the_unlimited_merge_on_sd1(tiny_backend, token_fraction, groups_per_stage):
    concepts = [_prepare(c, c.lora) for c in _concepts(tiny_backend)]
    placement = Placement("cpu", "cpu", False, packed=True)
    reference = IterisLoop(tiny_backend, concepts, SETTINGS, placement=placement, token_fraction=token_fraction)
    text_ref, unet_ref = reference.run()

    loop = IterisLoop(tiny_backend, concepts, SETTINGS, placement=placement, token_fraction=token_fraction)
    smallest = _largest_input_bytes(loop, placement)
    groups = {}
    for stage, plans in zip(("text", "unet"), loop.stage_plans()):
        if groups_per_stage == "smallest":   # the smallest budget there is: the largest single input's
            groups[stage] = group_layers(torch.device("cpu"), placement, plans, SETTINGS.effective_iterations,
                                         smallest[stage])
        else:
            names = [p.name for p in plans]
            third = -(-len(names) // 3)
            groups[stage] = [names[i:i + third] for i in range(0, len(names), third)]
    assert all(len(g) > 1 for g in groups.values())
    loop.set_groups(groups)
    calls = {"conv_out": 0}
    handle = tiny_backend.unet.conv_out.register_forward_hook(lambda *a: calls.__setitem__("conv_out", calls["conv_out"] + 1))
    try:
        text, unet = loop.run()
    finally:
        handle.remove()
    _assert_equal(text.merged, text_ref.merged)
    _assert_equal(unet.merged, unet_ref.merged)
    # early groups stop before the UNet's last layer: fewer full forwards than groups x passes
    replays_per_pass = 2   # two concepts, one batch of kept samples each
    assert calls["conv_out"] < len(groups["unet"]) * replays_per_pass * (SETTINGS.iterations + 1)


def test_a_budget_setting_groups_the_layers_and_keeps_the_merge(tiny_backend):
    concepts = _concepts(tiny_backend)
    unlimited = merge_loras(tiny_backend, concepts, SETTINGS)
    assert unlimited.report.memory["group_counts"] == [1, 1]
    loop = IterisLoop(tiny_backend, [_prepare(c, c.lora) for c in concepts], SETTINGS)
    budget = max(_largest_input_bytes(loop, Placement("cpu", "cpu", False, packed=True)).values()) * 1.5 / GB
    grouped = merge_loras(tiny_backend, concepts, SETTINGS.replace(statistics_budget_gb=budget))
    counts = grouped.report.memory["group_counts"]
    assert max(counts) > 1, counts
    assert "groups to fit the" in grouped.report.summary()
    _assert_equal(grouped.lora.layers, unlimited.lora.layers)


def test_a_budget_below_one_input_is_refused_with_what_to_do(tiny_backend):
    with pytest.raises(SettingsError, match="smaller than one layer input's statistics.*row_space_width"):
        merge_loras(tiny_backend, _concepts(tiny_backend), SETTINGS.replace(statistics_budget_gb=1e-6))
