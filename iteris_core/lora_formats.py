"""LoRA file layouts: group a file's tensors into per-module adapters, whatever the trainer.

The tables below say which key suffix carries which part of which adapter kind, tagged with the
tools that write it. Parsing consumes every key: a key that no table explains is an error that
lists it, never a silent drop. Which base-model layer a module key means is decided later, by
:mod:`iteris_core.lora_normalize`, against the base model's :class:`~iteris_core.layers.LayerTable`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from .errors import LoraFormatError
from .lora_io import LoraFile

# suffix -> (adapter kind, part). Longest suffix wins. "*" parts belong to any kind.
SUFFIXES: dict[str, tuple[str, str]] = {
    # kohya sd-scripts, LyCORIS (LoRA/LoCon), ComfyUI
    ".lora_up.weight": ("lora", "up"), ".lora_down.weight": ("lora", "down"), ".lora_mid.weight": ("lora", "mid"),
    # diffusers save_lora_weights before PEFT
    ".lora.up.weight": ("lora", "up"), ".lora.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"), ".lora_linear_layer.down.weight": ("lora", "down"),
    # PEFT and diffusers with PEFT
    ".lora_B.weight": ("lora", "up"), ".lora_A.weight": ("lora", "down"),
    ".lora_B.default.weight": ("lora", "up"), ".lora_A.default.weight": ("lora", "down"),
    ".lora_magnitude_vector": ("*", "magnitude"), ".lora_magnitude_vector.weight": ("*", "magnitude"),
    ".lora_magnitude_vector.default.weight": ("*", "magnitude"),
    # LyCORIS LoHa
    ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"), ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    # LyCORIS LoKr
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1_a"), ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"),
    # LyCORIS "full" (dense difference)
    ".diff": ("full", "diff"), ".diff_b": ("full", "diff_b"),
    # shared
    ".alpha": ("*", "alpha"), ".dora_scale": ("*", "dora_scale"),
    # LyCORIS norm training: not a LoRA, refused with a message
    ".w_norm": ("norm", "w_norm"), ".b_norm": ("norm", "b_norm"),
}
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)

# diffusers' attention-processor format (unet.save_attn_procs, 2023):
# "<block>.attn1.processor.to_q_lora.down.weight"
_ATTN_PROC = re.compile(r"(?P<stem>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>up|down)\.weight")
# cloneofsimo/lora positional format: "unet:12:down"
_POSITIONAL = re.compile(r"(?P<component>unet|text_encoder|text_encoder_2):(?P<index>\d+):(?P<part>up|down)")
_PEFT_PREFIX = "base_model.model."

REQUIRED_PARTS = {
    "lora": ({"up", "down"},),
    "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
    "lokr": ({"w1", "w2"}, {"w1_a", "w1_b", "w2"}, {"w1", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2_a", "w2_b"}),
    "full": ({"diff"},),
}


@dataclass
class RawModule:
    """One module's adapter as the file stores it, before it is placed on a base-model layer."""

    key: str                      # module key as spelled in the file (for messages and resolution)
    kind: str                     # "lora" | "loha" | "lokr" | "full"
    parts: dict[str, torch.Tensor]
    alpha: float | None = None    # kohya/LyCORIS alpha, or PEFT lora_alpha
    rslora: bool = False          # PEFT use_rslora: scale alpha/sqrt(r) instead of alpha/r
    dora: torch.Tensor | None = None         # kohya/LyCORIS dora_scale or PEFT magnitude vector
    positional: bool = False      # cloneofsimo layout: key is "component:index"
    component_hint: str | None = None        # "text_encoder"/"text_encoder_2" from a PEFT config


@dataclass
class ParsedLora:
    """A file's adapters grouped by module, plus non-LoRA content that is reported, not merged."""

    source: str
    modules: list[RawModule]
    skipped: list[str] = field(default_factory=list)   # human-readable notes about ignored content
    layout: str = "module"                             # "module" or "positional"


