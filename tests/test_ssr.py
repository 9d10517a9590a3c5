"""SSR-Merge as a method: the engine's merge against the formulas recomputed by brute force on a
small model with a text encoder, Linear and Conv2d layers (3x3, strided, 1x1), layers changed by
some of the concepts only and single-LoRA layers; the router, the memory plan, the defaults, the
command line and the merge node in the real ComfyUI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iteris_core import Concept, MergeSettings, SamplingSettings, merge_loras
from iteris_core.backends.base import LatentSample, TextBatch
from iteris_core.errors import SolverError
from iteris_core.layers import LayerTable
from iteris_core.low_rank import LowRankDelta
from iteris_core.lora_normalize import NormalizedLora
from iteris_core.settings import Method
from iteris_core.statistics import ssr_router
from iteris_core.statistics.ssr import PASSTHROUGH, ROUTED

TEXT_WIDTH, TEXT_TOKENS, CHANNELS, SIDE = 8, 5, 4, 6


# -- a small model with a text encoder and a conv denoiser ------------------------------------------
def _call(name: str, module: nn.Module, x: torch.Tensor, deltas: dict | None, record: dict | None) -> torch.Tensor:
    """The layer on ``x``: the module itself (the engine's hooks apply the LoRAs), or, for the
    brute force, its weight plus the dense delta, recording the input."""
    if deltas is None:
        return module(x)
    if record is not None:
        record.setdefault(name, []).append(x.detach().clone())
    weight = module.weight
    if name in deltas:
        weight = weight + deltas[name].reshape(weight.shape)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation)


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(TEXT_WIDTH, TEXT_WIDTH) for _ in range(2))

    def forward(self, tokens, deltas=None, record=None):
        for i, layer in enumerate(self.layers):
            tokens = torch.tanh(_call(f"text_encoder.layers.{i}", layer, tokens, deltas, record))
        return tokens


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(CHANNELS, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(6, 6, 1)
        self.post = nn.Conv2d(6, 6, 1)
        self.out = nn.Linear(6, CHANNELS)
        self.register_buffer("project", torch.randn(TEXT_WIDTH, CHANNELS) / TEXT_WIDTH ** 0.5)

    def forward(self, latents, context, deltas=None, record=None):
        h = latents + (context.mean(1) @ self.project)[:, :, None, None]   # the text steers every layer
        for name in ("conv_in", "down", "mix", "post"):
            h = torch.tanh(_call(f"unet.{name}", getattr(self, name), h, deltas, record))
        return _call("unet.out", self.out, h.flatten(2).transpose(1, 2), deltas, record)


class ToyBackend:
    """A ModelBackend: prompts are seeded token embeddings; sampling keeps the first latent."""

    architecture = "custom"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.text, self.denoiser = Text().eval(), Denoiser().eval()
        named = [(f"text_encoder.layers.{i}", m) for i, m in enumerate(self.text.layers)]
        named += [(f"unet.{n}", getattr(self.denoiser, n)) for n in ("conv_in", "down", "mix", "post", "out")]
        self._modules = dict(named)
        self._table = LayerTable.from_modules(named)
        self.sampled = 0

    def layer_table(self):
        return self._table

    def modules(self):
        return dict(self._modules)

    def roots(self, component):
        return [self.denoiser] if component == "unet" else [self.text]

    def base_weight(self, name):
        return self._modules[name].weight.detach().float()

    def resolution(self, settings):
        return (SIDE * 8, SIDE * 8)

    def weights_bytes(self, component):
        return 0

    def activation_bytes(self, settings):
        return 0

    def read_lora(self, lora):
        raise NotImplementedError("these tests pass NormalizedLora objects")

    @staticmethod
    def prompt_tokens(prompt: str) -> torch.Tensor:
        seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        return torch.randn(TEXT_TOKENS, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))

    def encode_text(self, prompts, deltas=None, record=None):
        return [TextBatch({"context": self.text(self.prompt_tokens(p)[None], deltas, record)}) for p in prompts]

    @staticmethod
    def latent(seed: int) -> torch.Tensor:
        return torch.randn(CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))

    def sample(self, positive, negative, seeds, settings, keep_steps, on_step):
        self.sampled += 1
        latents = torch.stack([self.latent(int(s)) for s in seeds])
        on_step(0)
        self.denoiser(latents, positive.tensors["context"].expand(len(seeds), -1, -1))
        return [[LatentSample(latents[j].clone(), torch.tensor(0.0), 0)] for j in range(len(seeds))]

    def replay(self, positive, negative, samples, settings, deltas=None, record=None):
        """Rows [negative..., positive...] under guidance, as a sampler batches them."""
        latents = torch.stack([s.latent for s in samples])
        conds = [positive] if negative is None else [negative, positive]
        context = torch.cat([c.tensors["context"].expand(len(samples), -1, -1) for c in conds])
        self.denoiser(latents.repeat(len(conds), 1, 1, 1), context, deltas, record)


# -- LoRAs and brute force -------------------------------------------------------------------------------
RANKS = (2, 3, 1)
# which concepts change each layer: shared by all, by some (the others' passes must add nothing), by one
LAYERS = {"text_encoder.layers.0": (0, 1, 2), "text_encoder.layers.1": (0, 2), "unet.conv_in": (0, 1, 2),
          "unet.down": (0, 1, 2), "unet.mix": (0, 2), "unet.post": (1,), "unet.out": (0, 1)}
PROMPTS = (["alpha one", "alpha two"], ["beta"], ["gamma one", "gamma two"])
SAMPLING = dict(samples_per_prompt=2, timesteps=1, steps=1, batch_size=3, seed=7)


def _lora(backend: ToyBackend, concept: int) -> NormalizedLora:
    g = torch.Generator().manual_seed(100 + concept)
    rank = RANKS[concept]
    table = backend.layer_table()
    layers = {}
    for name, owners in LAYERS.items():
        if concept in owners:
            info = table[name]
            # a file's scale (alpha / rank) that is not 1: the ridge is absolute, so where it goes matters
            layers[name] = LowRankDelta(torch.randn(info.out_features, rank, generator=g) * 0.4,
                                        torch.randn(rank, info.input_dim, generator=g) / info.input_dim ** 0.5,
                                        scale=1.5 / rank)
    return NormalizedLora(f"concept{concept}", layers)


def _concepts(backend: ToyBackend, count: int = 3) -> list[Concept]:
    strengths = (0.8, 1.0, 1.2)
    return [Concept(_lora(backend, k), list(PROMPTS[k]), strength=strengths[k], text_strength=1.3 - 0.2 * k,
                    negative_prompt="blurry" if k == 1 else "") for k in range(count)]


@dataclass
class Factors:
    down: torch.Tensor   # A_k, as stored
    up: torch.Tensor     # s_k B_k, scale and strength folded in


def _factors(concept: Concept) -> dict[str, Factors]:
    out = {}
    for name, delta in concept.lora.layers.items():
        strength = concept.strength if name.startswith("unet.") else concept.text_strength
        out[name] = Factors(delta.down.double(), delta.up.double() * delta.scale * strength)
    return out


def _tokens(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer input as token rows: a Linear's rows, or a conv's unfolded patches (one per output position)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).double()
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()


@torch.no_grad()
def _own_inputs(backend: ToyBackend, concept: Concept, guidance: float) -> dict[str, torch.Tensor]:
    """Token rows of every layer's input in the concept's own pass (its LoRA on the whole model)."""
    factors = _factors(concept)
    dense = {n: (f.up @ f.down).float() for n, f in factors.items()}
    text_prompts = list(concept.prompts) + ([concept.negative_prompt] if guidance > 1 else [])
    record: dict[str, list[torch.Tensor]] = {}
    conditioning = backend.encode_text(text_prompts, dense, record)
    negative = conditioning[-1] if guidance > 1 else None
    s = SamplingSettings(guidance=guidance, **SAMPLING)
    for p in range(len(concept.prompts)):
        seeds = [s.seed + p * s.samples_per_prompt + k for k in range(s.samples_per_prompt)]
        samples = [LatentSample(backend.latent(seed), torch.tensor(0.0), 0) for seed in seeds]
        backend.replay(conditioning[p], negative, samples, s, dense, record)
    modules = backend.modules()
    return {n: torch.cat([_tokens(x, modules[n]) for x in xs]) for n, xs in record.items()}


def _brute_force(backend: ToyBackend, concepts: list[Concept], guidance: float,
                 lam: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every layer's merged dense delta by the formulas, in fp64: per layer, over the concepts with
    a delta there, z = A x on each concept's own tokens, G = sum z z^T, Q's block row k = sum z_k z^T
    over concept k's tokens, R = (Q/n) (G/n + lam I)^-1 with n all their tokens, merged = B R A.
    Also each routed layer's condition number of G/n + lam I."""
    inputs = [_own_inputs(backend, c, guidance) for c in concepts]
    factors = [_factors(c) for c in concepts]
    merged, condition = {}, {}
    for name in LAYERS:
        owners = [k for k in range(len(concepts)) if name in factors[k]]
        if len(owners) == 1:
            f = factors[owners[0]][name]
            merged[name] = f.up @ f.down
            condition[name] = 1.0
            continue
        down = torch.cat([factors[k][name].down for k in owners])
        up = torch.cat([factors[k][name].up for k in owners], dim=1)
        total = down.shape[0]
        gram = torch.zeros(total, total, dtype=torch.float64)
        guide = torch.zeros(total, total, dtype=torch.float64)
        tokens = start = 0
        for k in owners:
            z = inputs[k][name] @ down.T
            rank = factors[k][name].down.shape[0]
            gram += z.T @ z
            guide[start:start + rank] += z[:, start:start + rank].T @ z
            tokens += z.shape[0]
            start += rank
        system = gram / tokens + lam * torch.eye(total, dtype=torch.float64)
        merged[name] = up @ (guide / tokens) @ torch.linalg.inv(system) @ down
        condition[name] = float(torch.linalg.cond(system))
    return merged, condition


def _settings(guidance: float = 1.0, **changes) -> MergeSettings:
    return MergeSettings(method="ssr", sampling=SamplingSettings(guidance=guidance, **SAMPLING), **changes)


# -- the merge against brute force ----------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 2.5], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("lam", [1e-4, 0.3])
def test_ssr_merge_equals_brute_force(guidance, lam):
    backend = ToyBackend()
    concepts = _concepts(backend)
    result = merge_loras(backend, concepts, _settings(guidance, regularization=lam))
    expected, condition = _brute_force(backend, concepts, guidance, lam)
    assert set(result.lora.layers) == set(LAYERS)
    for name, reference in expected.items():
        got = result.lora.layers[name]
        error = float((got.dense().double() - reference).norm() / reference.norm())
        # the sums are fp32 (as SSR's own): their rounding grows with the system's condition number
        # (unet.out: rank 5 of input width 6, about 2e3 at the smaller ridge)
        assert error < 1e-6 * max(condition[name], 10.0), (name, error, condition[name])
        owners = LAYERS[name]
        assert got.rank == sum(RANKS[k] for k in owners), name
        mode = result.report.layers[name].mode
        assert mode == (PASSTHROUGH if len(owners) == 1 else ROUTED), (name, mode)
    # the router really routes: the merge is neither the concatenation nor the average of the deltas
    name = "unet.down"
    concat = sum(f.up @ f.down for f in (_factors(c)[name] for c in concepts))
    assert float((expected[name] - concat).norm() / concat.norm()) > 0.05
    assert result.report.method == "ssr" and result.lora.metadata["iteris_method"] == "ssr"


def test_merged_down_matrices_are_the_stacked_ones_and_a_single_lora_layer_is_unchanged():
    backend = ToyBackend()
    concepts = _concepts(backend)
    merged = merge_loras(backend, concepts, _settings()).lora.layers
    stacked = torch.cat([c.lora.layers["unet.mix"].down for c in (concepts[0], concepts[2])])
    assert torch.equal(merged["unet.mix"].down, stacked)
    single, source = merged["unet.post"], concepts[1].lora.layers["unet.post"]
    assert torch.equal(single.up, source.up) and torch.equal(single.down, source.down)
    assert single.scale == source.scale * concepts[1].strength


def test_one_lora_passes_through_without_sampling():
    backend = ToyBackend()
    concept = _concepts(backend, 1)[0]
    result = merge_loras(backend, [concept], _settings())
    assert backend.sampled == 0   # nothing to route: the model is not sampled
    for name, delta in concept.lora.layers.items():
        strength = concept.strength if name.startswith("unet.") else concept.text_strength
        assert torch.equal(result.lora.layers[name].dense(), delta.scaled(strength).dense()), name
        assert result.report.layers[name].mode == PASSTHROUGH


def test_non_finite_activations_stop_the_merge_at_the_layer_that_sees_them():
    backend = ToyBackend()
    with torch.no_grad():
        backend.denoiser.down.bias[2] = float("nan")   # unet.mix reads NaN from here on
    with pytest.raises(SolverError, match=r"layer unet\.mix: .*NaN or infinite.*concept 1"):
        merge_loras(backend, _concepts(backend), _settings())


# -- the router ----------------------------------------------------------------------------------------
def test_router_is_the_regularised_least_squares_solution():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 5, generator=g, dtype=torch.float64)
    gram, guide = z.T @ z, torch.randn(5, 5, generator=g, dtype=torch.float64)
    router = ssr_router(gram.float(), guide.float(), 40, 1e-2, "layer")
    expected = (guide / 40) @ torch.linalg.inv(gram / 40 + 1e-2 * torch.eye(5, dtype=torch.float64))
    assert router.dtype == torch.float64
    assert torch.allclose(router, expected, rtol=1e-5, atol=1e-6)


