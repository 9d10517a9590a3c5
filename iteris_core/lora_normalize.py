"""Place a parsed LoRA on the base model's layers: one :class:`LowRankDelta` per target layer.

Every module must land on exactly one layer with matching shapes, or the whole file is refused
with the key and what was expected; a LoRA for another base model is named as such. Scales are
applied here once (kohya/LyCORIS ``alpha / rank``, PEFT ``lora_alpha / r`` or rsLoRA
``/ sqrt(r)``, none for formats that have no alpha), so downstream code sees plain deltas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import BaseModelMismatchError, LoraFormatError
from .families import check_lora_family, family_by_id, sd_version_from_widths
from .layers import TEXT_ENCODER, TEXT_ENCODER_2, UNET, LayerInfo, LayerTable
from .lora_formats import ParsedLora, RawModule, parse_lora
from .lora_io import LoraFile, read_lora_file
from .low_rank import LowRankDelta, compress, factorize_exact
from .lycoris import dora_delta, loha_dense, loha_factors, lokr_factors, lora_down_with_mid

BaseWeight = Callable[[str], torch.Tensor]


@dataclass
class NormalizedLora:
    """A LoRA as the engine uses it: canonical layer name -> delta at strength 1."""

    name: str
    layers: dict[str, LowRankDelta]
    sha256: str | None = None
    skipped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    # layers whose change is not proportional to the strength (ComfyUI's OFT applies it twice):
    # strength -> the layer's delta at that strength (None if zero)
    at_strength_of: dict[str, Callable[[float], LowRankDelta | None]] = field(default_factory=dict)

    def components(self) -> set[str]:
        return {name.split(".", 1)[0] for name in self.layers}

    def ranks(self) -> dict[str, int]:
        return {name: delta.rank for name, delta in self.layers.items()}

    def at_strength(self, unet: float, text_encoder: float) -> dict[str, LowRankDelta]:
        """Deltas scaled by the UNet or text-encoder strength; layers at strength 0 are dropped."""
        out = {}
        for name, delta in self.layers.items():
            strength = unet if name.startswith(UNET + ".") else text_encoder
            if strength == 0:
                continue
            scaled = self.at_strength_of[name](strength) if name in self.at_strength_of else delta.scaled(strength)
            if scaled is not None:
                out[name] = scaled
        return out


# --- placing module keys on layers ---------------------------------------------------------------

_TE_PATH = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.")


def _candidates(module: RawModule, table: LayerTable) -> list[str]:
    """Spellings to look up for a module key that may lack its component prefix."""
    key = module.key
    if key.startswith(("unet.", "text_encoder.", "text_encoder_2.", "lora_", "diffusion_model.",
                       "model.diffusion_model.")):
        return [key]
    if _TE_PATH.match(key):
        components = [module.component_hint] if module.component_hint else [TEXT_ENCODER, TEXT_ENCODER_2]
        return [f"{c}.{key}" for c in components]
    return [f"unet.{key}", key]


def _shape_of(module: RawModule) -> tuple[int, int] | None:
    """(out, input width) that a raw module produces, without materialising dense deltas."""
    p = module.parts
    if module.kind == "lora":
        down_width = p["down"][0].numel() if "mid" not in p else p["down"].shape[1] * p["mid"][0, 0].numel()
        return p["up"].shape[0], down_width
    if module.kind == "full":
        return p["diff"].shape[0], p["diff"][0].numel()
    return None  # LoHa/LoKr shapes are only known once materialised


def _fits(shape: tuple[int, int] | None, info: LayerInfo) -> bool:
    return shape is None or shape == (info.out_features, info.input_dim)


def _widths(modules: list[RawModule]) -> tuple[set[int], set[int]]:
    """Cross-attention context widths and text-encoder hidden widths that a LoRA's shapes imply."""
    context, text = set(), set()
    for m in modules:
        shape = _shape_of(m)
        if shape is None:
            continue
        if re.search(r"attn2[._]to_[kv]$", m.key):
            context.add(shape[1])
        elif re.search(r"(self_attn[._][qkv]_proj|mlp[._]fc1)$", m.key):
            text.add(shape[1])
    return context, text


def _base_mismatch_hint(modules: list[RawModule], table: LayerTable) -> str:
    context, text = _widths(modules)
    lora_arch = sd_version_from_widths(context, text)
    base = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(table.architecture)
    if lora_arch and base and lora_arch != base:
        return f"; this LoRA looks made for {lora_arch} but the base model is {base}"
    return ""


