"""Layer names: diffusers <-> LDM paths, kohya aliases, shared-input groups."""

from __future__ import annotations

import pytest

from iteris_core.layers import input_group, unet_path_from_ldm, unet_path_to_ldm


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_every_unet_layer_round_trips_through_ldm_names(full_tables, architecture):
    table = full_tables[architecture]
    converted = 0
    for name in table.layers:
        if not name.startswith("unet."):
            continue
        ldm = table.ldm_name(name)
        assert ldm is not None, name
        assert unet_path_from_ldm(ldm, 2) == name[len("unet."):], (name, ldm)
        converted += 1
    assert converted > 200
    ldm_names = [table.ldm_name(n) for n in table.layers if n.startswith("unet.")]
    assert len(set(ldm_names)) == len(ldm_names)  # one-to-one


@pytest.mark.parametrize("architecture, diffusers, ldm", [
    ("sd1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("sd1", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("sd1", "down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
    ("sd1", "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("sd1", "mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("sd1", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("sd1", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sd1", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.11.1.transformer_blocks.0.ff.net.2"),
    ("sd1", "up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("sdxl", "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.0.proj", "output_blocks.2.1.transformer_blocks.3.ff.net.0.proj"),
    ("sdxl", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sdxl", "add_embedding.linear_1", "label_emb.0.0"),
    ("sdxl", "time_embedding.linear_2", "time_embed.2"),
])
def test_known_ldm_names(full_tables, architecture, diffusers, ldm):
    assert full_tables[architecture].ldm_name("unet." + diffusers) == ldm


@pytest.mark.parametrize("architecture, spelling, canonical", [
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sd1", "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sd1", "lora_te_text_model_encoder_layers_3_mlp_fc2", "text_encoder.text_model.encoder.layers.3.mlp.fc2"),
    ("sd1", "lora_te1_text_model_encoder_layers_3_mlp_fc2", "text_encoder.text_model.encoder.layers.3.mlp.fc2"),
    ("sd1", "lora_te_encoder_layers_3_mlp_fc2", "text_encoder.text_model.encoder.layers.3.mlp.fc2"),
    ("sd1", "text_encoder.encoder.layers.3.mlp.fc2", "text_encoder.text_model.encoder.layers.3.mlp.fc2"),
    ("sd1", "diffusion_model.output_blocks.3.1.proj_out", "unet.up_blocks.1.attentions.0.proj_out"),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
     "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"),
    ("sdxl", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0",
     "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0"),
])
def test_aliases_resolve(full_tables, architecture, spelling, canonical):
    assert full_tables[architecture].resolve(spelling) == canonical


def test_bare_lora_te_means_the_first_encoder_on_sdxl(full_tables):
    """As in ComfyUI's and diffusers' key maps."""
    assert full_tables["sdxl"].resolve("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("name, group", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.<input>"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "unet.<text context>"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q", "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q"),
    ("text_encoder.text_model.encoder.layers.2.self_attn.v_proj", "text_encoder.text_model.encoder.layers.2.self_attn.<input>"),
    ("text_encoder.text_model.encoder.layers.2.self_attn.out_proj", "text_encoder.text_model.encoder.layers.2.self_attn.out_proj"),
])
def test_input_groups(name, group):
    assert input_group(name) == group


def test_distinct_inputs_of_sd15_match_the_math_note(full_tables):
    """SD1.5's 192 attention-type layers read 129 distinct inputs once q/k/v share one; cross-attention
    k/v all read the same text context, which brings it to 99."""
    table = full_tables["sd1"]
    names = [n for n in table.layers if n.startswith("unet.") and (".transformer_blocks." in n or "proj_" in n)]
    assert len(names) == 192
    assert len({input_group(n) for n in names}) == 192 - 16 * 2 - (16 * 2 - 1)
    assert unet_path_to_ldm("conv_in", 2, frozenset()) == "input_blocks.0.0"