def test_router_refuses_a_singular_system_without_regularisation():
    z = torch.randn(40, 2, dtype=torch.float64)
    z = torch.cat([z, z[:, :1]], dim=1)           # two LoRAs with the same down direction
    with pytest.raises(SolverError, match=r"layer x: .*singular.*raise the regularisation"):
        ssr_router(z.T @ z, torch.eye(3), 40, 0.0, "x")
    with pytest.raises(SolverError, match="no token"):
        ssr_router(z.T @ z, torch.eye(3), 0, 1e-4, "x")


# -- memory plan and report ----------------------------------------------------------------------------
def test_memory_plan_counts_only_the_small_projection_sums():
    from iteris_core.api import _prepare
    from iteris_core.iteris import IterisLoop
    from iteris_core.memory import GB, choose_plan

    backend = ToyBackend()
    concepts = _concepts(backend)
    prepared = [_prepare(c, c.lora) for c in concepts]
    table = backend.layer_table()
    expected = {}
    for stage in ("text", "unet"):
        names = [n for n in LAYERS if n.startswith("unet.") == (stage == "unet") and len(LAYERS[n]) > 1]
        expected[stage] = sum(4 * (2 * r * r + r * table[n].input_dim + r * table[n].out_features)
                              for n in names for r in [sum(RANKS[k] for k in LAYERS[n])])
    ssr = IterisLoop(backend, prepared, _settings())
    plan = choose_plan(torch.device("cpu"), ssr.stage_plans(), 0, 0, 0)
    assert plan.systems_gb == plan.scratch_gb == plan.cross_gb == 0
    assert plan.small_gb * GB == max(expected.values())
    iteris = IterisLoop(backend, prepared, MergeSettings(sampling=SamplingSettings(**SAMPLING)))
    assert choose_plan(torch.device("cpu"), iteris.stage_plans(), 3, 0, 0).statistics_gb > plan.statistics_gb


