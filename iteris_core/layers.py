"""Target layers of a Stable Diffusion model and every spelling a LoRA file uses for them.

A layer's canonical name is its diffusers module path with the component in front:
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (``text_encoder_2`` for SDXL's
second encoder). Text encoder paths keep ``text_model.``: published files and ComfyUI use it,
although transformers 5 dropped that attribute from ``CLIPTextModel``. The diffusers Flux.1 and SD3
pipelines use the same scheme: their transformer is ``unet.`` (the engine's name for the
denoiser), their encoders ``text_encoder``, ``text_encoder_2`` and SD3's T5 ``text_encoder_3``.

Files spell the same layer in other ways: kohya joins the path with underscores
(``lora_unet_down_blocks_0_...``, ``lora_te_text_model_...``) and, for SDXL, uses the original
LDM/SGM UNet paths (``lora_unet_input_blocks_4_1_...``). :class:`LayerTable` builds every alias
from the model's own layer list, so resolving a key is one dictionary lookup and nothing is
guessed from underscores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal

UNET = "unet"  # the denoiser, whatever it is (a UNet, or a DiT in ComfyUI's models)
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODER_3 = "text_encoder_3"  # SD3's T5 (diffusers' name)
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, UNET)  # DAG order: text encoders feed the UNet


def component_order(component: str) -> tuple[int, int, str]:
    """Sort key that puts text encoders (the diffusers names first, then any other, such as
    ComfyUI's ``clip_l`` or ``t5xxl``) before the denoiser, which reads their output."""
    known = COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS) - 1
    return (component == UNET, known, component)

LayerKind = Literal["linear", "conv"]


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts about one target layer (a Linear, or a Conv2d seen as a Linear over patches)."""

    name: str
    kind: LayerKind
    out_features: int
    in_features: int               # input channels for a conv
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def input_dim(self) -> int:
        """Width of the layer's input as a Linear: channels x kernel area for a conv."""
        return self.in_features * self.kernel[0] * self.kernel[1]

    @property
    def is_pointwise(self) -> bool:
        """A Linear, or a 1x1 conv (a Linear over channels)."""
        return self.kernel == (1, 1) and self.stride == (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features, *self.kernel)


