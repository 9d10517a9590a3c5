"""The engine on tiny diffusers Flux.1 (dev, schnell) and SD3.5 pipelines: the backend samples as the
pipelines do, reads LoRAs in kohya, diffusers/PEFT and ai-toolkit spellings exactly (against
diffusers' and ComfyUI's own loaders and key maps), merges one LoRA back to itself and two through
the API and the CLI, and writes files diffusers and ComfyUI load completely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iteris_core import Concept, MergeSettings, SamplingSettings, merge_loras
from iteris_core.api import open_backend
from iteris_core.backends.diffusers_dit import DitBackend, pack
from iteris_core.backends.dit_keys import flux_modules, spellings, split_native
from iteris_core.backends.tiny import random_lora_deltas
from iteris_core.cli import main
from iteris_core.errors import BaseModelMismatchError, IterisError
from iteris_core.layers import LayerTable, input_group
from iteris_core.lora_formats import parse_lora
from iteris_core.lora_io import LoraFile, read_lora_file
from iteris_core.lora_writer import MergedLora
from safetensors.torch import save_file
from tiny_dit_pipelines import (AI_TOOLKIT_METADATA, T5_LENGTH, TinyFlux, ai_toolkit_tensors, build_tiny_flux,
                                build_tiny_sd3, kohya_tensors, save_peft_lora,
                                write_sd3_single_file)

BUILDERS = {"flux_dev": build_tiny_flux, "flux_schnell": lambda: build_tiny_flux(TinyFlux(guidance_embeds=False)),
            "sd3": build_tiny_sd3}
FAST = dict(samples_per_prompt=1, timesteps=2, steps=3, batch_size=2, seed=1, width=64, height=64)
COMPONENTS = {"flux_dev": ["transformer", "text_encoder"], "flux_schnell": ["transformer", "text_encoder"],
              "sd3": ["transformer", "text_encoder", "text_encoder_2"]}


def _backend(family: str, pipe=None) -> DitBackend:
    return DitBackend(pipe or BUILDERS[family](), "cpu", torch.float32, max_sequence_length=T5_LENGTH)


@pytest.fixture(scope="module")
def backends() -> dict[str, DitBackend]:
    return {family: _backend(family) for family in BUILDERS}


def _fast(**changes) -> SamplingSettings:
    return SamplingSettings(**{**FAST, **changes})


def _dense(module) -> torch.Tensor:
    """A parsed LoRA module's delta as kohya/ComfyUI apply it: ``up @ down * alpha / rank``."""
    up, down = module.parts["up"].flatten(1).float(), module.parts["down"].flatten(1).float()
    scale = 1.0 if module.alpha is None else module.alpha / down.shape[0]
    return up @ down * scale


def test_dit_layers_share_the_inputs_they_read():
    """Flux single blocks: q, k, v and proj_mlp read one input; SD3.5's attn2 reads its block's image
    tokens (not the text context, as an SD UNet's attn2 k/v do)."""
    single = "unet.single_transformer_blocks.3"
    assert {input_group(f"{single}.{p}") for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")} == \
        {f"{single}.<input>"}
    assert input_group("unet.transformer_blocks.0.attn2.to_q") == input_group("unet.transformer_blocks.0.attn2.to_v")
    assert input_group("unet.transformer_blocks.1.attn2.to_k") != input_group("unet.transformer_blocks.0.attn2.to_k")
    assert input_group("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "unet.<text context>"


def test_extra_aliases_may_not_rename_a_layer(backends):
    table = backends["sd3"].layer_table()
    name = "unet.transformer_blocks.0.attn.to_q"
    assert table.resolve("transformer.transformer_blocks.0.attn.to_q") == name
    assert table.resolve("lora_transformer_transformer_blocks_0_attn_to_q") == name
    with pytest.raises(ValueError, match="would name both"):
        LayerTable(table.layers, extra_aliases={"lora_unet_transformer_blocks_0_attn_to_q": "unet.proj_out"})


# --- sampling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family, cfg, distilled", [("flux_dev", 1.0, 3.5), ("flux_dev", 2.0, 4.0),
                                                     ("flux_schnell", 1.0, None), ("sd3", 4.5, None),
                                                     ("sd3", 1.0, None)])
