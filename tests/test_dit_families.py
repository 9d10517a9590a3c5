"""The merge on every DiT family ComfyUI loads LoRAs for, inside the real ComfyUI 0.3.75 (in-process,
through its prompt executor), on tiny random models that ComfyUI's detection takes for each family
(``bench.dit_families``): Flux.1 dev and schnell, Chroma, SD3.5, Z-Image, Qwen-Image.

Per family: a single-LoRA merge does what LoraLoader does to the denoiser, for a kohya-named LoRA
and for a diffusers-named one (which lands on row slices of fused qkv weights where the family
fuses them); a two-LoRA IterIS merge samples an image with the merged MODEL and CLIP, and the file
it saves, loaded by LoraLoader, gives the same denoiser; a LoRA of another family and a corrupt
file are refused with messages that name them, and nothing is written.

The models keep their detected widths (0.4-0.9 B parameters), so each family is loaded once and
released before the next.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import bench.dit_families as dit
from comfy_fixtures import run_prompt
from bench.dit_tools import denoise, random_lora
from dit_fixtures import TinyDit, build_tiny_dit, release
from iteris_core.families import family_by_id

FAST = {"method": "iteris", "iterations": 1, "regularization": 1e-4, "rank": 0, "merge_text_encoder": True,
        "max_tokens": 0, "statistics_budget": 0.0, "samples_per_prompt": 1, "timesteps": 2, "steps": 2, "sampler": "default",
        "scheduler": "default", "cfg": 0.0, "guidance": 0.0, "seed": 0, "width": 64, "height": 64, "batch_size": 2}
PROMPTS = {"a": "a photo of sks dog", "b": "a painting in xyz style"}
LABEL_HEIGHT = 24   # the grid's label strips (nodes/compare_node.py)


@pytest.fixture(scope="module", params=dit.FAMILIES)
def tiny(request, comfy_nodes, comfy_state):
    tiny = build_tiny_dit(request.param, comfy_state / "models", comfy_nodes)
    loras = comfy_state / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    from iteris_core.lora_io import atomic_write_safetensors

    for label, spelling, seed in (("kohya", "kohya", 1), ("diffusers", "diffusers", 2), ("style", "kohya", 3)):
        name = f"{tiny.family}_{label}.safetensors"
        atomic_write_safetensors(random_lora(tiny.model, tiny.clip, spelling, seed), loras / name, {}, overwrite=True)
        tiny.loras[label] = name
    yield tiny
    release(tiny)


def merge_graph(tiny: TinyDit, concepts: list[tuple[str, str]], merge: dict | None = None,
                save_name: str | None = None) -> dict:
    """Loaders -> LoRA Concept chain -> Merge (-> Save Merged LoRA, or a text preview of the report)."""
    prompt = tiny.loaders()
    previous = None
    for i, (lora_name, text) in enumerate(concepts):
        node = str(10 + i)
        inputs = {"lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0, "prompts": text}
        if previous:
            inputs["previous"] = [previous, 0]
        prompt[node] = {"class_type": "IterIS_LoraConcept", "inputs": inputs}
        previous = node
    prompt["4"] = {"class_type": "IterIS_MergeLoras",
                   "inputs": {"model": ["1", 0], "clip": ["2", 0], "concepts": [previous, 0], **FAST, **(merge or {})}}
    if save_name:
        prompt["5"] = {"class_type": "IterIS_SaveLora", "inputs": {"lora": ["4", 2], "filename": save_name,
                                                                  "overwrite": True, "precision": "fp32"}}
    else:
        prompt["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 3]}}
    return prompt


def sampling_graph(tiny: TinyDit, prompt: dict) -> dict:
    """Add what a workflow samples the merged MODEL and CLIP with: text encodes (FluxGuidance for
    guidance-distilled models), an empty latent, KSampler at the family's cfg, VAE decode, save."""
    defaults = family_by_id(tiny.family).defaults
    positive = ["20", 0]
    prompt.update({
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": tiny.vae_name}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "sks dog in xyz style"}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "23": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "25": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["3", 0]}},
        "26": {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": f"iteris_{tiny.family}"}},
    })
    if defaults.guidance is not None:
        prompt["22"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["20", 0], "guidance": defaults.guidance}}
        positive = ["22", 0]
    prompt["24"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 1, "steps": 2, "cfg": defaults.cfg, "sampler_name": defaults.sampler,
        "scheduler": defaults.scheduler, "positive": positive, "negative": ["21", 0], "latent_image": ["23", 0],
        "denoise": 1.0}}
    return prompt


