"""Single-file checkpoints in the diffusers backend: the converted model computes what ComfyUI's
own model computes from the same file, and the CLI merges on it."""

from __future__ import annotations

import pytest
import torch

from iteris_core.backends.diffusers_backend import DiffusersBackend
from iteris_core.backends.single_file import detect_family, infer_unet_config
from iteris_core.cli import main
from iteris_core.errors import IterisError
from iteris_core.lora_io import read_lora_file


@pytest.fixture(scope="module")
def single_file_backend(tiny_checkpoint):
    return DiffusersBackend.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def comfy_parts(comfy_nodes, tiny_checkpoint):
    with torch.inference_mode():
        model, clip, _vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.name)
    return model, clip


def test_config_is_read_off_the_shapes(tiny_checkpoint):
    state = read_lora_file(tiny_checkpoint, with_hash=False).tensors
    assert detect_family(state.keys()) == "sd1"
    config = infer_unet_config(state, "sd1")
    assert config["block_out_channels"] == [320] and config["layers_per_block"] == 1
    assert config["cross_attention_dim"] == 768 and config["use_linear_projection"] is False


def test_unet_matches_comfyui(single_file_backend, comfy_parts):
    model, _ = comfy_parts
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        ours = single_file_backend.unet(x, t, encoder_hidden_states=context).sample
        theirs = model.model.diffusion_model(x, timesteps=t, context=context)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4), float((ours - theirs).abs().max())


def test_text_encoder_matches_comfyui(single_file_backend, comfy_parts):
    _, clip = comfy_parts
    prompt = "a photo of sks dog on the beach"
    with torch.no_grad():
        ours = single_file_backend.encode_text([prompt])[0].tensors["encoder_hidden_states"]
        theirs, _pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2), float((ours - theirs).abs().max())


def test_cli_merges_on_a_single_file(tiny_checkpoint, single_file_backend, tmp_path):
    from iteris_core.backends.tiny import random_lora_deltas
    from iteris_core.lora_writer import MergedLora

    table = single_file_backend.layer_table()
    assert table.architecture == "sd1"
    for seed in (1, 2):
        deltas = random_lora_deltas(table, seed, rank=2, scale=0.1, include=r"attn[12]\.to_[qkv]$|self_attn\.q_proj$")
        MergedLora(deltas, table).save(tmp_path / f"l{seed}.safetensors")
    code = main(["merge", "--base", str(tiny_checkpoint), "--lora", str(tmp_path / "l1.safetensors"), "--prompt", "sks dog",
                 "--lora", str(tmp_path / "l2.safetensors"), "--prompt", "xyz style", "--out", str(tmp_path / "m.safetensors"),
                 "--samples", "1", "--steps", "2", "--timesteps", "1", "--width", "64", "--height", "64",
                 "--iterations", "1", "--device", "cpu", "--quiet"])
    assert code == 0 and (tmp_path / "m.safetensors").exists()


def test_lora_file_is_not_a_checkpoint(tmp_path):
    from iteris_core.backends.single_file import load_single_file
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(IterisError, match="not an SD1.x/SD2.x/SDXL checkpoint"):
        load_single_file(tmp_path / "x.safetensors")