def _positional_order(table: LayerTable, component: str, modules: list[RawModule]) -> list[str]:
    """Layer order of cloneofsimo/lora's module traversal, checked against the file's shapes.

    UNet: every transformer block in diffusers registration order (down, up, mid), its linears as
    the trainer met them: old diffusers registered attn1, ff, attn2; newer ones attn1, attn2, ff.
    Text encoder: CLIPAttention registers k, v, q, out.
    """
    names = list(table.in_component(component))
    if component == UNET:
        blocks = sorted({n.split(".transformer_blocks.")[0] + ".transformer_blocks." +
                         n.split(".transformer_blocks.")[1].split(".")[0]
                         for n in names if ".transformer_blocks." in n}, key=_diffusers_order_key)
        attn = lambda b, a: [f"{b}.{a}.to_q", f"{b}.{a}.to_k", f"{b}.{a}.to_v", f"{b}.{a}.to_out.0"]  # noqa: E731
        layouts = {
            "attn1, ff, attn2 (diffusers < 0.12)": lambda b: attn(b, "attn1") + [f"{b}.ff.net.0.proj"] + attn(b, "attn2"),
            "attn1, attn2, ff": lambda b: attn(b, "attn1") + attn(b, "attn2") + [f"{b}.ff.net.0.proj"],
        }
    else:
        blocks = sorted({m[0] for n in names if (m := re.match(rf"{component}\.text_model\.encoder\.layers\.\d+", n))},
                        key=lambda b: int(b.rsplit(".", 1)[1]))
        layouts = {"k, v, q, out": lambda b: [f"{b}.self_attn.{p}" for p in ("k_proj", "v_proj", "q_proj", "out_proj")]}
    shapes = [_shape_of(m) for m in modules]
    for layout in layouts.values():
        order = [name for block in blocks for name in layout(block)]
        if len(order) == len(modules) and all(n in table and _fits(s, table[n]) for n, s in zip(order, shapes)):
            return order
    raise BaseModelMismatchError(
        f"{component} (positional cloneofsimo layout)",
        f"{len(modules)} positional modules do not line up with the base model's {len(blocks)} "
        f"{'transformer blocks' if component == UNET else 'encoder layers'} in any known traversal "
        f"order ({', '.join(layouts)}){_base_mismatch_hint(modules, table)}")


def _diffusers_order_key(block: str) -> tuple:
    """Sort key for diffusers' module registration order: down_blocks, up_blocks, mid_block."""
    section = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[block.split(".")[1]]
    return (section, *[int(x) for x in re.findall(r"\.(\d+)(?=\.|$)", block)])


def _resolve_names(parsed: ParsedLora, table: LayerTable) -> dict[str, RawModule]:
    if parsed.layout == "positional":
        placed: dict[str, RawModule] = {}
        by_component: dict[str, list[RawModule]] = {}
        for m in parsed.modules:
            by_component.setdefault(m.key.split(":")[0], []).append(m)
        for component, modules in by_component.items():
            if component not in table.components:
                raise BaseModelMismatchError(parsed.source, f"the file has {component} modules but the base "
                                             f"model has no {component}")
            try:
                order = _positional_order(table, component, modules)
            except BaseModelMismatchError as exc:
                raise BaseModelMismatchError(parsed.source, exc.problem) from None
            placed.update(zip(order, modules))
        return placed

    placed = {}
    unplaced: list[RawModule] = []
    misfit: list[tuple[RawModule, LayerInfo]] = []
    for module in parsed.modules:
        shape = _shape_of(module)
        hits = [n for c in _candidates(module, table) if (n := table.resolve(c)) is not None]
        fitting = [n for n in hits if _fits(shape, table[n])]
        if not hits:
            unplaced.append(module)
        elif not fitting:
            misfit.append((module, table[hits[0]]))
        else:
            name = fitting[0]
            if name in placed:
                raise LoraFormatError(parsed.source, f"modules {placed[name].key!r} and {module.key!r} both "
                                      f"target layer {name}", module.key)
            placed[name] = module
    hint = _base_mismatch_hint(parsed.modules, table)
    if misfit:
        module, info = misfit[0]
        out, width = _shape_of(module)  # type: ignore[misc]
        raise BaseModelMismatchError(
            parsed.source, f"shape ({out} x {width}) does not fit the base model's layer {info.name} "
            f"({info.out_features} x {info.input_dim}); {len(misfit)} module(s) disagree{hint}", module.key)
    if unplaced:
        keys = sorted(m.key for m in unplaced)
        what = (f"{len(keys)} of {len(parsed.modules)} modules name no layer of this base model"
                if placed else "no module names a layer of this base model (not a Stable Diffusion "
                "UNet/text-encoder LoRA, or one for another architecture)")
        raise BaseModelMismatchError(parsed.source, f"{what}, e.g. {', '.join(repr(k) for k in keys[:3])}{hint}",
                                     keys[0])
    return placed


# --- building deltas -----------------------------------------------------------------------------

def _check_finite(source: str, module: RawModule) -> None:
    for part, tensor in module.parts.items():
        if not torch.isfinite(tensor.float()).all():
            raise LoraFormatError(source, f"the {part} tensor holds NaN or infinite values (a diverged "
                                  "training run?)", module.key)


