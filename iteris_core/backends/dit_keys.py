"""The original (BFL Flux.1, SAI MMDiT) module names of the diffusers Flux and SD3 transformers.

kohya's sd-scripts, ComfyUI and most Flux/SD3 trainers name a LoRA's modules after the original
model (``lora_unet_double_blocks_0_img_attn_qkv``, ``diffusion_model.joint_blocks.0.x_block.mlp.fc1``),
whose attention projections are fused: one ``qkv`` Linear where diffusers has ``to_q``, ``to_k`` and
``to_v``, and Flux's single-block ``linear1`` also holding the MLP's input projection. Each
original module is listed here with the diffusers layers its output rows become, so a LoRA on it
can be split exactly: every part keeps the same down matrix and takes its rows of the up matrix
(the final layer's modulation stores shift before scale, diffusers scale before shift: its rows
are swapped, as ComfyUI's ``swap_scale_shift`` does).

The tables are built from the model's own widths and block counts, so they hold for any size
(diffusers' kohya converter assumes Flux.1's 3072/12288 widths and 19/38 blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import LoraFormatError
from ..lora_formats import ParsedLora, RawModule
from ..low_rank import LowRankDelta, factorize_exact
from ..lycoris import loha_dense, loha_factors, lokr_factors

Rows = tuple[tuple[int, int], ...]   # (start, length) ranges of the original rows, concatenated


@dataclass(frozen=True)
class NativePart:
    """One diffusers layer made of some rows of an original module."""

    path: str        # diffusers module path inside the transformer
    rows: Rows


@dataclass(frozen=True)
class NativeModule:
    """An original module and the diffusers layers its rows are split into."""

    name: str        # original module path, e.g. "double_blocks.0.img_attn.qkv"
    parts: tuple[NativePart, ...]

    @property
    def out_features(self) -> int:
        return sum(length for part in self.parts for _, length in part.rows)


def _whole(name: str, path: str, width: int) -> NativeModule:
    return NativeModule(name, (NativePart(path, ((0, width),)),))


def _split(name: str, paths: Iterable[str], widths: Iterable[int]) -> NativeModule:
    """An original module whose rows are the listed layers' rows, one after another."""
    parts, start = [], 0
    for path, width in zip(paths, widths):
        parts.append(NativePart(path, ((start, width),)))
        start += width
    return NativeModule(name, tuple(parts))


def _swapped(name: str, path: str, width: int) -> NativeModule:
    """The final layer's adaLN: the original stores (shift, scale), diffusers (scale, shift)."""
    return NativeModule(name, (NativePart(path, ((width, width), (0, width))),))


def flux_modules(double_blocks: int, single_blocks: int, hidden: int, mlp_hidden: int,
                 out_features: int) -> list[NativeModule]:
    """Flux.1's original modules (``comfy.ldm.flux.model.Flux``) over the diffusers
    ``FluxTransformer2DModel`` layers, for a model of these block counts and widths
    (``out_features``: the final projection's, patch area x latent channels)."""
    q, k, v = ("to_q", "to_k", "to_v")
    modules = []
    for i in range(double_blocks):
        old, new = f"double_blocks.{i}", f"transformer_blocks.{i}"
        modules += [
            _split(f"{old}.img_attn.qkv", [f"{new}.attn.{p}" for p in (q, k, v)], [hidden] * 3),
            _whole(f"{old}.img_attn.proj", f"{new}.attn.to_out.0", hidden),
            _whole(f"{old}.img_mlp.0", f"{new}.ff.net.0.proj", mlp_hidden),
            _whole(f"{old}.img_mlp.2", f"{new}.ff.net.2", hidden),
            _whole(f"{old}.img_mod.lin", f"{new}.norm1.linear", 6 * hidden),
            _split(f"{old}.txt_attn.qkv", [f"{new}.attn.add_{p}_proj" for p in "qkv"], [hidden] * 3),
            _whole(f"{old}.txt_attn.proj", f"{new}.attn.to_add_out", hidden),
            _whole(f"{old}.txt_mlp.0", f"{new}.ff_context.net.0.proj", mlp_hidden),
            _whole(f"{old}.txt_mlp.2", f"{new}.ff_context.net.2", hidden),
            _whole(f"{old}.txt_mod.lin", f"{new}.norm1_context.linear", 6 * hidden),
        ]
    for i in range(single_blocks):
        old, new = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        modules += [
            _split(f"{old}.linear1", [f"{new}.attn.{p}" for p in (q, k, v)] + [f"{new}.proj_mlp"],
                   [hidden] * 3 + [mlp_hidden]),
            _whole(f"{old}.linear2", f"{new}.proj_out", hidden),
            _whole(f"{old}.modulation.lin", f"{new}.norm.linear", 3 * hidden),
        ]
    modules += [
        _whole("img_in", "x_embedder", hidden),
        _whole("txt_in", "context_embedder", hidden),
        _whole("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", hidden),
        _whole("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", hidden),
        _whole("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", hidden),
        _whole("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", hidden),
        _whole("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", hidden),
        _whole("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", hidden),
        _swapped("final_layer.adaLN_modulation.1", "norm_out.linear", hidden),
        _whole("final_layer.linear", "proj_out", out_features),
    ]
    return modules


