"""Image model families as data: what the pack knows about each, and how a LoRA's keys betray the
family it was trained for.

A :class:`Family` is keyed by the names of ComfyUI's own model classes (``comfy/supported_models.py``),
which ComfyUI's detection picks from the weights: the backend asks the model which class it is and
looks the answer up here, so nothing else in the pack asks "is this Flux?". Each family says whether
the pack merges it (tested in CI, merged by the same generic code but untested, or refused), the
sampling a user of that family would pick, and how merged files declare it in their metadata.

:func:`lora_origin` reads a LoRA's keys, shapes and metadata to name the families it looks made for:
:func:`check_lora_family` refuses a LoRA for another family before any work, and mismatch messages
name it. Placing keys stays ComfyUI's (or the engine's readers') job.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .errors import BaseModelMismatchError, IterisError


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

_SD = frozenset({"sd1", "sd2", "sdxl", "sdxl_distilled"})
_SDXL = frozenset({"sdxl", "sdxl_distilled"})
_FLUX1 = frozenset({"flux_dev", "flux_schnell", "flux_fill", "chroma", "chroma_radiance"})
_LUMINA = frozenset({"zimage", "lumina2"})


@dataclass(frozen=True)
class LoraOrigin:
    """What a LoRA's keys or metadata say it was made for: a name for messages and the families
    whose models it can patch (names that several families share give several)."""

    name: str
    family_ids: frozenset[str]
    evidence: str    # "its keys (e.g. ...)" or "its metadata (field = value)"

    def fits(self, family: Family) -> bool:
        return family.id in self.family_ids


# key patterns, matched against keys with '.' spelled '_' (kohya flattens paths that way); each
# names the families whose models have modules of that name (diffusers spellings are shared)
_KEY_SIGNATURES: tuple[tuple[str, frozenset[str], re.Pattern], ...] = tuple(
    (label, ids, re.compile(pattern)) for label, ids, pattern in (
        ("HiDream", frozenset({"hidream"}), r"(double|single)_stream_blocks_\d+_"),
        ("a Flux.1-type model (Flux.1 dev/schnell, Chroma, Flux.2)", _FLUX1 | {"flux2"},
         r"(^|_)(double_blocks|single_blocks)_\d+_"),
        ("a Flux.1-type model (Flux.1 dev/schnell, Chroma, Flux.2, AuraFlow)", _FLUX1 | {"flux2", "auraflow"},
         r"(^|_)single_transformer_blocks_\d+_"),
        ("SD3 / SD3.5", frozenset({"sd3"}), r"joint_blocks_\d+_|(^|_)(x_block|context_block)_"),
        ("Qwen-Image", frozenset({"qwen_image"}), r"transformer_blocks_\d+_(img_mlp|txt_mlp|img_mod|txt_mod)"),
        ("Z-Image / Lumina 2", _LUMINA,
         r"(noise_refiner|context_refiner)_\d+_|(^|_)layers_\d+_(attention_(qkv|out)|feed_forward_w[123]|adaLN)"),
        ("Wan (video) or PixArt", frozenset({"video", "pixart"}), r"(^|_)blocks_\d+_(self_attn|cross_attn)_"),
        ("an MMDiT (SD3, Flux.1, Qwen-Image, AuraFlow)", frozenset({"sd3", "qwen_image", "auraflow", "flux2"}) | _FLUX1,
         r"transformer_blocks_\d+_(attn_add_[qkv]_proj|ff_context)"),
        ("Stable Diffusion", _SD, r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)_"),
    ))

# substrings of metadata values, tried in order; the first that matches names the origin
_METADATA_ORIGINS: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("sdxl", "SDXL", _SDXL), ("stable-diffusion-xl", "SDXL", _SDXL), ("sd_v2", "SD2.x", frozenset({"sd2"})), ("stable-diffusion-v2", "SD2.x", frozenset({"sd2"})),
    ("sd_v1", "SD1.x", frozenset({"sd1"})), ("sd_1", "SD1.x", frozenset({"sd1"})),
    ("stable-diffusion-v1", "SD1.x", frozenset({"sd1"})), ("flux-1-schnell", "Flux.1 schnell", _FLUX1),
    ("flux1", "Flux.1", _FLUX1), ("flux-1", "Flux.1", _FLUX1), ("flux.1", "Flux.1", _FLUX1),
    ("flux2", "Flux.2", frozenset({"flux2"})), ("flux-2", "Flux.2", frozenset({"flux2"})),
    ("chroma", "Chroma", _FLUX1), ("sd3", "SD3 / SD3.5", frozenset({"sd3"})),
    ("stable-diffusion-v3", "SD3 / SD3.5", frozenset({"sd3"})), ("z-image", "Z-Image", _LUMINA),
    ("zimage", "Z-Image", _LUMINA), ("qwen", "Qwen-Image", frozenset({"qwen_image"})),
    ("lumina", "Lumina Image 2.0", _LUMINA), ("hidream", "HiDream", frozenset({"hidream"})),
    ("wan", "Wan (video)", frozenset({"video"})),
)
# fields that name the base model, most reliable first; ss_sd_model_name is a file name, read
# only for the few spellings that cannot mean anything else
_METADATA_FIELDS = ("modelspec.architecture", "ss_base_model_version")
_MODEL_FILE_NAMES = ((r"sd_?xl|xl_base", "SDXL", _SDXL), (r"flux", "Flux.1", _FLUX1), (r"sd3", "SD3 / SD3.5",
                                                                                      frozenset({"sd3"})))
# trainers known to write a default in place of the real base model (ai-toolkit writes
# ss_base_model_version 'sd_1.5' into Flux LoRAs)
_UNRELIABLE_BASE_VERSION = ("ai-toolkit",)


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


_SD_VERSIONS = {"SDXL": _SDXL, "SD2.x": frozenset({"sd2"}), "SD1.x": frozenset({"sd1"})}


_LORA_DOWN = re.compile(r"[._](lora_down|lora_A|lora\.down|down)\.weight$")
# LyCORIS factors whose second dimension is (part of) the layer's input width: LoHa's hada_w1_b
# alone; LoKr's is a Kronecker product, in = in(w1) * in(w2), each factor whole or split as _a @ _b
_LOKR_INPUT_PARTS = {"lokr_w1": "w1", "lokr_w1_b": "w1", "lokr_w2": "w2", "lokr_w2_b": "w2"}


def _input_widths(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Input width of each LoRA module, keyed by the module's name: from the down matrix (kohya,
    PEFT and diffusers spellings), LoHa's hada_w1_b or LoKr's two Kronecker factors."""
    widths: dict[str, int] = {}
    lokr: dict[str, dict[str, int]] = {}
    for key, tensor in tensors.items():
        if tensor.dim() < 2:
            continue
        if match := _LORA_DOWN.search(key):
            widths[key[:match.start()]] = int(tensor.shape[1])
        elif key.endswith(".hada_w1_b"):
            widths[key[:-len(".hada_w1_b")]] = int(tensor.shape[1])
        elif (module_part := key.rpartition(".")) and module_part[2] in _LOKR_INPUT_PARTS:
            lokr.setdefault(module_part[0], {})[_LOKR_INPUT_PARTS[module_part[2]]] = int(tensor.shape[1])
    for module, parts in lokr.items():
        if len(parts) == 2:
            widths[module] = parts["w1"] * parts["w2"]
    return widths


