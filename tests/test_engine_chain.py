"""The whole IterIS loop on a chain of layers, against statistics recomputed by brute force."""

from __future__ import annotations

import pytest
import torch

from chain_backend import ChainBackend, random_deltas
from iteris_core import Concept, MergeSettings, SamplingSettings, merge_loras
from iteris_core.lora_normalize import NormalizedLora
from iteris_core.solver import closed_form_dense

PROMPTS = (["alpha one", "alpha two"], ["beta one", "beta two"])
SAMPLING = SamplingSettings(samples_per_prompt=3, timesteps=1, steps=1, guidance=1.0, batch_size=2, seed=5)


def _concepts(backend, seeds=(1, 2)):
    return [Concept(NormalizedLora(f"c{s}", random_deltas(backend, s)), list(p)) for s, p in zip(seeds, PROMPTS)]


def _merge(backend, concepts, **settings):
    settings.setdefault("sampling", SAMPLING)
    return merge_loras(backend, concepts, MergeSettings(**settings))


def _samples(backend, concept: Concept) -> torch.Tensor:
    """The samples the loop draws for a concept (same seeds as IterisLoop.trajectories)."""
    s = SAMPLING
    return torch.stack([backend.inputs(backend.prompt_mean(concept.prompts[p]), s.seed + p * s.samples_per_prompt + k)
                        for p in range(len(concept.prompts)) for k in range(s.samples_per_prompt)])


def _dense(lora: NormalizedLora, names):
    return [lora.layers[n].dense() for n in names]


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
def test_streaming_statistics_equal_brute_force_two_iterations(packed):
    from iteris_core.api import _prepare
    from iteris_core.iteris import IterisLoop
    from iteris_core.memory import Placement

    backend = ChainBackend()
    concepts = _concepts(backend)
    a = 1e-3
    settings = MergeSettings(iterations=1, tolerance=0.0, regularization=a, sampling=SAMPLING)
    loop = IterisLoop(backend, [_prepare(c, c.lora) for c in concepts], settings,
                      placement=Placement("cpu", "cpu", True, packed=packed))
    _text, unet = loop.run()

    names = backend.names
    deltas = [_dense(c.lora, names) for c in concepts]
    samples = [_samples(backend, c) for c in concepts]
    own = [backend.layer_inputs(x, d) for x, d in zip(samples, deltas)]   # X_i per layer (n x d)
    lams = []
    for layer in range(len(names)):
        lams.append([float(d[layer].pow(2).sum()) / float((x[layer] @ d[layer].T).pow(2).sum() / x[layer].shape[0])
                     for d, x in zip(deltas, own)])
    first = [closed_form_dense([d[l] for d in deltas], [x[l].T for x in own], [x[l].T for x in own], lams[l], a)
             for l in range(len(names))]
    merged_inputs = [backend.layer_inputs(x, [f.float() for f in first]) for x in samples]
    second = [closed_form_dense([d[l] for d in deltas], [x[l].T for x in own], [xt[l].T for xt in merged_inputs],
                                lams[l], a) for l in range(len(names))]

    for l, name in enumerate(names):
        got = unet.merged[name].dense().double()
        assert torch.allclose(got, second[l], rtol=1e-3, atol=1e-4), name
        assert unet.weights[name].lam == pytest.approx(lams[l], rel=1e-4)
    assert unet.layer_change[names[-1]][0] > 1e-3   # the deep layer really moved


def test_converges_within_depth_minus_one_iterations():
    depth = 4
    backend = ChainBackend(depth=depth)
    result = _merge(backend, _concepts(backend), iterations=depth + 2, tolerance=0.0)
    for index, name in enumerate(backend.names):
        changes = result.report.layers[name].change      # iteration 1, 2, ...
        settled = changes[index:]                        # layer `index` is final after iteration `index`
        assert max(settled) < 1e-5, (name, changes)
        if index:
            assert changes[index - 1] > 1e-4, (name, changes)
    unet = [r for r in result.report.iterations if r.stage == "unet"]
    assert unet[depth].max_change < 1e-5                 # iteration `depth` changes nothing: D^(depth-1) is final