def test_report_names_the_method_and_says_nothing_of_convergence():
    backend = ToyBackend()
    report = merge_loras(backend, _concepts(backend), _settings()).report
    summary = report.summary()
    assert summary.startswith("ssr merge of 3 LoRAs")
    assert "iteration limit" not in summary and "converged" not in summary
    assert [r.iteration for r in report.iterations] == [0, 0]   # text, unet: one pass each
    assert report.settings["method"] == "ssr"


# -- defaults --------------------------------------------------------------------------------------------
def test_ssr_defaults_are_one_calibration_pass_unless_set():
    settings = MergeSettings(method="ssr", iterations=5)
    assert settings.effective_iterations == 0
    assert (settings.sampling.samples_per_prompt, settings.sampling.timesteps) == (1, 1)
    assert settings.sampling.kept_steps() == [0]            # the trajectory's first, pure-noise latent
    assert settings.regularization == 1e-4
    assert MergeSettings().sampling == SamplingSettings()   # the other methods keep theirs
    chosen = SamplingSettings(samples_per_prompt=3, timesteps=2)
    assert MergeSettings(method="ssr", sampling=chosen).sampling == chosen
    assert Method.SSR.needs_model and Method.parse("SSR") is Method.SSR


def test_cli_applies_ssr_defaults_only_where_nothing_is_typed():
    from iteris_core.cli import _settings as cli_settings
    from iteris_core.cli import build_parser

    base = ["merge", "--base", "b", "--lora", "x.safetensors", "--out", "o.safetensors"]
    parse = lambda *extra: cli_settings(build_parser().parse_args([*base, *extra]))  # noqa: E731
    ssr = parse("--method", "ssr")
    assert ssr.method is Method.SSR and (ssr.sampling.samples_per_prompt, ssr.sampling.timesteps) == (1, 1)
    typed = parse("--method", "ssr", "--samples", "3", "--timesteps", "2", "--steps", "5")
    assert (typed.sampling.samples_per_prompt, typed.sampling.timesteps, typed.sampling.steps) == (3, 2, 5)
    iteris = parse()
    assert (iteris.sampling.samples_per_prompt, iteris.sampling.timesteps) == (2, 4)


