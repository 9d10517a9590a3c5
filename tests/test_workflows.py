"""The shared workflows in ``workflows/`` in the real runtime and the real web front end.

One ComfyUI server (the pack symlinked into its custom_nodes, the generated tiny SD1.5 checkpoint, tiny
Flux.1 dev and Z-Image models from ``bench.dit_families`` and generated LoRAs for each in its models
folders, and the tests' own node pack, whose loader gives the tiny text encoders in place of
DualCLIPLoader / CLIPLoader and whose ``CR LoRA Stack`` stands in for Comfyroll's) serves all three parts:

(a) every workflow fits the server's ``/object_info``: node types exist, widget values fit their
    inputs (model file names excepted: they are substituted), link types agree at both ends;
(b) each workflow, converted to the API format by ``workflow_tools`` with the test models and small
    CPU settings swapped in, runs through ``POST /prompt`` and writes its images / LoRA file; the
    workflows that leave the concept prompts empty use the prompts made from the test LoRAs'
    metadata (kohya dataset folders and tags, ``modelspec.trigger_phrase``, a Civitai sidecar), and
    the LoRA-stack workflow's before/after grid has one row per LoRA the stacker switches on;
(c) the front end the server ships (comfyui-frontend-package) loads each workflow in headless
    Chromium with no page error and no missing-node dialog, knows every node type, and its
    ``graphToPrompt()`` equals ``workflow_tools.to_api``; a screenshot becomes ``workflows/<name>.png``.
    Skipped when the ``playwright`` package or a Chromium binary is missing (CI installs both).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import bench.dit_families as dit
import workflow_tools as wt
from comfy_fixtures import comfy_base_directory
from bench.dit_tools import kohya_unet_lora
from dit_fixtures import TEST_NODES
from test_server import Server

WORKFLOWS = tuple(path.stem for path in wt.workflow_paths())
SHIPPED = {"iteris_two_concepts", "iteris_three_concepts_save", "iteris_compare_stacked",
           "iteris_flux_two_concepts", "iteris_zimage_two_concepts", "iteris_two_concepts_from_metadata",
           "iteris_lora_stack"}
# DiT workflows -> the family of tiny model they run on; the others run on the tiny SD1.5 checkpoint
WORKFLOW_FAMILY = {"iteris_flux_two_concepts": "flux_dev", "iteris_zimage_two_concepts": "zimage"}
DIT_FILES = {"unet_name": {"flux1-dev.safetensors", "z_image_turbo_bf16.safetensors"},
             "clip_name1": {"t5xxl_fp16.safetensors"}, "clip_name2": {"clip_l.safetensors"},
             "clip_name": {"qwen_3_4b.safetensors"}, "vae_name": {"ae.safetensors"}}
CHECKPOINT = "tiny_sd15.safetensors"
# the workflows' LoRA names -> generated test LoRAs (seed of each)
TEST_LORAS = {"character_a.safetensors": ("wf_character.safetensors", 11),
              "style_b.safetensors": ("wf_style.safetensors", 12),
              "outfit_c.safetensors": ("wf_outfit.safetensors", 13)}
# what the test LoRAs say they were trained on, as the trainers write it: kohya's dataset folder and
# caption tags, Stability's modelspec trigger phrase, a Civitai sidecar's trained words
TEST_LORA_METADATA = {
    "wf_character.safetensors": {
        "ss_dataset_dirs": json.dumps({"10_chara_a woman": {"n_repeats": 10, "img_count": 24}}),
        "ss_tag_frequency": json.dumps({"10_chara_a woman": {"chara_a woman": 24, "solo": 22, "long hair": 20,
                                                             "smile": 14, "looking at viewer": 12, "outdoors": 5}})},
    "wf_style.safetensors": {
        "modelspec.trigger_phrase": "styleb painting",
        "ss_tag_frequency": json.dumps({"img": {"no humans": 30, "landscape": 18, "building": 12, "sky": 9}})},
}
TEST_LORA_SIDECARS = {"wf_outfit.civitai.info": {"trainedWords": ["outfitc jacket"]}}
COMFYROLL_FOLDER = "ComfyUI_Comfyroll_CustomNodes"   # how `git clone` of Suzie1's Comfyroll pack names it
GRID_LABEL = 24   # the grid's label strip above each image (nodes/compare_node.py LABEL_HEIGHT)
# a few text-encoder and UNet attention layers: both halves of the merge run, and each merge takes
# seconds on a 2-core CPU (all attention/MLP/conv layers: minutes)
LORA_LAYERS = r"(encoder\.layers\.(0|11)\.self_attn\.(q|v)_proj|attn1\.to_(q|out\.0)|attn2\.to_(k|v))$"
UI_SETTINGS = {
    "Comfy.TutorialCompleted": True,          # no templates dialog on the first visit
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,          # no FPS counter: screenshots stay byte-stable
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # text stays drawn when zoomed out to fit
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",  # no tab bar listing the earlier workflows
    "Comfy.Graph.CanvasMenu": False,          # no zoom menu (its label rendered differently run to run)
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
VIEWPORT = {"width": 2400, "height": 1350}


def workflow_path(name: str) -> Path:
    return wt.WORKFLOWS_DIR / f"{name}.json"


def test_the_shared_workflows_are_there():
    assert SHIPPED <= set(WORKFLOWS)


@dataclass
class DitFiles:
    unet: str
    text_encoders: str
    vae: str
    loras: dict[str, str]


def install_dit(base: Path, family: str) -> DitFiles:
    """The family's tiny model files and test LoRAs (kohya names, the diffusion model's attention and
    MLP layers) in the server's models folders."""
    from iteris_core.lora_io import atomic_write_safetensors

    models = base / "models"
    unet = dit.write_diffusion_model(family, models / "diffusion_models" / f"tiny_{family}.safetensors")
    encoders = dit.write_text_encoders(family, models / "text_encoders")
    vae = dit.write_vae(family, models / "vae", models / "vae_approx")
    shapes = dit.diffusion_model_shapes(family)
    loras = {}
    for name, (_sd_name, seed) in TEST_LORAS.items():
        loras[name] = f"wf_{family}_{Path(name).stem}.safetensors"
        atomic_write_safetensors(kohya_unet_lora(shapes, seed), models / "loras" / loras[name], {}, overwrite=True)
    return DitFiles(unet.name, ",".join(p.name for p in encoders), vae, loras)


