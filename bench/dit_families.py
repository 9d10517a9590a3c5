"""Tiny random-weight DiT models of six ComfyUI families, with text encoders ComfyUI loads for them.

Every model is built from ComfyUI's own classes on the meta device, filled with random tensors (norm
scales 1, biases 0, other weights N(0, 1/fan_in): activations stay finite) and written in bf16 as the
files users have: a bare diffusion-model ``.safetensors`` that ``comfy.sd.load_diffusion_model`` (the
UNETLoader path) detects as the family, and one ``.safetensors`` per text encoder that
``comfy.sd.load_clip`` (the CLIPLoader / DualCLIPLoader path) detects and loads with the model options
of :func:`text_encoder_options`. :func:`write_vae` adds the VAE that decodes the family's latents
through ComfyUI's stock ``VAELoader`` -> ``VAEDecode`` nodes: a random TAESD pair (``taef1`` for
Flux, Chroma and Z-Image, ``taesd3`` for SD3; 1.2 M parameters each half) in ``models/vae_approx``, or
for Qwen-Image's 5-D latent a Wan 2.1 VAE of base width 2 (68 k parameters) in ``models/vae``.

ComfyUI's detection hard-codes several widths (Flux/Chroma hidden 3072, Z-Image 3840, the Qwen-Image
text width 3584, T5-XXL single files 24 blocks of 4096), so the "tiny" Flux, Chroma, Z-Image and
Qwen-Image keep their full width with one block of each kind (0.4-0.9 B parameters); SD3 shrinks to
one joint block. A family is data: one :class:`TinyFamily` in :data:`FAMILY_TABLE`.

Run as a script to build, load, encode, sample and decode every family (one process per family, so
each peak RSS is that family's own)::

    python -m bench.dit_families                 # all six
    python -m bench.dit_families chroma sd3      # some
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.checkpoints import random_tensor, write_checkpoint
from bench.common import machine, machine_line, markdown_table, peak_rss_gb, rss_gb

if TYPE_CHECKING:
    import comfy.sd


@dataclass(frozen=True)
class VaeFile:
    """One random VAE file: the ComfyUI module it is written from."""

    file_name: str
    module_class: str
    """Dotted path of ComfyUI's module (class or factory); called as ``cls(**kwargs)``."""
    kwargs: dict
    """Constructor arguments; ComfyUI must build the same shapes back from the file's keys."""


@dataclass(frozen=True)
class TinyVae:
    """A VAE as ComfyUI's stock ``VAELoader`` finds it: widget value, models folder, files."""

    vae_name: str
    """What goes in ``VAELoader``'s ``vae_name`` widget."""
    folder: str
    """``folder_paths`` name the files go to: ``vae_approx`` (TAESD pairs) or ``vae``."""
    files: tuple[VaeFile, ...]


@dataclass(frozen=True)
class TextEncoderFile:
    """One random text-encoder file: which ComfyUI class it is written from and how it is loaded."""

    name: str
    """File-name part and ComfyUI's own name for the encoder (``clip_l``, ``t5xxl``, ``qwen3_4b``...)."""
    module_class: str
    """Dotted path of ComfyUI's module class; called as ``cls(config, dtype, device, operations)``."""
    base_config: str | None
    """ComfyUI's JSON config (relative to the ``comfy`` package) the overrides apply to; ``None``
    for the Llama-type classes, whose config is a dataclass filled from the overrides."""
    overrides: dict
    """Config entries that make it tiny; ComfyUI must get the same ones back when loading."""
    options_key: str
    """``model_options`` key under which ComfyUI's loader reads ``overrides``."""
    drop_prefixes: tuple[str, ...] = ()
    """State-dict prefixes left out of the file (parts ComfyUI builds but text prompts never use)."""


