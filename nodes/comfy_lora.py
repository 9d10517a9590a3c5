"""LoRA files read the way ComfyUI's LoraLoader reads them, as the engine's exact low-rank deltas.

ComfyUI's own key maps (``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``) place
every spelling it accepts for the model's family (kohya, diffusers, OneTrainer, SimpleTuner,
native names), ``comfy.lora_convert.convert_lora`` handles the converted formats, and
``comfy.lora.load_lora`` returns one weight adapter per placed module, sometimes on a row slice of
a fused weight (diffusers ``to_q``/``to_k``/``to_v`` onto Flux's ``qkv``). Each adapter becomes a
:class:`~iteris_core.low_rank.LowRankDelta` over the whole weight:

* LoRA and LoCon (with a Tucker middle): its own factors, ``alpha / rank`` as the scale;
* LoHa and LoKr: the exact factors their structure gives (Khatri-Rao, Kronecker), trimmed to
  their numerical rank;
* anything else (DoRA, OFT, BOFT, GLoRA): the change ComfyUI's own ``calculate_weight`` makes to
  the base weight, factorised exactly;
* a row slice: its up matrix placed on the slice's rows of the fused weight, zeros elsewhere.

Several adapters on one weight (q, k and v on a fused qkv) add up into one delta of the summed
rank: they read the same input, so the merge solves them together. A key ComfyUI cannot place,
a patch with no low-rank form (``diff``, ``set``) and a shape that does not fit the weight are
errors that name the file and a key; nothing is dropped.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch

import comfy.lora
import comfy.lora_convert
import comfy.weight_adapter as weight_adapter

from ..iteris_core.errors import BaseModelMismatchError, LoraFormatError
from ..iteris_core.families import Family, check_lora_family, describe_mismatch
from ..iteris_core.layers import UNET
from ..iteris_core.lora_io import LoraFile
from ..iteris_core.lora_normalize import NormalizedLora
from ..iteris_core.low_rank import LowRankDelta, compress, factorize_exact, stack
from ..iteris_core.lycoris import lokr_factors, loha_factors, lora_down_with_mid

DIFFUSION_PREFIX = "diffusion_model."
# tensor names of the adapters ComfyUI reads (comfy/weight_adapter/, comfy/lora.py's diff and set)
ADAPTER_TENSOR = re.compile(r"(lora_(up|down|A|B|mid)\b|lora\.(up|down)\.|lora_linear_layer\.|hada_(w[12]_[ab]|t[12])|"
                            r"lokr_(w[12](_[ab])?|t2)|oft_(blocks|diag)|\.[ab][12]\.weight|\.diff(_b)?$|\.set_weight$|"
                            r"\.w_norm$)")
# ComfyUI weight key -> base weight (fp32); KeyError("which ...") for a weight the merge cannot take
WeightOf = Callable[[str], torch.Tensor]


def check_adapter_file(lora: LoraFile) -> None:
    """Refuse, next to the file, one that holds no adapter tensor ComfyUI reads (a checkpoint, an
    embedding, an unknown format): which layers a LoRA patches is known only with the model."""
    if not any(ADAPTER_TENSOR.search(key) for key in lora.tensors):
        example = min(lora.tensors) if lora.tensors else "none"
        raise LoraFormatError(lora.name, "no LoRA, LoHa, LoKr or OFT weights in it (keys such as "
                              f"'...lora_up.weight'; its first key is {example!r}): is it a LoRA?")


def key_map(model, clip) -> dict[str, str | tuple]:
    """Every LoRA key spelling ComfyUI accepts for this MODEL and CLIP -> the weight it patches
    (a key, or ``(key, (dim, start, length))`` for a slice)."""
    mapping = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        mapping = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, mapping)
    return mapping


def layer_name(weight_key: str) -> str | None:
    """The engine's layer name of a ComfyUI weight key: ``unet.<path>`` for the diffusion model,
    the CLIP's own state-dict path (``clip_l.transformer...``) for text encoders; None for a
    key that is not a weight (biases, norms' scales)."""
    if not weight_key.endswith(".weight"):
        return None
    path = weight_key[: -len(".weight")]
    if path.startswith(DIFFUSION_PREFIX):
        return f"{UNET}.{path[len(DIFFUSION_PREFIX):]}"
    return path


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().reshape(tensor.shape[0], -1)


def _parts(names: tuple[str, ...], values: tuple) -> dict[str, torch.Tensor]:
    return {name: value for name, value in zip(names, values) if value is not None}


def _structured_delta(adapter) -> LowRankDelta | None:
    """Exact factors of a LoRA, LoCon, LoHa or LoKr adapter without DoRA (None for other kinds:
    they go through ComfyUI's ``calculate_weight``)."""
    w = adapter.weights
    if isinstance(adapter, weight_adapter.LoRAAdapter):
        up, down, alpha, mid, dora, reshape = w
        if dora is not None or reshape is not None:
            return None
        rank = down.shape[0]   # ComfyUI's alpha / mat2.shape[0]
        down = lora_down_with_mid(down, mid) if mid is not None else down
        return LowRankDelta(_flat(up), _flat(down), alpha / rank if alpha is not None else 1.0)
    if isinstance(adapter, weight_adapter.LoHaAdapter) and w[7] is None:
        factors = loha_factors(_parts(("w1_a", "w1_b", "alpha", "w2_a", "w2_b", "t1", "t2"), w), w[2])
        return None if factors is None else compress(factors)
    if isinstance(adapter, weight_adapter.LoKrAdapter) and w[8] is None:
        return compress(lokr_factors(_parts(("w1", "w2", "alpha", "w1_a", "w1_b", "w2_a", "w2_b", "t2"), w), w[2]))
    return None


class _ComfyErrors(logging.Handler):
    """ComfyUI's weight adapters catch their own failures (a shape that does not fit), log
    "ERROR <adapter> <key> ..." and change nothing: this collects those lines."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def dense_delta(adapter, base: torch.Tensor, key: str, strength: float = 1.0) -> LowRankDelta | None:
    """What ComfyUI's own formula changes on ``base`` at ``strength`` (in fp32, as LoraLoader computes
    it), factorised exactly; a failure ComfyUI only logs raises."""
    errors = _ComfyErrors()
    logging.getLogger().addHandler(errors)
    try:
        patched = adapter.calculate_weight(base.float().clone(), key, strength, 1.0, None, lambda a: a, torch.float32)
    finally:
        logging.getLogger().removeHandler(errors)
    if errors.messages:
        raise RuntimeError(errors.messages[0])
    return factorize_exact(patched.double() - base.double())


def adapter_delta(adapter, base: torch.Tensor, key: str) -> LowRankDelta | None:
    """The adapter's change to the weight ``base`` (fp32, the slice it patches) at strength 1,
    None if zero."""
    structured = _structured_delta(adapter)
    if structured is None:
        return dense_delta(adapter, base, key)
    return structured if (structured.up.any() and structured.down.any()) else None   # untrained: no change


def _on_rows(delta: LowRankDelta, rows: int, start: int) -> LowRankDelta:
    """A delta of a row slice as a delta of the whole fused weight (zero outside the slice)."""
    up = torch.zeros(rows, delta.rank, dtype=delta.up.dtype)
    up[start:start + delta.out_features] = delta.up
    return LowRankDelta(up, delta.down, delta.scale)


def _rows_rearranged(delta: LowRankDelta, function, weight_key: str, source: str) -> LowRankDelta:
    """The delta after the row rearrangement ComfyUI applies to a patch (its key map's third entry,
    such as swapping the scale and shift halves of an adaLN weight): applied to the up matrix, which
    equals applying it to the change only if it moves whole rows, which is checked."""
    up = function(delta.up.clone())
    probe = torch.randn(delta.rank, 3, dtype=delta.up.dtype)
    if up.shape != delta.up.shape or not torch.allclose(function(delta.up @ probe), up @ probe, rtol=1e-5, atol=1e-6):
        raise LoraFormatError(source, f"ComfyUI transforms its patch of {weight_key} in a way that has no "
                              "low-rank form", weight_key)
    return LowRankDelta(up, delta.down, delta.scale)


def read_lora(lora: LoraFile, mapping: dict, weight_of: WeightOf, family: Family) -> NormalizedLora:
    """Place ``lora`` on the model as ComfyUI does and turn every patch into a low-rank delta.
    A LoRA whose keys or metadata name another family is refused before ComfyUI reads it."""
    check_lora_family(lora.name, lora.tensors, lora.metadata, family)
    tensors = comfy.lora_convert.convert_lora(dict(lora.tensors))
    patches = comfy.lora.load_lora(tensors, mapping, log_missing=False)

    def mismatch(problem: str, keys) -> BaseModelMismatchError:
        return BaseModelMismatchError(lora.name, describe_mismatch(tensors, lora.metadata, family, problem, keys))

    if not patches:
        raise mismatch("ComfyUI places none of its keys on this model", tensors)
    loaded: set[str] = set()
    pieces: dict[str, list[LowRankDelta]] = {}
    skipped: list[str] = []
    for target, patch in patches.items():
        # a key, or (key, row slice or None[, function]) as ModelPatcher.add_patches reads it
        weight_key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        if not isinstance(patch, weight_adapter.WeightAdapterBase):
            raise LoraFormatError(lora.name, f"its {patch[0]!r} patch of {weight_key} has no low-rank form, so it "
                                  "cannot be merged (only LoRA, LoCon, LoHa, LoKr, DoRA and OFT adapters can)",
                                  _first_key(tensors, weight_key, mapping))
        loaded |= patch.loaded_keys
        name = layer_name(weight_key)
        if name is None:
            raise LoraFormatError(lora.name, f"it patches {weight_key}, which is not a layer weight",
                                  _first_key(tensors, weight_key, mapping))
        try:
            base = weight_of(weight_key)
        except KeyError as exc:
            raise mismatch(f"it patches {weight_key}, {exc.args[0]}", ()) from None
        if offset is not None:
            dim, start, length = offset
            if dim != 0:
                raise LoraFormatError(lora.name, f"it patches a slice of {weight_key} along dimension {dim}, which "
                                      "the merge does not support", _first_key(tensors, weight_key, mapping))
            part = base.narrow(0, start, length)
        else:
            part, start = base, 0
        try:
            delta = adapter_delta(patch, part, weight_key)
        except RuntimeError as exc:   # shapes that do not fit: a LoRA for another model
            raise mismatch(f"its patch of {weight_key} does not fit the weight ({exc})", ()) from None
        if delta is not None and (delta.out_features != part.shape[0] or delta.in_features != part[0].numel()):
            raise mismatch(f"its patch of {weight_key} is {delta.out_features}x{delta.in_features}, the weight "
                           f"{part.shape[0]}x{part[0].numel()}", ())
        if delta is None:
            skipped.append(f"{weight_key}: zero delta, nothing to merge")
            continue

        def placed(piece: LowRankDelta | None, rows=base.shape[0], start=start, offset=offset, function=function,
                   weight_key=weight_key) -> LowRankDelta | None:
            if piece is not None and function is not None:   # ComfyUI's row rearrangement (swap_scale_shift)
                piece = _rows_rearranged(piece, function, weight_key, lora.name)
            return piece if piece is None or offset is None else _on_rows(piece, rows, start)

        # ComfyUI's own formula, recomputed at each strength, where the change is not a plain
        # product of factors (DoRA, OFT, ...): OFT's change is not proportional to the strength
        remake = None if _structured_delta(patch) is not None else (
            lambda strength, patch=patch, part=part, key=weight_key, placed=placed: placed(
                dense_delta(patch, part, key, strength)))
        pieces.setdefault(name, []).append((placed(delta), remake))
    unplaced = sorted(set(tensors) - loaded)
    if unplaced:
        raise mismatch(f"ComfyUI cannot place {len(unplaced)} of its {len(tensors)} keys on this model", unplaced)
    if not pieces:
        raise LoraFormatError(lora.name, "the LoRA changes no layer (every delta is zero)")
    layers = {name: _summed([delta for delta, _remake in parts]) for name, parts in pieces.items()}
    at_strength_of = {name: _at_strength(parts) for name, parts in pieces.items()
                      if any(remake is not None for _delta, remake in parts)}
    return NormalizedLora(lora.name, layers, sha256=lora.sha256, skipped=skipped, metadata=dict(lora.metadata),
                          at_strength_of=at_strength_of)


def _summed(deltas: list[LowRankDelta | None]) -> LowRankDelta | None:
    present = [d for d in deltas if d is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else stack(present)


def _at_strength(parts: list[tuple[LowRankDelta, Callable | None]]) -> Callable[[float], LowRankDelta | None]:
    """A layer's delta at any strength: plain factors scaled, the others remade by ComfyUI's formula."""
    def delta_at(strength: float) -> LowRankDelta | None:
        return _summed([delta.scaled(strength) if remake is None else remake(strength) for delta, remake in parts])
    return delta_at


def _first_key(tensors: dict, weight_key: str, mapping: dict) -> str | None:
    """A key of the file that ComfyUI maps onto ``weight_key`` (for messages)."""
    for lora_key, target in mapping.items():
        target_key = target if isinstance(target, str) else target[0]
        if target_key == weight_key:
            match = next((k for k in tensors if k.startswith(lora_key + ".") or k.startswith(lora_key + "_")), None)
            if match:
                return match
    return None