# -- command line: a real merge -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipe):
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import random_lora_deltas
    from iteris_core.lora_writer import MergedLora

    root = tmp_path_factory.mktemp("ssr-cli")
    tiny_pipe.save_pretrained(str(root / "base"))
    table = DiffusersBackend(tiny_pipe, device="cpu").layer_table()
    for seed, name in ((1, "dog"), (2, "style")):
        MergedLora(random_lora_deltas(table, seed, rank=2, scale=0.2), table).save(root / f"{name}.safetensors")
    return root


def test_cli_merges_with_ssr(workspace):
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline
    from iteris_core.cli import main
    from iteris_core.lora_normalize import load_lora

    out, report = workspace / "ssr.safetensors", workspace / "ssr.json"
    status = main(["merge", "--base", str(workspace / "base"), "--lora", str(workspace / "dog.safetensors"),
                   "--prompt", "a photo of dog", "--prompt", "dog on a table", "--lora",
                   str(workspace / "style.safetensors"), "--prompt", "a painting in style", "--out", str(out),
                   "--report", str(report), "--method", "ssr", "--steps", "3", "--device", "cpu", "--quiet"])
    assert status == 0
    data = json.loads(report.read_text())
    assert data["method"] == "ssr"
    assert (data["settings"]["sampling"]["samples_per_prompt"], data["settings"]["sampling"]["timesteps"]) == (1, 1)
    assert {layer["mode"] for layer in data["layers"].values()} == {ROUTED}   # both LoRAs change every layer
    assert {r["stage"] for r in data["iterations"]} == {"text", "unet"}
    table = DiffusersBackend(build_tiny_pipeline(TinySpec()), device="cpu").layer_table()
    merged, dog = load_lora(out, table), load_lora(workspace / "dog.safetensors", table)
    assert merged.metadata["iteris_method"] == "ssr"
    for name, delta in merged.layers.items():
        assert delta.rank == 2 * dog.layers[name].rank, name
        assert torch.isfinite(delta.dense()).all(), name


