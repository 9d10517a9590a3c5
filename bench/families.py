"""The merge on every tested DiT family, on its tiny ComfyUI model (``bench.dit_families``), on the CPU:
how exactly a single-LoRA merge reproduces LoraLoader, and what a two-LoRA IterIS merge costs.

For each family, in its own process (the models take gigabytes):
- a single-LoRA merge of a kohya-named and of a diffusers-named random LoRA (rank 4, attention, MLP
  and text-encoder layers; the diffusers one lands on row slices of fused qkv weights where the
  family fuses them), against LoraLoader's model: the denoiser's output on fixed inputs, relative to
  that output and relative to the LoRA's own effect on it;
- a two-LoRA IterIS merge at the merge node's family defaults (sampler, scheduler, steps, cfg,
  guidance), with 2 prompts x 1 seed, 4 kept timesteps, 2 iterations, batch 2, at ``--side`` pixels.

    python -m bench.families                    # all tested families, 256 px
    python -m bench.families flux_dev --side 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CACHE, machine, machine_line, markdown_table, peak_rss_gb, save_results

MERGE = dict(samples_per_prompt=1, timesteps=4, iterations=2, batch_size=2)
PROMPTS = (["a photo of sks dog", "sks dog on a beach"], ["a painting in xyz style", "a city street, xyz style"])


def _pack_modules():
    """The node pack as ComfyUI imports it: its modules live under the checkout's package name, and
    its engine is that package's ``iteris_core`` (one engine, whose classes the backend knows)."""
    import importlib

    from bench.comfy import import_comfy, load_pack

    nodes = import_comfy()
    pack = load_pack(nodes)
    package = pack["IterIS_MergeLoras"].__module__.rsplit(".", 1)[0]
    root = package.rsplit(".", 1)[0]
    return (nodes, sys.modules[package + ".comfy_backend"], sys.modules[package + ".merge_node"],
            importlib.import_module(root + ".iteris_core.api"), importlib.import_module(root + ".iteris_core.lora_io"))


def measure(family: str, side: int) -> dict:
    nodes, comfy_backend, merge_node, api, lora_io = _pack_modules()   # imports ComfyUI first
    import comfy.sd
    import torch

    import bench.dit_families as dit
    from bench.dit_tools import denoise, random_lora

    Concept, merge_loras, LoraFile = api.Concept, api.merge_loras, lora_io.LoraFile

    folder = CACHE / "families" / family
    unet = folder / f"tiny_{family}.safetensors"
    if not unet.exists():
        dit.write_diffusion_model(family, unet)
    encoders = [folder / dit.text_encoder_file_name(family, te) for te in dit.get_family(family).text_encoders]
    if not all(p.exists() for p in encoders):
        encoders = dit.write_text_encoders(family, folder)
    model = comfy.sd.load_diffusion_model(str(unet))
    clip = dit.load_text_encoder(family, encoders)
    backend = comfy_backend.ComfyBackend(model, clip)
    result = {"family": family, "name": backend.family.name, "comfy_class": type(model.model.model_config).__name__,
              "dit_params_m": sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6}

    def settings(**changes):
        inputs = dict(method="iteris", iterations=0, regularization=1e-4, rank=0, merge_text_encoder=True,
                      max_tokens=0, statistics_budget=0.0, samples_per_prompt=1, timesteps=2, steps=0, sampler="default",
                      scheduler="default", cfg=0.0, guidance=0.0, seed=0, width=side, height=side, batch_size=2)
        inputs.update(changes)
        return merge_node.IterisMergeLoras.settings(backend.family, **inputs)

    for spelling, seed in (("kohya", 1), ("diffusers", 2)):
        tensors = random_lora(model, clip, spelling, seed)
        started = time.perf_counter()
        merged = merge_loras(backend, [Concept(LoraFile(f"{spelling}.safetensors", tensors), PROMPTS[0][:1])],
                             settings(steps=2))
        result[f"{spelling}_merge_s"] = time.perf_counter() - started
        ours = merge_node.apply_merged_lora(model, clip, merged.lora.state_dict(torch.float32))
        theirs = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)
        base_out = denoise(family, model, clip, PROMPTS[0][0])
        ours_out, theirs_out = denoise(family, *ours, PROMPTS[0][0]), denoise(family, *theirs, PROMPTS[0][0])
        result[f"{spelling}_layers"] = len(merged.lora.layers)
        result[f"{spelling}_error"] = float((ours_out - theirs_out).norm() / theirs_out.norm())
        result[f"{spelling}_error_of_effect"] = float((ours_out - theirs_out).norm() / (theirs_out - base_out).norm())

    loras = [LoraFile(f"lora_{i}.safetensors", random_lora(model, clip, "kohya", 10 + i)) for i in range(2)]
    two = settings(**MERGE)
    started = time.perf_counter()
    merged = merge_loras(backend, [Concept(lora, list(p)) for lora, p in zip(loras, PROMPTS)], two)
    result["two_lora_merge_s"] = time.perf_counter() - started
    result["sampling"] = {k: getattr(two.sampling, k) for k in ("sampler", "scheduler", "steps", "guidance",
                                                                "distilled_guidance", "width")}
    result["objective"] = [r.objective for r in merged.report.iterations if r.stage == "unet" and r.objective]
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def main(argv: list[str] | None = None) -> None:
    import bench.dit_families as dit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", default=list(dit.FAMILIES))
    parser.add_argument("--side", type=int, default=256, help="sample side in pixels (default %(default)s)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # run one family, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args.families[0], args.side)))
        return
    rows = []
    for family in args.families:
        run = subprocess.run([sys.executable, "-m", "bench.families", family, "--side", str(args.side), "--one"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{family} failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    info = machine()
    columns = [("name", "family"), ("comfy_class", "ComfyUI class"), ("dit_params_m", "DiT params (M)"),
               ("kohya_error", "kohya: error of the output"), ("kohya_error_of_effect", "of the LoRA's effect"),
               ("diffusers_error", "diffusers: error of the output"),
               ("diffusers_error_of_effect", "of the LoRA's effect"), ("two_lora_merge_s", "2-LoRA merge (s)"),
               ("peak_rss_gb", "peak RSS (GB)")]
    markdown = (f"# The merge on each DiT family's tiny model\n\n{machine_line(info)}\n\n"
                f"Single-LoRA merges against LoraLoader (denoiser output on fixed inputs, 64 px); two-LoRA "
                f"IterIS merges at the family's defaults with {MERGE} and 2 prompts per concept at "
                f"{args.side} px.\n\n" + markdown_table(rows, columns))
    save_results("families_cpu", {"machine": info, "side": args.side, "merge": MERGE, "rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
