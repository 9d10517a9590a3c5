"""The engine on tiny SD1- and SDXL-type diffusers pipelines: text encoders and UNet, conv layers,
row-space mode, progress, interrupt, and input validation."""

from __future__ import annotations

import pytest
import torch

from iteris_core import Concept, MergeInterrupted, MergeSettings, SamplingSettings, SettingsError, merge_loras
from iteris_core.backends.tiny import random_lora_deltas
from iteris_core.lora_normalize import NormalizedLora

FAST = SamplingSettings(samples_per_prompt=1, timesteps=2, steps=3, batch_size=2, seed=1)


def _lora(backend, seed, include=r"."):
    return NormalizedLora(f"lora{seed}", random_lora_deltas(backend.layer_table(), seed, rank=3, scale=0.2,
                                                            include=include))


def _assert_reproduces(result, lora, tolerance=2e-3):
    assert set(result.lora.layers) == set(lora.layers)
    for name, delta in lora.layers.items():
        error = (result.lora.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < tolerance, (name, float(error))


@pytest.mark.parametrize("backend_fixture", ["tiny_backend", "tiny_sdxl_backend"])
def test_one_lora_is_reproduced_on_every_layer(request, backend_fixture):
    backend = request.getfixturevalue(backend_fixture)
    lora = _lora(backend, 1)          # attention, MLP, resnet convs, time embeddings, text encoders
    result = merge_loras(backend, [Concept(lora, ["a photo of sks dog"])], MergeSettings(iterations=1, sampling=FAST))
    _assert_reproduces(result, lora)
    # with one LoRA, iterating changes nothing but fp32 rounding of the (ridge-conditioned) systems
    assert all(r.max_change < 5e-3 for r in result.report.iterations if r.iteration)


def test_row_space_mode_reproduces_one_lora_and_merges_two(tiny_backend):
    lora_a, lora_b = _lora(tiny_backend, 2), _lora(tiny_backend, 3)
    settings = MergeSettings(iterations=1, row_space_width=1, sampling=FAST)   # every layer in row-space mode
    single = merge_loras(tiny_backend, [Concept(lora_a, ["sks dog"])], settings)
    _assert_reproduces(single, lora_a)
    assert {l.mode for l in single.report.layers.values()} == {"row space"}
    double = merge_loras(tiny_backend, [Concept(lora_a, ["sks dog"]), Concept(lora_b, ["xyz style"])], settings)
    for name, delta in double.lora.layers.items():
        assert delta.rank <= lora_a.layers[name].rank + lora_b.layers[name].rank
        assert torch.isfinite(delta.dense()).all()


def test_two_concepts_report_and_exact_rank(tiny_backend):
    lora_a = _lora(tiny_backend, 4, include=r"attn|self_attn")
    lora_b = _lora(tiny_backend, 5, include=r"attn|self_attn|mlp")
    concepts = [Concept(lora_a, ["sks dog"], strength=0.8, text_strength=1.2), Concept(lora_b, ["xyz style"])]
    result = merge_loras(tiny_backend, concepts, MergeSettings(iterations=2, tolerance=0, sampling=FAST))
    for name, delta in result.lora.layers.items():
        expected_rank = sum(l.layers[name].rank for l in (lora_a, lora_b) if name in l.layers)
        assert delta.rank == expected_rank, name
    stages = [r.stage for r in result.report.iterations]
    assert stages == ["text"] * 3 + ["unet"] * 3
    assert all(r.objective is not None for r in result.report.iterations if r.iteration)
    assert result.report.inputs[0].strength == 0.8 and result.report.inputs[0].text_strength == 1.2
    assert result.report.memory["statistics_gb"] > 0
    text = result.report.summary()
    assert "iteration 2" in text and "lora4" in text


def test_progress_is_monotonic_and_interrupt_leaves_no_hooks(tiny_backend):
    lora_a, lora_b = _lora(tiny_backend, 6), _lora(tiny_backend, 7)
    concepts = [Concept(lora_a, ["sks dog"]), Concept(lora_b, ["xyz style"])]
    seen = []
    merge_loras(tiny_backend, concepts, MergeSettings(iterations=1, sampling=FAST),
                on_progress=lambda done, total, message: seen.append((done, total, message)))
    assert seen and all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    assert all(done <= total for done, total, _ in seen)

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(MergeInterrupted):
        merge_loras(tiny_backend, concepts, MergeSettings(iterations=1, sampling=FAST), should_stop=stop)
    hooked = [n for n, m in tiny_backend.modules().items() if m._forward_hooks]
    roots = [r for c in ("unet", "text_encoder") for r in tiny_backend.roots(c) if r._forward_pre_hooks]
    assert not hooked and not roots


def test_empty_prompts_name_the_lora(tiny_backend):
    with pytest.raises(SettingsError, match="lora8.*at least one prompt"):
        merge_loras(tiny_backend, [Concept(_lora(tiny_backend, 8), ["  ", ""])], MergeSettings(sampling=FAST))


def test_baselines_need_no_prompts(tiny_backend):
    lora_a, lora_b = _lora(tiny_backend, 9), _lora(tiny_backend, 10)
    concat = merge_loras(tiny_backend, [Concept(lora_a), Concept(lora_b)], MergeSettings(method="concat"))
    linear = merge_loras(tiny_backend, [Concept(lora_a), Concept(lora_b)], MergeSettings(method="linear"))
    ties = merge_loras(tiny_backend, [Concept(lora_a), Concept(lora_b)], MergeSettings(method="ties", rank=4))
    name = next(iter(lora_a.layers))
    both = lora_a.layers[name].dense() + lora_b.layers[name].dense()
    assert torch.allclose(concat.lora.layers[name].dense(), both, atol=1e-5)
    assert torch.allclose(linear.lora.layers[name].dense(), both / 2, atol=1e-5)
    assert ties.lora.layers[name].rank == 4
    assert ties.report.layers[name].truncation_error is not None


def test_target_rank_truncates_and_reports_the_error(tiny_backend):
    lora_a, lora_b = _lora(tiny_backend, 11), _lora(tiny_backend, 12)
    result = merge_loras(tiny_backend, [Concept(lora_a, ["a"]), Concept(lora_b, ["b"])],
                         MergeSettings(iterations=0, rank=2, sampling=FAST))
    assert {d.rank for d in result.lora.layers.values()} == {2}
    errors = [l.truncation_error for l in result.report.layers.values()]
    assert all(0 < e < 1 for e in errors)


def test_sample_cache_reuses_trajectories_when_only_merge_settings_change(tiny_backend, tmp_path):
    from iteris_core.lora_writer import MergedLora

    table = tiny_backend.layer_table()
    paths = []
    for seed in (13, 14):
        path = tmp_path / f"c{seed}.safetensors"
        MergedLora(random_lora_deltas(table, seed, rank=2, scale=0.2), table).save(path, dtype="fp32")
        paths.append(path)
    concepts = [Concept(paths[0], ["sks dog"]), Concept(paths[1], ["xyz style"])]
    cache: dict = {}
    messages: list[str] = []
    first = merge_loras(tiny_backend, concepts, MergeSettings(iterations=1, sampling=FAST), sample_cache=cache)
    second = merge_loras(tiny_backend, concepts, MergeSettings(iterations=1, regularization=1e-3, sampling=FAST),
                         sample_cache=cache, log=messages.append)
    assert len(cache) == 2
    assert sum("reusing" in m for m in messages) == 2
    fresh = merge_loras(tiny_backend, concepts, MergeSettings(iterations=1, regularization=1e-3, sampling=FAST))
    for name, delta in fresh.lora.layers.items():   # reused samples give the same merge as fresh ones
        # (to fp32 rounding: replayed batches group rows differently from the sampler's batches)
        error = (second.lora.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 5e-3, (name, float(error))
    assert any(not torch.allclose(first.lora.layers[n].dense(), d.dense()) for n, d in fresh.lora.layers.items())