def _sd_version(tensors: Mapping[str, torch.Tensor]) -> str | None:
    context, text = set(), set()
    two_text_encoders = any(re.match(r"(lora_te[12]_|text_encoder_2_)", key.replace(".", "_")) for key in tensors)
    for module, width in _input_widths(tensors).items():
        flat = module.replace(".", "_")
        if re.search(r"attn2_(processor_)?(to_k|to_v)", flat):
            context.add(width)
        elif re.search(r"(^|_)(te\d?|text_encoder(_2)?)_.*self_attn_q_proj", flat):
            text.add(width)
    version = sd_version_from_widths(context, text)
    if two_text_encoders and version in (None, "SD1.x"):   # kohya's SDXL files name te1/te2; CLIP-L is 768 wide
        return "SDXL"
    return version


def _origin_from_keys(tensors: Mapping[str, torch.Tensor]) -> LoraOrigin | None:
    flat_keys = [key.replace(".", "_") for key in tensors]
    found: list[tuple[str, frozenset[str], str]] = []
    for label, ids, pattern in _KEY_SIGNATURES:
        key = next((k for k, flat in zip(tensors, flat_keys) if pattern.search(flat)), None)
        if key is not None:
            found.append((label, ids, key))
    agreed = _agreement(found)   # names of several unrelated families: the keys decide nothing
    if agreed is None:
        return None
    label, ids, key = agreed
    if ids <= _SD and (version := _sd_version(tensors)) is not None:
        label, ids = version, ids & _SD_VERSIONS[version] or ids
    return LoraOrigin(_name_of(ids, label), ids, f"its keys, e.g. {key!r}")