def describe_training(loras: Path) -> None:
    """Give the SD test LoRAs in ``loras`` the metadata and sidecar files of ``TEST_LORA_METADATA`` and
    ``TEST_LORA_SIDECARS`` (same tensors; the file is rewritten through a temporary one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from iteris_core.lora_io import atomic_write_safetensors

    for name, extra in TEST_LORA_METADATA.items():
        path = loras / name
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        atomic_write_safetensors(load_file(str(path)), path, {**metadata, **extra}, overwrite=True)
    for name, content in TEST_LORA_SIDECARS.items():
        (loras / name).write_text(json.dumps(content))


@pytest.fixture(scope="module")
def wf_server(tmp_path_factory, tiny_checkpoint, comfy_nodes):
    base = comfy_base_directory(tmp_path_factory.mktemp("workflow-server"), tiny_checkpoint, CHECKPOINT,
                                dict(TEST_LORAS.values()), include=LORA_LAYERS)
    describe_training(base / "models" / "loras")
    # under the folder name of Comfyroll's own pack: its "CR LoRA Stack" stand-in then wears, in the
    # front end and the workflow previews, the source badge a Comfyroll user sees on the real node
    (base / "custom_nodes" / COMFYROLL_FOLDER).symlink_to(TEST_NODES)
    dits = {family: install_dit(base, family) for family in sorted(set(WORKFLOW_FAMILY.values()))}
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(UI_SETTINGS))
    with pytest.MonkeyPatch.context() as env:
        # OpenMP threads that spin while they wait make torch 3-8x slower whenever another process
        # (this pytest, a parallel job) wants the same cores; waiting passively costs nothing when idle
        if "OMP_WAIT_POLICY" not in os.environ:
            env.setenv("OMP_WAIT_POLICY", "PASSIVE")
        running = Server(base)
    running.dits = dits
    yield running
    running.stop()


@pytest.fixture(scope="module")
def object_info(wf_server) -> dict:
    return wf_server.get("/object_info")


# --------------------------------------------------------------------------------------------------
# (a) the workflows fit the node schemas


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_fits_the_node_schemas(name, object_info):
    workflow = wt.load_workflow(workflow_path(name))
    real = [n for n in workflow["nodes"] if n["type"] not in wt.VIRTUAL_TYPES]
    assert {n["type"] for n in real} <= set(object_info), "node types missing from /object_info"
    assert wt.check_workflow(workflow, object_info) == []
    assert any(n["type"] in wt.NOTE_TYPES for n in workflow["nodes"]), "every shared workflow explains itself"
    prompt = wt.to_api(workflow, object_info)
    assert wt.model_files(prompt) <= {"v1-5-pruned-emaonly.safetensors", *TEST_LORAS, *set().union(*DIT_FILES.values())}
    # a seed set to 'randomize' would re-sample every concept on every run
    for node in real:
        _values, controls = wt.widget_values(node, object_info[node["type"]])
        assert set(controls.values()) <= {"fixed"}, (node["id"], node["type"], controls)


def test_the_checker_finds_broken_workflows(object_info):
    """The checks above can fail: a bad combo value, an out-of-range number, a wrong type, a link into
    an input of another type, a missing widget value and an unknown node are all reported."""
    good = wt.load_workflow(workflow_path("iteris_two_concepts"))
    by_type = {}
    for node in good["nodes"]:
        by_type.setdefault(node["type"], node["id"])

    def broken(change) -> list[str]:
        workflow = copy.deepcopy(good)
        change({n["id"]: n for n in workflow["nodes"]}, workflow)
        return wt.check_workflow(workflow, object_info)

    merge, ksampler = by_type["IterIS_MergeLoras"], by_type["KSampler"]
    assert any("method" in p for p in broken(lambda n, w: n[merge]["widgets_values"].__setitem__(0, "nope")))
    assert any("iterations" in p and "outside" in p
               for p in broken(lambda n, w: n[merge]["widgets_values"].__setitem__(1, 51)))
    assert any("merge_text_encoder" in p
               for p in broken(lambda n, w: n[merge]["widgets_values"].__setitem__(4, "yes")))
    assert any("control" in p for p in broken(lambda n, w: n[ksampler]["widgets_values"].__setitem__(1, 20)))
    assert any("widgets_values" in p for p in broken(lambda n, w: n[ksampler]["widgets_values"].append(1)))
    assert any("not in /object_info" in p for p in broken(lambda n, w: n[merge].__setitem__("type", "Bogus")))

    def retype(nodes, workflow):  # KSampler's model link now claims to come from the VAE output
        link = next(l for l in workflow["links"] if l[3] == ksampler and l[4] == 0)
        link[2], link[5] = 2, "VAE"
    assert any("typed VAE" in p for p in broken(retype))


# --------------------------------------------------------------------------------------------------
# (b) the workflows run


def runnable_prompt(name: str, object_info: dict, server=None) -> dict:
    """The workflow as the test runs it: API format, test models, small CPU settings. A DiT
    workflow gets its family's tiny files, and the tests' loader in place of its text-encoder loader."""
    prompt = wt.to_api(wt.load_workflow(workflow_path(name)), object_info)
    family = WORKFLOW_FAMILY.get(name)
    if family is None:
        prompt = wt.substitute_models(prompt, checkpoint=CHECKPOINT, loras={k: v[0] for k, v in TEST_LORAS.items()})
    else:
        files = server.dits[family]
        prompt = wt.replace_text_encoder_loaders(prompt, "IterISTest_TinyTextEncoderLoader",
                                                 {"family": family, "text_encoder_names": files.text_encoders})
        prompt = wt.substitute_models(prompt, checkpoint=CHECKPOINT, loras=files.loras,
                                      files={"unet_name": files.unet, "vae_name": files.vae,
                                             "text_encoder_names": files.text_encoders})
    return wt.shrink_for_cpu(prompt, size=64, steps=2)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_and_writes_its_outputs(name, wf_server, object_info):
    prompt = runnable_prompt(name, object_info, wf_server)
    save_lora = {k: v for k, v in prompt.items() if v["class_type"] == "IterIS_SaveLora"}
    for entry in save_lora.values():  # a file left by an earlier run must not hide a failed save
        (wf_server.base / "models" / "loras" / f"{entry['inputs']['filename']}.safetensors").unlink(missing_ok=True)

    entry = wf_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    outputs = entry["outputs"]
    expected = wt.output_nodes(prompt, object_info)
    assert set(expected) <= set(outputs), (outputs.keys(), expected)
    for node_id, kind in expected.items():
        if kind == "SaveImage":
            images = outputs[node_id]["images"]
            assert len(images) == 1
            image = wf_server.base / "output" / images[0]["subfolder"] / images[0]["filename"]
            assert image.is_file() and image.stat().st_size > 0, image
            assert image.name.startswith(Path(prompt[node_id]["inputs"]["filename_prefix"]).name)
        elif kind == "PreviewAny":
            assert outputs[node_id]["text"][0].strip()
        elif kind == "IterIS_SaveLora":
            saved = wf_server.base / "models" / "loras" / f"{prompt[node_id]['inputs']['filename']}.safetensors"
            assert saved.is_file(), outputs[node_id]
            listed = wf_server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
            assert saved.name in listed
    if name == "iteris_compare_stacked":  # same seed and prompt, different LoRA combination
        stacked, merged = compare_images(wf_server, prompt, outputs)
        assert (stacked != merged).any()
    if name == "iteris_two_concepts_from_metadata":
        check_prompts_from_metadata(wf_server, prompt, outputs)
    if name == "iteris_lora_stack":
        assert len(check_stack_and_grid(wf_server, prompt, outputs)) == 2   # slot 3 is switched off


def node_of(prompt: dict, class_type: str, title: str | None = None) -> str:
    """The id of the one node of this class (and title, if given)."""
    (found,) = [k for k, v in prompt.items()
                if v["class_type"] == class_type and (title is None or v["_meta"]["title"] == title)]
    return found


def fed_by(prompt: dict, node_id: str, output: int) -> list[str]:
    """The nodes with an input linked to ``node_id``'s output ``output``."""
    return [k for k, v in prompt.items() if [node_id, output] in v["inputs"].values()]


