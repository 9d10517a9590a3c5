"""The node pack inside the real ComfyUI 0.3.75 (in-process, CPU), on a generated SD1.5-type
checkpoint and generated LoRAs: what the merge node outputs, what the save node writes, what the
stock loaders make of it, and how bad inputs end."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from comfy_fixtures import load_pack, make_executor, run_prompt
from iteris_core.backends.diffusers_backend import DiffusersBackend
from iteris_core.backends.tiny import random_lora_deltas
from iteris_core.lora_io import LoraFile
from iteris_core.lora_normalize import load_lora
from iteris_core.lora_writer import MergedLora

LAYERS = r"(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj|ff\.net\.(0\.proj|2)|resnets\.0\.conv1|proj_in)$"
LABEL_HEIGHT = 24   # the grid's label strips (nodes/compare_node.py)
FAST = {"method": "iteris", "iterations": 2, "regularization": 1e-4, "samples_per_prompt": 1, "timesteps": 2,
        "steps": 4, "cfg": 5.0, "seed": 0, "rank": 0, "width": 64, "height": 64, "batch_size": 2,
        "merge_text_encoder": True, "max_tokens": 0, "statistics_budget": 0.0, "sampler": "default", "scheduler": "default", "guidance": 0.0}


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return load_pack(comfy_nodes)


@pytest.fixture(scope="module")
def table(tiny_checkpoint):
    return DiffusersBackend.from_pretrained(tiny_checkpoint, device="cpu").layer_table()


@pytest.fixture(scope="module")
def loras(comfy_state, table):
    folder = comfy_state / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for seed, name in ((1, "dog"), (2, "style")):
        deltas = random_lora_deltas(table, seed, rank=4, scale=0.2, include=LAYERS)
        names[name] = MergedLora(deltas, table).save(folder / f"{name}.safetensors", overwrite=True, dtype="fp32").name
    return folder, names


def graph(loras, *, concepts=("dog", "style"), merge=None, save_name="merged_test", overwrite=False):
    """Checkpoint -> LoRA Concept chain -> Merge -> Save."""
    _folder, names = loras
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}
    previous = None
    prompts = {"dog": "a photo of sks dog\nsks dog on the grass", "style": "a painting in xyz style"}
    for i, concept in enumerate(concepts):
        node = str(10 + i)
        inputs = {"lora_name": names.get(concept, concept), "strength_model": 0.9 if concept == "style" else 1.0,
                  "strength_clip": 1.0, "prompts": prompts.get(concept, "a photo")}
        if previous:
            inputs["previous"] = [previous, 0]
        prompt[node] = {"class_type": "IterIS_LoraConcept", "inputs": inputs}
        previous = node
    prompt["4"] = {"class_type": "IterIS_MergeLoras",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": [previous, 0], **FAST, **(merge or {})}}
    prompt["5"] = {"class_type": "IterIS_SaveLora", "inputs": {"lora": ["4", 2], "filename": save_name,
                                                              "overwrite": overwrite, "precision": "fp32"}}
    return prompt


def outputs_of(executor, node: str) -> list:
    return [value[0] for value in executor.caches.outputs.get(node).outputs]


def weights(model_or_clip, comfy_nodes) -> dict[str, torch.Tensor]:
    """The effective (patched) weights of a MODEL or CLIP, by ComfyUI state-dict key."""
    import comfy.model_management

    patcher = getattr(model_or_clip, "patcher", model_or_clip)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return {k: v.detach().float().clone() for k, v in patcher.model.state_dict().items()}


@pytest.fixture(scope="module")
def merged_run(pack, loras):
    executor = make_executor()
    ok, messages, outputs = run_prompt(graph(loras), executor)
    assert ok, messages
    return executor, outputs


def test_pack_registers_every_node_with_tooltips(pack, comfy_nodes):
    assert set(pack) == {"IterIS_LoraConcept", "IterIS_LoraStack", "IterIS_MergeLoras", "IterIS_SaveLora",
                         "IterIS_CompareGrid"}
    for node in pack.values():
        spec = node.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (kind, options) in spec.get(section, {}).items():
                assert options.get("tooltip"), (node, name)
        assert node.CATEGORY == "loaders/IterIS"
        assert node.DESCRIPTION


def _comfy_key(name: str, table) -> str:
    component, _, path = name.partition(".")
    if component == "unet":
        return "diffusion_model." + table.ldm_name(name) + ".weight"
    return "clip_l.transformer." + path + ".weight"


def test_merged_model_is_the_base_plus_the_engines_delta(merged_run, comfy_nodes, table, tiny_checkpoint):
    executor, _ = merged_run
    base_model, base_clip, _vae = outputs_of(executor, "1")
    model, clip, lora, report = outputs_of(executor, "4")
    assert "iteris merge of 2 LoRAs on sd1" in report
    merged = load_lora(LoraFile("lora", dict(lora)), table)
    base_unet, base_text = weights(base_model, comfy_nodes), weights(base_clip, comfy_nodes)
    unet, text = weights(model, comfy_nodes), weights(clip, comfy_nodes)
    checked = 0
    for name, delta in merged.layers.items():
        key = _comfy_key(name, table)
        before, after = (base_unet, unet) if name.startswith("unet.") else (base_text, text)
        change = (after[key] - before[key]).reshape(delta.out_features, -1)
        error = (change - delta.dense()).norm() / delta.dense().norm()
        # CLIP weights stay fp16 in ComfyUI on the CPU, the UNet's are fp32
        assert error < (1e-5 if name.startswith("unet.") else 2e-2), (name, float(error))
        checked += 1
    assert checked == len(merged.layers) > 80
    untouched = [k for k in base_unet if k.endswith("norm1.weight")]
    assert all(torch.equal(base_unet[k], unet[k]) for k in untouched)


def test_saved_lora_loads_in_the_stock_loraloader_identically(merged_run, comfy_nodes, loras, caplog):
    executor, outputs = merged_run
    folder, _ = loras
    assert outputs["5"]["text"][0].startswith("saved merged_test.safetensors")
    assert (folder / "merged_test.safetensors").is_file()
    import folder_paths
    assert "merged_test.safetensors" in folder_paths.get_filename_list("loras")
    base_model, base_clip, _vae = outputs_of(executor, "1")
    model, clip, _lora, _report = outputs_of(executor, "4")
    with caplog.at_level(logging.WARNING):
        loaded_model, loaded_clip = comfy_nodes.LoraLoader().load_lora(base_model, base_clip, "merged_test.safetensors",
                                                                       1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    for mine, theirs in ((model, loaded_model), (clip, loaded_clip)):
        a, b = weights(mine, comfy_nodes), weights(theirs, comfy_nodes)
        differ = [(k, float((a[k] - b[k]).abs().max())) for k in a if not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True)]
        assert not differ, differ[:5]


def test_lora_output_works_with_core_lora_model_nodes(merged_run, comfy_nodes):
    executor, _ = merged_run
    base_model, _clip, _vae = outputs_of(executor, "1")
    model, _clip2, lora, _report = outputs_of(executor, "4")
    import comfy_extras.nodes_train as train

    loaded = train.LoraModelLoader.execute(base_model, lora, 1.0).result[0]
    a, b = weights(model, comfy_nodes), weights(loaded, comfy_nodes)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6, equal_nan=True) for k in a)


def test_one_lora_is_reproduced(pack, loras, comfy_nodes):
    executor = make_executor()
    ok, messages, _ = run_prompt(graph(loras, concepts=("dog",), save_name="single"), executor)
    assert ok, messages
    base_model, base_clip, _vae = outputs_of(executor, "1")
    model, clip, _lora, _report = outputs_of(executor, "4")
    folder, names = loras
    reference_model, reference_clip = comfy_nodes.LoraLoader().load_lora(base_model, base_clip, names["dog"], 1.0, 1.0)
    total = 0
    for base_part, merged_part, reference_part, tolerance in ((base_model, model, reference_model, 5e-3),
                                                              (base_clip, clip, reference_clip, 3e-2)):
        base = weights(base_part, comfy_nodes)
        mine, theirs = weights(merged_part, comfy_nodes), weights(reference_part, comfy_nodes)
        changed = [k for k in base if not torch.equal(theirs[k], base[k], ) and torch.isfinite(base[k]).all()]
        for k in changed:
            error = (mine[k] - theirs[k]).norm() / (theirs[k] - base[k]).norm()
            assert error < tolerance, (k, float(error))   # CLIP weights are fp16 in ComfyUI
        total += len(changed)
    assert total > 60


def test_identical_prompt_is_served_from_cache_and_settings_change_reuses_samples(pack, loras, caplog):
    executor = make_executor()
    prompt = graph(loras, save_name="cached")
    assert run_prompt(prompt, executor)[0]
    ok, messages, _ = run_prompt(prompt, executor)
    cached = next(data["nodes"] for kind, data in messages if kind == "execution_cached")
    assert ok and set(cached) == set(prompt)
    with caplog.at_level(logging.INFO):
        ok, messages, _ = run_prompt(graph(loras, save_name="cached", merge={"regularization": 1e-3}), executor)
    assert ok
    assert sum("reusing its" in r.getMessage() for r in caplog.records) == 2   # both concepts' samples


def test_a_lora_for_another_model_ends_with_a_clear_error(pack, loras, comfy_nodes):
    from bench.full_size import full_size_tables

    folder, _ = loras
    sd2 = full_size_tables()["sd2"]
    deltas = random_lora_deltas(sd2, 3, rank=2, include=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_[kv]$")
    MergedLora(deltas, sd2).save(folder / "made_for_sd2.safetensors", overwrite=True)
    before = sorted(p.name for p in folder.iterdir())
    ok, messages, _ = run_prompt(graph(loras, concepts=("dog", "made_for_sd2.safetensors"), save_name="never"))
    error = next(data for kind, data in messages if kind == "execution_error")
    assert not ok and error["node_type"] == "IterIS_MergeLoras"
    assert "made_for_sd2.safetensors" in error["exception_message"]
    assert "looks made for SD2.x but the base model is SD1.x" in error["exception_message"]
    assert sorted(p.name for p in folder.iterdir()) == before


def test_metadata_for_another_family_stops_the_merge_before_any_model_call(pack, loras, table, monkeypatch):
    """An SD1-shaped LoRA whose kohya metadata says SDXL: its keys would fit, so only the metadata
    can tell, and the merge must stop before it encodes or samples anything."""
    import sys

    from safetensors.torch import save_file

    folder, _ = loras
    deltas = random_lora_deltas(table, 4, rank=2, components=("unet",), include=r"attn1\.to_(q|v)$")
    save_file(MergedLora(deltas, table).state_dict(torch.float32), str(folder / "says_sdxl.safetensors"),
              metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"})
    backend_class = sys.modules[pack["IterIS_MergeLoras"].__module__].ComfyBackend
    calls = []
    for method in ("encode_text", "sample", "replay", "render"):
        original = getattr(backend_class, method)
        monkeypatch.setattr(backend_class, method, lambda *a, _m=method, _f=original, **k: calls.append(_m) or _f(*a, **k))
    ok, messages, _ = run_prompt(graph(loras, concepts=("dog", "says_sdxl.safetensors"), save_name="never",
                                       merge={"seed": 41}))
    error = next(data for kind, data in messages if kind == "execution_error")
    assert not ok and error["node_type"] == "IterIS_MergeLoras"
    assert "says_sdxl.safetensors: it looks made for SDXL but the base model is SD1.x" in error["exception_message"]
    assert "ss_base_model_version = 'sdxl_base_v1-0'" in error["exception_message"]
    assert calls == []
    ok, _, _ = run_prompt(graph(loras, concepts=("dog",), save_name="never_either", merge={"seed": 41}))
    assert ok and "sample" in calls   # the counting sees a merge's calls


def test_a_corrupt_file_is_refused_by_the_concept_node(pack, loras):
    folder, names = loras
    data = (folder / names["dog"]).read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    ok, messages, _ = run_prompt(graph(loras, concepts=("dog", "cut.safetensors"), save_name="never"))
    error = next(data for kind, data in messages if kind == "execution_error")
    assert not ok and error["node_type"] == "IterIS_LoraConcept"
    assert "cut.safetensors" in error["exception_message"] and "truncated" in error["exception_message"]
    assert not (folder / "never.safetensors").exists()


@pytest.mark.parametrize("change, words", [
    ({"5": {"filename": "../escape"}}, "may not contain folders or '..'"),
    ({"10": {"lora_name": "missing.safetensors"}}, "is not in models/loras"),
    ({"4": {"iterations": 99}}, "iterations must be between 0 and 50"),
    ({"4": {"timesteps": 9, "steps": 4}}, "timesteps (9) cannot exceed steps (4)"),
])
def test_bad_inputs_are_refused_before_anything_runs(pack, loras, change, words):
    folder, _ = loras
    prompt = graph(loras, save_name="never")
    for node, inputs in change.items():
        prompt[node]["inputs"].update(inputs)
    before = sorted(p.name for p in folder.iterdir())
    ok, messages, _ = run_prompt(prompt)
    assert not ok and messages[0][0] == "validation"
    assert words in str(messages[0][2])
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.fixture(scope="module")
def tagged_lora(loras, table) -> str:
    """A kohya-style LoRA whose metadata says what it was trained on (folder ``10_sks dog``, tags)."""
    import json

    from iteris_core.lora_io import atomic_write_safetensors

    folder, _ = loras
    deltas = random_lora_deltas(table, 5, rank=4, scale=0.2, include=LAYERS)
    metadata = {"ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 12}}),
                "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 9, "sitting": 7}})}
    atomic_write_safetensors(MergedLora(deltas, table).state_dict(torch.float32), folder / "tagged_dog.safetensors",
                             metadata, overwrite=True)
    return "tagged_dog.safetensors"


def test_empty_prompts_are_made_from_the_loras_metadata_and_shown(pack, loras, tagged_lora):
    prompt = graph(loras, concepts=(tagged_lora, "style"), save_name="from_metadata")
    prompt["10"]["inputs"]["prompts"] = "  \n# only a comment\n"
    prompt["20"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    executor = make_executor()
    ok, messages, outputs = run_prompt(prompt, executor)
    assert ok, messages
    shown = outputs_of(executor, "10")[1]
    assert "sks dog" in shown and len(shown.splitlines()) >= 2
    assert any("10_sks dog" in text for text in outputs["10"]["text"])     # the node says where they came from
    report = outputs_of(executor, "4")[3]
    assert "10_sks dog" in report                                          # and so does the merge's report
    typed = graph(loras, concepts=(tagged_lora, "style"), save_name="typed")
    typed["20"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    executor = make_executor()
    assert run_prompt(typed, executor)[0]
    assert outputs_of(executor, "10")[1] == "a photo"                      # typed prompts win


def test_empty_prompts_without_metadata_ask_for_prompts(pack, loras):
    prompt = graph(loras, save_name="never")
    prompt["10"]["inputs"]["prompts"] = ""
    ok, messages, _ = run_prompt(prompt)
    error = next(m[1] for m in messages if m[0] == "execution_error")
    assert not ok and error["node_type"] == "IterIS_LoraConcept"
    assert "dog.safetensors" in error["exception_message"] and "prompt" in error["exception_message"]


def test_a_lora_stack_merges_like_the_same_concepts_chained_by_hand(pack, loras, merged_run, comfy_nodes):
    from dit_fixtures import load_test_nodes

    load_test_nodes(comfy_nodes)
    _folder, names = loras
    by_hand = outputs_of(merged_run[0], "4")[2]
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
              "2": {"class_type": "IterISTest_LoraStacker", "inputs": {
                  "lora_names": f"{names['dog']}, None, {names['style']}", "strengths_model": "1.0, 1.0, 0.9",
                  "strengths_clip": "1.0, 1.0, 1.0"}},
              "3": {"class_type": "IterIS_LoraStack", "inputs": {
                  "lora_stack": ["2", 0], "prompts": "a photo of sks dog\nsks dog on the grass\n---\na painting in xyz style"}},
              "4": {"class_type": "IterIS_MergeLoras",
                    "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 0], **FAST}},
              "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 3]}}}
    executor = make_executor()
    ok, messages, _ = run_prompt(prompt, executor)
    assert ok, messages
    stacked = outputs_of(executor, "4")[2]
    assert set(stacked) == set(by_hand)
    for key, tensor in by_hand.items():
        assert torch.allclose(stacked[key], tensor, rtol=1e-5, atol=1e-7), key
    assert outputs_of(executor, "3")[1].count("---") == 1


def test_a_bad_lora_stack_is_refused_naming_the_entry(pack, loras, comfy_nodes):
    from dit_fixtures import load_test_nodes

    load_test_nodes(comfy_nodes)
    _folder, names = loras
    prompt = {"2": {"class_type": "IterISTest_LoraStacker", "inputs": {
                  "lora_names": f"{names['dog']}, missing.safetensors", "strengths_model": "1.0, 1.0",
                  "strengths_clip": "1.0, 1.0"}},
              "3": {"class_type": "IterIS_LoraStack", "inputs": {"lora_stack": ["2", 0], "prompts": "a\n---\nb"}},
              "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}}
    ok, messages, _ = run_prompt(prompt)
    error = next(m[1] for m in messages if m[0] == "execution_error")
    assert not ok and "missing.safetensors" in error["exception_message"]


def _with_grid(prompt: dict, concepts_node: str) -> dict:
    prompt["6"] = {"class_type": "IterIS_CompareGrid", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": [concepts_node, 0],
        "merged_model": ["4", 0], "merged_clip": ["4", 1], "seed": 3, "steps": 3, "sampler": "default",
        "scheduler": "default", "cfg": 0.0, "guidance": 0.0, "width": 64, "height": 64}}
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    return prompt


def test_the_grid_shows_each_concepts_own_lora_beside_the_merge(pack, loras):

    executor = make_executor()
    ok, messages, _ = run_prompt(_with_grid(graph(loras, save_name="grid"), "11"), executor)
    assert ok, messages
    (image,) = outputs_of(executor, "6")
    assert image.shape == (1, 2 * (LABEL_HEIGHT + 64), 2 * 64, 3)          # one row per concept, own | merged
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # a one-LoRA merge reproduces the LoRA: its two pictures are the same (and not the other concept's)
    ok, messages, _ = run_prompt(_with_grid(graph(loras, concepts=("dog",), save_name="grid1"), "10"), executor)
    assert ok, messages
    (single,) = outputs_of(executor, "6")
    own, merged = single[0, LABEL_HEIGHT:, :64], single[0, LABEL_HEIGHT:, 64:]
    assert float((own - merged).abs().max()) < 2e-2
    assert float((own - image[0, LABEL_HEIGHT + 64 + LABEL_HEIGHT:, :64]).abs().mean()) > 1e-3


def test_save_never_overwrites_unless_asked(pack, loras):
    folder, _ = loras
    (folder / "taken.safetensors").write_bytes(b"precious")
    ok, _, outputs = run_prompt(graph(loras, merge={"method": "concat"}, save_name="taken"))
    assert ok and (folder / "taken.safetensors").read_bytes() == b"precious"
    assert "taken_00001.safetensors" in outputs["5"]["text"][0]
    ok, _, _ = run_prompt(graph(loras, merge={"method": "concat"}, save_name="taken", overwrite=True))
    assert ok and (folder / "taken.safetensors").read_bytes() != b"precious"


def test_save_keeps_a_tensor_fp16_cannot_hold_in_fp32(pack, loras):
    from safetensors.torch import load_file

    folder, _ = loras
    lora = {"lora_unet_x.lora_up.weight": torch.full((4, 2), 1e5), "lora_unet_x.lora_down.weight": torch.ones(2, 4),
            "lora_unet_x.alpha": torch.tensor(2.0), "lora_unet_y.lora_up.weight": torch.ones(4, 2)}
    name = pack["IterIS_SaveLora"].execute(lora, "wide_range", False, "fp16").result[0]
    saved = load_file(str(folder / name))
    assert saved["lora_unet_x.lora_up.weight"].dtype == torch.float32
    assert torch.equal(saved["lora_unet_x.lora_up.weight"], lora["lora_unet_x.lora_up.weight"])
    assert saved["lora_unet_x.lora_down.weight"].dtype == saved["lora_unet_y.lora_up.weight"].dtype == torch.float16
    assert saved["lora_unet_x.alpha"].dtype == torch.float32


def test_cancel_stops_the_merge_and_leaves_nothing(pack, loras, comfy_nodes, tiny_checkpoint):
    import comfy.model_management
    import comfy.utils

    folder, _ = loras
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 3:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    executor = make_executor()
    try:
        ok, messages, _ = run_prompt(graph(loras, save_name="interrupted", merge={"seed": 7}), executor)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert not ok
    assert any(kind == "execution_interrupted" for kind, _ in messages), messages
    assert not (folder / "interrupted.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    base_model, base_clip, _vae = outputs_of(executor, "1")
    modules = list(base_model.model.diffusion_model.modules()) + list(base_clip.cond_stage_model.modules())
    assert not [m for m in modules if m._forward_hooks or m._forward_pre_hooks]   # no hook left behind
    assert run_prompt(graph(loras, save_name="after_cancel"))[0]                   # and the next run works


def test_real_samples_are_read_as_comfyui_reads_them_or_refused(pack, loras, samples_dir):
    """Every real file ComfyUI itself loads completely on SD1.x is accepted by the concept node and read
    by the merge, each layer's delta exactly what ComfyUI's own formulas patch; every other file is
    refused with a message naming it (by the concept node, or by the merge's reader)."""
    import comfy.lora
    import comfy.utils
    from comfy_fixtures import comfy_places_every_patch, comfy_sd15_key_map

    from iteris_core.families import family_by_id
    from iteris_core.lora_io import read_lora_file

    comfy_lora = pack["IterIS_MergeLoras"].__module__.rsplit(".", 1)[0] + ".comfy_lora"
    reader = __import__(comfy_lora, fromlist=["read_lora"])
    folder, _ = loras
    key_map, shapes = comfy_sd15_key_map(with_shapes=True)
    concept = pack["IterIS_LoraConcept"]
    sd1 = family_by_id("sd1")

    def zeros(key: str) -> torch.Tensor:
        return torch.zeros(shapes[key])

    read = set()
    for path in sorted(samples_dir.glob("*.safetensors")):
        shutil.copy(path, folder / path.name)
        try:
            concept.execute(path.name, 1.0, 1.0, "a photo of sks")
            normalized = reader.read_lora(read_lora_file(folder / path.name), key_map, zeros, sd1)
            accepted, message = True, ""
        except Exception as exc:          # noqa: BLE001 - the message is what is checked
            accepted, message = False, str(exc)
        if comfy_places_every_patch(path, key_map, shapes):
            assert accepted, (path.name, message)
            read.add(path.stem)
            patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(path), safe_load=True), key_map,
                                           log_missing=False)
            for key, patch in patches.items():
                expected = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], zeros(key), key)
                layer = normalized.layers.get(reader.layer_name(key))
                if layer is None:      # skipped as a zero delta: ComfyUI's patch changes nothing either
                    assert not expected.any(), (path, key)
                    continue
                got = layer.dense().reshape(expected.shape)
                assert (got - expected).norm() <= 1e-4 * expected.norm(), (path, key)
        else:
            assert not accepted and path.name in message, (path.name, message)
    assert {"sd15_kohya_lokr_r4_fp16", "sd15_diffusers_attnproc_r4"} <= read