def test_early_stop_when_deltas_stop_moving():
    depth = 3
    backend = ChainBackend(depth=depth)
    result = _merge(backend, _concepts(backend), iterations=20, tolerance=1e-5)
    unet = [r for r in result.report.iterations if r.stage == "unet"]
    assert len(unet) <= depth + 1, [r.max_change for r in unet]
    assert result.report.converged["unet"]


def _output_error(backend, concepts, merged) -> float:
    names = backend.names
    total = 0.0
    for concept in concepts:
        x = _samples(backend, concept)
        own = backend.output(x, _dense(concept.lora, names))
        mine = backend.output(x, [merged.layers[n].dense() for n in names])
        total += float((own - mine).pow(2).mean())
    return total


def test_iteris_beats_regmean_and_linear_on_the_concepts_samples():
    backend = ChainBackend(depth=5, width=16)
    concepts = _concepts(backend)
    errors = {method: _output_error(backend, concepts, _merge(backend, concepts, method=method, iterations=6).lora)
              for method in ("iteris", "regmean", "linear")}
    assert errors["iteris"] < errors["regmean"] < errors["linear"], errors


def test_one_lora_is_reproduced():
    backend = ChainBackend()
    concept = _concepts(backend)[:1]
    result = _merge(backend, concept, iterations=2)
    for name, delta in concept[0].lora.layers.items():
        error = (result.lora.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-3, (name, float(error))


def test_probed_cross_norms_change_the_merge_only_at_ridge_level():
    from iteris_core.api import _prepare
    from iteris_core.iteris import IterisLoop
    from iteris_core.memory import Placement

    backend = ChainBackend()
    concepts = _concepts(backend)
    settings = MergeSettings(iterations=2, tolerance=0, sampling=SAMPLING)   # default ridge 1e-4
    results = {}
    for exact in (True, False):
        loop = IterisLoop(backend, [_prepare(c, c.lora) for c in concepts], settings,
                          placement=Placement("cpu", "cpu", exact))
        _text, unet = loop.run()
        results[exact] = unet.merged
    for name, delta in results[True].items():
        error = (results[False][name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-2, (name, float(error))


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
def test_non_finite_activations_stop_the_merge_at_the_layer_that_sees_them(packed):
    from iteris_core.api import _prepare
    from iteris_core.errors import SolverError
    from iteris_core.iteris import IterisLoop
    from iteris_core.memory import Placement

    backend = ChainBackend()
    with torch.no_grad():
        backend.chain.layers[1].bias[3] = float("nan")   # layer 2's input is NaN from here on
    loop = IterisLoop(backend, [_prepare(c, c.lora) for c in _concepts(backend)],
                      MergeSettings(iterations=1, sampling=SAMPLING), placement=Placement("cpu", "cpu", True, packed))
    with pytest.raises(SolverError, match=r"layer unet\.layers\.2: .*NaN or infinite.*concept 1"):
        loop.run()


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
def test_token_space_gives_the_same_merge_as_gram_sums(packed):
    """Layers kept as tokens (all the way, or until they outgrow the limit in the middle of the second
    concept) solve to the same LoRA as d x d sums, iteration after iteration."""
    from iteris_core.api import _prepare
    from iteris_core.iteris import IterisLoop
    from iteris_core.memory import Placement

    backend = ChainBackend()   # width 16; 36 tokens per concept, 12 per forward call
    concepts = _concepts(backend)
    settings = MergeSettings(iterations=2, tolerance=0.0, regularization=1e-3, sampling=SAMPLING)
    results, token_layers = {}, {}
    for fraction in (0.0, 100.0, 50 / 16):
        loop = IterisLoop(backend, [_prepare(c, c.lora) for c in concepts], settings,
                          placement=Placement("cpu", "cpu", False, packed), token_fraction=fraction)
        _text, unet = loop.run()
        results[fraction], token_layers[fraction] = unet.merged, len(unet.token_space_layers)
    assert token_layers == {0.0: 0, 100.0: 4, 50 / 16: 0}
    # both are fp32 solves, each within about 1e-5 of the largest entry of the exact (fp64) one
    for fraction in (100.0, 50 / 16):
        for name, reference in results[0.0].items():
            expected = reference.dense()
            assert torch.allclose(results[fraction][name].dense(), expected, rtol=1e-4,
                                  atol=4e-5 * float(expected.abs().max())), (fraction, name)