@dataclass(frozen=True)
class TinyFamily:
    """A ComfyUI model family as data: the diffusion model, its text encoders, how to sample it."""

    name: str
    supported_model: str
    """Name of the ``comfy.supported_models`` class ComfyUI's detection must pick."""
    unet_config: dict
    """The diffusion-model config exactly as ``comfy.model_detection.detect_unet_config`` reads it
    back from the file."""
    text_encoders: tuple[TextEncoderFile, ...]
    clip_type: str
    """``comfy.sd.CLIPType`` member to load the text encoders with."""
    context_width: int
    """Width of the encoded prompt the diffusion model reads (its text-input width)."""
    latent_channels: int
    latent_ndim: int
    """4 for image latents ``[B, C, H, W]``; 5 for video-VAE latents ``[B, C, T=1, H, W]``."""
    cfg: float
    """A usual CFG scale; 1.0 means the negative prompt is skipped (guidance-distilled models)."""
    vae: str
    """Key of :data:`VAE_TABLE`: the VAE that decodes the family's latents."""
    conditioning: dict = field(default_factory=dict)
    """Values a workflow adds to every conditioning (FluxGuidance's ``guidance``)."""


_T5_JSON = "text_encoders/t5_config_xxl.json"

# CLIP-L/G at width 32. ComfyUI routes a file to CLIP-L by "layers.1" and to CLIP-G by "layers.30",
# so CLIP-L needs >= 2 layers and CLIP-G >= 31 (the JSON's 32 is kept). Both read the generic
# "model_config" key: model_options_long_clip copies it into clip_l_/clip_g_model_config.
_CLIP_WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}

_FLUX_TEXT_ENCODERS = (
    TextEncoderFile("t5xxl", "comfy.text_encoders.t5.T5", _T5_JSON,
                    {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}, "t5xxl_model_config"),
    TextEncoderFile("clip_l", "comfy.clip_model.CLIPTextModel", "sd1_clip_config.json",
                    {**_CLIP_WIDTHS, "num_hidden_layers": 2}, "model_config"),
)

_FLUX_DIT = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "patch_size": 2,
    "context_in_dim": 64, "vec_in_dim": 32, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True,
}


def _taesd_pair(name: str, latent_channels: int) -> TinyVae:
    """ComfyUI's TAESD at its only width (64): ``VAELoader`` lists ``name`` once both
    ``{name}_encoder.*`` and ``{name}_decoder.*`` are in ``models/vae_approx`` and adds the
    family's latent scale and shift itself."""
    return TinyVae(name, "vae_approx", tuple(
        VaeFile(f"{name}_{part}.safetensors", f"comfy.taesd.taesd.{part.title()}", {"latent_channels": latent_channels})
        for part in ("encoder", "decoder")))


# The Wan 2.1 VAE decodes 5-D latents [B, 16, T, H, W]. `comfy.sd.VAE` reads only its base width
# from the file (decoder.head.0.gamma) and hard-codes the rest, so these kwargs are ComfyUI's own
# but for dim = 2, the smallest the halving upsamplers allow (68 k parameters; the real dim 96 has 127 M).
_WAN21_VAE_KWARGS = {"dim": 2, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                     "temperal_downsample": [False, True, True], "dropout": 0.0}

VAE_TABLE: dict[str, TinyVae] = {
    # Flux.1, Chroma and Z-Image share the Flux VAE; taef1 is its tiny stand-in (2-D latents only:
    # TAESD's Conv2d layers cannot take Qwen-Image's 5-D latent).
    "taef1": _taesd_pair("taef1", 16),
    "taesd3": _taesd_pair("taesd3", 16),
    "wan21": TinyVae("tiny_wan21_vae.safetensors", "vae", (
        VaeFile("tiny_wan21_vae.safetensors", "comfy.ldm.wan.vae.WanVAE", _WAN21_VAE_KWARGS),)),
}

