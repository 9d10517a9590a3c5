"""Tiny diffusers Flux.1 and SD3 pipelines built from configs with random weights (seeded), offline.

Nothing here is a test. The pipelines have the real structure (Flux: CLIP-L for the pooled vector,
T5 for the sequence, double- and single-stream blocks, 2x2 latent packing and, for dev, the
guidance embedding; SD3: CLIP-L and CLIP-G whose penultimate states and pooled projections join
T5's, joint blocks with SD3.5's dual attention in the first and a context-pre-only last block)
at widths that run in well under a second on a CPU. They have no VAE: the engine never decodes.

Tokenizers are built offline: CLIP's is the character-level one of
:func:`iteris_core.backends.tiny.write_char_tokenizer`, T5's a unigram vocabulary of single
characters (with and without the word-start marker).
"""

from __future__ import annotations

import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from iteris_core.backends.tiny import VOCAB_SIZE, write_char_tokenizer

T5_LENGTH = 16   # T5 tokens the tests encode (the pipelines' default is 512 for Flux, 256 for SD3)


def t5_tokenizer():
    """A T5 tokenizer whose vocabulary is one token per character (and per word-initial character)."""
    from transformers import T5TokenizerFast

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _t5(width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=t5_tokenizer().vocab_size, d_model=width, d_ff=2 * width, d_kv=8, num_heads=2,
                      num_layers=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    return T5EncoderModel(config).eval()


def _clip(width: int, seed: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                            vocab_size=VOCAB_SIZE, max_position_embeddings=77, bos_token_id=VOCAB_SIZE - 2,
                            eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1, hidden_act="quick_gelu",
                            projection_dim=projection or width)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_char_tokenizer(Path(tmp) / "tok", pad_token=pad_token)))


@dataclass(frozen=True)
class TinyFlux:
    """Widths of a tiny Flux.1 pipeline (``guidance_embeds``: dev; without: schnell)."""

    guidance_embeds: bool = True
    heads: int = 2
    head_dim: int = 16           # = sum of the rope axes
    axes: tuple[int, int, int] = (4, 6, 6)
    double_blocks: int = 1
    single_blocks: int = 1
    latent_channels: int = 4     # the transformer reads 4 x this (2x2 packed patches)
    text_width: int = 32         # T5 d_model (the context width)
    clip_width: int = 32         # CLIP-L hidden (the pooled vector's width)


