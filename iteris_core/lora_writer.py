"""The merged LoRA and its kohya-format file.

kohya naming (``lora_unet_<diffusers path>``, ``lora_te_``/``lora_te1_``/``lora_te2_``) is the one
that both ComfyUI's stock LoraLoader and diffusers' ``load_lora_weights`` map for SD1.x, SD2.x
and SDXL; ComfyUI 0.3.75 does not map PEFT-style UNet keys. Each layer's scale is folded into its
factors and alpha is written equal to the rank, so every loader computes scale 1: diffusers has
been seen to give layers the most common alpha instead of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import family_by_id
from .layers import TEXT_ENCODER, TEXT_ENCODER_2, UNET, LayerTable
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
    raise ValueError(f"unknown component in layer name {name!r}")


def balanced_factors(delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with the scale folded in and each rank-1 term's two factors given equal
    norms, which keeps both inside fp16's range and precision."""
    up = delta.up.double() * delta.scale
    down = delta.down.double()
    up_norm = up.norm(dim=0)
    down_norm = down.norm(dim=1)
    factor = torch.where((up_norm > 0) & (down_norm > 0), (down_norm / up_norm.clamp_min(1e-300)).sqrt(),
                         torch.ones_like(up_norm))
    return (up * factor).float(), (down / factor[:, None]).float()


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
        """kohya-format tensors: ``.lora_up.weight``, ``.lora_down.weight`` and ``.alpha`` per layer."""
        out: dict[str, torch.Tensor] = {}
        for name in sorted(self.layers):
            info = self.table[name]
            up, down = balanced_factors(self.layers[name])
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise ValueError(f"merged delta of layer {name} is not finite; refusing to write it")
            rank = up.shape[1]
            if dtype == torch.float16 and max(up.abs().max(), down.abs().max()) > 6.0e4:
                dtype = torch.float32  # out of fp16 range even after balancing: keep full precision
            if info.kind == "conv":
                up = up.reshape(info.out_features, rank, 1, 1)
                down = down.reshape(rank, info.in_features, *info.kernel)
            key = kohya_module_key(name, self.table)
            out[f"{key}.lora_up.weight"] = up.to(dtype)
            out[f"{key}.lora_down.weight"] = down.to(dtype)
            out[f"{key}.alpha"] = torch.tensor(float(rank))
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
        """Write the kohya-format ``.safetensors`` atomically (temp file + rename)."""
        if dtype not in SAVE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
        return atomic_write_safetensors(self.state_dict(SAVE_DTYPES[dtype]), path, self.file_metadata(),
                                        overwrite=overwrite)
