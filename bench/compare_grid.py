"""The README's before/after picture: what the Before/After Grid (IterIS) node outputs, in the real
ComfyUI, for two concept LoRAs of the small text-to-image world that ``bench.quality`` trains.

    python -m bench.compare_grid            # on bench.quality's world (trained and cached on first use:
                                            # up to half an hour on 2 CPU cores; then under a minute)
    python -m bench.compare_grid --quick    # on bench.quality --quick's world: a few minutes to train,
                                            # too little for its LoRAs to draw their concepts

1. The world (``bench/world.py``: coloured, textured shapes with captions; a small SD1-type UNet, CLIP
   text encoder and VAE trained from scratch) and its DreamBooth-style concept LoRAs for ``sks`` (a
   magenta striped circle) and ``zwx`` (a teal dotted square) come from bench.quality's cache folders,
   trained there as bench.quality trains them when missing.
2. ComfyUI builds its own SD1.5 model (``supported_models.SD15``, ComfyUI's UNet) and CLIP-L text
   encoder (ComfyUI's CLIP, with the world's character tokenizer) from those weights; before anything
   is drawn, their noise predictions and text embeddings are checked against diffusers' on the same
   weights. The world's VAE decodes: ComfyUI's VAE code always normalises in 32 groups and cannot be
   built for this VAE's 16-channel layers (8 groups), so the grid gets an object with ComfyUI's
   ``VAE.decode`` contract that runs the world's own diffusers VAE, and shows each 32-pixel image
   enlarged 5x (nearest neighbour), wide enough for the grid's labels.
3. Each LoRA goes into ``models/loras`` in kohya's key names (diffusers saved it in PEFT names that
   ComfyUI's key map does not place: it spells SD1 attention layers ``processor.to_q`` and CLIP
   layers with ``text_model.``; the tensors are the same), with the word it was
   trained on in ``modelspec.trigger_phrase``; the LoRA Concept nodes get no prompts and derive
   theirs from that.
4. LoRA Concept x 2 -> Merge LoRAs (IterIS) -> Before/After Grid (IterIS) runs in ComfyUI's executor,
   and the grid's IMAGE is written, as it is, to ``docs/compare_grid.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import CACHE, machine, machine_line

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "compare_grid.png"
CONCEPT_INDICES = (0, 1)    # sks and zwx: the pair bench.quality's own figure shows
# bench.quality's training, which names its cache folders (kept equal to bench/quality.py's main)
STEPS = {"vae": 1500, "base": 3000, "lora": 600}
QUICK_STEPS = {"vae": 300, "base": 600, "lora": 150}
ENLARGE = 5   # the 32-pixel images, enlarged so that the grid's labels fit above them
# the merge as bench.quality runs it (2 samples per prompt, 4 timesteps, 20 euler steps at cfg 5,
# 3 iterations), at the world's size: 64 px is the 8x8 latent the UNet was trained on
MERGE = {"method": "iteris", "iterations": 3, "regularization": 1e-4, "rank": 0, "merge_text_encoder": True,
         "max_tokens": 0, "statistics_budget": 0.0, "samples_per_prompt": 2, "timesteps": 4, "steps": 20,
         "sampler": "euler", "scheduler": "normal", "cfg": 5.0, "guidance": 0.0, "seed": 0, "width": 64,
         "height": 64, "batch_size": 4}
GRID = {"seed": 9000, "steps": 20, "sampler": "euler", "scheduler": "normal", "cfg": 5.0, "guidance": 0.0,
        "width": 64, "height": 64}
LOADER = "IterISBench_WorldLoader"


# --------------------------------------------------------------------------------------------------
# the world, as bench.quality trains and caches it


def world_files(steps: dict[str, int], seed: int) -> tuple[Path, Any, list[tuple[str, Path]]]:
    """The world's diffusers folder and pipeline, and ``(token, LoRA file)`` of the concepts drawn,
    trained first where bench.quality's cache does not hold them yet (the same folders, so either
    run reuses the other's)."""
    from bench.quality import encode, to_tensor, train_concept_lora, trained_base
    from bench.world import CONCEPTS, concept_images
    from iteris_core.backends.tiny import TinySpec

    torch.manual_seed(seed)    # as bench.quality's main, before it builds the base
    spec = TinySpec(channels=(32, 64), layers_per_block=1, text_width=64, sample_size=8, vae_channels=(16, 32, 32))
    tag = f"seed{seed}_" + "_".join(f"{k}{v}" for k, v in steps.items())
    base_folder = CACHE / f"quality_base_{tag}"
    pipe, _losses = trained_base(spec, steps, seed, base_folder)
    lora_folder = CACHE / f"quality_loras_{tag}"
    loras = []
    for index in CONCEPT_INDICES:
        concept = CONCEPTS[index]
        path = lora_folder / concept.token / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            images = concept_images(concept, 6, seed=1000 + index)   # bench.quality's training images
            train_concept_lora(pipe, concept, encode(pipe.vae, to_tensor(images)), steps["lora"], seed + index,
                               lora_folder)
        loras.append((concept.token, path))
    return base_folder, pipe, loras


