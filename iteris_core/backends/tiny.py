"""Small Stable-Diffusion-shaped diffusers pipelines built from configs with random weights.

They have the real architectures' structure (CLIP text encoders, a UNet with cross-attention
transformer blocks, resnets and down/upsamplers, SDXL's second encoder and added conditioning)
at a width that runs in seconds on a CPU. The demo, the tests and the benchmarks build them here,
so nothing is downloaded. The tokenizer is a byte-level CLIP BPE vocabulary without merges: every
character is a token, which is all a test needs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, codes)))


def write_char_tokenizer(folder: Path, pad_token: str = EOS) -> Path:
    """Write vocab.json/merges.txt/configs of a character-level CLIP tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token,
         "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
    return folder


VOCAB_SIZE = 514  # 2 x 256 characters + BOS + EOS


@dataclass(frozen=True)
class TinySpec:
    """Widths of a tiny pipeline. ``sdxl`` adds the second text encoder and SDXL's conditioning."""

    sdxl: bool = False
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    text_width: int = 32
    text_layers: int = 2
    text_width_2: int = 32
    sample_size: int = 16     # latent side
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)   # the VAE downsamples by 2 ** (len - 1)


def _text_config(width: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                          num_hidden_layers=layers, vocab_size=VOCAB_SIZE, max_position_embeddings=77,
                          bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
                          hidden_act="quick_gelu", **extra)


def build_tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0):
    """A diffusers StableDiffusion(XL)Pipeline with random weights (seeded), on the CPU, fp32."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    levels = len(spec.channels)
    if spec.sdxl:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
        extra = dict(transformer_layers_per_block=[1] + [2] * (levels - 1), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=spec.text_width_2 + 6 * 8,
                     cross_attention_dim=spec.text_width + spec.text_width_2, attention_head_dim=4)
    else:
        down = ("CrossAttnDownBlock2D",) * levels
        up = ("CrossAttnUpBlock2D",) * levels
        extra = dict(cross_attention_dim=spec.text_width, attention_head_dim=4)
    unet = UNet2DConditionModel(sample_size=spec.sample_size, in_channels=4, out_channels=4,
                                block_out_channels=spec.channels, layers_per_block=spec.layers_per_block,
                                down_block_types=down, up_block_types=up, norm_num_groups=8, **extra)
    levels = len(spec.vae_channels)
    vae = AutoencoderKL(block_out_channels=spec.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=8,
                        sample_size=spec.sample_size * 2 ** (levels - 1))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(Path(tmp) / "tok")))
        if spec.sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(Path(tmp) / "tok2", pad_token="!")))
    text_encoder = CLIPTextModel(_text_config(spec.text_width, spec.text_layers))
    if not spec.sdxl:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(spec.text_width_2, spec.text_layers,
                                                                  projection=spec.text_width_2))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder) + ((pipe.text_encoder_2,) if spec.sdxl else ()):
        module.eval()
    return pipe


ATTENTION_MLP = r"(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj|ff\.net\.(0\.proj|2)|mlp\.fc[12]|proj_(in|out))$"
"""The layers trainers usually adapt: attention projections, MLPs and the transformer in/out projections."""


def random_lora_deltas(table, seed: int, rank: int = 4, scale: float = 0.5, components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"),
                       include: str = ATTENTION_MLP):
    """Random LoRA deltas on a layer table's attention/MLP layers (for demos and tests): down
    Gaussian, up Gaussian scaled so that ``||dW|| ~ scale * ||typical weight||``."""
    import re

    from ..low_rank import LowRankDelta

    generator = torch.Generator().manual_seed(seed)
    pattern = re.compile(include)
    deltas = {}
    for name, info in table.layers.items():
        if info.component not in components or not pattern.search(name):
            continue
        down = torch.randn(rank, info.input_dim, generator=generator) / info.input_dim ** 0.5
        up = torch.randn(info.out_features, rank, generator=generator) * scale / rank ** 0.5
        deltas[name] = LowRankDelta(up, down, 1.0)
    return deltas