# -- the merge node in the real ComfyUI -----------------------------------------------------------------
NODE_LAYERS = r"(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj|resnets\.0\.conv1)$"


@dataclass
class NodeLoras:
    paths: list          # the two files in ComfyUI's loras folder
    table: LayerTable
    shared: list[str]    # layers both change
    only_first: list[str]


@pytest.fixture(scope="module")
def node_loras(comfy_state, tiny_checkpoint) -> NodeLoras:
    """Two LoRA files: the first on attention, text encoder and a resnet conv, the second on the
    cross-attention k/v only."""
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import random_lora_deltas
    from iteris_core.lora_writer import MergedLora

    table = DiffusersBackend.from_pretrained(tiny_checkpoint, device="cpu").layer_table()
    folder = comfy_state / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    paths, layers = [], []
    for seed, include in ((11, NODE_LAYERS), (12, r"attn2\.to_(k|v)$")):
        deltas = random_lora_deltas(table, seed, rank=2, scale=0.2, include=include)
        layers.append(set(deltas))
        paths.append(MergedLora(deltas, table).save(folder / f"ssr_{seed}.safetensors", overwrite=True, dtype="fp32"))
    assert layers[1] and layers[1] < layers[0]
    return NodeLoras(paths, table, sorted(layers[1]), sorted(layers[0] - layers[1]))


