"""Every real published file in ../shared/lora_samples loads on its base or is refused with a
message that names the file and says what is wrong (see its MANIFEST.md)."""

from __future__ import annotations

import re

import pytest
import torch

from iteris_core.errors import BaseModelMismatchError, LoraFileError, LoraFormatError
from iteris_core.lora_formats import parse_lora
from iteris_core.lora_io import read_lora_file
from iteris_core.lora_normalize import load_lora

# file stem -> (base it belongs to, layers placed, notes skipped)
LOADS = {
    "sd15_kohya_lokr_r4_fp16": ("sd1", 347, 3),
    "sd15_kohya_lokr_r8_fp16": ("sd1", 347, 3),
    "sd15_kohya_lokr_r16_fp16": ("sd1", 347, 3),
    "sd15_cloneofsimo_positional_r4_fp16": ("sd1", 192, 0),
    "sd15_cloneofsimo_positional_r1_tokens_fp32": ("sd1", 192, 2),
    "sd15inpaint_cloneofsimo_positional_r1_tokens_mixed": ("sd1", 192, 2),
    "sd15_diffusers_attnproc_r4": ("sd1", 128, 0),
    "sd15_diffusers_attnproc_r4_b": ("sd1", 128, 0),
    "sd14_diffusers_attnproc_r4": ("sd1", 128, 0),
    "sd15_diffusers_attnproc_unetprefix_r4": ("sd1", 128, 0),
    "sd14_diffusers_lora_r4": ("sd1", 128, 0),
    "sd15_diffusers_lora_r4": ("sd1", 128, 0),
    "sd15inpaint_diffusers_lora_r4": ("sd1", 128, 0),
    "sd21base_diffusers_lora_r4_bf16": ("sd2", 128, 0),
    "sd21_diffusers_lora_r4_fp32": ("sd2", 128, 0),
    "sd2x_diffusers_attnproc_unetprefix_r4": ("sd2", 128, 0),
    "clip_l_peft_te_r8_sd15": ("sd1", 24, 0),
    "clip_l_peft_te_r8_sdxl_te1": ("sdxl", 22, 2),  # layer 11 untrained: SDXL reads layer 10
}

# file stem -> (error class, words the message must contain)
REFUSED = {
    "bad_empty_crlf": (LoraFileError, "too short"),
    "bad_lfs_pointer": (LoraFileError, "Git LFS pointer"),
    "bad_lfs_pointer_b": (LoraFileError, "Git LFS pointer"),
    "bad_text_placeholder": (LoraFileError, "text file"),
    "bad_truncated_sdxl_attnproc": (LoraFileError, "truncated"),
    "bad_kohya_double_prefix_sd15": (LoraFormatError, "joined by '_'"),
    "sam_vitb_lora_wa_wb_r2": (LoraFormatError, "not a Stable Diffusion LoRA"),
    "vit_lora_a_only_r4": (LoraFormatError, "not a Stable Diffusion LoRA"),
    "gpt2_peft_lora_r8_with_score_head": (LoraFormatError, "base_model.model.score.weight"),
    "distilbert_peft_lora_r8_with_classifier": (LoraFormatError, "classifier"),
    "gpt2_peft_lora_r8_attn_mlp": (BaseModelMismatchError, "no module names a layer"),
    # refused from its keys before it is parsed (its metadata's 'sd_1.5' is ai-toolkit's default)
    "flux1_peft_aitoolkit_r16_fp16": (BaseModelMismatchError, "it looks made for a Flux.1-type model"),
}


# on another family's model, a file is refused for that before its format is read
ON_ANOTHER_FAMILY = {("bad_kohya_double_prefix_sd15", "sdxl"): (BaseModelMismatchError,
                                                                "it looks made for SD1.x but the base model is SDXL")}


def test_every_sample_is_covered(samples_dir):
    stems = {p.stem for p in samples_dir.glob("*.safetensors")}
    assert stems == set(LOADS) | set(REFUSED)


