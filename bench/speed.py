"""Speed and memory of a merge against the bare forward passes it has to make.

    python -m bench.speed --arch sd15 --repeats 2                       # CPU, minutes: few samples
    python -m bench.speed --arch sdxl --statistics-budget 64            # CPU, about 20 minutes, 20 GB RAM
    python -m bench.speed --samples 2 --timesteps 4 --steps 20 --iterations 3 --batch-size 4 \
        --label defaults                                                # the node's defaults at 256 px
    python -m bench.speed --arch sd15 --device cuda --resolution 512    # users with a GPU

Full-size architectures with random weights (speed does not depend on weight values), random
rank-16 LoRAs on every attention/MLP layer and both text encoders. In one run it measures: the
merge through the engine (diffusers backend on a single-file checkpoint), split into phases; the
same model calls made bare, with no hook (the floor: a merge cannot do less); peak process memory
against the engine's own plan for the device; the merge through the ComfyUI node on the same
checkpoint; and the plan for a GPU at native resolution. Results: bench/results/speed_<arch>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from bench.common import CACHE, machine, machine_line, markdown_table, peak_rss_gb, reset_peak_rss, rss_gb, save_results
from iteris_core.backends.tiny import ATTENTION_MLP as ATTENTION

NATIVE = {"sd15": 512, "sdxl": 1024}
BUDGET_GB = {"sd15": 8.0, "sdxl": 12.0}


def checkpoint(architecture: str) -> Path:
    """The cached random full-size checkpoint, built on first use in a child process: building
    imports ComfyUI, and the node run later in this process must import it with its own base folder."""
    import subprocess
    import sys

    path = CACHE / f"{architecture}_random.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "bench.checkpoints", "--arch", architecture, "--out", str(path)],
                       check=True, cwd=Path(__file__).resolve().parent.parent)
    return path


def random_loras(table, count: int, rank: int, folder: Path) -> list[Path]:
    """Random kohya-format LoRAs (what trainers write) on the attention/MLP layers."""
    from iteris_core.backends.tiny import random_lora_deltas
    from iteris_core.lora_writer import MergedLora

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        deltas = random_lora_deltas(table, 100 + i, rank=rank, scale=0.05, include=ATTENTION)
        paths.append(MergedLora(deltas, table).save(folder / f"concept_{i}.safetensors", overwrite=True))
    return paths


def forward_floor(backend, concepts, settings, text_passes: int, unet_passes: int) -> dict:
    """The model calls a merge makes, made bare through the same backend calls: the same encodes,
    the same sampled trajectories, the same replays of the kept samples (one per stage pass: the
    concept's own model at iteration 0, the merged model afterwards), with no hook and no statistics."""
    sampling = settings.sampling
    cfg = sampling.uses_cfg
    keep = sampling.kept_steps()
    times = {"text": 0.0, "sampling": 0.0, "replay": 0.0}

    def text_samples(concept) -> list[str]:
        return list(concept.prompts) + ([concept.negative_prompt] if cfg else [])

    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(text_passes):
            for concept in concepts:
                backend.encode_text(text_samples(concept))
        conds = [backend.encode_text(text_samples(concept)) for concept in concepts]   # the merged conditioning
        times["text"] = time.perf_counter() - start
        samples = []
        start = time.perf_counter()
        for concept, cond in zip(concepts, conds):
            kept = []
            for p in range(len(concept.prompts)):
                seeds = [sampling.seed + p * sampling.samples_per_prompt + k for k in range(sampling.samples_per_prompt)]
                for first in range(0, len(seeds), sampling.batch_size):
                    out = backend.sample(cond[p], cond[-1] if cfg else None, seeds[first:first + sampling.batch_size],
                                         sampling, keep, lambda step: None)
                    kept.append((p, [s for trajectory in out for s in trajectory]))
            samples.append(kept)
        times["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(unet_passes):
            for cond, kept in zip(conds, samples):
                for p, stored in kept:
                    for first in range(0, len(stored), sampling.batch_size):
                        backend.replay(cond[p], cond[-1] if cfg else None, stored[first:first + sampling.batch_size],
                                       sampling)
        times["replay"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times


def warm_up(backend, settings) -> float:
    """One text-encoder call and one sampling step with the batch size the merge uses, before
    anything is timed: a freshly loaded model's first calls pay page faults on its weights and
    one-time kernel setup, which neither the merge nor its floor should be charged for (the floor
    runs after the merge). Returns the seconds it took."""
    import dataclasses

    start = time.perf_counter()
    sampling = dataclasses.replace(settings.sampling, steps=1, timesteps=1)
    rows = sampling.batch_size
    with torch.no_grad():
        cond = backend.encode_text(["warm up"])[0]
        backend.sample(cond, cond if sampling.uses_cfg else None, list(range(rows)), sampling, [], lambda step: None)
    return time.perf_counter() - start


def run_engine(path: Path, loras: list[Path], prompts: list[list[str]], settings, device: str,
               repeats: int = 1) -> dict:
    """Load the checkpoint with the diffusers backend and measure a merge on it."""
    from iteris_core.backends.diffusers_backend import DiffusersBackend

    start = time.perf_counter()
    backend = DiffusersBackend.from_pretrained(path, device=device)
    load_s = time.perf_counter() - start
    return {"load_s": load_s, **measure_merge(backend, loras, prompts, settings, repeats)}


def measure_merge(backend, loras: list, prompts: list[list[str]], settings, repeats: int = 1, engine=None,
                  floor: bool = True) -> dict:
    """A merge on ``backend``, split into phases, then the same model calls made bare (the floor);
    ``repeats`` times, alternating, keeping the fastest of each (the usual way to take a time on a
    shared machine: noise only ever adds). Every run's time is returned too. ``engine``: the
    engine's ``api`` module to merge with (default: this checkout's ``iteris_core.api``; the ComfyUI
    backend wants the node pack's own). Without ``floor``, only the merge is timed."""
    if engine is None:
        import iteris_core.api as engine
    Concept, merge_loras = engine.Concept, engine.merge_loras
    _prepare, load_concept_lora = engine._prepare, engine.load_concept_lora

    concepts = [Concept(lora, p, negative_prompt="blurry") for lora, p in zip(loras, prompts)]
    warm_s = warm_up(backend, settings)
    baseline = rss_gb()
    merges, floors, peak, prepared = [], [], 0.0, None
    for _ in range(max(1, repeats)):
        reset_peak_rss()
        started = time.perf_counter()
        result = merge_loras(backend, concepts, settings)
        merges.append((time.perf_counter() - started, result.report))
        peak = max(peak, peak_rss_gb())
        if prepared is None:   # every run makes the same passes with the same LoRAs: load them once
            records = result.report.iterations
            text_passes = sum(1 for r in records if r.stage == "text")
            unet_passes = sum(1 for r in records if r.stage == "unet")   # iteration 0 replays too
            prepared = [_prepare(c, load_concept_lora(c, i, backend)) for i, c in enumerate(concepts)]
        if floor:
            floors.append(forward_floor(backend, prepared, settings, text_passes, unet_passes))
    total, report = min(merges, key=lambda m: m[0])
    floor = min(floors, key=lambda f: f["total"]) if floors else {"total": float("nan")}
    records = report.iterations
    phases = {
        "text_s": sum(r.passes_seconds for r in records if r.stage == "text"),
        "sampling_s": sum(r.passes_seconds for r in records if r.stage == "unet" and r.iteration == 0),
        "statistics_passes_s": sum(r.passes_seconds for r in records if r.stage == "unet" and r.iteration > 0),
        "solve_s": sum(r.solve_seconds for r in records),
    }
    return {"total_s": total, **phases, "forward_floor_s": floor["total"], "warm_up_s": warm_s,
            "total_s_runs": [m[0] for m in merges], "forward_floor_s_runs": [f["total"] for f in floors],
            "text_passes": text_passes, "unet_passes": unet_passes,
            "floor_phases_s": floor, "peak_rss_gb": peak, "rss_before_gb": baseline,
            "plan": report.memory, "layers": len(result.lora.layers),
            "objective": [r.objective for r in records if r.stage == "unet" and r.objective is not None],
            "token_space_layers": sum("token space" in layer.mode for layer in report.layers.values()),
            "report": report, "lora": result.lora}


def add_concept_nodes(graph: dict, loras: list[Path], prompts: list[list[str]], negative_prompt: str) -> str:
    """Add a chain of LoRA Concept nodes ("10", "11", ...) to an API-format ``graph``; return the
    id of the last one (the merge node's ``concepts``)."""
    previous = None
    for i, (lora, concept_prompts) in enumerate(zip(loras, prompts)):
        inputs = {"lora_name": lora.name, "strength_model": 1.0, "strength_clip": 1.0,
                  "prompts": "\n".join(concept_prompts), "negative_prompt": negative_prompt}
        if previous:
            inputs["previous"] = [previous, 0]
        previous = str(10 + i)
        graph[previous] = {"class_type": "IterIS_LoraConcept", "inputs": inputs}
    return previous


def run_nodes(path: Path, loras: list[Path], prompts: list[list[str]], settings, text_passes: int,
              unet_passes: int, pytorch_attention: bool, repeats: int = 1) -> dict:
    """The same merge through the ComfyUI node, in-process, on the same checkpoint; and the same
    bare model calls through ComfyUI's own model (its floor); ``repeats`` times, alternating, keeping
    the fastest of each. Each repeat uses the next seed, so that the node samples again instead of
    serving its cached samples (the cost does not depend on the seed)."""
    import shutil
    import sys
    import tempfile
    from types import SimpleNamespace

    from bench.comfy import import_comfy
    from bench.comfy import load_pack, make_executor, run_prompt

    state = Path(tempfile.mkdtemp(prefix="iteris-bench-comfy-"))
    (state / "models" / "checkpoints").mkdir(parents=True)
    (state / "models" / "checkpoints" / path.name).symlink_to(path)
    (state / "models" / "loras").mkdir(parents=True)
    for lora in loras:
        shutil.copy(lora, state / "models" / "loras" / lora.name)
    nodes = import_comfy(base_directory=state, use_pytorch_cross_attention=pytorch_attention)
    load_pack(nodes)
    sampling = settings.sampling
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": path.name}}}
    previous = add_concept_nodes(graph, loras, prompts, "blurry")

    def merge(method: str, seed: int = sampling.seed) -> dict:
        return {**graph, "4": {"class_type": "IterIS_MergeLoras", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": [previous, 0], "method": method,
            "iterations": settings.iterations, "regularization": settings.regularization,
            "samples_per_prompt": sampling.samples_per_prompt, "timesteps": sampling.timesteps, "steps": sampling.steps,
            "cfg": sampling.guidance, "seed": seed, "rank": 0, "width": sampling.width or 0,
            "height": sampling.height or 0, "batch_size": sampling.batch_size, "merge_text_encoder": True,
            "max_tokens": settings.max_tokens_per_sample or 0, "statistics_budget": settings.statistics_budget_gb or 0.0,
            "sampler": sampling.sampler, "scheduler": sampling.scheduler, "guidance": 0.0}}, "5": {"class_type": "IterIS_SaveLora", "inputs": {
                "lora": ["4", 2], "filename": f"bench_{method}", "overwrite": True, "precision": "fp16"}}}

    executor = make_executor()
    start = time.perf_counter()
    ok, messages, _ = run_prompt(merge("concat"), executor)      # loads the checkpoint, caches the loaders
    warm = time.perf_counter() - start
    assert ok, messages
    model, clip, _vae = [value[0] for value in executor.caches.outputs.get("1").outputs]
    backend_module = next(m for name, m in sys.modules.items() if name.endswith("nodes.comfy_backend"))
    warm += warm_up(backend_module.ComfyBackend(model, clip), settings)
    concepts = [SimpleNamespace(prompts=p, negative_prompt="blurry") for p in prompts]
    totals, floors = [], []
    for k in range(max(1, repeats)):
        start = time.perf_counter()
        ok, messages, outputs = run_prompt(merge("iteris", sampling.seed + k), executor)
        totals.append(time.perf_counter() - start)
        assert ok, messages
        floors.append(forward_floor(backend_module.ComfyBackend(model, clip), concepts, settings, text_passes,
                                    unet_passes))
    floor = min(floors, key=lambda f: f["total"])
    return {"node_total_s": min(totals), "node_warmup_s": warm, "node_report": outputs["4"]["text"][0],
            "comfy_floor_s": floor["total"], "comfy_floor_phases_s": floor,
            "node_total_s_runs": totals, "comfy_floor_s_runs": [f["total"] for f in floors]}


def planned_gpu(table, architecture: str) -> dict:
    """The engine's plan for a 3-concept merge at native resolution in fp16 on a GPU whose free
    memory is the target budget (batch 4 for SD1.5, 2 for SDXL; see bench/plans.py)."""
    from bench.plans import ARCHITECTURES, plan

    name = {"sd15": "sd1"}.get(architecture, architecture)
    return plan(table, name, 3, 4 if name == "sd1" else 2, ARCHITECTURES[name][2]).to_dict()


def plan_verdict(planned_gb: float, peak_gb: float) -> str:
    """How the engine's plan compares with the measured peak (a plan is useful when it is not below)."""
    if planned_gb >= peak_gb:
        return f"the plan covers the measured peak, with {planned_gb / peak_gb - 1:.0%} to spare"
    return f"the measured peak exceeds the plan by {peak_gb / planned_gb - 1:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--concepts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--timesteps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="spatial tokens per sample for the statistics (0 = all, the default of the engine)")
    parser.add_argument("--no-nodes", action="store_true", help="skip the ComfyUI node run")
    parser.add_argument("--statistics-budget", type=float, default=None,
                        help="GB for the statistics (default: what the planner finds free; its estimate counts "
                             "d x d sums where token-space inputs need far less)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each merge and its floor this many times, alternating, and keep the fastest")
    parser.add_argument("--label", default="", help="suffix of the result files, to keep runs with other settings apart")
    parser.add_argument("--comfy-sub-quadratic", action="store_true",
                        help="leave ComfyUI's CPU default (sub-quadratic attention) instead of PyTorch's SDPA")
    args = parser.parse_args()

    from iteris_core.settings import MergeSettings, SamplingSettings

    settings = MergeSettings(iterations=args.iterations, tolerance=0.0, max_tokens_per_sample=args.max_tokens or None,
                             statistics_budget_gb=args.statistics_budget,
                             sampling=SamplingSettings(
        samples_per_prompt=args.samples, timesteps=args.timesteps, steps=args.steps, guidance=7.5,
        width=args.resolution, height=args.resolution, batch_size=args.batch_size))
    path = checkpoint(args.arch)
    from iteris_core.backends.diffusers_backend import DiffusersBackend

    table = DiffusersBackend.from_pretrained(path, device="cpu").layer_table()
    loras = random_loras(table, args.concepts, args.rank, CACHE / f"loras_{args.arch}")
    prompts = [[f"a photo of sks{i} thing"] for i in range(args.concepts)]
    engine = run_engine(path, loras, prompts, settings, args.device, args.repeats)
    gc.collect()   # the engine's model goes before ComfyUI loads its own (SDXL needs the room)
    gpu_plan = planned_gpu(table, args.arch)
    result = {"model": f"{args.arch} (full size, random weights)", "device": args.device, **machine(),
              "n_concepts": args.concepts, "samples": args.samples, "timesteps": args.timesteps,
              "steps": args.steps, "iterations": args.iterations, "resolution": args.resolution,
              "batch_size": args.batch_size, "rank": args.rank, "max_tokens_per_sample": args.max_tokens or None,
              "layers": engine["layers"], "token_space_layers": engine["token_space_layers"],
              "warm_up_s": engine["warm_up_s"], "repeats": args.repeats,
              "total_s_runs": engine["total_s_runs"], "forward_floor_s_runs": engine["forward_floor_s_runs"],
              "total_s": engine["total_s"], "forward_floor_s": engine["forward_floor_s"],
              "overhead_ratio": engine["total_s"] / engine["forward_floor_s"],
              "phases_s": {k: engine[k] for k in ("text_s", "sampling_s", "statistics_passes_s", "solve_s")},
              "floor_phases_s": engine["floor_phases_s"], "peak_rss_gb": engine["peak_rss_gb"],
              "rss_before_merge_gb": engine["rss_before_gb"], "stats_gb": engine["plan"]["statistics_gb"],
              "planned_cpu_gb": engine["plan"]["total_gb"],
              "plan_vs_peak": engine["plan"]["total_gb"] / engine["peak_rss_gb"],
              "planned_vram_gb": gpu_plan["device_gb"], "planned_vram_placement": gpu_plan["placement"],
              "planned_vram_budget_gb": BUDGET_GB[args.arch], "objective_per_iteration": engine["objective"]}
    if not args.no_nodes:
        nodes = run_nodes(path, loras, prompts, settings, engine["text_passes"], engine["unet_passes"],
                          pytorch_attention=not args.comfy_sub_quadratic, repeats=args.repeats)
        result.update(node_total_s=nodes["node_total_s"], comfy_floor_s=nodes["comfy_floor_s"],
                      node_overhead_ratio=nodes["node_total_s"] / nodes["comfy_floor_s"],
                      node_vs_engine=nodes["node_total_s"] / engine["total_s"],
                      node_total_s_runs=nodes["node_total_s_runs"], comfy_floor_s_runs=nodes["comfy_floor_s_runs"],
                      comfy_attention="sub-quadratic" if args.comfy_sub_quadratic else "pytorch SDPA")
    name = (f"speed_{args.arch}_{args.device}" + (f"_tokens{args.max_tokens}" if args.max_tokens else "")
            + (f"_{args.label}" if args.label else ""))
    rows = [{"what": "merge (engine)", "seconds": result["total_s"]},
            {"what": "bare forward passes (floor)", "seconds": result["forward_floor_s"]},
            {"what": "ratio merge / floor", "seconds": result["overhead_ratio"]}]
    rows += [{"what": f"phase: {k[:-2]}", "seconds": v} for k, v in result["phases_s"].items()]
    if "node_total_s" in result:
        rows += [{"what": "merge through the ComfyUI node", "seconds": result["node_total_s"]},
                 {"what": "same bare calls through ComfyUI's model (its floor)", "seconds": result["comfy_floor_s"]},
                 {"what": "ratio node / ComfyUI floor", "seconds": result["node_overhead_ratio"]},
                 {"what": "ratio node / engine", "seconds": result["node_vs_engine"]}]
    markdown = (f"# Speed and memory: {result['model']} on {args.device}\n\n"
                f"{machine_line(result)}. {args.concepts} concepts, rank {args.rank}, {engine['layers']} layers, "
                f"{args.samples} sample(s) per prompt, {args.timesteps} timesteps of {args.steps} Euler steps, "
                f"{args.iterations} iterations, {args.resolution}x{args.resolution}, batch {args.batch_size}, "
                f"statistics on {args.max_tokens or 'all'} spatial tokens per sample; "
                f"{result['token_space_layers']} layers solved in token space. "
                + (f"Each time is the fastest of {args.repeats} alternating runs (all runs in the JSON). "
                   if args.repeats > 1 else "") +
                f"Both the merge and the floor run "
                f"after a warm-up call ({result['warm_up_s']:.1f} s) and with PyTorch's huge-page allocation "
                f"(THP_MEM_ALLOC_ENABLE={int(result['thp_mem_alloc'])}).\n\n"
                + markdown_table(rows, [("what", "measure"), ("seconds", "seconds (or ratio)")]) +
                f"\n\nPeak process memory during the merge: {result['peak_rss_gb']:.2f} GB "
                f"(the engine planned {result['planned_cpu_gb']:.2f} GB; statistics {result['stats_gb']:.2f} GB): "
                + plan_verdict(result["planned_cpu_gb"], result["peak_rss_gb"]) + ".\n"
                f"Planned GPU memory for 3 concepts at {NATIVE[args.arch]}x{NATIVE[args.arch]} in fp16: "
                f"{result['planned_vram_gb']:.2f} GB (target {BUDGET_GB[args.arch]:.0f} GB, placement "
                f"{result['planned_vram_placement']}).\n")
    json_path, md_path = save_results(name, result, markdown)
    print(markdown)
    print(json_path, md_path)


if __name__ == "__main__":
    main()