def layer_info_from_module(name: str, module) -> LayerInfo | None:
    """LayerInfo for a torch Linear/Conv2d (or a subclass such as ComfyUI's casting ops)."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return LayerInfo(name, "linear", module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None  # grouped convs are not LoRA targets in SD models
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        if isinstance(module.padding, str):
            return None
        return LayerInfo(name, "conv", module.out_channels, module.in_channels, pair(module.kernel_size),
                         pair(module.stride), pair(module.padding), pair(module.dilation))
    return None


# --- UNet: diffusers paths <-> original LDM (SGM) paths ------------------------------------------

_RESNET_TO_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_TOP_FROM_LDM = {v: k for k, v in _TOP_TO_LDM.items()}


def _resnet_part(rest: str, table: dict[str, str]) -> str | None:
    """Rename a resnet-internal path (``conv1`` <-> ``in_layers.2`` ...), None if unknown."""
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def unet_path_to_ldm(path: str, layers_per_block: int, up_blocks_with_attention: frozenset[int]) -> str | None:
    """diffusers UNet module path -> LDM path, or None if the path has no LDM counterpart.

    ``layers_per_block`` is the number of resnets per down level (2 for SD1.x/2.x/SDXL);
    ``up_blocks_with_attention`` says which up levels have attentions, because the LDM index of
    an upsampler conv depends on it.
    """
    n = layers_per_block
    if path in _TOP_TO_LDM:
        return _TOP_TO_LDM[path]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        level, kind, k, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + level * (n + 1) + k
        if kind == "resnets":
            inner = _resnet_part(rest, _RESNET_TO_LDM)
            return None if inner is None else f"input_blocks.{index}.0.{inner}"
        return f"input_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, k, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        inner = _resnet_part(rest, _RESNET_TO_LDM)
        return None if inner is None else f"middle_block.{2 * k}.{inner}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        level, kind, k, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = level * (n + 1) + k
        if kind == "resnets":
            inner = _resnet_part(rest, _RESNET_TO_LDM)
            return None if inner is None else f"output_blocks.{index}.0.{inner}"
        return f"output_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        level = int(m[1])
        slot = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{level * (n + 1) + n}.{slot}.conv"
    return None


def unet_path_from_ldm(path: str, layers_per_block: int) -> str | None:
    """LDM UNet module path -> diffusers path (inverse of :func:`unet_path_to_ldm`)."""
    n = layers_per_block
    if path in _TOP_FROM_LDM:
        return _TOP_FROM_LDM[path]
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        index, slot, rest = int(m[1]), int(m[2]), m[3]
        if index == 0:
            return None
        level, k = divmod(index - 1, n + 1)
        if k == n:
            return f"down_blocks.{level}.downsamplers.0.conv" if (slot, rest) == (0, "op") else None
        if slot == 0:
            inner = _resnet_part(rest, _RESNET_FROM_LDM)
            return None if inner is None else f"down_blocks.{level}.resnets.{k}.{inner}"
        return f"down_blocks.{level}.attentions.{k}.{rest}" if slot == 1 else None
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        slot, rest = int(m[1]), m[2]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        inner = _resnet_part(rest, _RESNET_FROM_LDM)
        return None if inner is None or slot not in (0, 2) else f"mid_block.resnets.{slot // 2}.{inner}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        index, slot, rest = int(m[1]), int(m[2]), m[3]
        level, k = divmod(index, n + 1)
        if slot == 0:
            inner = _resnet_part(rest, _RESNET_FROM_LDM)
            return None if inner is None else f"up_blocks.{level}.resnets.{k}.{inner}"
        if rest == "conv" and k == n:
            return f"up_blocks.{level}.upsamplers.0.conv"
        return f"up_blocks.{level}.attentions.{k}.{rest}" if slot == 1 else None
    return None


# --- the table -----------------------------------------------------------------------------------

_KOHYA_TE_PREFIX = {TEXT_ENCODER: ("lora_te_", "lora_te1_"), TEXT_ENCODER_2: ("lora_te2_",)}


@dataclass
class LayerTable:
    """The target layers of one base model, with the aliases that LoRA files use for them."""

    layers: dict[str, LayerInfo]
    architecture: str = "custom"            # the family: "sd1", "sd2", "sdxl", "flux_dev", ... or "custom"
    unet_layers_per_block: int | None = None
    # module key to write for a layer, where the backend knows its loaders' spelling (ComfyUI's
    # key map); other layers are written in kohya naming by the writer
    file_keys: dict[str, str] = field(default_factory=dict)
    # how a file spells each module's tensors: "kohya" (.lora_up/.lora_down.weight and .alpha) or
    # "peft" (.lora_B/.lora_A.weight, the scale folded into them, no alpha): diffusers' Flux and
    # SD3 loaders load only the PEFT spelling completely
    file_format: Literal["kohya", "peft"] = "kohya"
    # more spellings of layers (spelling -> canonical name) that the backend knows files to use
    # (diffusers' ``transformer.`` prefix, OneTrainer's ``lora_transformer_``, T5's ``lora_te3_``)
    extra_aliases: dict[str, str] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._aliases = self._build_aliases()

    @classmethod
    def from_modules(cls, named: Iterable[tuple[str, object]], **kwargs) -> LayerTable:
        """Build from ``(canonical_name, module)`` pairs, keeping Linear and Conv2d modules."""
        layers = {}
        for name, module in named:
            info = layer_info_from_module(name, module)
            if info is not None:
                layers[name] = info
        return cls(layers, **kwargs)

    @property
    def components(self) -> list[str]:
        return sorted({info.component for info in self.layers.values()}, key=component_order)

    def in_component(self, component: str) -> dict[str, LayerInfo]:
        return {n: i for n, i in self.layers.items() if i.component == component}

    def ldm_name(self, name: str) -> str | None:
        """LDM path of a canonical UNet layer name (None for text encoder layers)."""
        component, _, path = name.partition(".")
        if component != UNET or self.unet_layers_per_block is None:
            return None
        return unet_path_to_ldm(path, self.unet_layers_per_block, self._up_levels_with_attention())

    def _up_levels_with_attention(self) -> frozenset[int]:
        return frozenset(int(m[1]) for n in self.layers
                         if (m := re.match(r"unet\.up_blocks\.(\d+)\.attentions\.", n)))

    def _build_aliases(self) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for name in self.layers:
            component, _, path = name.partition(".")
            spellings = {name}
            if component == UNET:
                spellings.add("lora_unet_" + path.replace(".", "_"))
                ldm = self.ldm_name(name)
                if ldm is not None:
                    spellings |= {"lora_unet_" + ldm.replace(".", "_"), "diffusion_model." + ldm,
                                  "model.diffusion_model." + ldm}
            elif component in _KOHYA_TE_PREFIX:
                short = path.removeprefix("text_model.")  # transformers-5 spelling
                spellings.add(f"{component}.{short}")
                # a bare lora_te_ means the first encoder, on SDXL too (ComfyUI and diffusers agree)
                for prefix in _KOHYA_TE_PREFIX[component]:
                    spellings.add(prefix + path.replace(".", "_"))
                    spellings.add(prefix + short.replace(".", "_"))
            for spelling in spellings:
                aliases[spelling] = name
        for spelling, name in self.extra_aliases.items():
            if name not in self.layers:
                raise ValueError(f"alias {spelling!r} names {name}, which is not a layer of the table")
            if aliases.setdefault(spelling, name) != name:
                raise ValueError(f"alias {spelling!r} would name both {aliases[spelling]} and {name}")
        return aliases

    def resolve(self, module_key: str) -> str | None:
        """Canonical layer name for a module key as spelled in a file, or None."""
        return self._aliases.get(module_key)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerInfo:
        return self.layers[name]

    def __len__(self) -> int:
        return len(self.layers)


_SHARED_INPUT = [
    # self-attention q/k/v read the same hidden states (SD's attn1; CLIP, Qwen and Llama text
    # encoders; T5; Qwen-Image's image and text streams)
    (re.compile(r"(?P<base>.+\.attn1)\.to_[qkv]$"), "{base}.<input>"),
    (re.compile(r"(?P<base>.+\.self_attn)\.[qkv]_proj$"), "{base}.<input>"),
    (re.compile(r"(?P<base>.+\.SelfAttention)\.[qkv]$"), "{base}.<input>"),
    # diffusers' Flux single blocks: q, k, v and the MLP's input read one normalised input (the
    # original model's fused linear1); SD3.5's second self-attention (attn2) reads the image tokens
    (re.compile(r"(?P<base>unet\.single_transformer_blocks\.\d+)\.(attn\.to_[qkv]|proj_mlp)$"), "{base}.<input>"),
    (re.compile(r"(?P<base>unet\.transformer_blocks\.\d+\.attn2)\.to_[qkv]$"), "{base}.<image input>"),
    (re.compile(r"(?P<base>unet\..+\.attn)\.to_[qkv]$"), "{base}.<image input>"),
    (re.compile(r"(?P<base>unet\..+\.attn)\.add_[qkv]_proj$"), "{base}.<text input>"),
    # gated MLPs: the gate and the up projection read the same input (Llama/Qwen, T5, Z-Image)
    (re.compile(r"(?P<base>.+\.mlp)\.(gate|up)_proj$"), "{base}.<input>"),
    (re.compile(r"(?P<base>.+\.DenseReluDense)\.wi_[01]$"), "{base}.<input>"),
    (re.compile(r"(?P<base>unet\..+\.feed_forward)\.w[13]$"), "{base}.<input>"),
    # every cross-attention k/v of an SD UNet (its transformer blocks sit inside down/mid/up blocks)
    # reads the same text context
    (re.compile(r"unet\..+\.transformer_blocks\.\d+\.attn2\.to_[kv]$"), "unet.<text context>"),
]


def input_group(name: str) -> str:
    """Key shared by layers that read the same input tensor, so that its statistics are
    accumulated once (the hooks verify at run time that the tensors really are the same)."""
    for pattern, template in _SHARED_INPUT:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return name
