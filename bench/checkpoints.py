"""Random-weight single-file checkpoints in the layout ComfyUI loads (``model.diffusion_model.*``,
``cond_stage_model.*`` / ``conditioner.embedders.*``, a TAESD-shaped VAE), built from ComfyUI's own
modules on the meta device, so the shapes are exactly those of the real architectures.

Speed does not depend on weight values, so these stand in for SD1.5 and SDXL in the benchmarks;
tests use a one-level SD1.5-type variant. Weights are N(0, 1/fan_in), norms 1, biases 0: activations
stay finite at any depth. Run as a script to build the full-size ones into a cache folder:

    python -m bench.checkpoints --arch sd15 --out ~/.cache/comfyui-iteris/bench/sd15_random.safetensors
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
from pathlib import Path
from typing import Callable

import torch


def comfy_unet_config(name: str) -> dict:
    """ComfyUI's own UNet config preset (``SD15``, ``SDXL``), from its diffusers-detection table."""
    import comfy.model_detection

    source = inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet)
    match = re.search(rf"\n    {name} = (\{{.*?\}})\n", source, re.S)
    return eval(match.group(1), {"dtype": torch.float16})  # noqa: S307 - ComfyUI's own literal


def component_shapes(unet_config: dict, sdxl: bool) -> dict[str, torch.Size]:
    """Checkpoint key -> shape for a UNet config with the matching text encoder(s) and a TAESD VAE."""
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = {k: v for k, v in unet_config.items() if k not in ("dtype", "use_temporal_resblock")}
    shapes: dict[str, torch.Size] = {}
    with torch.device("meta"):
        parts = [("model.diffusion_model.", UNetModel(**config, operations=comfy.ops.disable_weight_init)),
                 ("first_stage_model.", comfy.taesd.taesd.TAESD())]
        if sdxl:
            clip_l = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
            clip_g = comfy.sdxl_clip.SDXLClipG(device="meta", dtype=torch.float32)
            parts += [("conditioner.embedders.0.", clip_l), ("conditioner.embedders.1.", clip_g)]
        else:
            parts.append(("cond_stage_model.", comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)))
        for prefix, module in parts:
            for key, tensor in module.state_dict().items():
                shapes[prefix + key] = tensor.shape
    if sdxl:
        return _sdxl_open_clip_layout(shapes)
    shapes.pop("cond_stage_model.logit_scale", None)
    shapes.pop("cond_stage_model.transformer.text_projection.weight", None)
    return shapes


def _sdxl_open_clip_layout(shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """SDXL files store CLIP-G in OpenCLIP's layout (``conditioner.embedders.1.model.*``, fused
    in_proj); ComfyUI converts it when loading. Rename the transformers-layout keys accordingly."""
    out = {}
    prefix_g = "conditioner.embedders.1."
    for key, shape in shapes.items():
        if key.startswith("conditioner.embedders.0."):
            if key.endswith(("logit_scale", "text_projection.weight")):
                continue
            out[key] = shape
        elif key.startswith(prefix_g):
            continue
        else:
            out[key] = shape
    width, layers, inner = 1280, 32, 5120
    g = prefix_g + "model."
    out[g + "token_embedding.weight"] = torch.Size([49408, width])
    out[g + "positional_embedding"] = torch.Size([77, width])
    out[g + "ln_final.weight"] = out[g + "ln_final.bias"] = torch.Size([width])
    out[g + "text_projection"] = torch.Size([width, width])
    for i in range(layers):
        block = f"{g}transformer.resblocks.{i}."
        out[block + "attn.in_proj_weight"] = torch.Size([3 * width, width])
        out[block + "attn.in_proj_bias"] = torch.Size([3 * width])
        out[block + "attn.out_proj.weight"] = torch.Size([width, width])
        out[block + "attn.out_proj.bias"] = torch.Size([width])
        for norm in ("ln_1", "ln_2"):
            out[block + f"{norm}.weight"] = out[block + f"{norm}.bias"] = torch.Size([width])
        out[block + "mlp.c_fc.weight"] = torch.Size([inner, width])
        out[block + "mlp.c_fc.bias"] = torch.Size([inner])
        out[block + "mlp.c_proj.weight"] = torch.Size([width, inner])
        out[block + "mlp.c_proj.bias"] = torch.Size([width])
    return out


def random_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, other weights N(0, 1/fan_in)."""
    if key.endswith("vae_scale"):
        return torch.ones(shape)
    if key.endswith(("vae_shift", ".bias", "in_proj_bias")):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def write_checkpoint(shapes: dict[str, torch.Size], path: Path, seed: int = 0, label: str = "random",
                     dtype: torch.dtype = torch.float16,
                     fill: Callable[[str, torch.Size, torch.Generator], torch.Tensor] | None = None) -> Path:
    """Write random tensors of these shapes (``fill``'s recipe, :func:`random_tensor`'s unless told)
    in ``dtype`` to ``path``, through a temporary file: an interrupted write leaves no partial file,
    and the same seed gives the same bytes."""
    from safetensors.torch import save_file

    fill = fill or random_tensor
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    # converted tensor by tensor: a large model never exists in fp32 at once
    state = {key: fill(key, shape, generator).to(dtype) for key, shape in sorted(shapes.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        # one metadata entry: safetensors orders metadata differently per process
        save_file(state, str(partial), metadata={"iteris_bench": f"{label} seed={seed}"})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def build_checkpoint(architecture: str, path: Path, seed: int = 0) -> Path:
    """A random-weight ``sd15`` or ``sdxl`` checkpoint at full size."""
    name = {"sd15": "SD15", "sdxl": "SDXL"}[architecture]
    return write_checkpoint(component_shapes(comfy_unet_config(name), architecture == "sdxl"), path, seed,
                            f"full-size {architecture}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from bench.comfy import import_comfy

    import_comfy()
    print(build_checkpoint(args.arch, Path(args.out).expanduser(), args.seed))


if __name__ == "__main__":
    main()