def derived_prompts(server, lora_name: str) -> list[str]:
    """What the engine's own rules make of the test LoRA's metadata and sidecars."""
    from iteris_core.lora_io import read_lora_file
    from iteris_core.lora_prompts import derive_prompts

    path = server.base / "models" / "loras" / lora_name
    derived = derive_prompts(read_lora_file(path).metadata, lora_path=path)
    assert derived is not None, lora_name
    return list(derived.prompts)


def check_prompts_from_metadata(server, prompt: dict, outputs: dict) -> None:
    """The concepts typed no prompts: each concept node's prompts output (shown by the Preview node
    it feeds) holds the prompts made from its file, the node says where they came from, and the
    merge's report names those sources."""
    concepts = [k for k, v in prompt.items() if v["class_type"] == "IterIS_LoraConcept"]
    assert len(concepts) == 2 and all(prompt[k]["inputs"]["prompts"] == "" for k in concepts)
    for concept, trigger in zip(concepts, ("chara_a woman", "styleb painting")):
        lora_name = prompt[concept]["inputs"]["lora_name"]
        expected = derived_prompts(server, lora_name)
        (preview,) = fed_by(prompt, concept, 1)
        assert outputs[preview]["text"][0].splitlines() == expected
        assert any(trigger in line for line in expected), expected
        on_node = outputs[concept]["text"][0]
        assert on_node.startswith(f"{len(expected)} prompts derived from ") and on_node.endswith("\n".join(expected))
    report = outputs[node_of(prompt, "IterIS_MergeLoras")]["text"][0]
    assert "ss_dataset_dirs folder '10_chara_a woman'" in report and "modelspec.trigger_phrase" in report, report