def _lora_delta(module: RawModule, info: LayerInfo, source: str) -> LowRankDelta:
    up, down = module.parts["up"], module.parts["down"]
    rank = down.shape[0]
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise LoraFormatError(source, f"lora_up of a conv must be 1x1, got {tuple(up.shape)}", module.key)
    if up.shape[1] != rank:
        raise LoraFormatError(source, f"up has rank {up.shape[1]} but down has rank {rank}", module.key)
    if "mid" in module.parts:
        down = lora_down_with_mid(down, module.parts["mid"])
    if info.kind == "conv" and down.dim() == 4 and tuple(down.shape[2:]) != info.kernel:
        raise BaseModelMismatchError(source, f"kernel {tuple(down.shape[2:])} does not fit the base layer "
                                     f"{info.name} (kernel {info.kernel})", module.key)
    if module.alpha is None:
        scale = 1.0
    elif module.rslora:
        scale = module.alpha / rank ** 0.5
    else:
        scale = module.alpha / rank
    return LowRankDelta(up.float().reshape(up.shape[0], rank), down.float().reshape(rank, -1), scale)


def _factors(module: RawModule, info: LayerInfo, source: str) -> LowRankDelta | torch.Tensor:
    """Exact low-rank factors of the module's delta, or its dense matrix where its structure gives
    none (full diffs, Tucker LoHa)."""
    if module.kind == "lora":
        return _lora_delta(module, info, source)
    if module.kind == "lokr":
        return lokr_factors(module.parts, module.alpha)
    if module.kind == "loha":
        factors = loha_factors(module.parts, module.alpha)
        if factors is not None:
            return factors
        return loha_dense(module.parts, module.alpha)
    return module.parts["diff"].float()


def _module_delta(module: RawModule, info: LayerInfo, source: str, base_weight: BaseWeight | None) -> LowRankDelta | None:
    _check_finite(source, module)
    delta = _factors(module, info, source)
    shape = (delta.out_features, delta.in_features) if isinstance(delta, LowRankDelta) else \
        (delta.shape[0], delta[0].numel())
    if shape != (info.out_features, info.input_dim):
        raise BaseModelMismatchError(source, f"{module.kind} delta of shape ({shape[0]} x {shape[1]}) does not fit "
                                     f"the base layer {info.name} {info.weight_shape}", module.key)
    if module.dora is not None:
        if base_weight is None:
            raise LoraFormatError(source, "DoRA needs the base model's weights, which were not given", module.key)
        dense = delta.dense() if isinstance(delta, LowRankDelta) else delta.reshape(shape)
        try:
            return factorize_exact(dora_delta(base_weight(info.name), dense, module.dora))
        except ValueError as exc:
            raise BaseModelMismatchError(source, str(exc), module.key) from None
    if isinstance(delta, torch.Tensor):
        return factorize_exact(delta.reshape(shape))
    if module.kind == "lora":  # already minimal; an untrained (all-zero) factor means no change
        return delta if bool(delta.up.any()) and bool(delta.down.any()) else None
    return compress(delta)


def normalize_lora(parsed: ParsedLora, table: LayerTable, base_weight: BaseWeight | None = None,
                   *, sha256: str | None = None, metadata: dict[str, str] | None = None) -> NormalizedLora:
    """Place every module of ``parsed`` on a layer of ``table`` and build its delta.

    ``base_weight(name)`` returns a layer's base weight; it is needed only for DoRA, whose delta
    depends on it.
    """
    placed = _resolve_names(parsed, table)
    layers: dict[str, LowRankDelta] = {}
    skipped = list(parsed.skipped)
    for name, module in placed.items():
        delta = _module_delta(module, table[name], parsed.source, base_weight)
        if delta is None:
            skipped.append(f"{module.key}: zero delta, nothing to merge")
            continue
        layers[name] = delta
    if not layers:
        raise LoraFormatError(parsed.source, "the LoRA changes no layer (every delta is zero)")
    return NormalizedLora(parsed.source, layers, sha256=sha256, skipped=skipped, metadata=dict(metadata or {}))


def load_lora(source: str | Path | LoraFile, table: LayerTable, base_weight: BaseWeight | None = None) -> NormalizedLora:
    """Read, parse and place a LoRA file (or an already-read :class:`LoraFile`). A LoRA whose keys
    or metadata name another family than the table's is refused before it is parsed."""
    lora = source if isinstance(source, LoraFile) else read_lora_file(source)
    family = family_by_id(table.architecture)
    if family is not None:
        check_lora_family(lora.name, lora.tensors, lora.metadata, family)
    return normalize_lora(parse_lora(lora), table, base_weight, sha256=lora.sha256, metadata=lora.metadata)


def lora_from_tensors(name: str, tensors: dict[str, torch.Tensor], table: LayerTable,
                      base_weight: BaseWeight | None = None, metadata: dict[str, str] | None = None) -> NormalizedLora:
    """Normalise a LoRA given as a state dict (e.g. ComfyUI's LORA_MODEL, or tensors in memory)."""
    return load_lora(LoraFile(name=name, tensors=dict(tensors), metadata=dict(metadata or {})), table, base_weight)