def _split_suffix(key: str) -> tuple[str, str, str] | None:
    m = _ATTN_PROC.fullmatch(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['stem']}.{proj}", "lora", m["part"]
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix) and len(key) > len(suffix):
            kind, part = SUFFIXES[suffix]
            return key[: -len(suffix)], kind, part
    return None


def _hint_for_unknown(keys: list[str]) -> str:
    sample = ", ".join(repr(k) for k in keys[:3])
    if any(re.search(r"_lora_(up|down)\.weight$", k) for k in keys):
        return (f"keys such as {sample} look like kohya keys with '.lora_down'/'.lora_up' joined by '_' "
                "(a hand-converted file?); no tool writes this layout, so it cannot be placed safely")
    if any(re.fullmatch(r"w_[ab]_\d+", k) for k in keys):
        return (f"keys such as {sample} are a bare positional layout (w_a_NNN/w_b_NNN, used by ViT/SAM "
                "LoRA repos) with no module names: not a Stable Diffusion LoRA")
    return (f"{len(keys)} key(s) follow no LoRA layout this loader knows (kohya, LyCORIS, diffusers, "
            f"PEFT, cloneofsimo), e.g. {sample}")


def _peft_config(lora: LoraFile) -> dict:
    """PEFT settings from the sidecar adapter_config.json or the diffusers metadata header."""
    config = dict(lora.adapter_config or {})
    raw = lora.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError:
            raise LoraFormatError(lora.name, "the 'lora_adapter_metadata' header is not valid JSON") from None
        config["__per_component__"] = packed
    return config


def _peft_alpha(config: dict, module_key: str, rank: int) -> tuple[float | None, bool]:
    """lora_alpha for one module (alpha_pattern wins), and whether rsLoRA scaling applies."""
    per_component = config.get("__per_component__")
    if per_component:
        component = module_key.split(".", 1)[0]
        section = {k.split(".", 1)[1]: v for k, v in per_component.items() if k.startswith(component + ".")}
        if not section and any("." not in k for k in per_component):
            section = per_component  # un-prefixed (a model's own save_lora_adapter)
        config = section or config
    if not config or "lora_alpha" not in config:
        return None, False
    alpha = config.get("lora_alpha")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    path = module_key.split(".", 1)[1] if "." in module_key else module_key
    for pattern, value in alpha_pattern.items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(pattern, path):
            alpha = value
            break
    declared_rank = config.get("r")
    for pattern, value in rank_pattern.items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(pattern, path):
            declared_rank = value
            break
    if declared_rank is not None and int(declared_rank) != rank:
        raise LoraFormatError("PEFT config", f"module {module_key!r} has rank {rank} in the file but r="
                              f"{declared_rank} in the adapter config; the config does not belong to this file")
    return float(alpha), bool(config.get("use_rslora", False))


def _component_hint(config: dict) -> str | None:
    base = str(config.get("base_model_name_or_path") or "").replace("\\", "/").rstrip("/")
    if base.endswith("text_encoder_2"):
        return "text_encoder_2"
    if base.endswith("text_encoder"):
        return "text_encoder"
    auto = (config.get("auto_mapping") or {}).get("base_model_class", "")
    if auto == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    return None


def _as_float(tensor: torch.Tensor, source: str, key: str) -> float:
    if tensor.numel() != 1:
        raise LoraFormatError(source, f"alpha must be a single number, got shape {tuple(tensor.shape)}", key)
    value = float(tensor.float().item())
    if value != value or value in (float("inf"), float("-inf")):
        raise LoraFormatError(source, "alpha is not a finite number", key)
    return value


