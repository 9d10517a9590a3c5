"""Planned GPU memory of merges on full-size SD1.5, SD2.1 and SDXL, from the engine's own planner.

    python -m bench.plans

No weights are needed: the architectures are built on the meta device and the planner counts what
a merge of rank-16 LoRAs on every attention/MLP layer keeps (model in fp16, statistics in fp32,
the activations of one paired batch of samples with guidance at native resolution). For each,
it shows the statistics with nothing moved off the GPU, for 2 to 6 concepts (they must not grow
with the number of concepts), and the placement the engine picks for a GPU whose free memory is
the target budget. Results: bench/results/plans.{json,md}.
"""

from __future__ import annotations

import re

import torch

from bench.common import GB, machine, markdown_table, save_results
from iteris_core.backends.tiny import ATTENTION_MLP

ATTENTION = re.compile(ATTENTION_MLP)
ARCHITECTURES = {   # parameters (UNet + text encoders), native side, target budget in GB
    "sd1": (860_000_000 + 123_000_000, 512, 8.0),
    "sd2": (865_000_000 + 340_000_000, 768, 8.0),
    "sdxl": (2_567_000_000 + 123_000_000 + 695_000_000, 1024, 16.0),
}
ITERATIONS = 3


def stages_for(table, concepts: int = 3, rank: int = 16) -> list[list]:
    """The text and UNet stage plans of a merge of ``concepts`` rank-``rank`` LoRAs on every
    attention/MLP layer of ``table`` (only shapes matter to the planner)."""
    from iteris_core.activation_stats import LayerPlan
    from iteris_core.layers import input_group
    from iteris_core.low_rank import LowRankDelta

    delta = LowRankDelta(torch.zeros(1, rank), torch.zeros(rank, 1))
    stages = {"text": [], "unet": []}
    for name, info in table.layers.items():
        if ATTENTION.search(name):
            stages["unet" if name.startswith("unet.") else "text"].append(
                LayerPlan(name, info, input_group(name), [delta] * concepts))
    return [stages["text"], stages["unet"]]


def plan(table, architecture: str, concepts: int, batch: int, free_gb: float | None):
    from iteris_core.memory import activation_estimate, choose_plan

    params, side, _budget = ARCHITECTURES[architecture]
    activations = activation_estimate(table, side, side, batch, 7.5, torch.float16, "cuda")
    free = None if free_gb is None else int(free_gb * GB)
    return choose_plan(torch.device("cuda"), stages_for(table, concepts), ITERATIONS, 2 * params, activations, free)


def main() -> None:
    from bench.full_size import full_size_tables

    tables = full_size_tables()
    rows = []
    for architecture, (params, side, budget) in ARCHITECTURES.items():
        table = tables[architecture]
        for concepts, batch in ((2, 2), (3, 2), (4, 2), (6, 2), (3, 4)):
            unconstrained = plan(table, architecture, concepts, batch, None).to_dict()
            fitted = plan(table, architecture, concepts, batch, budget).to_dict()
            placement = fitted["placement"]
            rows.append({"model": architecture, "side": side, "concepts": concepts, "batch": batch,
                         "statistics_gb": unconstrained["statistics_gb"], "all_on_gpu_gb": unconstrained["device_gb"],
                         "budget_gb": budget, "planned_vram_gb": fitted["device_gb"], "host_gb": fitted["host_gb"],
                         "placement": ", ".join(f"{k}={v}" for k, v in placement.items()),
                         "fits": fitted["device_gb"] <= budget})
            print(rows[-1], flush=True)
    info = machine()
    markdown = (f"# Planned GPU memory (fp16 model, fp32 statistics)\n\n{info['date']}, torch {info['torch']}. "
                f"Rank-16 LoRAs on every attention/MLP layer, {ITERATIONS} iterations, guidance, native resolution; "
                "batch: samples per forward pass (each runs twice, for the LoRA and for the merge). `all on GPU`: the plan with nothing moved to host memory; `planned`: what the "
                "engine picks when the GPU has the budget free (scratch/systems on cuda or cpu, packed symmetric "
                "sums, probed cross norms).\n\n" + markdown_table(rows, [
                    ("model", "model"), ("side", "px"), ("concepts", "concepts"), ("batch", "batch"), ("statistics_gb", "statistics GB"),
                    ("all_on_gpu_gb", "all on GPU GB"), ("budget_gb", "budget GB"), ("planned_vram_gb", "planned GB"),
                    ("host_gb", "host GB"), ("placement", "placement"), ("fits", "fits")]) + "\n")
    save_results("plans", {**info, "iterations": ITERATIONS, "rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
