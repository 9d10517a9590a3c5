"""Which family a LoRA is made for, from its keys and its metadata, and the refusal of a LoRA for
another family before the merge calls the model."""

from __future__ import annotations

import pytest
import torch

from iteris_core import Concept, MergeSettings, SamplingSettings, merge_loras
from iteris_core.backends.tiny import random_lora_deltas
from iteris_core.errors import BaseModelMismatchError
from iteris_core.families import family_by_id, lora_origin
from iteris_core.lora_io import LoraFile, read_lora_file
from iteris_core.lora_normalize import load_lora
from iteris_core.lora_writer import MergedLora

PAIR = ("lora_down.weight", "lora_up.weight")


def kohya(*modules: str, width: int = 8) -> dict[str, torch.Tensor]:
    """A kohya-named file's tensors (rank 2) for these module keys."""
    tensors = {}
    for module in modules:
        tensors[f"{module}.lora_down.weight"] = torch.randn(2, width)
        tensors[f"{module}.lora_up.weight"] = torch.randn(width, 2)
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    return tensors


def peft(*modules: str, width: int = 8) -> dict[str, torch.Tensor]:
    return {f"{m}.lora_{part}.weight": torch.randn(*shape) for m in modules
            for part, shape in (("A", (2, width)), ("B", (width, 2)))}


def loha(module: str, width: int) -> dict[str, torch.Tensor]:
    """LoHa factors (rank 2) of a Linear layer with this input width."""
    return {f"{module}.hada_w1_a": torch.randn(8, 2), f"{module}.hada_w1_b": torch.randn(2, width),
            f"{module}.hada_w2_a": torch.randn(8, 2), f"{module}.hada_w2_b": torch.randn(2, width),
            f"{module}.alpha": torch.tensor(2.0)}


def lokr(module: str, w1_in: int, w2_in: int) -> dict[str, torch.Tensor]:
    """LoKr factors as LyCORIS writes them: w1 whole, w2 split as w2_a @ w2_b (input w1_in * w2_in)."""
    return {f"{module}.lokr_w1": torch.randn(4, w1_in), f"{module}.lokr_w2_a": torch.randn(5, 2),
            f"{module}.lokr_w2_b": torch.randn(2, w2_in), f"{module}.alpha": torch.tensor(2.0)}


SD_ATTN1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD_ATTN2_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
FLUX_KOHYA = "lora_unet_double_blocks_0_img_attn_qkv"

