"""Image model families as data: what the pack knows about each, and how a LoRA's keys betray the
family it was trained for.

A :class:`Family` is keyed by the names of ComfyUI's own model classes (``comfy/supported_models.py``),
which ComfyUI's detection picks from the weights: the backend asks the model which class it is and
looks the answer up here, so nothing else in the pack asks "is this Flux?". Each family says whether
the pack merges it (tested in CI, merged by the same generic code but untested, or refused), the
sampling a user of that family would pick, and how merged files declare it in their metadata.

:func:`guess_lora_family` reads a LoRA's keys, shapes and metadata to name the family it looks made
for, only to explain a mismatch: placing keys is ComfyUI's (or the engine's readers') job.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .errors import IterisError


class Support(str, enum.Enum):
    TESTED = "tested"              # merged and checked in CI on a tiny model ComfyUI detects
    GENERIC = "generic, untested"  # the same backend merges it; no model of it is tested
    REFUSED = "refused"            # the merge says why and stops


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling a user of the family would pick in KSampler (and FluxGuidance)."""

    sampler: str = "euler"
    scheduler: str = "normal"
    steps: int = 20
    cfg: float = 7.5
    guidance: float | None = None   # guidance embedding of distilled models (Flux.1 dev); None: none
    side: int = 512                 # native resolution, pixels per side
    side_v_prediction: int | None = None  # native side of the model's v-prediction variant (SD2.x: 768)


@dataclass(frozen=True)
class Family:
    """One family of image models and the pack's stance on it."""

    id: str
    name: str
    comfy_classes: tuple[str, ...]
    support: Support
    defaults: SamplingDefaults = SamplingDefaults()
    modelspec: str | None = None    # modelspec.architecture of a LoRA for it (Stability's metadata)
    reason: str = ""                # why it is refused


_FLUX_LIKE = SamplingDefaults(scheduler="simple", steps=20, cfg=1.0, guidance=3.5, side=1024)

FAMILIES: tuple[Family, ...] = (
    Family("sd1", "SD1.x", ("SD15", "SD15_instructpix2pix"), Support.TESTED,
           SamplingDefaults(), "stable-diffusion-v1/lora"),
    Family("sd2", "SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH"), Support.TESTED,
           SamplingDefaults(side=512, side_v_prediction=768), "stable-diffusion-v2-768-v/lora"),
    Family("sdxl", "SDXL", ("SDXL", "SDXL_instructpix2pix"), Support.TESTED,
           SamplingDefaults(side=1024), "stable-diffusion-xl-v1-base/lora"),
    Family("sdxl_distilled", "SDXL-distilled (SSD-1B, Vega, KOALA)",
           ("SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"), Support.GENERIC, SamplingDefaults(side=1024)),
    Family("flux_dev", "Flux.1 dev", ("Flux",), Support.TESTED, _FLUX_LIKE, "flux-1-dev/lora"),
    Family("flux_schnell", "Flux.1 schnell", ("FluxSchnell",), Support.TESTED,
           SamplingDefaults(scheduler="simple", steps=4, cfg=1.0, side=1024), "flux-1-schnell/lora"),
    Family("flux_fill", "Flux.1 Fill", ("FluxInpaint",), Support.GENERIC, _FLUX_LIKE),
    Family("chroma", "Chroma", ("Chroma",), Support.TESTED,
           SamplingDefaults(scheduler="simple", steps=26, cfg=4.0, side=1024), "chroma/lora"),
    Family("chroma_radiance", "Chroma Radiance", ("ChromaRadiance",), Support.GENERIC,
           SamplingDefaults(scheduler="simple", steps=26, cfg=4.0, side=1024)),
    Family("sd3", "SD3 / SD3.5", ("SD3",), Support.TESTED,
           SamplingDefaults(scheduler="sgm_uniform", steps=20, cfg=4.5, side=1024), "stable-diffusion-v3-medium/lora"),
    Family("zimage", "Z-Image", ("ZImage",), Support.TESTED,
           SamplingDefaults(scheduler="simple", steps=8, cfg=1.0, side=1024), "z-image/lora"),
    Family("lumina2", "Lumina Image 2.0", ("Lumina2",), Support.GENERIC,
           SamplingDefaults(scheduler="simple", steps=25, cfg=4.0, side=1024)),
    Family("qwen_image", "Qwen-Image", ("QwenImage",), Support.TESTED,
           SamplingDefaults(scheduler="simple", steps=20, cfg=2.5, side=1328), "qwen-image/lora"),
    Family("hidream", "HiDream", ("HiDream",), Support.GENERIC,
           SamplingDefaults(scheduler="simple", steps=30, cfg=5.0, side=1024)),
    Family("flux2", "Flux.2", ("Flux2",), Support.GENERIC, _FLUX_LIKE),
    Family("auraflow", "AuraFlow", ("AuraFlow",), Support.GENERIC,
           SamplingDefaults(scheduler="simple", cfg=3.5, side=1024)),
    Family("pixart", "PixArt", ("PixArtAlpha", "PixArtSigma"), Support.GENERIC,
           SamplingDefaults(cfg=4.5, side=1024)),
    Family("hunyuan_dit", "HunyuanDiT", ("HunyuanDiT", "HunyuanDiT1"), Support.GENERIC,
           SamplingDefaults(cfg=6.0, side=1024)),
    Family("video", "a video model", (
        "SVD_img2vid", "GenmoMochi", "LTXV", "HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V",
        "HunyuanVideo15", "HunyuanVideo15_SR_Distilled", "CosmosT2V", "CosmosI2V", "CosmosI2VPredict2",
        "WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Camera", "WAN21_Vace",
        "WAN21_HuMo", "WAN22_S2V", "WAN22_Animate", "WAN22_T2V"), Support.REFUSED,
        reason="video models are not supported: the merge samples still images, not clips"),
)

