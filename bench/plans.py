"""Planned GPU and host memory of merges on full-size models, from the engine's own planner, every
layer solved exactly.

    python -m bench.plans

No weights are needed: each denoiser is built by ComfyUI's own classes on the meta device (the
``supported_models`` class its detection picks for the real config), with the weights in the
dtype users load (fp8 for Flux.1, Chroma and Qwen-Image, bf16 for SD3.5 and Z-Image, fp16 for
SD1.5/SDXL). The merge: 2-6 rank-16 LoRAs on every Linear of the transformer blocks (attention,
MLP; the modulation layers, which read the token-independent embedding, left out) and, for the SD
models, the attention/MLP layers of the UNet and text encoders; defaults of the merge (3
iterations, 2 seeds x 4 kept timesteps of 2 prompts per concept, batch 2) and of the family
(steps, cfg, native side). Activations are ComfyUI's own estimate (``memory_required``) for a CUDA
GPU with PyTorch attention.

For each row: the statistics the merge would keep all at once; the plan for a card of the target
size (ComfyUI's free memory taken as the card minus 0.5 GB), with the groups it splits the layers
into, the passes each iteration makes relative to one full pass, the host memory (systems placed
there, the concepts' own-side projections kept for the later iterations, the text encoders that
ComfyUI offloads), and the expected merge time relative to an unlimited budget (sampling the
trajectories costs the same in both). Results: bench/results/plans.{json,md}.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from bench.common import GB, machine, machine_line, markdown_table, save_results
from iteris_core.backends.tiny import ATTENTION_MLP

RANK = 16
PROMPTS_PER_CONCEPT = 2
BATCH = 2
CARD_RESERVE_GB = 0.5   # what the driver, the CUDA context and ComfyUI keep of a card
HOST_TARGET_GB = 32.0
# Linear layers in a transformer block list, but not modulation (adaLN) layers
DIT_TARGET = re.compile(r"(double_blocks|single_blocks|joint_blocks|transformer_blocks|layers|noise_refiner|"
                        r"context_refiner)\.\d+\.(?!.*(_mod\b|_mod\.|\bmod\.|modulation|adaLN))")
ATTENTION = re.compile(ATTENTION_MLP)   # the engine's SD tables (diffusers names)
SD_TARGET = re.compile(r"transformer_blocks\.\d+\.(attn\d|ff)\.|\.proj_(in|out)$|self_attn\.|\.mlp\.fc\d$")


@dataclass(frozen=True)
class FullSize:
    """A full-size model: ComfyUI detection config (``unet_config``), its weights' dtype, the text
    tokens its prompts usually give (the tokenizer's padding), the text encoders' bytes in host
    memory, and the cards to plan for (pixels per side, GB)."""

    label: str
    family: str
    unet_config: dict
    weight_dtype: torch.dtype
    text_tokens: int
    text_encoder_gb: float
    targets: tuple[tuple[int, float], ...]


def _dit(name: str, **changes) -> dict:
    import bench.dit_families as dit

    return {**copy.deepcopy(dit.get_family(name).unet_config), **changes}


def full_size_models() -> list[FullSize]:
    from bench.checkpoints import comfy_unet_config

    sd3_context = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * 38}}
    return [
        FullSize("SD1.5", "sd1", comfy_unet_config("SD15"), torch.float16, 77, 0.0, ((512, 8.0),)),
        FullSize("SDXL", "sdxl", comfy_unet_config("SDXL"), torch.float16, 77, 0.0, ((1024, 12.0),)),
        # T5-XXL fp8 (4.9 GB) + CLIP-L stay in host memory while the denoiser runs
        FullSize("Flux.1 dev fp8", "flux_dev", _dit("flux_dev", context_in_dim=4096, vec_in_dim=768, depth=19,
                                                    depth_single_blocks=38),
                 torch.float8_e4m3fn, 256, 5.1, ((1024, 24.0), (512, 16.0))),
        FullSize("Chroma fp8", "chroma", _dit("chroma", depth=19, depth_single_blocks=38),
                 torch.float8_e4m3fn, 64, 4.9, ((1024, 24.0),)),
        FullSize("SD3.5 Large", "sd3", _dit("sd3", depth=38, adm_in_channels=2048, num_patches=36864,
                                            pos_embed_max_size=192, context_embedder_config=sd3_context),
                 torch.bfloat16, 154, 5.6, ((1024, 24.0),)),
        FullSize("Z-Image", "zimage", _dit("zimage", n_layers=30, cap_feat_dim=2560), torch.bfloat16, 64, 8.0,
                 ((1024, 24.0),)),
        FullSize("Qwen-Image fp8", "qwen_image", _dit("qwen_image", num_layers=60), torch.float8_e4m3fn, 64, 8.8,
                 ((1024, 24.0), (1024, 32.0))),
    ]


def build(model: FullSize):
    """ComfyUI's model for the config on the meta device (and its supported_models class name),
    with the text encoders of the SD models (whose LoRAs usually train them)."""
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.sdxl_clip

    with torch.device("meta"):
        config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(model.unet_config))
        config.set_inference_dtype(model.weight_dtype, None if model.weight_dtype == torch.float16 else torch.bfloat16)
        base = config.get_model({}, device="meta")
        encoders = {}
        if model.family == "sd1":
            encoders["clip_l"] = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        elif model.family == "sdxl":
            encoders["clip_l"] = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16, layer="hidden",
                                                             layer_idx=-2)
            encoders["clip_g"] = comfy.sdxl_clip.SDXLClipG(device="meta", dtype=torch.float16)
    return type(config).__name__, base, encoders


def stage_plans(base, encoders: dict, target: re.Pattern, concepts: int) -> list[list]:
    """The (text encoders, denoiser) stage plans of ``concepts`` rank-16 LoRAs on the target layers
    (named as the ComfyUI backend names them)."""
    from iteris_core.layers import LayerTable

    named = [(f"unet.{n}", m) for n, m in base.diffusion_model.named_modules() if n]
    for attribute, encoder in encoders.items():
        named += [(f"{attribute}.{n}", m) for n, m in encoder.named_modules() if n]
    return stages_for(LayerTable.from_modules(named, architecture="plan"), concepts, target=target)


def comfy_activation_bytes(base, family, side: int, rows: int) -> int:
    """ComfyUI's own estimate of a forward's activations on a CUDA GPU with PyTorch attention."""
    import comfy.model_management as mm

    latent = [rows, base.latent_format.latent_channels, side // 8, side // 8]
    if family == "qwen_image":
        latent.insert(2, 1)   # Qwen-Image's latent is 5-D
    flash = mm.pytorch_attention_flash_attention
    mm.pytorch_attention_flash_attention = lambda: True
    try:
        return int(base.memory_required(latent))
    finally:
        mm.pytorch_attention_flash_attention = flash


def tokens_per_call(plans: list, family: str, side: int, text_tokens: int) -> dict[str, int]:
    """Token rows each layer input sees in one call of ``BATCH`` samples: image tokens in the image
    stream, text tokens in the text stream, both in joint (single-stream) blocks; an SD UNet's
    layers see their own resolution's tokens (cross-attention keys read the text)."""
    image = (side // 16) ** 2
    rows: dict[str, int] = {}
    for plan in plans:
        name = plan.name
        if family in ("sd1", "sdxl"):
            if name.startswith("unet."):
                level = re.search(r"(input|output)_blocks\.(\d+)|middle_block", name)
                scale = 1 if level is None or level.group(0) == "middle_block" else None
                down = {"sd1": (1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8), "sdxl": (1, 1, 1, 2, 2, 2, 4, 4, 4)}[family]
                if scale is None:
                    index = int(level.group(2))
                    scale = down[index] if level.group(1) == "input" else down[::-1][index]
                else:
                    scale = down[-1]
                count = (side // 8 // scale) ** 2 if not re.search(r"attn2\.to_[kv]", name) else text_tokens
            else:
                count = text_tokens
        elif re.search(r"txt_|context_block|add_[qkv]_proj|to_add_out|context_refiner", name):
            count = text_tokens
        elif re.search(r"single_blocks|\.layers\.", name):
            count = image + text_tokens
        else:
            count = image
        rows[plan.group] = BATCH * count
    return rows


def expected_time(pass_factor: float, steps: int, timesteps: int, iterations: int) -> float:
    """Merge time relative to an unlimited budget: sampling makes ``steps`` forwards per sample, each
    iteration ``timesteps`` replays per sample, scaled by the passes the grouping makes."""
    sampling, replays = steps, (iterations + 1) * timesteps
    return (sampling + replays * pass_factor) / (sampling + replays)


def plan_row(model: FullSize, name: str, base, encoders, side: int, card_gb: float, concepts: int) -> dict:
    from iteris_core.families import family_of_comfy_class
    from iteris_core.errors import SettingsError
    from iteris_core.memory import choose_plan, own_side_bytes
    from iteris_core.settings import MergeSettings

    settings = MergeSettings()
    family = family_of_comfy_class(name)
    defaults = family.defaults
    target = SD_TARGET if model.family in ("sd1", "sdxl") else DIT_TARGET
    stages = stage_plans(base, encoders, target, concepts)
    rows = BATCH * (2 if defaults.cfg > 1 else 1)
    activations = comfy_activation_bytes(base, model.family, side, rows)
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    model_bytes = params * torch.finfo(model.weight_dtype).bits // 8
    iterations = settings.iterations
    sampling = settings.sampling
    unlimited = choose_plan(torch.device("cuda"), stages, iterations, model_bytes, activations, None,
                            exact_cross_norm=False)
    free = int((card_gb - CARD_RESERVE_GB) * GB)
    row = {"model": model.label, "comfy_class": name, "params_b": params / 1e9, "side": side, "concepts": concepts,
           "layers": len(stages[1]) + len(stages[0]), "statistics_gb": unlimited.statistics_gb, "card_gb": card_gb,
           "model_gb": model_bytes / GB, "activations_gb": activations / GB}
    try:
        plan = choose_plan(torch.device("cuda"), stages, iterations, model_bytes, activations, free,
                           exact_cross_norm=False, host_free_bytes=int(HOST_TARGET_GB * GB))
    except SettingsError as error:   # the weights and activations leave too little: say so
        return {**row, "placement": f"does not fit: {str(error)[:100]}", "fits": False}
    calls = PROMPTS_PER_CONCEPT * sampling.samples_per_prompt * sampling.timesteps // BATCH
    denoiser = stages[1]
    tokens = tokens_per_call(denoiser, model.family, side, model.text_tokens)
    kept = concepts * calls * own_side_bytes(denoiser, tokens)
    host = plan.host_gb + kept / GB + model.text_encoder_gb
    factor = plan.pass_factors[1]
    return {**row, "planned_gpu_gb": plan.device_gb, "groups": len(plan.groups[1]), "pass_factor": factor,
            "own_side_gb": kept / GB, "host_gb": host,
            "relative_time": expected_time(factor, defaults.steps, sampling.timesteps, iterations),
            "placement": f"systems on {plan.placement.systems}, packed={plan.placement.packed}",
            "fits": plan.device_gb <= card_gb - CARD_RESERVE_GB and host <= HOST_TARGET_GB}


# -- plans on the engine's own (diffusers-named) SD tables: bench/speed.py and the tests use these --
ARCHITECTURES = {   # parameters (UNet + text encoders), native side, target budget in GB
    "sd1": (860_000_000 + 123_000_000, 512, 8.0),
    "sd2": (865_000_000 + 340_000_000, 768, 8.0),
    "sdxl": (2_567_000_000 + 123_000_000 + 695_000_000, 1024, 12.0),
}


def stages_for(table, concepts: int = 3, rank: int = RANK, target: re.Pattern | None = None) -> list[list]:
    """The text and UNet stage plans of a merge of ``concepts`` rank-``rank`` LoRAs on every layer
    of ``table`` that ``target`` finds (default: attention/MLP; only shapes matter to the planner)."""
    from iteris_core.layers import input_group
    from iteris_core.low_rank import LowRankDelta
    from iteris_core.statistics import LayerPlan

    delta = LowRankDelta(torch.zeros(1, rank), torch.zeros(rank, 1))
    stages = {"text": [], "unet": []}
    for name, info in table.layers.items():
        if (target or ATTENTION).search(name):
            stages["unet" if name.startswith("unet.") else "text"].append(
                LayerPlan(name, info, input_group(name), [delta] * concepts))
    return [stages["text"], stages["unet"]]


def plan(table, architecture: str, concepts: int, batch: int, free_gb: float | None):
    """The engine's plan for ``table`` (fp16 model, guidance, native side) on a GPU with ``free_gb`` free."""
    from iteris_core.memory import activation_estimate, choose_plan

    params, side, _budget = ARCHITECTURES[architecture]
    activations = activation_estimate(table, side, side, batch, 7.5, torch.float16, "cuda")
    free = None if free_gb is None else int(free_gb * GB)
    return choose_plan(torch.device("cuda"), stages_for(table, concepts), 3, 2 * params, activations, free)


def main() -> None:
    from bench.comfy import import_comfy

    import_comfy()
    rows = []
    for model in full_size_models():
        name, base, encoders = build(model)
        for side, card in model.targets:
            for concepts in (2, 3, 4, 6):
                rows.append(plan_row(model, name, base, encoders, side, card, concepts))
                print(rows[-1], flush=True)
    info = machine()
    columns = [("model", "model"), ("comfy_class", "ComfyUI class"), ("params_b", "denoiser params (B)"),
               ("side", "px"), ("concepts", "concepts"), ("layers", "layers"),
               ("statistics_gb", "statistics at once GB"), ("card_gb", "card GB"), ("model_gb", "weights GB"),
               ("activations_gb", "activations GB"), ("planned_gpu_gb", "planned GPU GB"), ("groups", "groups"),
               ("pass_factor", "passes / iteration"), ("host_gb", "host GB"), ("own_side_gb", "of which own-side GB"),
               ("relative_time", "time vs unlimited"), ("placement", "placement"), ("fits", "fits")]
    markdown = (f"# Planned memory of exact merges on full-size models\n\n{machine_line(info)} (planning only: "
                "meta-device models, nothing runs)\n\n" + __doc__.split("\n\n", 2)[2].strip() + "\n\n"
                + markdown_table(rows, columns) + "\n")
    save_results("plans", {"machine": info, "rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