def outputs_of(executor, node: str) -> list:
    return [value[0] for value in executor.caches.outputs.get(node).outputs]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spelling", ["kohya", "diffusers"])
def test_single_lora_merge_does_what_loraloader_does(tiny, comfy_nodes, spelling):
    executor = tiny.executor
    lora_name = tiny.loras[spelling]
    ok, messages, _ = run_prompt(merge_graph(tiny, [(lora_name, PROMPTS["a"])]), executor)
    assert ok, messages
    base_model, base_clip = outputs_of(executor, "1")[0], outputs_of(executor, "2")[0]
    model, clip, lora, report = outputs_of(executor, "4")
    assert family_by_id(tiny.family).name in report
    reference = comfy_nodes.LoraLoader().load_lora(base_model, base_clip, lora_name, 1.0, 1.0)
    base = denoise(tiny.family, base_model, base_clip, PROMPTS["a"])
    ours = denoise(tiny.family, model, clip, PROMPTS["a"])
    theirs = denoise(tiny.family, *reference, PROMPTS["a"])
    assert relative(theirs, base) > 1e-3           # the LoRA changes the denoiser
    assert relative(ours, theirs) < 1e-3, relative(ours, theirs)


def test_two_lora_merge_samples_an_image_and_its_file_loads_as_the_model(tiny, comfy_nodes, comfy_state, caplog):
    executor = tiny.executor
    concepts = [(tiny.loras["kohya"], PROMPTS["a"]), (tiny.loras["style"], PROMPTS["b"])]
    prompt = sampling_graph(tiny, merge_graph(tiny, concepts, save_name=f"merged_{tiny.family}"))
    ok, messages, outputs = run_prompt(prompt, executor)
    assert ok, messages
    image = outputs["26"]["images"][0]
    assert (comfy_state / "output" / image["subfolder"] / image["filename"]).is_file()
    saved = outputs["5"]["text"][0].split()[1]
    assert saved == f"merged_{tiny.family}.safetensors"
    base_model, base_clip = outputs_of(executor, "1")[0], outputs_of(executor, "2")[0]
    model, clip, _lora, report = outputs_of(executor, "4")
    assert "iteration 1" in report
    with caplog.at_level(logging.WARNING):
        loaded = comfy_nodes.LoraLoader().load_lora(base_model, base_clip, saved, 1.0, 1.0)
        assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
        (model_only,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, saved, 1.0)
    unloaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not [m for m in unloaded if "lora_unet_" in m]   # only the text encoders' keys, which it ignores
    for text in PROMPTS.values():
        merged_out = denoise(tiny.family, model, clip, text)
        assert relative(denoise(tiny.family, *loaded, text), merged_out) < 1e-5
        assert relative(denoise(tiny.family, model_only, base_clip, text),
                        denoise(tiny.family, model, base_clip, text)) < 1e-5
    from safetensors import safe_open

    with safe_open(str(comfy_state / "models" / "loras" / saved), "pt") as f:
        metadata = f.metadata()
    family = family_by_id(tiny.family)
    assert metadata["iteris_family"] == family.name and metadata["modelspec.architecture"] == family.modelspec