def check_stack_and_grid(server, prompt: dict, outputs: dict) -> list[str]:
    """The stacker's switched-on LoRAs become the concepts, in its order, with prompts made from their
    files (the stack node names each one's source); the grid the Save Image node wrote has one row per
    concept, each row that concept's own LoRA beside the merge, and the rows differ. Returns the
    test LoRA names of the concepts."""
    import numpy as np
    from PIL import Image

    stacker = prompt[node_of(prompt, "CR LoRA Stack")]["inputs"]
    switched_on = [stacker[f"lora_name_{slot}"] for slot in (1, 2, 3)
                   if stacker[f"switch_{slot}"] == "On" and stacker[f"lora_name_{slot}"] != "None"]
    to_concepts = node_of(prompt, "IterIS_LoraStack")
    assert prompt[to_concepts]["inputs"]["prompts"] == ""
    (preview,) = fed_by(prompt, to_concepts, 1)
    blocks = outputs[preview]["text"][0].split("\n---\n")
    assert [block.splitlines() for block in blocks] == [derived_prompts(server, name) for name in switched_on]
    sources = outputs[to_concepts]["text"][0].split("\n\n")[0].splitlines()
    assert [line.split(": ", 1)[0] for line in sources] == switched_on
    assert all(" prompts derived from " in line for line in sources), sources

    grid_node = node_of(prompt, "IterIS_CompareGrid")
    side = prompt[grid_node]["inputs"]["width"]
    assert prompt[grid_node]["inputs"]["height"] == side
    (save,) = fed_by(prompt, grid_node, 0)
    image = outputs[save]["images"][0]
    path = server.base / "output" / image["subfolder"] / image["filename"]
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert grid.shape == (len(switched_on) * (GRID_LABEL + side), 2 * side, 3)
    first_own = grid[GRID_LABEL:GRID_LABEL + side, :side]
    second_own = grid[2 * GRID_LABEL + side:2 * (GRID_LABEL + side), :side]
    assert abs(first_own - second_own).mean() > 1.0     # each row drew its own concept
    return switched_on