# --------------------------------------------------------------------------------------------------
# the world in ComfyUI's own classes


def unet_config(diffusers_config: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's UNetModel settings for the world's diffusers UNet (every block a cross-attention
    block with one transformer, conv in/out projections, ``attention_head_dim`` heads)."""
    channels = diffusers_config["block_out_channels"]
    levels, blocks = len(channels), diffusers_config["layers_per_block"]
    return {"use_checkpoint": False, "image_size": 32, "in_channels": diffusers_config["in_channels"],
            "out_channels": diffusers_config["out_channels"], "model_channels": channels[0],
            "num_res_blocks": [blocks] * levels, "channel_mult": [c // channels[0] for c in channels],
            "transformer_depth": [1] * (blocks * levels), "transformer_depth_output": [1] * ((blocks + 1) * levels),
            "transformer_depth_middle": 1, "context_dim": diffusers_config["cross_attention_dim"],
            "use_spatial_transformer": True, "use_linear_in_transformer": diffusers_config["use_linear_projection"],
            "legacy": False, "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
            "dtype": torch.float32}


def group_norm_operations(groups: int):
    """ComfyUI operations whose GroupNorm has ``groups`` groups: ComfyUI's UNet asks for 32, the
    world's diffusers UNet was built with fewer (ComfyUI's custom_operations hook exists for this)."""
    import comfy.ops

    class Operations(comfy.ops.disable_weight_init):
        class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
            def __init__(self, num_groups, num_channels, *args, **kwargs):
                super().__init__(groups, num_channels, *args, **kwargs)

    return Operations


def comfy_model(folder: Path):
    """A ComfyUI MODEL (ModelPatcher) of the world's UNet: ComfyUI's SD15 model class, whose latent
    scale is the world VAE's."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import load_file

    config = json.loads((folder / "unet" / "config.json").read_text())
    settings = unet_config(config)
    to_comfy = comfy.utils.unet_to_diffusers(settings)     # diffusers key -> ComfyUI key
    weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    unmapped = sorted(set(weights) - set(to_comfy))
    if unmapped:
        raise RuntimeError(f"ComfyUI's UNet has no place for {len(unmapped)} world weights, e.g. {unmapped[0]}")
    state = {to_comfy[key]: value for key, value in weights.items()}
    model_config = comfy.supported_models.SD15(settings)
    model_config.unet_config["num_heads"] = config["attention_head_dim"]   # diffusers' name for the head count
    model_config.latent_format.scale_factor = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    model_config.custom_operations = group_norm_operations(config["norm_num_groups"])
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state, "", device=torch.device("cpu"))
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"world UNet in ComfyUI: missing {missing[:3]}, unexpected {unexpected[:3]}")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_clip(folder: Path):
    """A ComfyUI CLIP of the world's text encoder: ComfyUI's SD1 CLIP-L classes with the world's
    width, special tokens and character tokenizer."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from safetensors.torch import load_file

    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    weights = load_file(str(folder / "text_encoder" / "model.safetensors"))
    state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()
             if not k.endswith("position_ids")}
    width = config["hidden_size"]
    # ComfyUI's CLIP embeds CLIP-L's 49408 tokens; the world's tokenizer only emits its first rows
    token_embedding = torch.zeros(49408, width)
    token_embedding[:config["vocab_size"]] = state["text_model.embeddings.token_embedding.weight"]
    state["text_model.embeddings.token_embedding.weight"] = token_embedding
    state["text_projection.weight"] = torch.eye(width)   # the pooled output, which SD1 does not use
    special = {"start": config["bos_token_id"], "end": config["eos_token_id"], "pad": config["pad_token_id"]}
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(config), special_tokens=special)
    tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(folder / "tokenizer"),
                                  embedding_size=width)
    target = comfy.supported_models_base.ClipTarget(functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tokenizer),
                                                    functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=encoder))
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    missing, unexpected = clip.load_sd(state)
    if missing or unexpected:
        raise RuntimeError(f"world CLIP in ComfyUI: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


class WorldVae:
    """The world's diffusers VAE behind ComfyUI's ``VAE.decode`` contract: a latent ``[B, 4, h, w]``
    (as KSampler returns it, unscaled) in, images ``[B, H, W, 3]`` in [0, 1] out, enlarged ``enlarge``
    times (nearest neighbour)."""

    def __init__(self, vae, enlarge: int = ENLARGE):
        self.vae, self.enlarge = vae, enlarge

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latent.to(self.vae.dtype)).sample.float()
        images = torch.nn.functional.interpolate(images, scale_factor=self.enlarge, mode="nearest")
        return ((images.clamp(-1, 1) + 1) / 2).movedim(1, -1)


def check_against_diffusers(pipe, model, clip, prompt: str = "a photo of sks") -> None:
    """ComfyUI's model and CLIP compute what diffusers computes on the world's weights (text
    embedding, and the noise prediction at one timestep), or a RuntimeError says by how much not."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected_text = pipe.text_encoder(ids)[0]
        text = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0]
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        step = torch.tensor([500])
        expected_noise = pipe.unet(latent, step, encoder_hidden_states=expected_text).sample
        sigma = model.model.model_sampling.sigma(step.float())
        noisy = latent * (sigma ** 2 + 1) ** 0.5          # ComfyUI's x at sigma, for diffusers' latent
        denoised = model.model.apply_model(noisy, sigma, c_crossattn=expected_text)
        noise = (noisy - denoised) / sigma
    for what, ours, theirs in (("text embedding", text, expected_text), ("noise prediction", noise, expected_noise)):
        error = float((ours - theirs).abs().max() / theirs.abs().max())
        if error > 1e-4:
            raise RuntimeError(f"ComfyUI's {what} of the world differs from diffusers' by {error:.2e} (relative)")