def build_tiny_flux(spec: TinyFlux = TinyFlux(), seed: int = 0):
    """A diffusers FluxPipeline (no VAE) with random weights, fp32 on the CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * spec.latent_channels,
                                         num_layers=spec.double_blocks, num_single_layers=spec.single_blocks,
                                         attention_head_dim=spec.head_dim, num_attention_heads=spec.heads,
                                         joint_attention_dim=spec.text_width, pooled_projection_dim=spec.clip_width,
                                         guidance_embeds=spec.guidance_embeds, axes_dims_rope=spec.axes).eval()
    if spec.guidance_embeds:   # Flux.1 dev's scheduler: resolution-dependent shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:                      # schnell's: no shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=_clip(spec.clip_width, seed + 1, None),
                        tokenizer=_clip_tokenizer(), text_encoder_2=_t5(spec.text_width, seed + 2),
                        tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TinySD3:
    """Widths of a tiny SD3/SD3.5 pipeline (ComfyUI's MMDiT ties the width to the depth: 64 per block)."""

    blocks: int = 2
    dual_attention_blocks: tuple[int, ...] = (0,)   # SD3.5 medium's second image self-attention
    clip_width: int = 16          # CLIP-L and CLIG-G hidden (their projections too)
    text_width: int = 48          # T5 d_model: the context width, >= the two CLIPs' joint width
    latent_channels: int = 4
    sample_size: int = 16


def build_tiny_sd3(spec: TinySD3 = TinySD3(), seed: int = 0):
    """A diffusers StableDiffusion3Pipeline (no VAE) with random weights, fp32 on the CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=spec.sample_size, patch_size=2, in_channels=spec.latent_channels,
                                        num_layers=spec.blocks, attention_head_dim=64, num_attention_heads=spec.blocks,
                                        joint_attention_dim=spec.text_width, caption_projection_dim=64 * spec.blocks,
                                        pooled_projection_dim=2 * spec.clip_width, out_channels=spec.latent_channels,
                                        pos_embed_max_size=32, dual_attention_layers=spec.dual_attention_blocks,
                                        qk_norm="rms_norm").eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None,
                                    text_encoder=_clip(spec.clip_width, seed + 1, spec.clip_width),
                                    tokenizer=_clip_tokenizer(),
                                    text_encoder_2=_clip(spec.clip_width, seed + 2, spec.clip_width),
                                    tokenizer_2=_clip_tokenizer(pad_token="!"),
                                    text_encoder_3=_t5(spec.text_width, seed + 3), tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- LoRA files in the spellings trainers write ------------------------------------------------

def _pair(out: int, width: int, rank: int, generator: torch.Generator, scale: float = 0.3):
    down = torch.randn(rank, width, generator=generator) / width ** 0.5
    up = torch.randn(out, rank, generator=generator) * scale / rank ** 0.5
    return up, down


def kohya_tensors(backend, seed: int, rank: int = 3, alpha: float = 6.0, include: str = r".",
                  text_modules: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A kohya (sd-scripts) LoRA for a DiT backend's model: the denoiser under the original
    model's flattened names (``lora_unet_double_blocks_0_img_attn_qkv``, fused), with ``.alpha``;
    ``text_modules`` are kohya names of text-encoder layers (``lora_te1_...``, ``lora_te3_...``)."""
    import re

    generator = torch.Generator().manual_seed(seed)
    table = backend.layer_table()
    tensors: dict[str, torch.Tensor] = {}
    for module in backend.native_modules:
        if not re.search(include, module.name):
            continue
        info = table[f"unet.{module.parts[0].path}"]
        if info.kind != "linear":
            continue
        tensors.update(_kohya_module("lora_unet_" + module.name.replace(".", "_"), module.out_features,
                                     info.input_dim, rank, alpha, generator))
    for key in text_modules:
        info = table[table.resolve(key)]
        tensors.update(_kohya_module(key, info.out_features, info.input_dim, rank, alpha, generator))
    return tensors


def _kohya_module(key: str, out: int, width: int, rank: int, alpha: float, generator) -> dict[str, torch.Tensor]:
    up, down = _pair(out, width, rank, generator)
    return {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(alpha)}


def ai_toolkit_tensors(backend, seed: int, rank: int = 4, include: str = r"attn\.(to_[qkv]|add_[qkv]_proj)$|proj_out$"):
    """An ai-toolkit LoRA: ``transformer.<diffusers path>.lora_A/lora_B.weight``, no alpha (scale 1)."""
    import re

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in backend.layer_table().in_component("unet").items():
        path = name.removeprefix("unet.")
        if info.kind == "linear" and re.search(include, path):
            up, down = _pair(info.out_features, info.input_dim, rank, generator)
            tensors.update({f"transformer.{path}.lora_A.weight": down, f"transformer.{path}.lora_B.weight": up})
    return tensors


AI_TOOLKIT_METADATA = {"software": '{"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"}',
                       "ss_base_model_version": "sd_1.5"}   # as ai-toolkit writes it, wrongly, into Flux LoRAs
"""Metadata ai-toolkit writes (the real file in the samples folder has the same)."""


def save_peft_lora(build, path: Path, seed: int, rank: int = 4, alpha: float = 8.0,
                   targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.0.proj",
                                               "proj_mlp", "norm1.linear"),
                   text_targets: tuple[str, ...] = ("q_proj", "v_proj", "fc1")) -> Path:
    """A diffusers LoRA as its training scripts save it: PEFT adapters added to a fresh pipeline's
    transformer and CLIP-L with random (non-zero) weights, written by the pipeline class's
    ``save_lora_weights`` with their LoRA configs (lora_alpha != r) in the metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build()
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    text_config = LoraConfig(r=2, lora_alpha=3.0, target_modules=list(text_targets), init_lora_weights=False)
    pipe.text_encoder.add_adapter(text_config)
    path.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                                 transformer_lora_adapter_metadata=config.to_dict(),
                                 text_encoder_lora_adapter_metadata=text_config.to_dict())
    return path / "pytorch_lora_weights.safetensors"


def write_sd3_single_file(transformer, path: Path) -> Path:
    """The transformer's weights as an SD3 single-file checkpoint (SAI's MMDiT names under
    ``model.diffusion_model.``, fused qkv), through ComfyUI's own ``mmdit_to_diffusers`` map
    (ComfyUI imported first, by the tests' ``comfy_nodes`` fixture)."""
    from safetensors.torch import save_file

    import comfy.utils

    key_map = comfy.utils.mmdit_to_diffusers({"depth": transformer.config.num_layers}, output_prefix="")
    native: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, tensor in transformer.state_dict().items():
        target = key_map[key]
        if isinstance(target, str):
            native[target] = tensor
        elif target[1] is None:              # (key, None, function): swap_scale_shift is its own inverse
            native[target[0]] = target[2](tensor)
        else:                                # (key, (dim, start, length)): rows of a fused weight
            pieces.setdefault(target[0], []).append((target[1][1], tensor))
    native.update({k: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for k, parts in pieces.items()})
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in native.items()}, str(path))
    return path