def test_a_lora_switched_on_in_the_stacker_joins_the_merge_and_the_grid(wf_server, object_info):
    """The shipped stack workflow leaves slot 3 off (two rows); switched on, its LoRA - whose trigger
    words only a Civitai sidecar names - becomes a third concept and a third row."""
    prompt = runnable_prompt("iteris_lora_stack", object_info)
    stacker = prompt[node_of(prompt, "CR LoRA Stack")]["inputs"]
    assert stacker["switch_3"] == "Off"
    stacker["switch_3"] = "On"
    entry = wf_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    concepts = check_stack_and_grid(wf_server, prompt, entry["outputs"])
    assert concepts == [TEST_LORAS[name][0] for name in ("character_a.safetensors", "style_b.safetensors",
                                                         "outfit_c.safetensors")]
    assert derived_prompts(wf_server, concepts[2])[0].startswith("outfitc jacket")
    assert "sidecar wf_outfit.civitai.info trainedWords" in entry["outputs"][node_of(prompt, "IterIS_LoraStack")]["text"][0]


def test_changing_only_merge_settings_reuses_the_samples(wf_server, object_info):
    """What the Notes promise: after a first run, a run with only merge settings changed (here
    iterations and regularization) samples nothing again, and the nodes before the merge stay cached."""
    prompt = runnable_prompt("iteris_two_concepts", object_info)
    assert wf_server.run(prompt)["status"]["status_str"] == "success"  # served from cache if run before
    merge_id = next(k for k, v in prompt.items() if v["class_type"] == "IterIS_MergeLoras")
    prompt[merge_id]["inputs"].update(iterations=2, regularization=2e-4)
    log_before = wf_server.log.read_text()
    entry = wf_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    log = wf_server.log.read_text()[len(log_before):]
    concepts = [k for k, v in prompt.items() if v["class_type"] == "IterIS_LoraConcept"]
    assert all(f"concept {i + 1}: reusing" in log for i in range(len(concepts))), log
    cached = next(data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached")
    assert set(concepts) <= set(cached)


def compare_images(server, prompt: dict, outputs: dict):
    """The compare workflow's two images as arrays: (stacked LoraLoaders, IterIS merge)."""
    import numpy as np
    from PIL import Image

    by_prefix = {}
    for node_id, entry in prompt.items():
        if entry["class_type"] == "SaveImage":
            image = outputs[node_id]["images"][0]
            path = server.base / "output" / image["subfolder"] / image["filename"]
            by_prefix[entry["inputs"]["filename_prefix"]] = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return by_prefix["IterIS/compare_stacked"], by_prefix["IterIS/compare_iteris"]


def test_compare_with_concat_matches_the_stacked_loaders(wf_server, object_info):
    """What the compare workflow's Note promises: with method 'concat' (the plain sum of the LoRAs) the
    IterIS branch draws the same image as the two stacked LoraLoaders - so the two branches differ
    only in how the LoRAs are combined."""
    prompt = runnable_prompt("iteris_compare_stacked", object_info)
    for entry in prompt.values():
        if entry["class_type"] == "IterIS_MergeLoras":
            entry["inputs"]["method"] = "concat"
    entry = wf_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    stacked, merged = compare_images(wf_server, prompt, entry["outputs"])
    assert abs(stacked - merged).max() <= 2


# --------------------------------------------------------------------------------------------------
# (c) the real front end


def _chromium() -> str | None:
    """$CHROMIUM if set, else the system Chromium (Debian's package installs /usr/bin/chromium)."""
    if os.environ.get("CHROMIUM"):
        candidates = [os.environ["CHROMIUM"]]
    else:
        candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


MISSING_NODE_UI = """() => {
  const found = [];
  for (const el of document.querySelectorAll('.comfy-missing-nodes')) found.push('missing-nodes list: ' + el.innerText);
  for (const el of document.querySelectorAll('.p-dialog, [role=dialog]')) {
    const text = el.innerText || '';
    if (/missing|error|not found|failed/i.test(text)) found.push('dialog: ' + text.slice(0, 300));
  }
  return found;
}"""

FIT_VIEW = """() => {
  const graph = app.graph, canvas = app.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const g of graph._groups) {
    const [x, y, w, h] = g._bounding ?? g.bounding;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const rect = canvas.canvas.getBoundingClientRect();
  const left = 80, top = 100, pad = 16;   // clear of the side bar and the floating tool bars
  const w = rect.width - left - pad, h = rect.height - top - pad;
  const s = Math.min(w / (x1 - x0), h / (y1 - y0), 1.5);
  canvas.ds.scale = s;
  canvas.ds.offset = [left / s - x0 + (w / s - (x1 - x0)) / 2, top / s - y0 + (h / s - (y1 - y0)) / 2];
  canvas.setDirty(true, true);
}"""

# the side bar's badges count open workflows and queued prompts: they would make the picture depend on
# what ran before
SCREENSHOT_STYLE = ".side-bar-button .p-badge { visibility: hidden !important; }"


@pytest.fixture(scope="module")
def page(request):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("front-end check needs the 'playwright' Python package (pip install playwright; no "
                    "`playwright install`: the test drives the system Chromium)")
    chromium = _chromium()
    if chromium is None:
        pytest.skip(f"front-end check needs Chromium: apt-get install chromium (or set CHROMIUM to its path; "
                    f"now {os.environ.get('CHROMIUM') or 'unset'})")
    wf_server = request.getfixturevalue("wf_server")  # only once the skips are decided

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport=VIEWPORT)
            tab.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # "Nodes 2.0" banner
            tab.page_errors = []
            tab.on("pageerror", lambda error: tab.page_errors.append(str(error)))
            tab.goto(wf_server.url + "/")
            tab.wait_for_function("window.app?.graph?._nodes?.length > 0 && window.LiteGraph", timeout=90_000)
            yield tab
        finally:
            browser.close()