def loader_node(model, clip, vae) -> type:
    """A node class that outputs these MODEL, CLIP and VAE (the world has no checkpoint file that
    ComfyUI's loaders would detect)."""

    class WorldLoader:
        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        CATEGORY = "IterIS/bench"

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {}}

        def load(self) -> tuple:
            return (model, clip, vae)

    return WorldLoader


def kohya_tensors(tensors: dict[str, torch.Tensor], adapter_metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The world's PEFT LoRA (``unet.<path>.lora_A.weight``, ``text_encoder.<path>...``, as diffusers
    saves it under transformers 5, whose CLIP paths lack ``text_model.``) renamed to kohya's keys with
    their alphas: the same tensors, in the spelling ComfyUI's key map places (its diffusers spelling
    expects ``processor.to_q`` for attention)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        path, _, part = rest.rpartition(".lora_")
        if component not in prefixes or part not in ("A.weight", "B.weight"):
            raise ValueError(f"unexpected key in the world's LoRA: {key}")
        for setting in ("use_rslora", "use_dora"):
            if adapter_metadata.get(f"{component}.{setting}"):
                raise ValueError(f"the world's {component} LoRA uses {setting}, which kohya's format does not say")
        if adapter_metadata.get(f"{component}.alpha_pattern") or adapter_metadata.get(f"{component}.rank_pattern"):
            raise ValueError(f"the world's {component} LoRA has per-layer alphas or ranks")
        if path.startswith("text_model."):
            path = path[len("text_model."):]
        name = prefixes[component] + path.replace(".", "_")
        out[f"{name}.lora_{'down' if part[0] == 'A' else 'up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(adapter_metadata[f"{component}.lora_alpha"]))
    return out


def install_lora(source: Path, loras: Path, token: str) -> str:
    """Write a world LoRA into ComfyUI's loras folder as ``<token>.safetensors`` in kohya's keys,
    the word it was trained on in ``modelspec.trigger_phrase`` (as a trainer records it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    name = f"{token}.safetensors"
    save_file(kohya_tensors(load_file(str(source)), adapter), str(loras / name), {"modelspec.trigger_phrase": token})
    return name


def graph(lora_names: list[str]) -> dict:
    """The API prompt: the world's loader, one LoRA Concept per LoRA with no prompts, the merge and the grid."""
    prompt: dict[str, dict] = {"1": {"class_type": LOADER, "inputs": {}}}
    previous = None
    for index, name in enumerate(lora_names):
        inputs = {"lora_name": name, "strength_model": 1.0, "strength_clip": 1.0, "prompts": "", "negative_prompt": ""}
        if previous is not None:
            inputs["previous"] = [previous, 0]
        previous = str(10 + index)
        prompt[previous] = {"class_type": "IterIS_LoraConcept", "inputs": inputs}
    prompt["2"] = {"class_type": "IterIS_MergeLoras",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": [previous, 0], **MERGE}}
    prompt["3"] = {"class_type": "IterIS_CompareGrid",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": [previous, 0],
                              "merged_model": ["2", 0], "merged_clip": ["2", 1], **GRID}}
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    return prompt


def to_png(image: torch.Tensor, path: Path) -> Path:
    """An IMAGE ``[1, H, W, 3]`` in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path, optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="bench.quality --quick's world: quick to train, too little trained to show the concepts")
    parser.add_argument("--seed", type=int, default=0, help="bench.quality's seed of the world")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    started = time.perf_counter()
    folder, pipe, loras = world_files(QUICK_STEPS if args.quick else STEPS, args.seed)
    trained = time.perf_counter() - started

    from bench.comfy import import_comfy, load_pack, make_executor, run_prompt

    with tempfile.TemporaryDirectory(prefix="iteris-compare-grid-") as base:
        (Path(base) / "models" / "loras").mkdir(parents=True)
        nodes = import_comfy(base_directory=base)
        load_pack(nodes)
        model, clip = comfy_model(folder), comfy_clip(folder)
        check_against_diffusers(pipe, model, clip)
        nodes.NODE_CLASS_MAPPINGS[LOADER] = loader_node(model, clip, WorldVae(pipe.vae))
        names = [install_lora(path, Path(base) / "models" / "loras", token) for token, path in loras]
        executor = make_executor()
        ok, messages, outputs = run_prompt(graph(names), executor)
        if not ok:
            raise RuntimeError(f"the grid's workflow failed: {messages}")
        (image,) = [value[0] for value in executor.caches.outputs.get("3").outputs]
        for index in range(len(names)):
            print(f"{names[index]}: {outputs[str(10 + index)]['text'][0]}\n")
        print(outputs["2"]["text"][0])
    to_png(image, args.output)
    print(f"\n{machine_line(machine())}; world {'quick' if args.quick else 'full'} "
          f"(trained or loaded in {trained:.0f} s), grid {image.shape[2]}x{image.shape[1]} in "
          f"{time.perf_counter() - started - trained:.0f} s -> {args.output}")


if __name__ == "__main__":
    main()
