"""Full-size SD1.5 / SD2.1 / SDXL architectures on the meta device (no memory, no weights): their
layer tables let tests place real published LoRAs without any checkpoint."""

from __future__ import annotations

import torch

from iteris_core.layers import TEXT_ENCODER, TEXT_ENCODER_2, UNET, LayerTable

SD15_UNET = dict(sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 sample_size=96)
SDXL_UNET = dict(sample_size=128, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
              projection_dim=1024, hidden_act="gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu")


def _named(component: str, module, text: bool):
    for name, sub in module.named_modules():
        if name:
            if text and not name.startswith("text_model.") and name != "text_projection":
                name = "text_model." + name
            yield f"{component}.{name}", sub


def build_table(unet_config: dict, text_configs: list[tuple[str, dict, bool]], architecture: str) -> LayerTable:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        named = list(_named(UNET, unet, False))
        for component, config, projection in text_configs:
            cls = CLIPTextModelWithProjection if projection else CLIPTextModel
            named += list(_named(component, cls(CLIPTextConfig(**config)), True))
    return LayerTable.from_modules(named, architecture=architecture, unet_layers_per_block=2)


def full_size_tables() -> dict[str, LayerTable]:
    return {
        "sd1": build_table(SD15_UNET, [(TEXT_ENCODER, CLIP_L, False)], "sd1"),
        "sd2": build_table(SD21_UNET, [(TEXT_ENCODER, CLIP_H, False)], "sd2"),
        "sdxl": build_table(SDXL_UNET, [(TEXT_ENCODER, CLIP_L, False), (TEXT_ENCODER_2, CLIP_G, True)], "sdxl"),
    }