FAMILY_TABLE: dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily(
        name="flux_dev", supported_model="Flux", unet_config=_FLUX_DIT,
        text_encoders=_FLUX_TEXT_ENCODERS, clip_type="FLUX", context_width=64,
        latent_channels=16, latent_ndim=4, cfg=1.0, vae="taef1", conditioning={"guidance": 3.5}),
    TinyFamily(
        name="flux_schnell", supported_model="FluxSchnell", unet_config={**_FLUX_DIT, "guidance_embed": False},
        text_encoders=_FLUX_TEXT_ENCODERS, clip_type="FLUX", context_width=64,
        latent_channels=16, latent_ndim=4, cfg=1.0, vae="taef1"),
    TinyFamily(
        # A single T5 file is detected as T5-XXL only with 24 blocks of width 4096 (the wi_1 of
        # block 23); one head of width 8 and an 8-wide MLP keep the blocks small. The embedding
        # (32128 x 4096) stays: the tokenizer emits ids up to 32100.
        name="chroma", supported_model="Chroma",
        unet_config={
            "image_model": "chroma", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
            "out_channels": 64, "qkv_bias": True, "in_channels": 64, "hidden_size": 3072, "context_in_dim": 4096,
            "patch_size": 2, "depth": 1, "depth_single_blocks": 1, "in_dim": 64, "out_dim": 3072,
            "hidden_dim": 5120, "n_layers": 5},
        text_encoders=(TextEncoderFile("t5xxl", "comfy.text_encoders.t5.T5", _T5_JSON,
                                       {"num_heads": 1, "d_kv": 8, "d_ff": 8}, "t5xxl_model_config"),),
        clip_type="CHROMA", context_width=4096, latent_channels=16, latent_ndim=4, cfg=4.0, vae="taef1"),
    TinyFamily(
        # SD3.5-type MMDiT (RMS qk-norm); hidden = 64 x depth. ComfyUI pads the CLIP-L+G features
        # (32 + 32 wide here) to 4096 when no T5 is given; the pooled vector is 32 + 32.
        name="sd3", supported_model="SD3",
        unet_config={
            "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 1, "input_size": None,
            "adm_in_channels": 64,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64}},
            "num_patches": 1024, "pos_embed_max_size": 32, "qk_norm": "rms", "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []},
        text_encoders=(
            TextEncoderFile("clip_l", "comfy.clip_model.CLIPTextModel", "sd1_clip_config.json",
                            _CLIP_WIDTHS, "model_config"),
            TextEncoderFile("clip_g", "comfy.clip_model.CLIPTextModel", "clip_config_bigg.json",
                            _CLIP_WIDTHS, "model_config"),
        ),
        clip_type="SD3", context_width=4096, latent_channels=16, latent_ndim=4, cfg=4.5, vae="taesd3"),
    TinyFamily(
        # Z-Image reads the Qwen3's second-to-last layer, and ComfyUI asserts |layer| < layers: 3 layers.
        name="zimage", supported_model="ZImage",
        unet_config={
            "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 64,
            "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
            "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
            "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32},
        text_encoders=(TextEncoderFile(
            "qwen3_4b", "comfy.text_encoders.llama.Qwen3_4B", None,
            {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 1, "num_key_value_heads": 1}, "qwen3_4b_model_config"),),
        clip_type="LUMINA2", context_width=64, latent_channels=16, latent_ndim=4, cfg=4.0, vae="taef1"),
    TinyFamily(
        # The DiT's text width is fixed at 3584, so the Qwen2.5-VL-7B keeps hidden 3584 and its
        # 152064-token embedding (the chat template uses ids up to 151644); detection as QWEN25_7B
        # needs k_proj biases of 512 = 4 kv heads x 128, so 4 heads, one layer, a 64-wide MLP.
        # ComfyUI always builds the 32-block vision tower too; its weights are left out of the file
        # (text prompts never run it) and stay uninitialised memory that is never touched.
        name="qwen_image", supported_model="QwenImage",
        unet_config={"image_model": "qwen_image", "in_channels": 64, "num_layers": 1},
        text_encoders=(TextEncoderFile(
            "qwen25_7b", "comfy.text_encoders.llama.Qwen25_7BVLI", None,
            {"num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4},
            "qwen25_7b_model_config", drop_prefixes=("visual.",)),),
        clip_type="QWEN_IMAGE", context_width=3584, latent_channels=16, latent_ndim=5, cfg=2.5, vae="wan21"),
)}

FAMILIES: tuple[str, ...] = tuple(FAMILY_TABLE)


def get_family(name: str) -> TinyFamily:
    """The :class:`TinyFamily` called ``name`` (one of :data:`FAMILIES`)."""
    try:
        return FAMILY_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def _ensure_comfy() -> None:
    """Import ComfyUI in-process unless it is already running (as when a node calls in here)."""
    if "comfy.model_management" not in sys.modules:
        from bench.comfy import import_comfy

        import_comfy()