def _parse_positional(lora: LoraFile) -> ParsedLora:
    """cloneofsimo/lora: "unet:N:up/down" pairs ordered by the trainer's module traversal, plus
    pivotal-tuning token embeddings ("<s1>") that are textual inversion, not LoRA."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    skipped, unknown = [], []
    for key, tensor in lora.tensors.items():
        m = _POSITIONAL.fullmatch(key)
        if m:
            groups.setdefault(f"{m['component']}:{m['index']}", {})[m["part"]] = tensor
        elif lora.metadata.get(key) == "<embed>" or (key.startswith("<") and key.endswith(">") and tensor.dim() == 1):
            skipped.append(f"token embedding {key!r} (pivotal tuning): not merged; prompts that use "
                           f"{key} will not reproduce the concept without it")
        else:
            unknown.append(key)
    if unknown:
        raise LoraFormatError(lora.name, _hint_for_unknown(sorted(unknown)))
    modules = []
    for key in sorted(groups, key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
        parts = groups[key]
        if set(parts) != {"up", "down"}:
            raise LoraFormatError(lora.name, f"positional module {key} has only {sorted(parts)}", key)
        modules.append(RawModule(key=key, kind="lora", parts=parts, positional=True))
    return ParsedLora(lora.name, modules, skipped, layout="positional")


def parse_lora(lora: LoraFile) -> ParsedLora:
    """Group a file's tensors into :class:`RawModule` objects. Raises :class:`LoraFormatError`
    naming the file and key for anything that is not a complete, known adapter."""
    if any(_POSITIONAL.fullmatch(k) for k in lora.tensors):
        return _parse_positional(lora)

    groups: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    unknown = []
    for key, tensor in lora.tensors.items():
        split = _split_suffix(key)
        if split is None:
            unknown.append(key)
            continue
        stem, kind, part = split
        if stem.startswith(_PEFT_PREFIX):
            stem = stem[len(_PEFT_PREFIX):]
        if part in groups.setdefault(stem, {}):
            raise LoraFormatError(lora.name, f"two tensors give the {part!r} part of module {stem!r}", key)
        groups[stem][part] = tensor
        if kind != "*":
            kinds.setdefault(stem, set()).add(kind)
    if unknown:
        raise LoraFormatError(lora.name, _hint_for_unknown(sorted(unknown)))

    config = _peft_config(lora)
    hint = _component_hint(config)
    modules: list[RawModule] = []
    for stem, parts in groups.items():
        kind_set = kinds.get(stem, set())
        if not kind_set:
            raise LoraFormatError(lora.name, f"module {stem!r} has only {sorted(parts)} and no weights", stem)
        if len(kind_set) > 1:
            raise LoraFormatError(lora.name, f"module {stem!r} mixes adapter kinds {sorted(kind_set)}", stem)
        (kind,) = kind_set
        if kind == "norm":
            raise LoraFormatError(lora.name, "LyCORIS norm-layer training (w_norm/b_norm) changes "
                                  "normalisation layers, which a LoRA merge cannot represent", stem)
        if "diff_b" in parts:
            raise LoraFormatError(lora.name, "bias differences (diff_b) are not supported: IterIS merges "
                                  "weight matrices only", stem)
        present = set(parts) - {"alpha", "dora_scale", "magnitude"}
        if not any(required <= present for required in REQUIRED_PARTS[kind]) or \
                not present <= set().union(*REQUIRED_PARTS[kind]) | {"t1", "t2", "mid"}:
            expected = " or ".join("+".join(sorted(r)) for r in REQUIRED_PARTS[kind])
            raise LoraFormatError(lora.name, f"incomplete {kind} module {stem!r}: has {sorted(present)}, "
                                  f"needs {expected}", stem)
        alpha = _as_float(parts.pop("alpha"), lora.name, stem + ".alpha") if "alpha" in parts else None
        dora = parts.pop("dora_scale", None)
        magnitude = parts.pop("magnitude", None)
        if dora is not None and magnitude is not None:
            raise LoraFormatError(lora.name, "module has both dora_scale and lora_magnitude_vector", stem)
        rslora = False
        if kind == "lora" and alpha is None and config:
            alpha, rslora = _peft_alpha(config, stem, parts["down"].shape[0])
        modules.append(RawModule(key=stem, kind=kind, parts=parts, alpha=alpha, rslora=rslora,
                                 dora=dora if dora is not None else magnitude, component_hint=hint))
    return ParsedLora(lora.name, modules)