def test_sampling_follows_the_pipeline(backends, family, cfg, distilled):
    """Every step's latents equal the diffusers pipeline's for the same seeds: conditioning, packing,
    image ids, flow-matching schedule (shift or mu), guidance embedding and true/batched CFG."""
    backend = backends[family]
    settings = _fast(steps=4, timesteps=4, guidance=cfg, distilled_guidance=distilled)
    positive, negative = backend.encode_text(["a photo of sks cat", ""])
    negative = negative if settings.uses_cfg else None
    steps_seen = []
    kept = backend.sample(positive, negative, [5, 6], settings, [0, 1, 2, 3], steps_seen.append)
    assert steps_seen == [0, 1, 2, 3]

    caught = []

    def record(pipe, step, t, tensors):
        caught.append((t.clone(), tensors["latents"].clone()))
        return {}

    args = dict(prompt=["a photo of sks cat"] * 2, height=64, width=64, num_inference_steps=4,
                max_sequence_length=T5_LENGTH, output_type="latent", callback_on_step_end=record,
                generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    if family.startswith("flux"):
        args.update(guidance_scale=distilled or 3.5, true_cfg_scale=cfg)
        if cfg > 1:
            args["negative_prompt"] = [""] * 2
    else:
        args.update(guidance_scale=cfg)
    backend.pipe(**args)
    for step in range(1, 4):   # the pipeline's latents after step k-1 are what step k reads
        mine = torch.stack([kept[j][step].latent for j in range(2)])
        mine = pack(mine) if backend.recipe.packs_latents else mine
        expected = caught[step - 1][1]
        assert torch.allclose(mine, expected, rtol=1e-5, atol=1e-5), (step, float((mine - expected).abs().max()))
        assert kept[0][step].timestep == caught[step][0]


def test_guidance_and_cfg_change_the_samples(backends):
    """The sampling test can fail: Flux.1 dev's embedded guidance and the negative prompt matter."""
    backend = backends["flux_dev"]
    positive, negative = backend.encode_text(["a photo of sks cat", ""])
    final = {}
    for label, settings, neg in [("3.5", _fast(guidance=1.0, distilled_guidance=3.5), None),
                                 ("1.0", _fast(guidance=1.0, distilled_guidance=1.0), None),
                                 ("cfg", _fast(guidance=3.0, distilled_guidance=3.5), negative)]:
        final[label] = backend.sample(positive, neg, [5], settings, [2], lambda step: None)[0][0].latent
    assert (final["3.5"] - final["1.0"]).abs().max() > 1e-4
    assert (final["3.5"] - final["cfg"]).abs().max() > 1e-4


def test_sides_must_fit_the_latent_patches(backends):
    with pytest.raises(Exception, match="multiples of 16"):
        backends["flux_dev"].resolution(SamplingSettings(width=72, height=64))


# --- reading LoRAs -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["flux_dev", "sd3"])
def test_a_diffusers_lora_reads_as_diffusers_loads_it(tmp_path, family):
    """A LoRA saved by diffusers' ``save_lora_weights`` (PEFT keys, lora_alpha != r in the
    metadata): our deltas equal what ``load_lora_weights`` + ``fuse_lora`` add to the weights."""
    path = save_peft_lora(BUILDERS[family], tmp_path / "lora", seed=3)
    fresh = BUILDERS[family]()
    backend = _backend(family, fresh)
    lora = backend.read_lora(read_lora_file(path))
    base = {n: m.weight.detach().clone() for n, m in backend.modules().items()}
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora(components=COMPONENTS[family], lora_scale=1.0)
    fresh.unload_lora_weights()
    after = {n: m.weight.detach() for n, m in DitBackend(fresh, "cpu", torch.float32).modules().items()}
    changed = {n for n in base if not torch.equal(after[n], base[n])}
    assert changed == set(lora.layers)
    assert any(n.startswith("text_encoder.") for n in changed) and any(n.startswith("unet.") for n in changed)
    for name, delta in lora.layers.items():
        assert delta.scale != 1.0 or name.startswith("text_encoder.")  # alpha 8 over rank 4: the scale is read
        assert torch.allclose((after[name] - base[name]).flatten(1), delta.dense(), atol=1e-6), name


def test_an_xlabs_lora_reads_as_diffusers_loads_it(tmp_path):
    """XLabs' Flux layout (attention processors' qkv_lora1/proj_lora2..., fused qkv, no alpha),
    read through diffusers' converter: our deltas are what ``load_lora_weights`` fuses in."""
    generator = torch.Generator().manual_seed(8)
    tensors = {}
    for name, out in (("qkv_lora1", 96), ("qkv_lora2", 96), ("proj_lora1", 32), ("proj_lora2", 32)):
        key = f"double_blocks.0.processor.{name}"
        tensors[f"{key}.down.weight"] = torch.randn(4, 32, generator=generator) / 6
        tensors[f"{key}.up.weight"] = torch.randn(out, 4, generator=generator) / 6
    path = tmp_path / "xlabs.safetensors"
    save_file(tensors, str(path))
    fresh = build_tiny_flux()
    backend = _backend("flux_dev", fresh)
    lora = backend.read_lora(read_lora_file(path))
    base = {n: m.weight.detach().clone() for n, m in backend.modules().items()}
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora(components=["transformer"], lora_scale=1.0)
    fresh.unload_lora_weights()
    after = {n: m.weight.detach() for n, m in backend.modules().items()}
    changed = {n for n in base if not torch.equal(after[n], base[n])}
    assert changed == set(lora.layers) and len(changed) == 8
    for name, delta in lora.layers.items():
        assert torch.allclose(after[name] - base[name], delta.dense(), atol=1e-6), name


def test_ai_toolkit_lora_reads_at_scale_one(backends):
    """ai-toolkit's spelling (``transformer.<path>.lora_A/B``, no alpha) and its metadata, which
    wrongly says SD1.5: the keys decide the family, the scale is 1."""
    backend = backends["flux_dev"]
    tensors = ai_toolkit_tensors(backend, seed=4)
    lora = backend.read_lora(LoraFile("aitk.safetensors", tensors, dict(AI_TOOLKIT_METADATA)))
    assert len(lora.layers) == len(tensors) // 2
    for name, delta in lora.layers.items():
        path = name.removeprefix("unet.")
        expected = tensors[f"transformer.{path}.lora_B.weight"] @ tensors[f"transformer.{path}.lora_A.weight"]
        assert torch.allclose(delta.dense(), expected, atol=1e-6), name


def _comfy_rows(entry, native_rows: int) -> torch.Tensor:
    """Which rows of the original module a ComfyUI ``*_to_diffusers`` map entry takes."""
    rows = torch.arange(native_rows)
    if isinstance(entry, str):
        return rows
    if entry[1] is None:            # (key, None, function): the rows rearranged (swap_scale_shift)
        return entry[2](rows)
    _, (_, start, length) = entry
    return rows[start:start + length]


def _comfy_map(family: str):
    """ComfyUI's own original-name -> diffusers map (ComfyUI imported by the ``comfy_nodes`` fixture,
    with the session's base directory, which a bare import here would pin to the default)."""
    import comfy.utils

    if family == "sd3":
        return comfy.utils.mmdit_to_diffusers({"depth": 2}, output_prefix="")
    return comfy.utils.flux_to_diffusers({"depth": 1, "depth_single_blocks": 1, "hidden_size": 32}, output_prefix="")


@pytest.mark.parametrize("family", ["flux_dev", "sd3"])
def test_original_module_names_match_comfyuis_maps(backends, family, comfy_nodes):
    """Every original module's split (which diffusers layers get which rows) is the one ComfyUI's
    own ``flux_to_diffusers`` / ``mmdit_to_diffusers`` maps give, and every layer of the model that
    ComfyUI maps from an original module is covered."""
    backend = backends[family]
    comfy_map = _comfy_map(family)
    covered = set()
    for module in backend.native_modules:
        for part in module.parts:
            entry = comfy_map[part.path + ".weight"]
            native_key = entry if isinstance(entry, str) else entry[0]
            assert native_key == module.name + ".weight", (part.path, native_key)
            mine = torch.cat([torch.arange(module.out_features)[s:s + n] for s, n in part.rows])
            assert torch.equal(mine, _comfy_rows(entry, module.out_features)), part.path
            covered.add(part.path)
    layers = {n.removeprefix("unet.") for n in backend.layer_table().in_component("unet")}
    assert {k.removesuffix(".weight") for k in comfy_map if k.endswith(".weight")} & layers == covered


def test_flux_split_equals_diffusers_kohya_converter_at_full_width():
    """At Flux.1's real widths (3072, 12288), where diffusers' kohya converter applies, our split of
    a kohya file gives the same deltas, the ranks of sparse fused factors (q, k, v trained apart)
    included. (diffusers' converter ignores the final layer's alpha, so that one is alpha = rank.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    hidden, mlp = 3072, 12288
    modules = flux_modules(1, 1, hidden, mlp, 64)
    widths = {"double_blocks.0.img_mlp.2": mlp, "double_blocks.0.txt_mlp.2": mlp,   # input widths
              "single_blocks.0.linear2": hidden + mlp, "img_in": 64, "txt_in": 4096, "vector_in.in_layer": 768}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module in modules:
        if module.name.startswith(("guidance_in", "time_in")):
            continue
        key = "lora_unet_" + module.name.replace(".", "_")
        rank = 6 if module.name.endswith("qkv") else 2
        up = torch.randn(module.out_features, rank, generator=generator)
        if module.name == "double_blocks.0.img_attn.qkv":   # block-sparse: each of q, k, v its own 2 columns
            for j in range(3):
                mask = torch.ones_like(up[j * hidden:(j + 1) * hidden], dtype=torch.bool)
                mask[:, 2 * j:2 * j + 2] = False
                up[j * hidden:(j + 1) * hidden][mask] = 0
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, widths.get(module.name, hidden), generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) if module.name.startswith("final") else 4.0)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    ours = split_native(parse_lora(LoraFile("k.safetensors", tensors)), modules, "transformer.")
    assert len(ours.modules) == len(theirs) // 2
    converted = {k.rsplit(".lora_", 1)[0] for k in theirs}
    for module in ours.modules:   # (diffusers' converter leaves the final layer without "transformer.")
        key = module.key if module.key in converted else module.key.removeprefix("transformer.")
        up, down = theirs[f"{key}.lora_B.weight"].float(), theirs[f"{key}.lora_A.weight"].float()
        probe = torch.randn(down.shape[1], 4, generator=generator)   # delta @ probe: the deltas, never formed
        scale = module.alpha / module.parts["down"].shape[0]
        mine = module.parts["up"] @ (module.parts["down"] @ probe) * scale
        assert torch.allclose(mine, up @ (down @ probe), rtol=1e-4, atol=1e-3), module.key
        assert module.parts["down"].shape[0] == down.shape[0], module.key


@pytest.mark.parametrize("family", ["flux_dev", "sd3"])
def test_kohya_lora_is_split_as_comfyui_splits_it(backends, family, comfy_nodes):
    """A kohya file on the original names (fused qkv, Flux's linear1, the swapped final
    modulation) and kohya text-encoder names (CLIP-L te1, T5 te3): each layer's delta is the rows
    ComfyUI's map gives it of ``up @ down * alpha / rank``."""
    backend = backends[family]
    t5 = "text_encoder_2" if family == "flux_dev" else "text_encoder_3"
    text = ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    tensors = kohya_tensors(backend, seed=5, text_modules=text)
    lora = backend.read_lora(LoraFile("kohya.safetensors", tensors))
    comfy_map = _comfy_map(family)
    parsed = {m.key: m for m in parse_lora(LoraFile("kohya.safetensors", tensors)).modules}
    for name, delta in lora.layers.items():
        if not name.startswith("unet."):
            continue
        entry = comfy_map[name.removeprefix("unet.") + ".weight"]
        native = (entry if isinstance(entry, str) else entry[0]).removesuffix(".weight")
        whole = _dense(parsed["lora_unet_" + native.replace(".", "_")])
        assert torch.allclose(delta.dense(), whole[_comfy_rows(entry, whole.shape[0])], atol=1e-6), name
    assert {n for n in lora.layers if not n.startswith("unet.")} == {
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj", f"{t5}.encoder.block.0.layer.0.SelfAttention.q"}
    linear = [m for m in backend.native_modules if backend.layer_table()[f"unet.{m.parts[0].path}"].kind == "linear"]
    assert len([n for n in lora.layers if n.startswith("unet.")]) == sum(len(m.parts) for m in linear)
    # ComfyUI's spelling of the same file (dotted original names, text_encoders.<name>.transformer.)
    comfy_names = {spellings(m)[0]: spellings(m)[2] for m in backend.native_modules}
    comfy_names.update({text[0]: "text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj",
                        text[1]: "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"})
    respelled = {comfy_names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}
    again = backend.read_lora(LoraFile("comfy.safetensors", respelled))
    assert set(again.layers) == set(lora.layers)
    assert all(torch.equal(again.layers[n].dense(), d.dense()) for n, d in lora.layers.items())


def test_lokr_and_full_diffs_on_fused_modules_are_split_exactly(backends):
    """LyCORIS adapters on fused modules (LoKr on Flux's img_attn.qkv, a full difference on linear1):
    each part's delta is its rows of the whole module's delta."""
    backend = backends["flux_dev"]
    generator = torch.Generator().manual_seed(9)
    w1, w2 = torch.randn(4, 4, generator=generator), torch.randn(24, 8, generator=generator) / 10
    diff = torch.randn(224, 32, generator=generator) / 10
    qkv_key = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {f"{qkv_key}.lokr_w1": w1, f"{qkv_key}.lokr_w2": w2, "lora_unet_single_blocks_0_linear1.diff": diff}
    lora = backend.read_lora(LoraFile("lycoris.safetensors", tensors))
    qkv = torch.kron(w1, w2)
    block, single = "unet.transformer_blocks.0.attn", "unet.single_transformer_blocks.0"
    expected = {f"{block}.to_q": qkv[:32], f"{block}.to_k": qkv[32:64], f"{block}.to_v": qkv[64:],
                f"{single}.attn.to_q": diff[:32], f"{single}.attn.to_k": diff[32:64],
                f"{single}.attn.to_v": diff[64:96], f"{single}.proj_mlp": diff[96:]}
    assert set(lora.layers) == set(expected)
    for name, rows in expected.items():
        assert torch.allclose(lora.layers[name].dense(), rows, atol=1e-5), name


def test_a_lora_for_another_family_is_refused(backends):
    sd3_lora = kohya_tensors(backends["sd3"], seed=6, include=r"joint_blocks\.0\.x_block\.attn\.qkv")
    with pytest.raises(BaseModelMismatchError, match="SD3"):
        backends["flux_dev"].read_lora(LoraFile("sd3.safetensors", sd3_lora))
    flux_lora = kohya_tensors(backends["flux_dev"], seed=6, include=r"single_blocks")
    with pytest.raises(BaseModelMismatchError, match="Flux"):
        backends["sd3"].read_lora(LoraFile("flux.safetensors", flux_lora))


def test_a_fused_module_of_the_wrong_width_names_the_key(backends):
    tensors = kohya_tensors(backends["flux_dev"], seed=7, include=r"double_blocks\.0\.img_attn\.qkv")
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(64, 3)
    with pytest.raises(IterisError, match="double_blocks.0.img_attn.qkv has 96 output rows"):
        backends["flux_dev"].read_lora(LoraFile("bad.safetensors", tensors))


def test_the_real_ai_toolkit_file_places_on_a_full_size_flux(samples_dir):
    """The published ai-toolkit Flux LoRA lands on four single-block projections of a full-size
    FLUX.1 transformer (built on the meta device: no weights)."""
    from diffusers import FluxTransformer2DModel

    from iteris_core.backends.diffusers_dit import FLUX, dit_modules, dit_table
    from iteris_core.families import check_lora_family, family_by_id
    from iteris_core.lora_normalize import normalize_lora

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
    table = dit_table(FLUX, dit_modules(FLUX, transformer, {}), "flux_dev")
    lora = read_lora_file(samples_dir / "flux1_peft_aitoolkit_r16_fp16.safetensors")
    check_lora_family(lora.name, lora.tensors, lora.metadata, family_by_id("flux_dev"))
    placed = normalize_lora(parse_lora(lora), table)
    assert sorted(placed.layers) == [f"unet.single_transformer_blocks.{i}.proj_out" for i in (12, 16, 20, 7)]
    assert {delta.rank for delta in placed.layers.values()} == {16}


# --- merging -----------------------------------------------------------------------------------

def _lora_file(kind: str, family: str, backend: DitBackend, tmp_path: Path, seed: int) -> Path:
    """A LoRA file for ``backend`` as a trainer writes it."""
    if kind == "diffusers":
        return save_peft_lora(BUILDERS[family], tmp_path / f"peft{seed}", seed=seed)
    if kind == "ai-toolkit":
        tensors, metadata = ai_toolkit_tensors(backend, seed), dict(AI_TOOLKIT_METADATA)
    else:
        t5 = ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0",)
        tensors, metadata = kohya_tensors(backend, seed, include=r"attn|mlp|linear|mod", text_modules=t5), {}
    path = tmp_path / f"{kind}{seed}.safetensors"
    save_file(tensors, str(path), metadata)
    return path


def _assert_reproduces(merged, lora, tolerance=2e-3):
    assert set(merged.layers) == set(lora.layers)
    for name, delta in lora.layers.items():
        error = (merged.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < tolerance, (name, float(error))


@pytest.mark.parametrize("family, kind", [("flux_dev", "kohya"), ("flux_dev", "diffusers"), ("flux_dev", "ai-toolkit"),
                                          ("flux_schnell", "kohya"), ("sd3", "kohya"), ("sd3", "diffusers")])
def test_one_lora_is_reproduced(backends, tmp_path, family, kind):
    """IterIS on a single LoRA returns it: every layer it changes, text encoders (CLIP, T5) and
    denoiser, read from each trainer's spelling."""
    backend = backends[family]
    path = _lora_file(kind, family, backend, tmp_path, seed=11)
    lora = backend.read_lora(read_lora_file(path))
    cfg = 4.5 if family == "sd3" else 1.0
    result = merge_loras(backend, [Concept(path, ["a photo of sks cat"])],
                         MergeSettings(iterations=1, sampling=_fast(guidance=cfg)))
    _assert_reproduces(result.lora, lora)
    touched = {n.split(".", 1)[0] for n in lora.layers}
    assert "unet" in touched and (len(touched) >= 2 or kind == "ai-toolkit")   # ai-toolkit trains the DiT only
    # a text encoder the LoRA leaves alone gets no statistics: only the LoRA's layers are merged
    assert {n.split(".", 1)[0] for n in result.report.layers} == touched


def test_two_loras_merge_through_the_api_with_grouped_statistics(backends, tmp_path):
    """Flux.1 dev with true CFG (two transformer calls per replay): two LoRAs merge to the exact
    rank, and a statistics budget that splits the layers into groups (each pass stopping after its
    group) gives the same LoRA."""
    backend = backends["flux_dev"]
    concepts = [Concept(_lora_file("kohya", "flux_dev", backend, tmp_path, 21), ["a photo of sks cat"]),
                Concept(_lora_file("ai-toolkit", "flux_dev", backend, tmp_path, 22), ["a painting in xyz style"],
                        negative_prompt="blurry")]
    settings = MergeSettings(iterations=2, tolerance=0, sampling=_fast(guidance=2.0, distilled_guidance=3.5))
    whole = merge_loras(backend, concepts, settings)
    loras = whole.inputs
    for name, delta in whole.lora.layers.items():
        assert delta.rank == sum(l.layers[name].rank for l in loras if name in l.layers), name
        assert torch.isfinite(delta.dense()).all()
    assert [r.stage for r in whole.report.iterations] == ["text"] * 3 + ["unet"] * 3
    budget = whole.report.memory["statistics_gb"] / 2   # the unet stage's statistics no longer fit at once
    grouped = merge_loras(backend, concepts, settings.replace(statistics_budget_gb=budget))
    assert len(grouped.report.memory["group_counts"]) == 2 and grouped.report.memory["group_counts"][1] > 1
    for name, delta in whole.lora.layers.items():
        error = (grouped.lora.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-4, (name, float(error))


def test_sd3_merge_with_cfg_and_t5_layers(backends, tmp_path):
    backend = backends["sd3"]
    concepts = [Concept(_lora_file("kohya", "sd3", backend, tmp_path, 31), ["a photo of sks cat"]),
                Concept(_lora_file("diffusers", "sd3", backend, tmp_path, 32), ["a painting in xyz style"])]
    result = merge_loras(backend, concepts, MergeSettings(iterations=1, sampling=_fast(guidance=4.5)))
    assert any(n.startswith("text_encoder_3.") for n in result.lora.layers)
    assert any(n.startswith("unet.transformer_blocks.0.attn2.") for n in result.lora.layers)
    assert result.report.base["architecture"] == "sd3"


def test_cli_merges_a_flux_folder_with_the_familys_defaults(tmp_path, capsys):
    """``python -m iteris_core merge`` on a saved diffusers Flux.1 dev folder: it samples without
    CFG at guidance 3.5 (the family's defaults), and its file holds the API's merge of the same LoRAs."""
    pipe = build_tiny_flux()
    folder = tmp_path / "tiny-flux"
    pipe.save_pretrained(folder)
    backend = open_backend(folder, device="cpu")
    assert isinstance(backend, DitBackend) and backend.architecture == "flux_dev"
    assert open_backend(folder, device="cpu", dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
    a = _lora_file("kohya", "flux_dev", backend, tmp_path, 41)
    b = _lora_file("ai-toolkit", "flux_dev", backend, tmp_path, 42)
    out, report = tmp_path / "merged.safetensors", tmp_path / "report.json"
    code = main(["merge", "--base", str(folder), "--lora", str(a), "--prompt", "a photo of sks cat", "--lora", str(b),
                 "--prompt", "a painting in xyz style", "--out", str(out), "--report", str(report), "--samples", "1",
                 "--timesteps", "2", "--steps", "3", "--iterations", "1", "--width", "64", "--height", "64",
                 "--device", "cpu", "--save-dtype", "fp32", "--quiet"])
    assert code == 0
    sampling = json.loads(report.read_text())["settings"]["sampling"]
    assert sampling["guidance"] == 1.0 and sampling["distilled_guidance"] is None
    api = merge_loras(backend, [Concept(a, ["a photo of sks cat"]), Concept(b, ["a painting in xyz style"])],
                      MergeSettings(iterations=1, sampling=SamplingSettings(**{**FAST, "seed": 0, "batch_size": 4},
                                                                             guidance=1.0)))
    written = backend.read_lora(read_lora_file(out))
    main(["inspect", str(a), "--base", str(folder)])   # a kohya file's fused modules, split by the backend
    assert f"places on {len(backend.read_lora(read_lora_file(a)).layers)} layers of flux_dev" in capsys.readouterr().out
    assert set(written.layers) == set(api.lora.layers)
    for name, delta in api.lora.layers.items():
        error = (written.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < 1e-5, (name, float(error))


def test_a_single_file_transformer_needs_its_config_folder(tmp_path, backends):
    state = {f"model.diffusion_model.{m.name}.weight": torch.zeros(1) for m in backends["flux_dev"].native_modules}
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(state, str(path))
    with pytest.raises(IterisError, match="--config DIR"):
        open_backend(path, device="cpu")
    with pytest.raises(IterisError, match="not an option"):
        open_backend(path, device="cpu", tokenizer="somewhere")


def test_an_sd3_single_file_loads_with_its_config_folder(tmp_path, comfy_nodes):
    """An SD3 checkpoint in SAI's names (fused qkv, swapped final modulation) with a diffusers
    folder for the rest: the backend's transformer has exactly the checkpoint's weights."""
    pipe = build_tiny_sd3()
    folder = tmp_path / "tiny-sd3"
    pipe.save_pretrained(folder)
    path = write_sd3_single_file(pipe.transformer, tmp_path / "sd3-tiny.safetensors")
    backend = open_backend(path, device="cpu", config=folder)
    assert isinstance(backend, DitBackend) and backend.architecture == "sd3"
    loaded = backend.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(IterisError, match="not a diffusers StableDiffusion3Pipeline folder"):
        open_backend(path, device="cpu", config=tmp_path)


# --- the merged file in diffusers and ComfyUI ----------------------------------------------------

def _every_layer(backend: DitBackend, seed: int) -> MergedLora:
    table = backend.layer_table()
    components = tuple(table.components)
    return MergedLora(random_lora_deltas(table, seed, rank=3, scale=0.2, components=components, include=r"."), table)


_NOT_IN_DIFFUSERS = (r"^text_encoder_3\.", r"\.text_projection$")   # its Flux/SD3 loaders do not target these


@pytest.mark.parametrize("family", ["flux_dev", "sd3"])
def test_the_merged_spelling_loads_completely_in_diffusers(tmp_path, family):
    """The spelling the table asks for (``file_keys``, PEFT suffixes, scale folded): diffusers'
    ``load_lora_weights`` patches every denoiser and CLIP encoder layer with its delta; the only
    layers left are those its loaders never target (T5, CLIP projections)."""
    import re

    backend = _backend(family)
    merged = _every_layer(backend, seed=51)
    path = tmp_path / "merged.safetensors"
    merged.save(path, dtype="fp32")
    fresh = BUILDERS[family]()
    base = {n: m.weight.detach().clone() for n, m in _backend(family, fresh).modules().items()}
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora(components=COMPONENTS[family], lora_scale=1.0)
    fresh.unload_lora_weights()
    after = _backend(family, fresh).modules()
    t5 = "text_encoder_2" if family.startswith("flux") else "text_encoder_3"
    skipped = [p.replace("text_encoder_3", t5) for p in _NOT_IN_DIFFUSERS]
    for name in merged.layers:
        change = (after[name].weight.detach() - base[name]).flatten(1)
        if any(re.search(p, name) for p in skipped):
            assert not change.any(), name
        else:
            assert torch.allclose(change, merged.layers[name].dense(), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["flux_dev", "sd3"])
def test_the_merged_spelling_loads_completely_in_comfyui(family, comfy_nodes):
    """ComfyUI's own key maps (``model_lora_keys_unet``/``_clip`` of ComfyUI models of the same
    configs, on the meta device) place every key of that file, and its LoRA parser reads the
    delta we wrote for each layer (on the rows of the fused weight the map names)."""
    import comfy.lora
    import comfy.supported_models
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    backend = _backend(family)
    merged = _every_layer(backend, seed=52)
    with torch.device("meta"):
        if family == "sd3":
            config = dict(in_channels=4, patch_size=2, out_channels=4, depth=2, input_size=None, adm_in_channels=32,
                          context_embedder_config={"target": "torch.nn.Linear",
                                                   "params": {"in_features": 48, "out_features": 128}},
                          num_patches=1024, pos_embed_max_size=32, pos_embed_scaling_factor=None, qk_norm="rms",
                          x_block_self_attn_layers=[0])
            model = comfy.supported_models.SD3(config).get_model({}, device="meta")
            clip = comfy.text_encoders.sd3_clip.SD3ClipModel(device="meta", model_options={
                "t5xxl_model_config": {"d_model": 48, "d_ff": 96, "d_kv": 8, "num_heads": 2, "num_layers": 2},
                "model_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                 "num_hidden_layers": 2, "projection_dim": 16}})
        else:
            config = {"image_model": "flux", "axes_dim": [4, 6, 6], "num_heads": 2, "mlp_ratio": 4.0, "theta": 10000,
                      "out_channels": 4, "qkv_bias": True, "in_channels": 4, "hidden_size": 32, "patch_size": 2,
                      "context_in_dim": 32, "vec_in_dim": 32, "depth": 1, "depth_single_blocks": 1,
                      "guidance_embed": True}
            model = comfy.supported_models.Flux(config).get_model({}, device="meta")
            clip = comfy.text_encoders.flux.FluxClipModel(device="meta", model_options={
                "t5xxl_model_config": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 2},
                "model_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                 "num_hidden_layers": 2}})
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    patches = comfy.lora.load_lora(merged.state_dict(torch.float32), key_map, log_missing=False)
    for name, delta in merged.layers.items():
        target = key_map[merged.table.file_keys[name]]
        up, down, alpha = patches[target].weights[:3]
        assert alpha is None
        assert torch.allclose(up.flatten(1) @ down.flatten(1), delta.dense(), atol=1e-6), name
    assert len(patches) == len(merged.layers)


def test_the_writers_file_loads_in_diffusers(tmp_path):
    backend = _backend("sd3")
    path = _every_layer(backend, seed=53).save(tmp_path / "merged.safetensors", dtype="fp32")
    fresh = build_tiny_sd3()
    fresh.load_lora_weights(str(path))   # SD3's loader refuses keys without 'lora' (the .alpha ones)
    assert any("lora" in k for k in fresh.transformer.state_dict())
