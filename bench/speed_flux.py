"""Speed of a merge on a full-width Flux.1 dev against the bare forward passes it has to make, on
one group and on budgets that force the layers into several groups.

    python -m bench.speed_flux                 # CPU, about 30 minutes
    python -m bench.speed_flux --side 128 --groups 2

The model is Flux.1 dev at its full width (hidden 3072, 24 heads, MLP 12288, single-block linear2
15360 wide) with two double and two single blocks, random bf16 weights, built by ComfyUI's own
classes and detected by ComfyUI as Flux; the text encoders are the tiny T5 and CLIP-L of
``bench.dit_families`` (a T5 prompt still pads to 256 tokens, as Flux's does). Two random kohya
rank-16 LoRAs on every attention/MLP Linear. In one run it measures:
- the merge through the engine's API on ComfyUI's model, split into phases, and the same model
  calls made bare (the floor: a merge cannot do less);
- the same merge under statistics budgets that force the denoiser's layers into 2 and 4 groups
  (each group its own passes, early groups stopping after their last layer): what each extra group
  costs, relative to the floor, and that the merged LoRA stays the same;
- the merge through the ComfyUI node (UNETLoader, the tests' tiny text-encoder loader, the concept
  and merge nodes), in the same process.
Results: bench/results/speed_flux_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import CACHE, machine, machine_line, markdown_table, peak_rss_gb, save_results

DEPTH, SINGLE = 2, 2
RANK = 16
PROMPTS = [["a photo of sks dog"], ["a painting in xyz style"]]


def write_model(folder: Path) -> Path:
    """The full-width, reduced-depth Flux.1 dev as a UNETLoader file (cached)."""
    import comfy.model_detection

    import bench.dit_families as dit
    from bench.checkpoints import write_checkpoint

    path = folder / "diffusion_models" / f"flux_dev_w3072_d{DEPTH}s{SINGLE}.safetensors"
    if path.exists():
        return path
    config = {**copy.deepcopy(dit.get_family("flux_dev").unet_config), "depth": DEPTH, "depth_single_blocks": SINGLE}
    with torch.device("meta"):
        model_config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(config))
        if type(model_config).__name__ != "Flux":
            raise RuntimeError(f"ComfyUI detects {type(model_config).__name__}, not Flux")
        shapes = {k: t.shape for k, t in model_config.get_model({}, device="meta").diffusion_model.state_dict().items()}
    return write_checkpoint(shapes, path, 0, "flux dev, full width, reduced depth", torch.bfloat16)


def budget_for_groups(plans: list, groups: int, iterations: int, memory) -> float:
    """The smallest statistics budget (bytes, within 2%) that splits ``plans`` into ``groups`` groups."""
    placement = memory.Placement("cpu", "cpu", False, packed=True)
    total = memory.statistics_bytes(torch.device("cpu"), placement, plans, iterations)
    low = memory.largest_input_bytes(torch.device("cpu"), placement, plans, iterations)
    budget = max(low, total / groups)
    while len(memory.group_layers(torch.device("cpu"), placement, plans, iterations, budget)) > groups:
        budget *= 1.02
    return budget


def max_difference(lora, reference) -> float:
    """The largest relative difference of a merged layer's delta from the reference merge's."""
    if set(lora.layers) != set(reference.layers):
        return float("inf")
    return max(float((lora.layers[n].dense() - d.dense()).norm() / d.dense().norm())
               for n, d in reference.layers.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--groups", type=int, nargs="*", default=[2, 4], help="group counts to force")
    parser.add_argument("--no-nodes", action="store_true")
    parser.add_argument("--repeats", type=int, default=2,
                        help="one-group merge and floor, alternating; the fastest of each is kept (default %(default)s)")
    args = parser.parse_args(argv)

    from bench.comfy import import_comfy, load_pack, make_executor, run_prompt

    state = Path(tempfile.mkdtemp(prefix="iteris-speed-flux-"))
    models = CACHE / "speed_flux" / "models"
    nodes = import_comfy(base_directory=state, use_pytorch_cross_attention=True)
    import comfy.sd
    import folder_paths

    import bench.dit_families as dit
    from bench.dit_tools import random_lora
    from bench.speed import add_concept_nodes, measure_merge

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from dit_fixtures import load_test_nodes

    pack = load_pack(nodes)
    load_test_nodes(nodes)
    package = pack["IterIS_MergeLoras"].__module__.rsplit(".", 1)[0]
    engine_root = package.rsplit(".", 1)[0] + ".iteris_core"
    import importlib

    api, memory = (importlib.import_module(f"{engine_root}.{m}") for m in ("api", "memory"))
    iteris = importlib.import_module(f"{engine_root}.iteris")
    lora_io = importlib.import_module(f"{engine_root}.lora_io")
    merge_node = sys.modules[package + ".merge_node"]
    comfy_backend = sys.modules[package + ".comfy_backend"]

    unet = write_model(models)
    encoders = dit.write_text_encoders("flux_dev", models / "text_encoders")
    for kind, paths in (("diffusion_models", [unet]), ("text_encoders", encoders)):
        for path in paths:
            folder_paths.add_model_folder_path(kind, str(path.parent))
    model = comfy.sd.load_diffusion_model(str(unet))
    clip = dit.load_text_encoder("flux_dev", encoders)
    backend = comfy_backend.ComfyBackend(model, clip)
    lora_folder = state / "models" / "loras"
    lora_folder.mkdir(parents=True)
    loras = []
    for i in range(len(PROMPTS)):
        tensors = random_lora(model, clip, "kohya", 20 + i, rank=RANK, scale=0.05)
        path = lora_folder / f"flux_concept_{i}.safetensors"
        lora_io.atomic_write_safetensors(tensors, path, {}, overwrite=True)
        loras.append(path)
    inputs = dict(method="iteris", iterations=2, regularization=1e-4, rank=0, merge_text_encoder=True, max_tokens=0,
                  statistics_budget=0.0, samples_per_prompt=1, timesteps=2, steps=4, sampler="default",
                  scheduler="default", cfg=0.0, guidance=0.0, seed=0, width=args.side, height=args.side, batch_size=2)
    settings = merge_node.IterisMergeLoras.settings(backend.family, **inputs).replace(tolerance=0.0)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"Flux.1 dev, hidden 3072, {DEPTH}+{SINGLE} blocks: {params / 1e9:.2f} B parameters, "
          f"weights {model.model.get_dtype()}", flush=True)

    runs = {}
    runs[1] = measure_merge(backend, [str(p) for p in loras], PROMPTS, settings, args.repeats, engine=api)
    print(f"one group: merge {runs[1]['total_s']:.1f} s, floor {runs[1]['forward_floor_s']:.1f} s", flush=True)
    prepared = [api._prepare(c, api.load_concept_lora(c, i, backend))
                for i, c in enumerate(api.Concept(str(p), q) for p, q in zip(loras, PROMPTS))]
    unet_plans = iteris.IterisLoop(backend, prepared, settings).stage_plans()[1]
    for groups in args.groups:
        budget = budget_for_groups(unet_plans, groups, settings.effective_iterations, memory)
        run = measure_merge(backend, [str(p) for p in loras], PROMPTS,
                            settings.replace(statistics_budget_gb=budget / memory.GB), engine=api, floor=False)
        run["budget_gb"] = budget / memory.GB
        run["difference_from_one_group"] = max_difference(run["lora"], runs[1]["lora"])
        runs[groups] = run
        print(f"{groups} groups ({run['plan']['group_counts']}): merge {run['total_s']:.1f} s, largest difference "
              f"{run['difference_from_one_group']:.1e}", flush=True)
    floor = runs[1]["forward_floor_s"]
    rows = [{"what": "merge, one group (engine)", "value": runs[1]["total_s"]},
            {"what": "bare forward passes (floor)", "value": floor},
            {"what": "ratio merge / floor, one group", "value": runs[1]["total_s"] / floor}]
    rows += [{"what": f"phase: {k[:-2]}", "value": runs[1][k]}
             for k in ("text_s", "sampling_s", "statistics_passes_s", "solve_s")]
    for groups in args.groups:
        run = runs[groups]
        extra = (run["total_s"] - runs[1]["total_s"]) / (groups - 1)
        rows += [{"what": f"merge, {groups} groups ({run['budget_gb']:.2f} GB budget; denoiser groups "
                          f"{run['plan']['group_counts'][1]}, passes per iteration {run['plan']['pass_factors'][1]:.2f})",
                  "value": run["total_s"]},
                 {"what": f"ratio merge / floor, {groups} groups", "value": run["total_s"] / floor},
                 {"what": f"cost of each extra group / floor, {groups} groups", "value": extra / floor},
                 {"what": f"largest relative difference of a layer from one group's, {groups} groups",
                  "value": run["difference_from_one_group"]}]
    result = {"model": f"Flux.1 dev, hidden 3072, {DEPTH} double + {SINGLE} single blocks, random weights "
                       f"({str(model.model.get_dtype()).removeprefix('torch.')} on this CPU)",
              "params_b": params / 1e9, **machine(), "side": args.side, "settings": inputs,
              "runs": {str(k): {key: v for key, v in run.items() if key not in ("report", "lora")}
                       for k, run in runs.items()},
              "peak_rss_gb": peak_rss_gb()}
    if not args.no_nodes:
        graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet.name, "weight_dtype": "default"}},
                 "2": {"class_type": "IterISTest_TinyTextEncoderLoader",
                       "inputs": {"family": "flux_dev", "text_encoder_names": ",".join(p.name for p in encoders)}}}
        previous = add_concept_nodes(graph, loras, PROMPTS, "")
        graph["4"] = {"class_type": "IterIS_MergeLoras", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "concepts": [previous, 0], **inputs}}
        graph["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}}
        executor = make_executor()
        warm = dict(graph, **{"4": {**graph["4"], "inputs": {**graph["4"]["inputs"], "method": "concat"}}})
        ok, messages, _ = run_prompt(warm, executor)   # loads the models, caches the loaders
        assert ok, messages
        started = time.perf_counter()
        ok, messages, _ = run_prompt(graph, executor)
        node_s = time.perf_counter() - started
        assert ok, messages
        result["node_total_s"] = node_s
        rows += [{"what": "merge through the ComfyUI node, one group", "value": node_s},
                 {"what": "ratio node / floor", "value": node_s / floor}]
    result["rows"] = rows
    markdown = (f"# Speed on a full-width Flux.1 dev\n\n{machine_line(result)}. {result['model']} "
                f"({params / 1e9:.2f} B parameters), {args.side}x{args.side}, 2 concepts with rank-{RANK} LoRAs, "
                "1 seed per prompt, 2 kept timesteps of 4 steps, 2 iterations, batch 2, Flux defaults "
                "(euler/simple, guidance 3.5, cfg 1). The floor is the same model calls made bare, in the "
                f"same run (one group: the fastest of {args.repeats} alternating runs of each); the grouped runs "
                "have the same prompts, seeds and LoRAs.\n\n"
                + markdown_table(rows, [("what", "measure"), ("value", "seconds (or ratio)")]) + "\n")
    save_results("speed_flux_cpu", result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