_BY_CLASS = {name: family for family in FAMILIES for name in family.comfy_classes}
_BY_ID = {family.id: family for family in FAMILIES}
MERGED = [f for f in FAMILIES if f.support is not Support.REFUSED]


def family_by_id(family_id: str) -> Family | None:
    return _BY_ID.get(family_id)


def family_of_comfy_class(class_name: str) -> Family:
    """The family of ComfyUI's model class ``class_name``, or an error that names it and says which
    families are merged."""
    family = _BY_CLASS.get(class_name)
    if family is None:
        family = Family("unknown", class_name, (class_name,), Support.REFUSED,
                        reason="the pack has not been taught this model family")
    if family.support is Support.REFUSED:
        known = ", ".join(f.name for f in MERGED if f.support is Support.TESTED)
        raise IterisError(f"this model is ComfyUI's {class_name} ({family.name}): {family.reason}. "
                          f"IterIS merges LoRAs for {known}")
    return family


# --- which family a LoRA looks made for -------------------------------------------------------

# key patterns, tried in order against keys with '.' spelled '_' (kohya flattens paths that way)
_KEY_SIGNATURES: tuple[tuple[str, re.Pattern], ...] = tuple((label, re.compile(pattern)) for label, pattern in (
    ("HiDream", r"(double|single)_stream_blocks_\d+_"),
    ("a Flux.1-type model (Flux.1 dev/schnell, Chroma)", r"(^|_)(double_blocks|single_blocks|single_transformer_blocks)_\d+_"),
    ("SD3 / SD3.5", r"joint_blocks_\d+_|(^|_)(x_block|context_block)_"),
    ("Qwen-Image", r"transformer_blocks_\d+_(img_mlp|txt_mlp|img_mod|txt_mod|attn_add_[qkv]_proj)"),
    ("Z-Image / Lumina 2", r"(noise_refiner|context_refiner)_\d+_|(^|_)layers_\d+_(attention_(qkv|out)|feed_forward_w[123]|adaLN)"),
    ("Wan (video)", r"(^|_)blocks_\d+_(self_attn|cross_attn)_"),
    ("SD3 / SD3.5", r"transformer_blocks_\d+_(attn_add_[qkv]_proj|ff_context)"),
    ("SD", r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)_"),
))