def test_the_before_after_grid_renders_each_concept_on_the_family(tiny):
    """The grid node on the family's own sampling defaults: one row per concept (its LoRA, then the
    merge), after the same merge as the test before (the executor reuses it)."""
    concepts = [(tiny.loras["kohya"], PROMPTS["a"]), (tiny.loras["style"], PROMPTS["b"])]
    prompt = merge_graph(tiny, concepts)
    prompt["3"] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny.vae_name}}
    prompt["6"] = {"class_type": "IterIS_CompareGrid", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "concepts": ["11", 0], "merged_model": ["4", 0],
        "merged_clip": ["4", 1], "seed": 3, "steps": 2, "sampler": "default", "scheduler": "default", "cfg": 0.0,
        "guidance": 0.0, "width": 64, "height": 64}}
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    ok, messages, _ = run_prompt(prompt, tiny.executor)
    assert ok, messages
    (grid,) = outputs_of(tiny.executor, "6")
    assert grid.shape == (1, 2 * (LABEL_HEIGHT + 64), 2 * 64, 3)
    assert torch.isfinite(grid).all() and 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    for row in range(2):                                  # decoded pictures, not blank tiles
        top = row * (LABEL_HEIGHT + 64) + LABEL_HEIGHT
        assert float(grid[0, top:top + 64, :64].std()) > 1e-3 and float(grid[0, top:top + 64, 64:].std()) > 1e-3


def test_a_lora_of_another_family_is_refused_naming_both(tiny, comfy_state, sd1_lora):
    before = sorted(p.name for p in (comfy_state / "models" / "loras").iterdir())
    ok, messages, _ = run_prompt(merge_graph(tiny, [(tiny.loras["kohya"], PROMPTS["a"]), (sd1_lora, PROMPTS["b"])],
                                             save_name="never"), tiny.executor)
    error = next(data for kind, data in messages if kind == "execution_error")
    assert not ok and error["node_type"] == "IterIS_MergeLoras"
    message = error["exception_message"]
    assert sd1_lora in message and f"looks made for SD1.x but the base model is {family_by_id(tiny.family).name}" in message
    assert sorted(p.name for p in (comfy_state / "models" / "loras").iterdir()) == before