def load_in_front_end(page, workflow: dict, name: str) -> None:
    page.page_errors.clear()
    page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, name])
    page.wait_for_timeout(300)


def close_dialogs(page) -> None:
    for button in page.query_selector_all(".p-dialog .p-dialog-close-button"):
        button.click()
    page.wait_for_function("document.querySelectorAll('.p-dialog').length === 0", timeout=5_000)


def test_front_end_is_the_shipped_package(page, wf_server):
    from importlib.metadata import version

    assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == version("comfyui-frontend-package")
    assert page.page_errors == [], page.page_errors
    assert page.evaluate("() => ['IterIS_LoraConcept', 'IterIS_MergeLoras', 'IterIS_SaveLora']"
                         ".every(t => t in LiteGraph.registered_node_types)")


def test_front_end_reports_a_missing_node(page):
    """The missing-node check below really sees something: a workflow with an unknown node type opens
    the front end's "This workflow has missing nodes" dialog listing it (frontend 1.32.9)."""
    workflow = wt.load_workflow(workflow_path("iteris_two_concepts"))
    bogus = copy.deepcopy(workflow)
    bogus["nodes"][0] = {**bogus["nodes"][0], "type": "IterIS_NoSuchNode"}
    load_in_front_end(page, bogus, "missing_node_check")
    page.wait_for_selector(".comfy-missing-nodes", timeout=10_000)
    found = page.evaluate(MISSING_NODE_UI)
    assert any("IterIS_NoSuchNode" in f for f in found), found
    assert not page.evaluate("() => app.graph._nodes.every(n => n.type in LiteGraph.registered_node_types)")
    close_dialogs(page)