def _node_graph(names: list[str]) -> dict:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}
    previous = None
    for i, (name, text) in enumerate(zip(names, ("a photo of sks dog", "a painting in xyz style"))):
        inputs = {"lora_name": name, "strength_model": 1.0, "strength_clip": 1.0, "prompts": text}
        if previous:
            inputs["previous"] = [previous, 0]
        prompt[str(10 + i)] = {"class_type": "IterIS_LoraConcept", "inputs": inputs}
        previous = str(10 + i)
    settings = {"method": "ssr", "iterations": 3, "regularization": 1e-4, "samples_per_prompt": 0, "timesteps": 0,
                "steps": 2, "cfg": 5.0, "seed": 0, "rank": 0, "width": 64, "height": 64, "batch_size": 2,
                "merge_text_encoder": True, "max_tokens": 0, "statistics_budget": 0.0, "sampler": "default",
                "scheduler": "default", "guidance": 0.0}
    prompt["4"] = {"class_type": "IterIS_MergeLoras",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": [previous, 0], **settings}}
    prompt["5"] = {"class_type": "IterIS_SaveLora", "inputs": {"lora": ["4", 2], "filename": "ssr_merged",
                                                              "overwrite": True, "precision": "fp32"}}
    return prompt


def test_merge_node_resolves_unset_sampling_to_the_methods_defaults(comfy_nodes):
    from comfy_fixtures import load_pack
    from iteris_core.families import family_by_id

    node = load_pack(comfy_nodes)["IterIS_MergeLoras"]
    kind, options = node.INPUT_TYPES()["required"]["method"]
    assert kind == "COMBO" and "ssr" in options["options"]
    args = dict(iterations=3, regularization=1e-4, rank=0, merge_text_encoder=True, max_tokens=0, statistics_budget=0.0,
                steps=0, sampler="default", scheduler="default", cfg=0.0, guidance=0.0, seed=0, width=0, height=0,
                batch_size=4)

    def sampling(method: str, samples: int, timesteps: int) -> tuple[int, int]:
        chosen = node.settings(family_by_id("sd1"), method, samples_per_prompt=samples, timesteps=timesteps, **args)
        return chosen.sampling.samples_per_prompt, chosen.sampling.timesteps

    assert sampling("ssr", 0, 0) == (1, 1)
    assert sampling("ssr", 3, 2) == (3, 2)
    assert sampling("iteris", 0, 0) == (2, 4)
    assert sampling("regmean", 1, 0) == (1, 4)


def test_merge_node_merges_with_ssr(comfy_nodes, node_loras, caplog):
    import logging

    from comfy_fixtures import load_pack, make_executor, run_prompt
    from iteris_core.lora_io import LoraFile
    from iteris_core.lora_normalize import load_lora

    load_pack(comfy_nodes)
    executor = make_executor()
    with caplog.at_level(logging.INFO):
        ok, messages, _ = run_prompt(_node_graph([p.name for p in node_loras.paths]), executor)
    assert ok, messages
    assert any("1 trajectories per concept, 1 kept timesteps each" in r.getMessage() for r in caplog.records)
    _model, _clip, lora, report = [value[0] for value in executor.caches.outputs.get("4").outputs]
    assert report.startswith("ssr merge of 2 LoRAs on sd1")
    assert lora.metadata["iteris_method"] == "ssr"
    merged = load_lora(LoraFile("merged", dict(lora)), node_loras.table)
    first = load_lora(node_loras.paths[0], node_loras.table)
    assert set(merged.layers) == set(first.layers)
    for name in node_loras.shared:   # routed: both rank-2 LoRAs stacked
        assert merged.layers[name].rank == 4, name
        assert torch.isfinite(merged.layers[name].dense()).all(), name
    for name in node_loras.only_first:   # the second LoRA does not change it: the first one's delta, as it is
        reference = first.layers[name].dense()
        assert torch.allclose(merged.layers[name].dense(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