def _origin_from_metadata(metadata: Mapping[str, str]) -> LoraOrigin | None:
    software = str(metadata.get("software", "")).lower()
    fields = [f for f in _METADATA_FIELDS if not (f == "ss_base_model_version" and
                                                 any(name in software for name in _UNRELIABLE_BASE_VERSION))]
    said: list[tuple[str, frozenset[str], str]] = []
    for field_name in fields:
        value = str(metadata.get(field_name, ""))
        hit = next(((name, ids) for needle, name, ids in _METADATA_ORIGINS if needle in value.lower()), None)
        if hit:
            said.append((*hit, f"{field_name} = {value!r}"))
    model_name = str(metadata.get("ss_sd_model_name", ""))
    hit = next(((name, ids) for pattern, name, ids in _MODEL_FILE_NAMES if re.search(pattern, model_name.lower())),
               None)
    if hit:
        said.append((*hit, f"ss_sd_model_name = {model_name!r}"))
    elif str(metadata.get("ss_v2", "")).lower() == "true":
        said.append(("SD2.x", frozenset({"sd2"}), "ss_v2 = 'True'"))
    agreed = _agreement(said)    # fields that contradict each other: trust none of them
    if agreed is None:
        return None
    name, ids, _ = agreed
    return LoraOrigin(_name_of(ids, name), ids, "its metadata, " + "; ".join(e for _, _, e in said))


def _agreement(claims: list[tuple[str, frozenset[str], str]]) -> tuple[str, frozenset[str], str] | None:
    """The families every claim ``(label, family ids, evidence)`` allows, with the label and
    evidence of the most specific claim; None if there is none or they allow no family in common."""
    if not claims:
        return None
    ids = frozenset.intersection(*(claim[1] for claim in claims))
    if not ids:
        return None
    label, _, evidence = min(claims, key=lambda claim: len(claim[1]))
    return label, ids, evidence


def _name_of(ids: frozenset[str], label: str) -> str:
    return _BY_ID[next(iter(ids))].name if len(ids) == 1 else label


def lora_origin(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> LoraOrigin | None:
    """The family a LoRA looks made for, from its keys (and, for Stable Diffusion, its shapes) and
    its metadata; None if nothing points anywhere.

    The keys win: metadata only narrows what they say (an SD LoRA's version), or speaks where they
    say nothing. Trainers have been seen to write a default base model (ai-toolkit's Flux LoRAs say
    ``ss_base_model_version = 'sd_1.5'``), while a key either names a module of the model or not.
    """
    by_keys = _origin_from_keys(tensors)
    by_metadata = _origin_from_metadata(metadata or {})
    if by_keys is None or by_metadata is None:
        return by_keys or by_metadata
    both = by_keys.family_ids & by_metadata.family_ids
    if not both:
        return by_keys
    name = by_metadata.name if both == by_metadata.family_ids else _name_of(both, by_keys.name)
    return LoraOrigin(name, both, f"{by_keys.evidence}; {by_metadata.evidence}")


def guess_lora_family(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str | None:
    """A human name of the family a LoRA looks made for (see :func:`lora_origin`)."""
    origin = lora_origin(tensors, metadata)
    return origin.name if origin else None


def check_lora_family(source: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                      family: Family) -> None:
    """Refuse, before any work, a LoRA whose keys or metadata say it was made for another family
    than the base model's, naming both and the evidence."""
    origin = lora_origin(tensors, metadata)
    if origin is not None and not origin.fits(family):
        raise BaseModelMismatchError(source, f"it looks made for {origin.name} but the base model is {family.name} "
                                     f"(going by {origin.evidence})")


def describe_mismatch(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, family: Family,
                      problem: str, keys: Iterable[str] = ()) -> str:
    """Why a LoRA does not fit the model: the problem, an example key, and the family the LoRA
    looks made for beside the model's (the caller puts the file's name in front)."""
    origin = lora_origin(tensors, metadata)
    example = next(iter(sorted(keys)), None)
    where = f" (e.g. {example!r})" if example else ""
    if origin is not None and not origin.fits(family):
        return f"{problem}{where}: it looks made for {origin.name} but the base model is {family.name}"
    return f"{problem}{where}; the base model is {family.name}"