_METADATA_FAMILIES = (   # substrings of ss_base_model_version / modelspec.architecture, in order
    ("sdxl", "SDXL"), ("stable-diffusion-xl", "SDXL"), ("sd_v2", "SD2.x"), ("stable-diffusion-v2", "SD2.x"),
    ("sd_v1", "SD1.x"), ("stable-diffusion-v1", "SD1.x"), ("flux-1-schnell", "Flux.1 schnell"),
    ("flux1", "Flux.1"), ("flux-1", "Flux.1"), ("flux.1", "Flux.1"), ("flux2", "Flux.2"), ("flux-2", "Flux.2"),
    ("chroma", "Chroma"), ("sd3", "SD3 / SD3.5"), ("stable-diffusion-v3", "SD3 / SD3.5"), ("z-image", "Z-Image"),
    ("zimage", "Z-Image"), ("qwen", "Qwen-Image"), ("lumina", "Lumina Image 2.0"), ("hidream", "HiDream"),
    ("wan", "Wan (video)"),
)


def sd_version_from_widths(context_dims: set[int], text_widths: set[int]) -> str | None:
    """Name the Stable Diffusion version that a LoRA's shapes point to: the cross-attention context
    width (attn2 k/v input) and the text encoder hidden widths."""
    if 2048 in context_dims or 1280 in text_widths:
        return "SDXL"
    if 1024 in context_dims or 1024 in text_widths:
        return "SD2.x"
    if 768 in context_dims or (768 in text_widths and not context_dims):
        return "SD1.x"
    return None


def _down_width(key: str, tensor: torch.Tensor) -> int | None:
    """Input width of a LoRA down matrix (kohya, PEFT and diffusers spellings)."""
    if re.search(r"(lora_down|lora_A|lora\.down|down)\.weight$", key) and tensor.dim() >= 2:
        return int(tensor.shape[1])
    return None


def guess_lora_family(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str | None:
    """A human name of the family a LoRA looks made for, from its metadata, else its keys (and, for
    Stable Diffusion, its shapes); None if nothing points anywhere."""
    for field in ("modelspec.architecture", "ss_base_model_version"):
        value = str((metadata or {}).get(field, "")).lower()
        for needle, name in _METADATA_FAMILIES:
            if needle in value:
                return name
    keys = [key.replace(".", "_") for key in tensors]
    for label, pattern in _KEY_SIGNATURES:
        if any(pattern.search(key) for key in keys):
            if label == "SD":   # SD1.x, SD2.x and SDXL share their names: their widths tell them apart
                return _sd_version(tensors) or "Stable Diffusion"
            return label
    return None


def _sd_version(tensors: Mapping[str, torch.Tensor]) -> str | None:
    context, text = set(), set()
    for key, tensor in tensors.items():
        width = _down_width(key, tensor)
        flat = key.replace(".", "_")
        if width is None:
            continue
        if re.search(r"attn2_(to_k|to_v)", flat):
            context.add(width)
        elif re.search(r"(^|_)(te\d?|text_encoder(_2)?)_.*self_attn_q_proj", flat):
            text.add(width)
    return sd_version_from_widths(context, text)


def describe_mismatch(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, family: Family,
                      problem: str, keys: Iterable[str] = ()) -> str:
    """Why a LoRA does not fit the model: the problem, an example key, and the family the LoRA
    looks made for beside the model's (the caller puts the file's name in front)."""
    guess = guess_lora_family(tensors, metadata)
    example = next(iter(sorted(keys)), None)
    where = f" (e.g. {example!r})" if example else ""
    if guess and guess != family.name:
        return f"{problem}{where}: it looks made for {guess} but the base model is {family.name}"
    return f"{problem}{where}; the base model is {family.name}"