# (tensors, metadata) -> families it fits and families it does not
CASES = {
    "kohya SD, no widths": (kohya(SD_ATTN1), {}, {"sd1", "sd2", "sdxl"}, {"flux_dev", "sd3"}),
    "kohya SD + ss_base_model_version sdxl": (kohya(SD_ATTN1), {"ss_base_model_version": "sdxl_base_v1-0"},
                                              {"sdxl"}, {"sd1", "sd2"}),
    "kohya SD + ss_v2": (kohya(SD_ATTN1), {"ss_v2": "True", "ss_sd_model_name": "wd-1-5-beta2.ckpt"}, {"sd2"},
                         {"sd1", "sdxl"}),
    "kohya SD + modelspec SD1": (kohya(SD_ATTN1), {"modelspec.architecture": "stable-diffusion-v1/lora"}, {"sd1"},
                                 {"sd2", "sdxl"}),
    "kohya SD + ss_sd_model_name sd_xl": (kohya(SD_ATTN1), {"ss_sd_model_name": "sd_xl_base_1.0.safetensors"},
                                          {"sdxl"}, {"sd1"}),
    "kohya SD cross-attention 768": (kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                                           width=768), {}, {"sd1"}, {"sd2", "sdxl"}),
    # LyCORIS files have no down matrix: the widths come from their factors
    "LoHa cross-attention 1024": (loha(SD_ATTN2_K, 1024), {}, {"sd2"}, {"sd1", "sdxl"}),
    "LoKr cross-attention 16x48": (lokr(SD_ATTN2_K, 16, 48), {}, {"sd1"}, {"sd2", "sdxl"}),
    "LoKr cross-attention 32x64": (lokr(SD_ATTN2_K, 32, 64), {}, {"sdxl"}, {"sd1", "sd2"}),
    "kohya SDXL te1/te2": (kohya(SD_ATTN1, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                 width=768), {}, {"sdxl"}, {"sd1"}),
    # keys win over metadata that contradicts them
    "kohya SD keys, Flux metadata": (kohya(SD_ATTN1), {"modelspec.architecture": "flux-1-dev/lora"},
                                     {"sd1", "sdxl"}, {"flux_dev"}),
    "kohya Flux": (kohya(FLUX_KOHYA), {}, {"flux_dev", "flux_schnell", "chroma"}, {"sd1", "sdxl", "sd3"}),
    "kohya Flux + schnell metadata": (kohya(FLUX_KOHYA), {"modelspec.architecture": "flux-1-schnell/lora"},
                                      {"flux_dev", "flux_schnell"}, {"sdxl"}),
    "ai-toolkit Flux, default sd_1.5": (peft("transformer.single_transformer_blocks.0.proj_out"),
                                        {"ss_base_model_version": "sd_1.5",
                                         "software": '{"name": "ai-toolkit", "version": "0.1.0"}'},
                                        {"flux_dev", "chroma"}, {"sd1", "sdxl"}),
    "diffusers Flux double blocks only": (peft("transformer.transformer_blocks.0.attn.add_q_proj"), {},
                                          {"flux_dev", "sd3", "qwen_image"}, {"sd1", "zimage"}),
    "kohya SD3": (kohya("lora_unet_joint_blocks_0_x_block_attn_qkv"), {}, {"sd3"}, {"flux_dev", "sdxl"}),
    "diffusers Qwen-Image": (peft("transformer.transformer_blocks.0.img_mlp.net.0.proj"), {}, {"qwen_image"},
                             {"flux_dev", "sd3"}),
    "Z-Image": (peft("diffusion_model.layers.0.attention.qkv"), {}, {"zimage"}, {"flux_dev", "qwen_image"}),
    "metadata only": (peft("text_model.encoder.layers.0.self_attn.q_proj"),
                      {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, {"sdxl"}, {"sd1", "flux_dev"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_origin_fits_its_families_only(case):
    tensors, metadata, fits, misfits = CASES[case]
    origin = lora_origin(tensors, metadata)
    assert origin is not None
    for family_id in fits:
        assert origin.fits(family_by_id(family_id)), (case, family_id, origin)
    for family_id in misfits:
        assert not origin.fits(family_by_id(family_id)), (case, family_id, origin)


def test_a_file_that_says_nothing_has_no_origin():
    assert lora_origin(peft("text_model.encoder.layers.0.self_attn.q_proj"), {}) is None   # CLIP-L: SD1 or Flux
    assert lora_origin(kohya(SD_ATTN1), {"modelspec.architecture": "flux-1-dev/lora",
                                         "ss_base_model_version": "sdxl_base_v1-0"}).name == "Stable Diffusion"


def test_a_real_ai_toolkit_file_is_read_by_its_keys(samples_dir):
    lora = read_lora_file(samples_dir / "flux1_peft_aitoolkit_r16_fp16.safetensors")
    assert lora.metadata["ss_base_model_version"] == "sd_1.5"
    origin = lora_origin(lora.tensors, lora.metadata)
    assert origin.fits(family_by_id("flux_dev")) and not origin.fits(family_by_id("sd1"))
    assert "single_transformer_blocks" in origin.evidence


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_the_real_lokr_files_are_sd1_by_their_factor_shapes(samples_dir, full_tables, rank):
    """kohya LoKr files trained on an SD1 finetune: no metadata field names the version, and
    Kronecker factors (20x32)(x)(16x24) give attn2's 768-wide context, so an SDXL model refuses them
    at once rather than at the first mismatched shape."""
    lora = read_lora_file(samples_dir / f"sd15_kohya_lokr_r{rank}_fp16.safetensors")
    origin = lora_origin(lora.tensors, lora.metadata)
    assert origin.family_ids == {"sd1"}, origin
    assert load_lora(lora, full_tables["sd1"]).layers
    with pytest.raises(BaseModelMismatchError, match="looks made for SD1.x but the base model is SDXL"):
        load_lora(lora, full_tables["sdxl"])


def _sd1_file(table, metadata: dict[str, str], name: str) -> LoraFile:
    """An attention-1-only LoRA for the table (its shapes fit SD1.x, SD2.x and SDXL alike)."""
    deltas = random_lora_deltas(table, 3, rank=2, components=("unet",), include=r"attn1\.to_(q|v)$")
    return LoraFile(name=name, tensors=MergedLora(deltas, table).state_dict(torch.float32), metadata=metadata)


@pytest.fixture(scope="module")
def sd15_backend(tiny_checkpoint):
    """A diffusers backend on the generated SD1.5-type checkpoint (real SD1.5 widths: detected as SD1.x)."""
    from iteris_core.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_pretrained(tiny_checkpoint, device="cpu")
    assert backend.layer_table().architecture == "sd1"
    return backend


def test_metadata_for_another_family_is_refused_where_the_keys_would_fit(full_tables):
    table = full_tables["sd1"]
    plain = _sd1_file(table, {}, "plain.safetensors")
    assert load_lora(plain, table).layers   # the keys alone fit this SD1.x model
    marked = _sd1_file(table, {"ss_base_model_version": "sdxl_base_v1-0"}, "marked_sdxl.safetensors")
    with pytest.raises(BaseModelMismatchError) as info:
        load_lora(marked, table)
    message = str(info.value)
    assert message.startswith("marked_sdxl.safetensors: it looks made for SDXL but the base model is SD1.x")
    assert "ss_base_model_version = 'sdxl_base_v1-0'" in message


def test_a_lora_for_another_family_stops_the_merge_before_any_model_call(sd15_backend, monkeypatch):
    backend = sd15_backend
    table = backend.layer_table()
    calls = []
    for method in ("encode_text", "sample", "replay"):
        original = getattr(backend, method)
        monkeypatch.setattr(backend, method,
                            lambda *a, _m=method, _f=original, **k: calls.append(_m) or _f(*a, **k))
    good = _sd1_file(table, {}, "good.safetensors")
    flux = LoraFile(name="flux_style.safetensors", tensors=kohya(FLUX_KOHYA, width=3072), metadata={})
    settings = MergeSettings(iterations=1, sampling=SamplingSettings(samples_per_prompt=1, timesteps=1, steps=2,
                                                                     batch_size=1, width=64, height=64))
    with pytest.raises(BaseModelMismatchError) as info:
        merge_loras(backend, [Concept(good, ["a photo"]), Concept(flux, ["a style"])], settings)
    assert "flux_style.safetensors" in str(info.value)
    assert "looks made for a Flux.1-type model" in str(info.value) and "base model is SD1.x" in str(info.value)
    assert calls == []
    merge_loras(backend, [Concept(good, ["a photo"])], settings)   # the counting itself works
    assert "sample" in calls and "encode_text" in calls