def test_a_corrupt_file_is_refused_and_nothing_is_written(tiny, comfy_state):
    folder = comfy_state / "models" / "loras"
    data = (folder / tiny.loras["kohya"]).read_bytes()
    (folder / f"cut_{tiny.family}.safetensors").write_bytes(data[: len(data) // 3])
    before = sorted(p.name for p in folder.iterdir())
    ok, messages, _ = run_prompt(merge_graph(tiny, [(f"cut_{tiny.family}.safetensors", PROMPTS["a"])],
                                             save_name="never"), tiny.executor)
    error = next(data for kind, data in messages if kind == "execution_error")
    assert not ok and error["node_type"] == "IterIS_LoraConcept"
    assert f"cut_{tiny.family}.safetensors" in error["exception_message"]
    assert "truncated" in error["exception_message"]
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.fixture(scope="module")
def sd1_lora(comfy_state) -> str:
    """A kohya LoRA for full-size SD1.5 (attention layers), in the test ComfyUI's loras folder."""
    from bench.full_size import full_size_tables
    from iteris_core.backends.tiny import random_lora_deltas
    from iteris_core.lora_writer import MergedLora

    sd1 = full_size_tables()["sd1"]
    deltas = random_lora_deltas(sd1, 5, rank=2, include=r"transformer_blocks\.0\.attn[12]\.to_[qkv]$")
    MergedLora(deltas, sd1).save(comfy_state / "models" / "loras" / "made_for_sd15.safetensors", overwrite=True)
    return "made_for_sd15.safetensors"


def _pack_engine(comfy_nodes) -> tuple:
    """The node pack's own merge-node and backend modules and its engine package name (the backend
    raises and catches that engine's classes, so tests drive the engine the pack imported)."""
    package = comfy_nodes.NODE_CLASS_MAPPINGS["IterIS_MergeLoras"].__module__.rsplit(".", 1)[0]
    merge_node, comfy_backend = (sys.modules[f"{package}.{m}"] for m in ("merge_node", "comfy_backend"))
    return merge_node, comfy_backend, package.rsplit(".", 1)[0] + ".iteris_core"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8_e4m3fn", "bf16"])
def test_low_precision_weights_merge_like_loraloader(tiny, comfy_nodes, dtype):
    """What GPU users run (UNETLoader's fp8_e4m3fn, ``--bf16-unet``: both set the model's weight
    dtype, which is what this loads it with): the merge's side paths on low-precision weights do
    what LoraLoader's patched low-precision weights do, up to those weights' rounding. Flux.1 dev
    only, the family users most often run in fp8."""
    import comfy.sd
    import folder_paths

    if tiny.family != "flux_dev":
        pytest.skip("checked on Flux.1 dev")
    model = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", tiny.unet_name),
                                          model_options={"dtype": dtype})
    assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == dtype
    merge_node, comfy_backend, engine = _pack_engine(comfy_nodes)
    Concept, merge_loras = sys.modules[engine + ".api"].Concept, sys.modules[engine + ".api"].merge_loras
    read_lora_file = sys.modules[engine + ".lora_io"].read_lora_file
    backend = comfy_backend.ComfyBackend(model, tiny.clip)
    settings = merge_node.IterisMergeLoras.settings(backend.family, **FAST)
    lora = read_lora_file(folder_paths.get_full_path("loras", tiny.loras["kohya"]))
    merged = merge_loras(backend, [Concept(lora, [PROMPTS["a"]])], settings)
    ours = merge_node.apply_merged_lora(model, tiny.clip, merged.lora.state_dict(torch.float32))
    reference = comfy_nodes.LoraLoader().load_lora(model, tiny.clip, tiny.loras["kohya"], 1.0, 1.0)
    base = denoise(tiny.family, model, tiny.clip, PROMPTS["a"])
    theirs = denoise(tiny.family, *reference, PROMPTS["a"])
    assert relative(theirs, base) > 1e-3
    assert relative(denoise(tiny.family, *ours, PROMPTS["a"]), theirs) < 2e-2


def test_a_statistics_budget_keeps_the_two_lora_merge_exact(tiny, comfy_nodes):
    """Under a statistics budget that holds only a few layer inputs at once, the layers are merged
    in groups (each with its own passes, early groups stopping after their last layer) and the
    merged LoRA is the unlimited one within 1e-5. Flux.1 dev only (the widest inputs: 15360)."""
    import importlib

    import folder_paths

    if tiny.family != "flux_dev":
        pytest.skip("checked on Flux.1 dev")
    merge_node, comfy_backend, engine = _pack_engine(comfy_nodes)
    api, memory, iteris = (importlib.import_module(f"{engine}.{m}") for m in ("api", "memory", "iteris"))
    read_lora_file = importlib.import_module(f"{engine}.lora_io").read_lora_file
    backend = comfy_backend.ComfyBackend(tiny.model, tiny.clip)
    settings = merge_node.IterisMergeLoras.settings(backend.family, **FAST).replace(tolerance=0.0)
    concepts = [api.Concept(read_lora_file(folder_paths.get_full_path("loras", tiny.loras[label])), [PROMPTS[p]])
                for label, p in (("kohya", "a"), ("style", "b"))]
    unlimited = api.merge_loras(backend, concepts, settings)
    assert unlimited.report.memory["group_counts"] == [1, 1]

    loop = iteris.IterisLoop(backend, [api._prepare(c, api.load_concept_lora(c, i, backend))
                                       for i, c in enumerate(concepts)], settings)
    placement = memory.Placement("cpu", "cpu", False, packed=True)
    largest = max(memory.largest_input_bytes(torch.device("cpu"), placement, plans, settings.effective_iterations)
                  for plans in loop.stage_plans() if plans)
    grouped = api.merge_loras(backend, concepts, settings.replace(statistics_budget_gb=1.2 * largest / memory.GB))
    assert grouped.report.memory["group_counts"][1] > 1, grouped.report.memory["group_counts"]
    assert set(grouped.lora.layers) == set(unlimited.lora.layers)
    for name, delta in unlimited.lora.layers.items():
        error = (grouped.lora.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-5, (name, float(error))