def _import_class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def diffusion_model_shapes(name: str) -> dict[str, torch.Size]:
    """Key -> shape of the family's diffusion model, built on the meta device by the
    ``supported_models`` class that ComfyUI's detection picks for its config."""
    _ensure_comfy()
    import comfy.model_detection

    fam = get_family(name)
    with torch.device("meta"):
        model_config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(fam.unet_config))
        found = type(model_config).__name__ if model_config is not None else None
        if found != fam.supported_model:
            raise RuntimeError(f"{name}: ComfyUI matches its config to {found}, not {fam.supported_model}")
        model = model_config.get_model({}, device="meta")
    return {key: tensor.shape for key, tensor in model.diffusion_model.state_dict().items()}


def write_diffusion_model(family: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the family's random diffusion model to ``path`` (bare keys, as UNETLoader files are)
    and return ``path``. ``comfy.sd.load_diffusion_model(path)`` detects it as the family; the same
    seed gives the same bytes; an interrupted write leaves no partial file."""
    return write_checkpoint(diffusion_model_shapes(family), path, seed, f"tiny {family} diffusion model", dtype)


def _text_encoder_config(te: TextEncoderFile) -> dict:
    import comfy.ops  # `comfy` is a namespace package: locate it by one of its modules

    config: dict = {}
    if te.base_config is not None:
        config = json.loads((Path(comfy.ops.__file__).parent / te.base_config).read_text())
    config.update(copy.deepcopy(te.overrides))
    return config


def text_encoder_shapes(te: TextEncoderFile) -> dict[str, torch.Size]:
    """Key -> shape of one text-encoder file: ComfyUI's class built on the meta device."""
    _ensure_comfy()
    import comfy.ops

    cls = _import_class(te.module_class)
    with torch.device("meta"):
        module = cls(_text_encoder_config(te), torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    return {key: tensor.shape for key, tensor in module.state_dict().items() if not key.startswith(te.drop_prefixes)}


def text_encoder_file_name(family: str, te: TextEncoderFile) -> str:
    """File name :func:`write_text_encoders` gives this encoder of the family."""
    return f"tiny_{family}_{te.name}.safetensors"


def write_text_encoders(family: str, folder: Path, seed: int = 0) -> list[Path]:
    """Write the family's random text encoders (bf16, one ``.safetensors`` each) into ``folder``;
    return their paths, to give to :func:`load_text_encoder`."""
    fam = get_family(family)
    return [write_checkpoint(text_encoder_shapes(te), Path(folder) / text_encoder_file_name(family, te),
                             seed + index, f"tiny {family} {te.name}", torch.bfloat16)
            for index, te in enumerate(fam.text_encoders)]


def text_encoder_options(family: str) -> tuple[str, dict]:
    """``(CLIPType member name, model_options)`` for ``comfy.sd.load_clip`` on the family's files.

    A fresh dict on every call: ComfyUI writes into the ``model_config`` entry it is given.
    """
    fam = get_family(family)
    options: dict = {}
    for te in fam.text_encoders:
        if options.setdefault(te.options_key, te.overrides) != te.overrides:
            raise ValueError(f"{family}: encoders disagree on model_options[{te.options_key!r}]")
    return fam.clip_type, copy.deepcopy(options)


def load_text_encoder(family: str, paths: list[Path]) -> comfy.sd.CLIP:
    """The family's text encoder from :func:`write_text_encoders`'s files, loaded by ComfyUI's own
    ``comfy.sd.load_clip`` (tokenizer and encoding code paths included)."""
    _ensure_comfy()
    import comfy.sd

    clip_type, model_options = text_encoder_options(family)
    return comfy.sd.load_clip([str(p) for p in paths], clip_type=comfy.sd.CLIPType[clip_type],
                              model_options=model_options)


def encode_prompt(family: str, clip: comfy.sd.CLIP, text: str) -> list:
    """Conditioning as a workflow makes it: ``CLIPTextEncode``, then the family's extra values
    set the way ``FluxGuidance`` sets ``guidance``."""
    import node_helpers

    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    extras = get_family(family).conditioning
    return node_helpers.conditioning_set_values(conditioning, extras) if extras else conditioning


def vae_shapes(vae_file: VaeFile) -> dict[str, torch.Size]:
    """Key -> shape of one VAE file: ComfyUI's module built on the meta device."""
    _ensure_comfy()
    with torch.device("meta"):
        module = _import_class(vae_file.module_class)(**copy.deepcopy(vae_file.kwargs))
    return {key: tensor.shape for key, tensor in module.state_dict().items()}


def _vae_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """``random_tensor``, except the Wan VAE's RMS-norm scales (``gamma``, shaped ``[C, 1, 1, 1]``) are 1."""
    return torch.ones(shape) if key.endswith(".gamma") else random_tensor(key, shape, generator)


def write_vae(family: str, vae_folder: Path, vae_approx_folder: Path, seed: int = 0) -> str:
    """Write the random VAE file(s) that decode the family's latents (bf16 ``.safetensors``, atomic)
    into ``vae_approx_folder`` (TAESD pairs) or ``vae_folder`` (full VAEs) and return the value for
    ``VAELoader``'s ``vae_name`` widget once ComfyUI's ``vae`` / ``vae_approx`` model folders
    include these folders. Families sharing a VAE write the same files (same bytes for the same seed)."""
    vae = VAE_TABLE[get_family(family).vae]
    folder = Path({"vae": vae_folder, "vae_approx": vae_approx_folder}[vae.folder])
    for index, vae_file in enumerate(vae.files):
        write_checkpoint(vae_shapes(vae_file), folder / vae_file.file_name, seed + index,
                         f"tiny {vae.vae_name} VAE", torch.bfloat16, fill=_vae_tensor)
    return vae.vae_name


def vae_file_paths(family: str, vae_folder: Path, vae_approx_folder: Path) -> list[Path]:
    """The paths :func:`write_vae` writes for the family."""
    vae = VAE_TABLE[get_family(family).vae]
    folder = Path({"vae": vae_folder, "vae_approx": vae_approx_folder}[vae.folder])
    return [folder / vae_file.file_name for vae_file in vae.files]


def load_vae(vae_name: str, vae_folder: Path, vae_approx_folder: Path) -> comfy.sd.VAE:
    """ComfyUI's stock ``VAELoader`` node loading ``vae_name`` after adding these folders to its
    ``vae`` and ``vae_approx`` model folders (they stay added for the process)."""
    _ensure_comfy()
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("vae", str(Path(vae_folder).resolve()))
    folder_paths.add_model_folder_path("vae_approx", str(Path(vae_approx_folder).resolve()))
    if vae_name not in nodes.VAELoader.vae_list(nodes.VAELoader):
        raise RuntimeError(f"VAELoader does not list {vae_name!r}")
    return nodes.VAELoader().load_vae(vae_name)[0]


def decode_latent(vae: comfy.sd.VAE, latent: torch.Tensor) -> torch.Tensor:
    """Images ``[B, H, W, 3]`` in [0, 1] from ComfyUI's stock ``VAEDecode`` node, run under
    ``torch.inference_mode`` as ComfyUI's executor runs nodes."""
    _ensure_comfy()
    import nodes

    with torch.inference_mode():
        return nodes.VAEDecode().decode(vae, {"samples": latent})[0]


def empty_latent(family: str, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """Zeros shaped like the family's latent of ``height x width`` latent pixels (8 image pixels
    each), in the shape ``comfy.sample.fix_empty_latent_channels`` gives KSampler."""
    fam = get_family(family)
    time_axis = [1] * (fam.latent_ndim - 4)
    return torch.zeros([batch, fam.latent_channels, *time_axis, height, width])


# --- benchmark --------------------------------------------------------------------------------

_LATENT_SIZES = (16, 8)


def _file_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _file_parameters(paths: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for path in paths:
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _sample_once(name: str, model, positive: list, negative: list, size: int, seed: int) -> float:
    """Seconds for one euler step of ``comfy.sample.sample`` at a ``size x size`` latent."""
    return _sample(name, model, positive, negative, size, seed)[0]


def _sample(name: str, model, positive: list, negative: list, size: int, seed: int) -> tuple[float, torch.Tensor]:
    """Seconds for, and the latent of, one euler step of ``comfy.sample.sample`` at ``size x size``."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, empty_latent(name, size, size))
    if tuple(latent.shape) != tuple(empty_latent(name, size, size).shape):
        raise RuntimeError(f"{name}: KSampler would use a {tuple(latent.shape)} latent, the table says otherwise")
    noise = comfy.sample.prepare_noise(latent, seed)
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, 1, get_family(name).cfg, "euler", "simple", positive, negative, latent,
                              seed=seed, disable_pbar=True)
    seconds = time.perf_counter() - start
    if out.shape != latent.shape or not torch.isfinite(out).all():
        raise RuntimeError(f"{name}: sampling gave {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}")
    return seconds, out


def _decode_row(name: str, folder: Path, latent: torch.Tensor, seed: int) -> dict:
    """Write the family's VAE, load it with ``VAELoader`` and decode ``latent`` with ``VAEDecode``
    (twice: the first call also loads the VAE into ComfyUI's memory manager)."""
    row: dict = {}
    vae_folder, approx_folder = folder / "vae", folder / "vae_approx"
    row["vae_name"] = write_vae(name, vae_folder, approx_folder, seed)
    paths = vae_file_paths(name, vae_folder, approx_folder)
    row["vae_kb"] = sum(p.stat().st_size for p in paths) / 1024
    row["vae_file_params_m"] = _file_parameters(paths) / 1e6
    vae = load_vae(row["vae_name"], vae_folder, approx_folder)
    # VAELoader prefixes a TAESD pair's keys (encoder file, decoder file) and adds the scale/shift
    taesd = VAE_TABLE[get_family(name).vae].folder == "vae_approx"
    prefixes = ("taesd_encoder.", "taesd_decoder.") if taesd else ("",)
    expected = {f"{prefix}{key}" for prefix, p in zip(prefixes, paths) for key in _file_keys(p)}
    unfilled = set(vae.first_stage_model.state_dict()) - expected - {"vae_scale", "vae_shift"}
    if unfilled:
        raise RuntimeError(f"{name}: the VAE module has weights its files lack: {sorted(unfilled)[:5]}")
    row["vae_dtype"] = str(vae.vae_dtype).removeprefix("torch.")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        image = decode_latent(vae, latent)
        times.append(time.perf_counter() - start)
    row["decode_first_s"], row["decode_s"] = times
    height, width = (8 * s for s in latent.shape[-2:])
    row["image"] = "x".join(map(str, image.shape))
    if tuple(image.shape) != (latent.shape[0], height, width, 3) or not torch.isfinite(image).all():
        raise RuntimeError(f"{name}: VAEDecode gave {tuple(image.shape)}, finite={bool(torch.isfinite(image).all())}")
    return row


def bench_family(name: str, folder: Path, seed: int = 0) -> dict:
    """Build, load, encode and sample one family in ``folder``; return its measurements."""
    _ensure_comfy()
    import comfy.sd

    fam = get_family(name)
    row: dict = {"family": name}
    start = time.perf_counter()
    dit_path = write_diffusion_model(name, folder / f"tiny_{name}_dit.safetensors", seed)
    row["build_dit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    te_paths = write_text_encoders(name, folder, seed)
    row["build_te_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model = comfy.sd.load_diffusion_model(str(dit_path))
    row["load_dit_s"] = time.perf_counter() - start
    rss_before_te = rss_gb()
    start = time.perf_counter()
    clip = load_text_encoder(name, te_paths)
    row["load_te_s"] = time.perf_counter() - start
    row["te_rss_gb"] = rss_gb() - rss_before_te
    row["detected"] = type(model.model.model_config).__name__
    detected_config = model.model.model_config.unet_config
    row["config_matches"] = all(detected_config.get(k) == v for k, v in fam.unet_config.items())
    latent_format = model.model.latent_format
    row["latent"] = f"{latent_format.latent_channels}ch {latent_format.latent_dimensions + 2}-D"
    row["dit_dtype"] = str(model.model.get_dtype()).removeprefix("torch.")
    row["dit_params_m"] = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    row["te_file_params_m"] = _file_parameters(te_paths) / 1e6
    row["te_module_params_m"] = sum(p.numel() for p in clip.cond_stage_model.parameters()) / 1e6

    # CPU kernels warm up over the first calls (4 s, then 0.03 s for SD3's CLIPs): first and best apart
    encode_times = []
    for _ in range(4):
        start = time.perf_counter()
        positive = encode_prompt(name, clip, "a photo of a dog")
        encode_times.append(time.perf_counter() - start)
    row["encode_first_s"], row["encode_s"] = encode_times[0], min(encode_times[1:])
    negative = encode_prompt(name, clip, "")
    row["context"] = "x".join(map(str, positive[0][0].shape))
    if positive[0][0].shape[-1] != fam.context_width:
        raise RuntimeError(f"{name}: the prompt is {positive[0][0].shape[-1]} wide, the DiT reads {fam.context_width}")
    row["cond_keys"] = ",".join(sorted(positive[0][1]))

    # the first call also loads the model into ComfyUI's memory manager: timed apart
    row["sample_first_s"] = _sample_once(name, model, positive, negative, _LATENT_SIZES[0], seed)
    sampled = None
    for size in _LATENT_SIZES:
        try:
            row[f"step_{size}_s"], sampled = _sample(name, model, positive, negative, size, seed)
        except Exception as error:  # noqa: BLE001 - a size the family cannot take is a result
            row[f"step_{size}_s"] = f"failed: {type(error).__name__}: {error}"[:120]
    if sampled is not None:  # the last (8x8, 64 px) sample, decoded by the stock VAE nodes
        row.update(_decode_row(name, folder, sampled, seed))
    row["peak_rss_gb"] = peak_rss_gb()
    return row


_COLUMNS = [
    ("family", "family"), ("detected", "detected"), ("config_matches", "config ok"), ("dit_params_m", "DiT M"),
    ("dit_dtype", "DiT dtype"), ("te_file_params_m", "TE file M"), ("te_module_params_m", "TE module M"),
    ("te_rss_gb", "TE RSS GB"), ("latent", "latent"), ("context", "prompt"), ("build_dit_s", "build DiT s"),
    ("build_te_s", "build TE s"), ("load_dit_s", "load DiT s"), ("load_te_s", "load TE s"),
    ("encode_first_s", "1st encode s"), ("encode_s", "encode s"), ("sample_first_s", "1st sample s"),
    ("step_16_s", "step 16x16 s"), ("step_8_s", "step 8x8 s"), ("vae_name", "vae_name"), ("vae_kb", "VAE KB"),
    ("vae_file_params_m", "VAE M"), ("vae_dtype", "VAE dtype"), ("decode_first_s", "1st decode s"),
    ("decode_s", "decode 64px s"), ("image", "image"), ("peak_rss_gb", "peak RSS GB"),
]


def _run_in_subprocess(name: str, seed: int) -> dict:
    """``bench_family`` in a fresh process, so memory and peak RSS are the family's alone."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "bench.dit_families", "--json", "--seed", str(seed), name],
                          cwd=root, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"family": name, "detected": f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    """Benchmark the families named on the command line (default: all), one subprocess each."""
    parser = argparse.ArgumentParser(description="Build, load, encode and sample tiny ComfyUI DiT families.")
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="run one family here and print its row as JSON")
    args = parser.parse_args(argv)
    args.families = args.families or list(FAMILIES)
    for name in args.families:
        if name not in FAMILY_TABLE:
            parser.error(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    if args.json:
        if len(args.families) != 1:
            parser.error("--json takes exactly one family")
        with tempfile.TemporaryDirectory(prefix="iteris_dit_") as folder:
            print(json.dumps(bench_family(args.families[0], Path(folder), args.seed)))
        return
    rows = []
    for name in args.families:
        rows.append(_run_in_subprocess(name, args.seed))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(machine_line(machine()))
    print(markdown_table(rows, _COLUMNS))
    print("\nconditioning keys: " + "; ".join(f"{r['family']}: {r.get('cond_keys')}" for r in rows))


if __name__ == "__main__":
    main()
