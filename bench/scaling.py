"""How the cost of a merge grows with concepts, samples and timesteps, on a small model.

    python -m bench.scaling            # a few minutes on 2 CPU cores
    python -m bench.scaling --device cuda

A small SD1-type model (random weights, built from a config) and random rank-8 LoRAs on every
attention/MLP layer of the UNet and the text encoder. From one reference setting, one knob at a
time is varied: the number of concepts, the seeds per prompt, the timesteps kept per trajectory.
Each row is a full IterIS merge (2 iterations) and, in the same run, the bare model calls that
merge must make (the floor). The statistics column is what the merge keeps between passes: it must
not grow with the number of concepts. Results: bench/results/scaling_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from bench.common import machine, machine_line, markdown_table, save_results
from bench.speed import measure_merge, random_loras

REFERENCE = {"concepts": 2, "samples": 2, "timesteps": 2}
SWEEPS = {"concepts": (2, 3, 4, 6), "samples": (1, 2, 4), "timesteps": (1, 2, 4)}


def settings_for(samples: int, timesteps: int, iterations: int):
    from iteris_core.settings import MergeSettings, SamplingSettings

    return MergeSettings(iterations=iterations, tolerance=0.0, sampling=SamplingSettings(
        samples_per_prompt=samples, timesteps=timesteps, steps=8, guidance=7.5, batch_size=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each merge and its floor this many times, alternating, and keep the fastest")
    args = parser.parse_args()

    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline

    spec = TinySpec(channels=(64, 128), layers_per_block=1, text_width=64, text_layers=2, sample_size=32)
    backend = DiffusersBackend(build_tiny_pipeline(spec, seed=0), device=args.device, dtype=torch.float32)
    folder = Path(tempfile.mkdtemp(prefix="iteris-scaling-"))
    loras = random_loras(backend.layer_table(), max(SWEEPS["concepts"]), args.rank, folder)
    prompts = [[f"a photo of sks{i} thing", f"sks{i} in a field"] for i in range(len(loras))]
    measure_merge(backend, loras[:2], prompts[:2], settings_for(1, 1, 1))   # warm-up: first calls are slow

    rows = []
    for knob, values in SWEEPS.items():
        for value in values:
            point = {**REFERENCE, knob: value}
            n = point["concepts"]
            measured = measure_merge(backend, loras[:n], prompts[:n],
                                     settings_for(point["samples"], point["timesteps"], args.iterations),
                                     args.repeats)
            rows.append({"varied": knob, **point, "total_s": measured["total_s"],
                         "forward_floor_s": measured["forward_floor_s"],
                         "ratio": measured["total_s"] / measured["forward_floor_s"],
                         **{k: measured[k] for k in ("text_s", "sampling_s", "statistics_passes_s", "solve_s")},
                         "stats_gb": measured["plan"]["statistics_gb"]})
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)

    info = machine()
    result = {**info, "model": "small SD1-type (random weights)", "device": args.device,
              "spec": dataclasses.asdict(spec), "rank": args.rank, "iterations": args.iterations,
              "prompts_per_concept": 2, "repeats": args.repeats, "reference": REFERENCE, "rows": rows}
    columns = [("varied", "varied"), ("concepts", "concepts"), ("samples", "seeds/prompt"),
               ("timesteps", "timesteps"), ("total_s", "merge s"), ("forward_floor_s", "floor s"),
               ("ratio", "merge/floor"), ("text_s", "text s"), ("sampling_s", "sampling s"),
               ("statistics_passes_s", "statistics s"), ("solve_s", "solve s"), ("stats_gb", "statistics GB")]
    markdown = (f"# Scaling with concepts, samples and timesteps ({args.device})\n\n"
                f"{machine_line(info)}. Small SD1-type "
                f"model (UNet channels {spec.channels}, {spec.sample_size}x{spec.sample_size} latents), "
                f"random rank-{args.rank} LoRAs, 2 prompts per concept, {args.iterations} IterIS iterations; "
                f"reference point {REFERENCE}, one knob varied per block. The floor is the bare model calls "
                "the merge makes, timed in the same run"
                + (f"; each time is the fastest of {args.repeats} alternating runs" if args.repeats > 1 else "")
                + ".\n\n" + markdown_table(rows, columns) + "\n")
    save_results(f"scaling_{args.device}", result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