@pytest.mark.parametrize("stem", sorted(LOADS))
def test_sample_loads_on_its_base(samples_dir, full_tables, stem):
    architecture, layers, skipped = LOADS[stem]
    lora = load_lora(samples_dir / f"{stem}.safetensors", full_tables[architecture])
    assert len(lora.layers) == layers
    assert len(lora.skipped) == skipped
    for name, delta in lora.layers.items():
        info = full_tables[architecture][name]
        assert (delta.out_features, delta.in_features) == (info.out_features, info.input_dim)
        assert torch.isfinite(delta.up).all() and torch.isfinite(delta.down).all()


@pytest.mark.parametrize("stem", sorted(REFUSED))
@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_sample_is_refused_with_a_clear_message(samples_dir, full_tables, stem, architecture):
    error, words = ON_ANOTHER_FAMILY.get((stem, architecture), REFUSED[stem])
    with pytest.raises(error) as info:
        load_lora(samples_dir / f"{stem}.safetensors", full_tables[architecture])
    message = str(info.value)
    assert f"{stem}.safetensors" in message
    assert words in message


@pytest.mark.parametrize("stem, base, made_for", [
    ("sd15_diffusers_lora_r4", "sd2", "SD1.x"),
    ("sd15_diffusers_attnproc_r4", "sdxl", "SD1.x"),
    ("sd21_diffusers_lora_r4_fp32", "sd1", "SD2.x"),
    ("sd15_kohya_lokr_r4_fp16", "sdxl", None),
    ("sd15_cloneofsimo_positional_r4_fp16", "sdxl", None),
    ("clip_l_peft_te_r8_sd15", "sd2", None),
])
def test_wrong_base_model_is_named(samples_dir, full_tables, stem, base, made_for):
    with pytest.raises(BaseModelMismatchError) as info:
        load_lora(samples_dir / f"{stem}.safetensors", full_tables[base])
    message = str(info.value)
    assert f"{stem}.safetensors" in message
    if made_for:
        assert re.search(rf"looks made for {re.escape(made_for)} but the base model is", message), message


def test_cloneofsimo_order_matches_every_shape(samples_dir, full_tables):
    """The positional layout is placed by traversal order; the r4 file's 144 UNet modules must
    line up with SD1.5's transformer blocks in shape, module by module."""
    parsed = parse_lora(read_lora_file(samples_dir / "sd15_cloneofsimo_positional_r4_fp16.safetensors"))
    lora = load_lora(samples_dir / "sd15_cloneofsimo_positional_r4_fp16.safetensors", full_tables["sd1"])
    ff = [n for n in lora.layers if n.endswith("ff.net.0.proj")]
    cross_k = [n for n in lora.layers if n.endswith("attn2.to_k")]
    assert len(ff) == 16 and len(cross_k) == 16
    assert all(lora.layers[n].in_features == 768 for n in cross_k)
    assert parsed.layout == "positional"


def test_peft_sidecar_alpha_is_used(samples_dir, full_tables):
    lora = load_lora(samples_dir / "clip_l_peft_te_r8_sd15.safetensors", full_tables["sd1"])
    raw = read_lora_file(samples_dir / "clip_l_peft_te_r8_sd15.safetensors")
    key = "base_model.model.text_model.encoder.layers.0.self_attn.q_proj"
    expected = raw.tensors[f"{key}.lora_B.weight"] @ raw.tensors[f"{key}.lora_A.weight"] * (8 / 8)
    got = lora.layers["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].dense()
    assert torch.allclose(got, expected, atol=1e-7)


def test_sdxl_te1_peft_goes_to_the_first_text_encoder(samples_dir, full_tables):
    lora = load_lora(samples_dir / "clip_l_peft_te_r8_sdxl_te1.safetensors", full_tables["sdxl"])
    assert lora.components() == {"text_encoder"}
