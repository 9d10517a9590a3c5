"""A merged file whose layers have different ranks loads to the same model in diffusers'
``load_lora_weights`` and in ComfyUI's ``comfy.sd.load_lora_for_models``, on SD1 and SDXL, and that
model is the base plus the merged deltas.

Both loaders start from the same weights: the tiny diffusers pipeline's, and ComfyUI's own model
classes (``supported_models.SD15`` / ``SDXL``) built with the same config and given those weights
through ComfyUI's own key conversion (``comfy.utils.unet_to_diffusers``). Compared: each layer's
patched weight, and the pipeline's noise prediction (text encoders and UNet) on fixed inputs, both
relative to the LoRA's own effect on them. ComfyUI's patched weights are run in the diffusers
architecture, because ComfyUI's tiny model is not the same network (its GroupNorms have 32 groups,
its CLIP a 49408-token vocabulary).

The ranks: 4 on most layers, 8 on the UNet's middle block, 2 on the first text encoder's MLP, 6 on
the second's attention and on the resnet convs. When each layer's alpha was its rank, diffusers
0.42.1 gave the middle block's attention layers half their strength and the first text encoder's
MLP twice its strength (its alpha pattern names the former after attention processors and the
latter with the ``text_model.`` that transformers 5 dropped from ``CLIPTextModel``): its noise
prediction was off by 40% (SD1) and 14% (SDXL) of the LoRA's effect, ComfyUI's by 1e-6.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from iteris_core.backends.base import TextBatch
from iteris_core.backends.diffusers_backend import DiffusersBackend
from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline, random_lora_deltas
from iteris_core.layers import LayerTable
from iteris_core.lora_normalize import load_lora
from iteris_core.lora_writer import MergedLora, file_alpha, kohya_module_key
from iteris_core.low_rank import LowRankDelta

TOLERANCE = 1e-4               # of the LoRA's effect: loaders against each other, and fp32 files against the merge
FP16_TOLERANCE = 2e-3          # an fp16 file against the merge: the factors' rounding
PROMPTS = ["a photo of sks dog", "a painting in xyz style"]
CPU = torch.device("cpu")
MID_BLOCK_ATTENTION = r"unet\.mid_block\.attentions\.0\.transformer_blocks\.\d+\.attn[12]\."


def mixed_rank_deltas(table: LayerTable) -> dict[str, LowRankDelta]:
    """Random deltas of rank 4 on the attention/MLP layers, with other ranks on some groups."""
    deltas = random_lora_deltas(table, seed=1, rank=4, scale=0.3)
    others = [(8, 2, r"^unet\.mid_block\."), (2, 3, r"^text_encoder\..*\.mlp\."),
              (6, 4, r"^text_encoder_2\..*\.self_attn\.")]
    for rank, seed, pattern in others:
        deltas.update({n: d for n, d in random_lora_deltas(table, seed=seed, rank=rank, scale=0.3).items()
                       if re.search(pattern, n)})
    deltas.update(random_lora_deltas(table, seed=5, rank=6, scale=0.3, components=("unet",),
                                     include=r"resnets\.\d+\.conv[12]$"))
    return deltas


def comfy_unet_config(spec: TinySpec) -> dict:
    """ComfyUI's UNet config of the tiny pipeline's UNet (``build_tiny_pipeline``'s layout)."""
    levels = len(spec.channels)
    depths = [0] + [2] * (levels - 1) if spec.sdxl else [1] * levels   # transformer blocks per level
    config = dict(image_size=spec.sample_size, in_channels=4, out_channels=4, model_channels=spec.channels[0],
                  channel_mult=[c // spec.channels[0] for c in spec.channels],
                  num_res_blocks=[spec.layers_per_block] * levels,
                  transformer_depth=[d for d in depths for _ in range(spec.layers_per_block)],
                  transformer_depth_output=[d for d in depths for _ in range(spec.layers_per_block + 1)],
                  transformer_depth_middle=depths[-1], num_heads=4, num_head_channels=-1, use_spatial_transformer=True,
                  legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
                  use_linear_in_transformer=spec.sdxl, context_dim=spec.text_width, adm_in_channels=None)
    if spec.sdxl:
        config.update(context_dim=spec.text_width + spec.text_width_2, adm_in_channels=spec.text_width_2 + 6 * 8,
                      num_classes="sequential")
    return config


def comfy_model(pipe, spec: TinySpec):
    """ComfyUI's model (a ModelPatcher, as CheckpointLoaderSimple gives) with the pipeline's UNet weights."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    config = comfy_unet_config(spec)
    model_config = (comfy.supported_models.SDXL if spec.sdxl else comfy.supported_models.SD15)(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    to_ldm = comfy.utils.unet_to_diffusers(config)
    weights = pipe.unet.state_dict()
    assert set(weights) <= set(to_ldm), sorted(set(weights) - set(to_ldm))[:5]
    missing, _ = model.load_state_dict({"diffusion_model." + to_ldm[k]: v for k, v in weights.items()}, strict=False)
    assert not [k for k in missing if k.startswith("diffusion_model.")], missing[:5]
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


class _TextEncoders(torch.nn.Module):
    """The text side of a ComfyUI CLIP: ``clip_l`` (and ``clip_g``), the names ComfyUI's key map reads."""

    dtypes = {torch.float32}   # CLIP's constructor asks its text model which dtypes it holds


def _comfy_text_encoder(encoder):
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(textmodel_json_config=encoder.config.to_dict(), dtype=torch.float32, device="cpu")
    ours = clip.state_dict()
    theirs = {}
    for key, value in encoder.state_dict().items():   # transformers 5 has no text_model. level
        theirs["transformer." + key if key.startswith("text_projection.") else
               "transformer.text_model." + key.removeprefix("text_model.")] = value
    fits = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    assert set(theirs) - set(fits) == {"transformer.text_model.embeddings.token_embedding.weight"}   # vocabularies
    clip.load_state_dict(fits, strict=False)
    return clip


def comfy_clip(pipe, spec: TinySpec):
    """A ComfyUI CLIP (its own constructor) whose encoders have the pipeline's text encoder weights."""
    import comfy.sd

    encoders = _TextEncoders()
    encoders.clip_l = _comfy_text_encoder(pipe.text_encoder)
    if spec.sdxl:
        encoders.clip_g = _comfy_text_encoder(pipe.text_encoder_2)
    target = SimpleNamespace(params={}, clip=lambda **_: encoders, tokenizer=lambda **_: None)
    options = {"load_device": CPU, "offload_device": CPU, "initial_device": CPU, "dtype": torch.float32}
    return comfy.sd.CLIP(target, model_options=options)


def diffusers_loaded(spec: TinySpec, path):
    """A fresh pipeline with the file loaded by ``load_lora_weights`` and fused."""
    pipe = build_tiny_pipeline(spec, seed=0)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe


def comfy_loaded_weights(model, clip, path, table: LayerTable, names) -> dict[str, torch.Tensor]:
    """Each layer's weight in ComfyUI's models patched with the file by ``load_lora_for_models``,
    as ComfyUI patches them before it runs them (``load_models_gpu``)."""
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    loaded_model, loaded_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    comfy.model_management.load_models_gpu([loaded_model, loaded_clip.patcher], force_full_load=True)
    weights = loaded_model.model.state_dict() | loaded_clip.cond_stage_model.state_dict()
    keys = {n: key_map[kohya_module_key(n, table)] for n in names}
    return {n: weights[key].clone() for n, key in keys.items() if key in weights}


def layer_weights(pipe, names) -> dict[str, torch.Tensor]:
    modules = DiffusersBackend(pipe, device="cpu").modules()
    return {n: modules[n].weight.detach().clone() for n in names}


def noise_prediction(pipe, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The pipeline's UNet prediction for two prompts at fixed latents and timesteps, with these
    layer weights put in first."""
    backend = DiffusersBackend(pipe, device="cpu")
    modules = backend.modules()
    with torch.no_grad():
        for name, weight in (weights or {}).items():
            modules[name].weight.copy_(weight.reshape(modules[name].weight.shape))
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        cond = TextBatch.cat(backend.encode_text(PROMPTS))
        return backend.predict_noise(latents, torch.tensor([999, 300]), cond)


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], effect: dict[str, torch.Tensor]):
    """Layer -> ||got - want|| / ||the LoRA's change of that layer||."""
    return {n: float((got[n].reshape(want[n].shape) - want[n]).norm() / effect[n].norm()) for n in want}


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sdxl"])
def case(request, comfy_nodes):
    spec = TinySpec(sdxl=request.param)
    pipe = build_tiny_pipeline(spec, seed=0)
    table = DiffusersBackend(pipe, device="cpu").layer_table()
    deltas = mixed_rank_deltas(table)
    ranks = {n: d.rank for n, d in deltas.items()}
    # the groups diffusers read wrongly have ranks other than the most common one
    assert Counter(ranks.values()).most_common(1)[0][0] == 4
    assert {r for n, r in ranks.items() if re.match(MID_BLOCK_ATTENTION, n)} == {8}
    assert {r for n, r in ranks.items() if re.match(r"text_encoder\..*\.mlp\.", n)} == {2}
    base = layer_weights(pipe, deltas)
    changes = {n: d.dense().reshape(base[n].shape) for n, d in deltas.items()}
    return dict(spec=spec, table=table, merged=MergedLora(deltas, table), base=base, changes=changes,
                model=comfy_model(pipe, spec), clip=comfy_clip(pipe, spec), base_output=noise_prediction(pipe))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_diffusers_and_comfyui_load_a_mixed_rank_file_to_the_merged_model(case, tmp_path, dtype):
    path = case["merged"].save(tmp_path / "merged.safetensors", dtype=dtype)
    base, changes = case["base"], case["changes"]
    intended = {n: base[n] + changes[n] for n in changes}
    pipe = diffusers_loaded(case["spec"], path)
    loaded = {"diffusers": layer_weights(pipe, changes),
              "ComfyUI": comfy_loaded_weights(case["model"], case["clip"], path, case["table"], changes)}
    assert set(loaded["ComfyUI"]) == set(changes)

    apart = relative_errors(loaded["diffusers"], loaded["ComfyUI"], changes)
    apart = {n: round(e, 4) for n, e in apart.items() if e >= TOLERANCE}
    assert not apart, f"diffusers and ComfyUI load these layers differently (difference / the layer's change): {apart}"
    merge_tolerance = TOLERANCE if dtype == "fp32" else FP16_TOLERANCE
    for loader, weights in loaded.items():
        errors = relative_errors(weights, intended, changes)
        wrong = {n: round(e, 4) for n, e in errors.items() if e >= merge_tolerance}
        assert not wrong, f"{loader} loads these layers off the merge (error / the layer's change): {wrong}"

    reference = build_tiny_pipeline(case["spec"], seed=0)
    merged_output = noise_prediction(reference, intended)
    effect = (merged_output - case["base_output"]).norm()
    outputs = {"diffusers": noise_prediction(pipe), "ComfyUI": noise_prediction(reference, loaded["ComfyUI"])}
    apart = float((outputs["diffusers"] - outputs["ComfyUI"]).norm() / effect)
    assert apart < TOLERANCE, f"the two models' predictions differ by {apart:.3g} of the LoRA's effect"
    for loader, output in outputs.items():
        error = float((output - merged_output).norm() / effect)
        assert error < merge_tolerance, f"{loader}'s prediction is off the merge's by {error:.3g} of the LoRA's effect"


def test_every_layer_has_one_alpha_and_our_reader_gets_the_merge_back(case, tmp_path):
    merged = case["merged"]
    path = merged.save(tmp_path / "merged.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as file:
        alphas = {float(file.get_tensor(k)) for k in file.keys() if k.endswith(".alpha")}
        ranks = {k.removesuffix(".lora_down.weight"): file.get_slice(k).get_shape()[0] for k in file.keys()
                 if k.endswith(".lora_down.weight")}
        metadata = file.metadata()
    assert alphas == {4.0}                       # the most common rank
    written = json.loads(metadata["iteris_ranks"])
    assert {kohya_module_key(n, case["table"]): r for n, r in written.items()} == ranks
    back = load_lora(path, case["table"])
    assert set(back.layers) == set(merged.layers)
    for name, delta in merged.layers.items():
        error = (back.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-6, name


def test_file_alpha_is_the_most_common_rank():
    assert file_alpha([4, 4, 8, 2]) == 4.0
    assert file_alpha([16] * 3) == 16.0           # one rank: alpha = rank, every scale 1 as before
    assert file_alpha([4, 8, 8, 4]) == 8.0        # a tie: the larger
    assert file_alpha([]) == 1.0
