"""The merged LoRA and its file, in the spelling its layer table asks for.

kohya naming (``lora_unet_<diffusers path>``, ``lora_te_``/``lora_te1_``/``lora_te2_``) is the one
that both ComfyUI's stock LoraLoader and diffusers' ``load_lora_weights`` map for SD1.x, SD2.x
and SDXL; ComfyUI 0.3.75 does not map PEFT-style UNet keys there. Tables whose ``file_format`` is
``"peft"`` (the diffusers Flux.1 and SD3 pipelines) are written with their ``file_keys`` and PEFT's
``.lora_A``/``.lora_B`` suffixes, the whole scale in the factors and no ``.alpha``: any kohya suffix
sends a Flux file through diffusers' kohya converter, which drops its text-encoder layers, and SD3's
loader refuses a file with keys that do not say ``lora`` (the ``.alpha`` ones); ComfyUI reads PEFT
suffixes without alpha at scale 1.

Every layer of a file carries the same alpha (:func:`file_alpha`), and the rest of its scale is
folded into its factors, so that ``up @ down * alpha / rank`` is the merged delta. One alpha is
what makes the file load the same everywhere: diffusers (0.42) turns per-layer alphas into a PEFT
alpha pattern whose keys for some layers match no module (the UNet's mid-block attention layers,
named after their attention processors; the layers of a ``CLIPTextModel``, SD1's encoder and
SDXL's first, named with the ``text_model.`` that transformers 5 dropped from it), and those
layers silently get the most common alpha (a rank-64 layer among rank-32 ones loads at half
strength); with one alpha that is every layer's own. ComfyUI, kohya and our reader apply
``alpha / rank`` per layer, which one alpha leaves exact.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from .families import family_by_id
from .layers import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, UNET, LayerTable
from .lora_io import atomic_write_safetensors
from .low_rank import LowRankDelta

FORMAT_VERSION = "1"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kohya_module_key(name: str, table: LayerTable) -> str:
    """The module key a layer is written under: the table's own spelling where its backend gave one
    (ComfyUI's key map), else kohya's. SDXL UNet layers use the SGM/LDM block paths, as kohya's
    SDXL trainer writes them (diffusers maps SDXL's added-embedding layers only so)."""
    if name in table.file_keys:
        return table.file_keys[name]
    component, _, path = name.partition(".")
    two_text_encoders = TEXT_ENCODER_2 in table.components
    flat = path.replace(".", "_")
    if component == UNET:
        ldm = table.ldm_name(name) if two_text_encoders else None
        return "lora_unet_" + (ldm.replace(".", "_") if ldm else flat)
    if component == TEXT_ENCODER:
        return ("lora_te1_" if two_text_encoders else "lora_te_") + flat
    if component == TEXT_ENCODER_2:
        return "lora_te2_" + flat
    if component == TEXT_ENCODER_3:
        return "lora_te3_" + flat
    raise ValueError(f"unknown component in layer name {name!r}")


def file_alpha(ranks: Iterable[int]) -> float:
    """The one alpha every layer of a file is written with: its most common rank (the larger on a
    tie), so that the most layers have scale ``alpha / rank = 1``, as a loader that ignores alpha
    assumes, and a file whose layers share one rank is written with alpha equal to it."""
    counts = Counter(ranks)
    return float(max(counts, key=lambda rank: (counts[rank], rank), default=1))   # 1: no layer reads it


def balanced_factors(delta: LowRankDelta, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` whose product times kohya's scale ``alpha / rank`` (1 when ``alpha`` is None)
    is the delta, with each rank-1 term's two factors given equal norms, which keeps both inside
    fp16's range and precision."""
    loader_scale = 1.0 if alpha is None else alpha / delta.rank
    up = delta.up.double() * (delta.scale / loader_scale)
    down = delta.down.double()
    up_norm = up.norm(dim=0)
    down_norm = down.norm(dim=1)
    factor = torch.where((up_norm > 0) & (down_norm > 0), (down_norm / up_norm.clamp_min(1e-300)).sqrt(),
                         torch.ones_like(up_norm))
    return (up * factor).float(), (down / factor[:, None]).float()


FP16_MAX = 6.0e4   # a little under fp16's largest finite value (65504)


def file_dtype(dtype: torch.dtype, *tensors: torch.Tensor) -> torch.dtype:
    """The precision to write ``tensors`` in: ``dtype``, or fp32 where fp16 cannot hold them (they
    would be written as inf)."""
    if dtype == torch.float16 and any(t.numel() and float(t.abs().max()) > FP16_MAX for t in tensors):
        return torch.float32
    return dtype


def cast_for_file(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LoRA's tensors in the precision chosen for its file: ``.alpha`` scalars kept as they are,
    and a tensor that fp16 cannot hold kept in fp32 rather than written as inf."""
    def cast(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key.endswith(".alpha") or not tensor.is_floating_point():
            return tensor
        return tensor.to(file_dtype(dtype, tensor))

    return {key: cast(key, tensor) for key, tensor in tensors.items()}


@dataclass
class MergedLora:
    """The result of a merge: one exact (or truncated) low-rank delta per layer."""

    layers: dict[str, LowRankDelta]
    table: LayerTable
    metadata: dict[str, str] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {name: delta.rank for name, delta in self.layers.items()}

    def dense(self, name: str) -> torch.Tensor:
        """The layer's delta as a dense weight-shaped tensor (for checks and for patching)."""
        info = self.table[name]
        return self.layers[name].dense().reshape(info.weight_shape)

    def state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The file's tensors: kohya's ``.lora_up.weight``, ``.lora_down.weight`` and ``.alpha`` per
        layer, every alpha the same (:func:`file_alpha`); or, for a table whose ``file_format`` is
        ``"peft"``, ``.lora_B.weight`` and ``.lora_A.weight`` with the scale folded in and no alpha."""
        out: dict[str, torch.Tensor] = {}
        peft = self.table.file_format == "peft"
        alpha = None if peft else file_alpha(self.ranks().values())
        up_suffix, down_suffix = ("lora_B", "lora_A") if peft else ("lora_up", "lora_down")
        for name in sorted(self.layers):
            info = self.table[name]
            up, down = balanced_factors(self.layers[name], alpha)
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise ValueError(f"merged delta of layer {name} is not finite; refusing to write it")
            rank = up.shape[1]
            layer_dtype = file_dtype(dtype, up, down)   # one precision for both factors of a layer
            if info.kind == "conv":
                up = up.reshape(info.out_features, rank, 1, 1)
                down = down.reshape(rank, info.in_features, *info.kernel)
            key = kohya_module_key(name, self.table)
            out[f"{key}.{up_suffix}.weight"] = up.to(layer_dtype)
            out[f"{key}.{down_suffix}.weight"] = down.to(layer_dtype)
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(alpha)
        return out

    def file_metadata(self) -> dict[str, str]:
        meta = {"iteris_format": FORMAT_VERSION,
                "iteris_ranks": json.dumps(self.ranks(), sort_keys=True),
                "iteris_base_architecture": self.table.architecture}
        family = family_by_id(self.table.architecture)
        if family is not None:   # the family, as other tools read it too (Stability's modelspec)
            meta["iteris_family"] = family.name
            if family.modelspec:
                meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": family.modelspec,
                             "modelspec.title": "IterIS merge"})
        meta.update(self.metadata)
        return meta

    def save(self, path: str | Path, *, dtype: str = "fp16", overwrite: bool = False) -> Path:
        """Write the ``.safetensors`` file (:meth:`state_dict`) atomically (temp file + rename)."""
        if dtype not in SAVE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
        return atomic_write_safetensors(self.state_dict(SAVE_DTYPES[dtype]), path, self.file_metadata(),
                                        overwrite=overwrite)