def sd3_modules(blocks: int, hidden: int, mlp_hidden: int, dual_attention_blocks: Iterable[int],
                out_features: int) -> list[NativeModule]:
    """SD3/SD3.5's original MMDiT modules (``comfy.ldm.modules.diffusionmodules.mmdit``) over the
    diffusers ``SD3Transformer2DModel`` layers. The last block's context stream stops after its
    attention input (no output projection or MLP) and its modulation is a final-layer-style
    (shift, scale) pair."""
    dual = set(dual_attention_blocks)
    modules = []
    for i in range(blocks):
        old, new = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == blocks - 1
        modules += [
            _split(f"{old}.x_block.attn.qkv", [f"{new}.attn.to_{p}" for p in "qkv"], [hidden] * 3),
            _whole(f"{old}.x_block.attn.proj", f"{new}.attn.to_out.0", hidden),
            _whole(f"{old}.x_block.mlp.fc1", f"{new}.ff.net.0.proj", mlp_hidden),
            _whole(f"{old}.x_block.mlp.fc2", f"{new}.ff.net.2", hidden),
            _whole(f"{old}.x_block.adaLN_modulation.1", f"{new}.norm1.linear", (9 if i in dual else 6) * hidden),
            _split(f"{old}.context_block.attn.qkv", [f"{new}.attn.add_{p}_proj" for p in "qkv"], [hidden] * 3),
        ]
        if i in dual:
            modules += [_split(f"{old}.x_block.attn2.qkv", [f"{new}.attn2.to_{p}" for p in "qkv"], [hidden] * 3),
                        _whole(f"{old}.x_block.attn2.proj", f"{new}.attn2.to_out.0", hidden)]
        if last:
            modules.append(_swapped(f"{old}.context_block.adaLN_modulation.1", f"{new}.norm1_context.linear", hidden))
        else:
            modules += [
                _whole(f"{old}.context_block.attn.proj", f"{new}.attn.to_add_out", hidden),
                _whole(f"{old}.context_block.mlp.fc1", f"{new}.ff_context.net.0.proj", mlp_hidden),
                _whole(f"{old}.context_block.mlp.fc2", f"{new}.ff_context.net.2", hidden),
                _whole(f"{old}.context_block.adaLN_modulation.1", f"{new}.norm1_context.linear", 6 * hidden),
            ]
    modules += [
        _whole("x_embedder.proj", "pos_embed.proj", hidden),
        _whole("context_embedder", "context_embedder", hidden),
        _whole("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", hidden),
        _whole("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", hidden),
        _whole("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", hidden),
        _whole("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", hidden),
        _swapped("final_layer.adaLN_modulation.1", "norm_out.linear", hidden),
        _whole("final_layer.linear", "proj_out", out_features),
    ]
    return modules


def fit_to(modules: list[NativeModule], widths: dict[str, int]) -> list[NativeModule]:
    """The modules whose every part is a layer of the model (``widths``: diffusers path -> output
    rows), checked against the model's widths."""
    kept = []
    for module in modules:
        if not all(part.path in widths for part in module.parts):
            continue     # a layer this model does not have (schnell's guidance_in)
        for part in module.parts:
            if sum(length for _, length in part.rows) != widths[part.path]:
                raise ValueError(f"{module.name}: its rows for {part.path} do not match the layer's "
                                 f"{widths[part.path]} outputs (an unusual model?)")
        kept.append(module)
    return kept


