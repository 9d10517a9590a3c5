"""LoRA files spelled the ways trainers spell them, for the tiny DiT models of
:mod:`bench.dit_families` (taken from ComfyUI's own key map, or from the model's state-dict shapes),
and the denoiser's output on fixed inputs through ComfyUI's own cond processing. Tests and
benchmarks share them.
"""

from __future__ import annotations

import re

import torch

import bench.dit_families as dit

# the layers test LoRAs touch: attention and MLP projections (not modulation, norms or embedders)
TRAINED = re.compile(r"(attn|attention|mlp|linear[12]|ff|feed_forward|SelfAttention|DenseReluDense|self_attn)")
SKIPPED = re.compile(r"(^|[._])(img_mod|txt_mod|mod|modulation|adaLN_modulation|\w*norm\w*|\w*embed\w*|img_in|txt_in|"
                     r"time_in|vector_in|guidance_in|final_layer|proj_out|ln_[qk]|t_embedder|y_embedder)([._]|$)")


def _trained(weight_key: str) -> bool:
    """Whether test LoRAs touch this weight: an attention or MLP projection (the model's path,
    without ComfyUI's ``diffusion_model.`` prefix, is what the patterns read)."""
    path = weight_key.removeprefix("diffusion_model.")
    return bool(TRAINED.search(path)) and not SKIPPED.search(path)


def lora_key_map(model, clip) -> dict:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)


def _shape(model, clip, weight_key: str) -> torch.Size | None:
    """The shape of a Linear's weight; None where ComfyUI's key map names a module the model lacks
    (SD3's map has every block's second attention) or one that is not a Linear (T5's position bias)."""
    root = model.model if weight_key.startswith("diffusion_model.") else clip.cond_stage_model
    try:
        module = root.get_submodule(weight_key[: -len(".weight")])
    except AttributeError:
        return None
    return module.weight.shape if isinstance(module, torch.nn.Linear) else None   # not embeddings


def trained_targets(model, clip, spelling: str) -> dict[str, tuple[str, tuple | None]]:
    """LoRA key -> (weight key, row slice) for the attention/MLP layers, one key per target, in a
    trainer's spelling: ``kohya`` (``lora_unet_`` / ``lora_te``), or ``diffusers``: the family's
    diffusers names (slices of fused weights included) where ComfyUI maps them, else its generic
    ``diffusion_model.`` / ``text_encoders.`` names."""
    chosen: dict[str, tuple[str, tuple | None]] = {}
    seen: set = set()
    key_map = lora_key_map(model, clip)

    def style(key: str, sliced: bool) -> int | None:
        """Preference of a spelling for this test (lower first), None if not of the style."""
        if spelling == "kohya":
            return 0 if key.startswith(("lora_unet_", "lora_te")) and not sliced else None
        if key.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) or sliced:
            return 0
        return 1 if key.startswith(("diffusion_model.", "text_encoders.")) else None

    ranked = []
    for key, target in key_map.items():
        weight_key, offset = (target, None) if isinstance(target, str) else target[:2]
        if len(target) > 2 and not isinstance(target, str):
            continue   # rearranged by a function (adaLN weights): not what trainers usually touch
        if not weight_key.endswith(".weight") or not _trained(weight_key):
            continue
        shape = _shape(model, clip, weight_key)
        if shape is None or len(shape) != 2:
            continue
        rank = style(key, offset is not None)
        if rank is not None:
            ranked.append((rank, key, weight_key, offset))
    best = {}
    for rank, key, weight_key, offset in sorted(ranked):
        best.setdefault(weight_key, rank)
        if rank == best[weight_key] and (weight_key, offset) not in seen:
            seen.add((weight_key, offset))
            chosen[key] = (weight_key, offset)
    return chosen


def random_lora(model, clip, spelling: str, seed: int, rank: int = 4, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A random LoRA on the attention/MLP layers in a trainer's spelling (kohya: up/down/alpha;
    diffusers: PEFT's lora_A/lora_B, scale 1)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (weight_key, offset) in sorted(trained_targets(model, clip, spelling).items()):
        rows, columns = _shape(model, clip, weight_key)
        rows = offset[2] if offset else rows
        up = torch.randn(rows, rank, generator=g) * scale / rank ** 0.5
        down = torch.randn(rank, columns, generator=g) / columns ** 0.5
        if spelling == "kohya":
            tensors.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
                            f"{key}.alpha": torch.tensor(float(rank))})
        else:
            tensors.update({f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down})
    return tensors


def kohya_unet_lora(shapes: dict[str, torch.Size], seed: int, rank: int = 4, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A random kohya LoRA on the attention/MLP Linears of a diffusion model given by its state-dict
    shapes (``lora_unet_`` + the native path, which ComfyUI maps for every family): no model loaded."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(shapes.items()):
        if not key.endswith(".weight") or len(shape) != 2 or not _trained(key):
            continue
        module = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        rows, columns = shape
        tensors[f"{module}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * scale / rank ** 0.5
        tensors[f"{module}.lora_down.weight"] = torch.randn(rank, columns, generator=g) / columns ** 0.5
        tensors[f"{module}.alpha"] = torch.tensor(float(rank))
    return tensors


@torch.no_grad()
def denoise(family: str, model, clip, prompt: str, settings_size: int = 64, seed: int = 3) -> torch.Tensor:
    """The denoiser's output (x0) for ``prompt`` on fixed noise at a fixed noise level, through
    ComfyUI's own cond processing (``process_conds`` + ``calc_cond_batch``)."""
    import comfy.model_management
    import comfy.sample
    import comfy.sampler_helpers
    import comfy.samplers

    positive = dit.encode_prompt(family, clip, prompt)
    side = settings_size // 8
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, side, side))
    x = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    sigma = torch.tensor([float(model.get_model_object("model_sampling").percent_to_sigma(0.4))])
    comfy.model_management.load_models_gpu([model])
    model.pre_run()
    try:
        conds = comfy.samplers.process_conds(model.model, x, {"positive": comfy.sampler_helpers.convert_cond(positive)},
                                             model.load_device, latent, None, seed)
        return comfy.samplers.calc_cond_batch(model.model, [conds["positive"]], x.to(model.load_device),
                                              sigma.to(model.load_device), model.model_options)[0].float().cpu()
    finally:
        model.cleanup()