def test_conversion_follows_bypass_mute_and_reroute_like_the_front_end(page, object_info):
    """workflow_tools.to_api on an edited copy of the compare workflow - a LoraLoader bypassed, an
    image branch muted, the VAE routed through a Reroute node - equals the front end's own prompt."""
    workflow = copy.deepcopy(wt.load_workflow(workflow_path("iteris_compare_stacked")))
    nodes = {n.get("title") or n["type"]: n for n in workflow["nodes"]}
    nodes["A: Load LoRA (style)"]["mode"] = wt.MODE_BYPASS
    nodes["B: IterIS merge"]["mode"] = wt.MODE_NEVER
    vae_link = next(l for l in workflow["links"] if l[5] == "VAE")
    reroute_id, new_link = max(n["id"] for n in workflow["nodes"]) + 1, max(l[0] for l in workflow["links"]) + 1
    decode = next(n for n in workflow["nodes"] if n["id"] == vae_link[3])
    checkpoint = next(n for n in workflow["nodes"] if n["id"] == vae_link[1])
    checkpoint["outputs"][vae_link[2]]["links"] = [new_link if i == vae_link[0] else i
                                                   for i in checkpoint["outputs"][vae_link[2]]["links"]]
    workflow["nodes"].append({"id": reroute_id, "type": "Reroute", "pos": [1900, 440], "size": [75, 26],
                              "flags": {}, "order": 0, "mode": 0,
                              "inputs": [{"name": "", "type": "*", "link": new_link}],
                              "outputs": [{"name": "", "type": "VAE", "links": [vae_link[0]]}],
                              "properties": {"showOutputText": False, "horizontal": False}})
    workflow["links"].append([new_link, checkpoint["id"], vae_link[2], reroute_id, 0, "VAE"])
    vae_link[1], vae_link[2] = reroute_id, 0
    assert decode["inputs"][vae_link[4]]["link"] == vae_link[0]
    workflow["last_node_id"], workflow["last_link_id"] = reroute_id, new_link

    load_in_front_end(page, workflow, "conversion_check")
    assert page.evaluate(MISSING_NODE_UI) == [] and page.page_errors == []
    front_end = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = wt.to_api(workflow, object_info)
    assert wt.comparable(front_end, object_info) == wt.comparable(ours, object_info)
    stacked_sampler = next(v for v in ours.values() if v["_meta"]["title"] == "A: KSampler (stacked LoRAs)")
    character = next(k for k, v in ours.items() if v["_meta"]["title"] == "A: Load LoRA (character)")
    assert stacked_sampler["inputs"]["model"] == [character, 0]    # through the bypassed loader
    assert "Reroute" not in {v["class_type"] for v in ours.values()}


def pixels_changed(a: Path, b: Path) -> int:
    """How many pixels differ between two images (all of them if the sizes differ)."""
    import numpy as np
    from PIL import Image

    first, second = (np.asarray(Image.open(p).convert("RGB")) for p in (a, b))
    if first.shape != second.shape:
        return max(first.size, second.size)
    return int((first != second).any(axis=-1).sum())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_front_end_loads_the_workflow(name, page, object_info):
    workflow = wt.load_workflow(workflow_path(name))
    load_in_front_end(page, workflow, name)
    problems = page.evaluate(MISSING_NODE_UI)
    assert problems == [], problems
    assert page.page_errors == [], page.page_errors

    loaded = page.evaluate("() => app.graph._nodes.map(n => ({id: n.id, type: n.type, errors: !!n.has_errors, "
                           "known: n.type in LiteGraph.registered_node_types}))")
    assert sorted(n["id"] for n in loaded) == sorted(n["id"] for n in workflow["nodes"])
    assert all(n["known"] and not n["errors"] for n in loaded), loaded
    assert page.evaluate("() => app.graph.links.size ?? Object.keys(app.graph.links).length") == len(workflow["links"])

    front_end = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = wt.to_api(workflow, object_info)
    assert wt.comparable(front_end, object_info) == wt.comparable(ours, object_info)

    page.evaluate(FIT_VIEW)
    page.evaluate("() => document.fonts.ready")
    page.wait_for_timeout(500)
    target = wt.WORKFLOWS_DIR / f"{name}.png"
    fd, temporary = tempfile.mkstemp(suffix=".png", prefix=f".{name}.", dir=wt.WORKFLOWS_DIR)
    os.close(fd)
    try:
        page.screenshot(path=temporary, animations="disabled", style=SCREENSHOT_STYLE)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600
        if target.is_file() and pixels_changed(target, Path(temporary)) <= 16:
            os.unlink(temporary)  # unchanged (up to anti-aliasing of a side-bar icon): keep the committed file
        else:
            os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    assert target.stat().st_size > 50_000
    assert page.page_errors == [], page.page_errors