def spellings(module: NativeModule) -> list[str]:
    """Module keys that files use for an original module: kohya's flattened ``lora_unet_`` name and
    the dotted name, bare or under ComfyUI's ``diffusion_model.`` prefixes."""
    return ["lora_unet_" + module.name.replace(".", "_"), module.name, "diffusion_model." + module.name,
            "model.diffusion_model." + module.name]


# --- splitting a parsed file's original modules ------------------------------------------------

def _take(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return torch.cat([tensor[start:start + length] for start, length in rows])


def _low_rank(module: RawModule) -> LowRankDelta | None:
    """Exact factors of a non-LoRA module's delta (LoHa, LoKr, full difference); None if zero."""
    if module.kind == "lokr":
        return lokr_factors(module.parts, module.alpha)
    if module.kind == "loha":
        factors = loha_factors(module.parts, module.alpha)
        return factors if factors is not None else factorize_exact(loha_dense(module.parts, module.alpha).flatten(1))
    return factorize_exact(module.parts["diff"].float().flatten(1))


def _lora_part(module: RawModule, rows: Rows, key: str) -> RawModule:
    """A LoRA's part on some rows: the same down matrix, those rows of up. Rank columns that are
    zero on these rows (a fused LoRA trained as separate q, k, v) are dropped, with alpha changed
    so that the scale is the module's own."""
    up = _take(module.parts["up"], rows)
    down = module.parts["down"]
    rank, alpha = down.shape[0], module.alpha
    used = up.flatten(1).abs().sum(dim=0) > 0
    kept = int(used.sum())
    if "mid" not in module.parts and 0 < kept < rank:
        up, down = up[:, used], down[used]
        if alpha is not None:   # kohya's alpha / rank (rsLoRA: / sqrt(rank)) must stay the same
            alpha = alpha * (kept / rank) ** (0.5 if module.rslora else 1.0)
    return RawModule(key, "lora", {**module.parts, "up": up, "down": down}, alpha=alpha, rslora=module.rslora)


def _dense_part(delta: LowRankDelta, rows: Rows, key: str) -> RawModule:
    up = _take(delta.up * delta.scale, rows)
    return RawModule(key, "lora", {"up": up, "down": delta.down}, alpha=None)


def split_module(module: RawModule, native: NativeModule, prefix: str, source: str) -> list[RawModule]:
    """The parts of one original module's adapter, as modules named ``prefix + <diffusers path>``
    (none if the adapter is zero)."""
    delta = None if module.kind == "lora" else _low_rank(module)
    if module.kind != "lora" and delta is None:
        return []
    rows = module.parts["up"].shape[0] if delta is None else delta.out_features
    if rows != native.out_features:
        raise LoraFormatError(source, f"{native.name} has {native.out_features} output rows in this model but the "
                              f"file's {module.kind} module has {rows}", module.key)
    parts = []
    for part in native.parts:
        key = prefix + part.path
        split = _lora_part(module, part.rows, key) if delta is None else _dense_part(delta, part.rows, key)
        if module.dora is not None:
            if module.dora.shape[0] != native.out_features:
                raise LoraFormatError(source, "its DoRA magnitude is not one per output row, so the fused module "
                                      "cannot be split into the model's layers", module.key)
            split.dora = _take(module.dora, part.rows)   # per output row: each part keeps its rows
        parts.append(split)
    return parts


def split_native(parsed: ParsedLora, modules: list[NativeModule], prefix: str) -> ParsedLora:
    """``parsed`` with every module named after an original module replaced by its parts on the
    diffusers layers (named ``prefix + <path>``); other modules are kept as they are."""
    by_spelling = {spelling: module for module in modules for spelling in spellings(module)}
    out: list[RawModule] = []
    skipped = list(parsed.skipped)
    for raw in parsed.modules:
        native = by_spelling.get(raw.key)
        if native is None:
            out.append(raw)
            continue
        parts = split_module(raw, native, prefix, parsed.source)
        if not parts:
            skipped.append(f"{raw.key}: zero delta, nothing to merge")
        out += parts
    return ParsedLora(parsed.source, out, skipped, parsed.layout)
