"""The diffusers backend for flow-matching DiT pipelines: Flux.1 (dev, schnell) and SD3/SD3.5.

One class serves both; what differs is data in a :class:`DitRecipe`, read off diffusers'
``pipeline_flux.py`` and ``pipeline_stable_diffusion_3.py`` so that the backend conditions and
samples as the pipelines do:

- text: Flux takes CLIP-L's pooled output and T5's last hidden state; SD3 takes both CLIPs'
  penultimate hidden states side by side, zero-padded to T5's width and followed by T5's tokens,
  and the two CLIPs' projected pooled outputs side by side;
- latents: Flux packs 2x2 latent patches into tokens and gives the transformer their positions
  (image ids) and zero text ids; SD3 patchifies inside the transformer;
- time: both step FlowMatchEulerDiscreteScheduler on the pipeline's own configuration (shift, or
  the resolution-dependent ``mu``); Flux passes the sigmas ``linspace(1, 1/N, N)`` and reads
  ``t / 1000``, SD3 lets the scheduler space them and reads ``t``;
- guidance: Flux.1 dev embeds a distilled guidance value; classifier-free guidance is Flux's
  "true CFG" (one call with the prompt, then one with the negative) or SD3's one batched call on
  [negative, prompt].

Layers are the transformer's Linear and Conv2d modules as ``unet.<diffusers path>`` (the engine's
name for the denoiser) and every text encoder's as ``<pipeline attribute>.<path>``; a LoRA that
leaves T5 alone makes no T5 statistics, because only the layers the LoRAs change are merged.
LoRA files in diffusers/PEFT, ai-toolkit, OneTrainer and SimpleTuner spellings name those layers
directly; kohya's and ComfyUI's original-model names (fused ``qkv``, Flux's ``linear1``) are split
onto them exactly by :mod:`.dit_keys`, and the engine's own readers do the rest (scales, formats).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import IterisError, LoraFormatError, SettingsError
from ..families import check_lora_family, family_by_id
from ..layers import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, UNET, LayerTable
from ..lora_formats import parse_lora
from ..lora_io import LoraFile
from ..lora_normalize import NormalizedLora, normalize_lora
from ..memory import unet_activation_bytes
from ..settings import SamplingSettings
from ..adapter_hooks import StopPass
from .base import LatentSample, ModuleTableMixin, StepCallback, TextBatch
from .diffusers_backend import _text_path
from .dit_keys import NativeModule, fit_to, flux_modules, sd3_modules, split_native

DENOISER_PREFIX = "transformer."   # diffusers' (and ai-toolkit's, SimpleTuner's) name for the DiT


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a pipeline."""

    attribute: str            # the pipeline's attribute (also the layer names' component)
    tokenizer: str            # its tokenizer's attribute
    comfy_name: str           # ComfyUI's name for it: files ComfyUI saves say text_encoders.<name>.transformer.
    kohya_prefix: str         # kohya's (and ComfyUI's) prefix for its layers
    clip: bool                # a CLIP (its paths keep ``text_model.``), else T5


@dataclass(frozen=True)
class DitRecipe:
    """What one family of flow-matching pipelines does differently (see the module docstring)."""

    pipeline_class: str
    transformer_class: str
    text_encoders: tuple[TextEncoderSlot, ...]
    encode: Callable[[DitBackend, Sequence[str]], TextBatch]
    packs_latents: bool       # Flux: 2x2 latent patches packed into tokens, with image/text ids
    timestep_divisor: float   # the transformer reads t / this
    timestep_in_model_dtype: bool   # Flux casts t to the latents' dtype first; SD3 keeps it fp32
    batched_cfg: bool         # one call on [negative, prompt] (SD3), else prompt then negative (Flux)
    flux_sigmas: bool         # sigmas linspace(1, 1/N, N) given to the scheduler (Flux)
    default_max_shift: float  # calculate_shift's max_shift when the scheduler config has none
    native_modules: Callable[[torch.nn.Module], list[NativeModule]]
    family: Callable[[torch.nn.Module], str]
    reads_xlabs: bool = False   # XLabs' Flux LoRA layout (``double_blocks.N.processor.qkv_lora1``)


# --- text conditioning, as the pipelines' encode_prompt ---------------------------------------

def _tokens(tokenizer, prompts: Sequence[str], length: int, device: torch.device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return ids.input_ids.to(device)


def _encode_flux(backend: DitBackend, prompts: Sequence[str]) -> TextBatch:
    """``FluxPipeline.encode_prompt``: CLIP-L's pooled output, T5's last hidden state."""
    clip, t5 = backend.text_encoders[TEXT_ENCODER], backend.text_encoders[TEXT_ENCODER_2]
    pooled = clip(_tokens(backend.tokenizers[TEXT_ENCODER], prompts, backend.clip_length, backend.device),
                  output_hidden_states=False).pooler_output
    hidden = t5(_tokens(backend.tokenizers[TEXT_ENCODER_2], prompts, backend.max_sequence_length, backend.device),
                output_hidden_states=False)[0]
    return TextBatch({"encoder_hidden_states": hidden, "pooled_projections": pooled})


def _encode_sd3(backend: DitBackend, prompts: Sequence[str]) -> TextBatch:
    """``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate states side by side,
    padded to T5's width, then T5's tokens; both CLIPs' projected pooled outputs side by side. A
    pipeline without T5 gets zeros in its place, as diffusers does."""
    hidden_states, pooled = [], []
    for component in (TEXT_ENCODER, TEXT_ENCODER_2):
        out = backend.text_encoders[component](
            _tokens(backend.tokenizers[component], prompts, backend.clip_length, backend.device),
            output_hidden_states=True)
        pooled.append(out[0])
        hidden_states.append(out.hidden_states[-2])
    clip_states = torch.cat(hidden_states, dim=-1)
    t5 = backend.text_encoders.get(TEXT_ENCODER_3)
    if t5 is None:
        width = backend.transformer.config.joint_attention_dim
        t5_states = clip_states.new_zeros(len(prompts), backend.max_sequence_length, width)
    else:
        t5_states = t5(_tokens(backend.tokenizers[TEXT_ENCODER_3], prompts, backend.max_sequence_length,
                               backend.device))[0]
    clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return TextBatch({"encoder_hidden_states": torch.cat([clip_states, t5_states], dim=-2),
                      "pooled_projections": torch.cat(pooled, dim=-1)})


# --- the original models' module names ---------------------------------------------------------

def _output_widths(transformer: torch.nn.Module) -> dict[str, int]:
    return {name: m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
            for name, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _flux_native(transformer: torch.nn.Module) -> list[NativeModule]:
    config, widths = transformer.config, _output_widths(transformer)
    hidden = config.num_attention_heads * config.attention_head_dim
    mlp = widths.get("single_transformer_blocks.0.proj_mlp") or widths.get("transformer_blocks.0.ff.net.0.proj", 0)
    return fit_to(flux_modules(config.num_layers, config.num_single_layers, hidden, mlp, widths["proj_out"]), widths)


def _sd3_native(transformer: torch.nn.Module) -> list[NativeModule]:
    config, widths = transformer.config, _output_widths(transformer)
    hidden = config.num_attention_heads * config.attention_head_dim
    return fit_to(sd3_modules(config.num_layers, hidden, widths["transformer_blocks.0.ff.net.0.proj"],
                              config.dual_attention_layers or (), widths["proj_out"]), widths)


_CLIP_L = TextEncoderSlot(TEXT_ENCODER, "tokenizer", "clip_l", "lora_te1_", clip=True)

FLUX = DitRecipe(
    pipeline_class="FluxPipeline", transformer_class="FluxTransformer2DModel",
    text_encoders=(_CLIP_L, TextEncoderSlot(TEXT_ENCODER_2, "tokenizer_2", "t5xxl", "lora_te3_", clip=False)),
    encode=_encode_flux, packs_latents=True, timestep_divisor=1000.0, timestep_in_model_dtype=True,
    batched_cfg=False, flux_sigmas=True, default_max_shift=1.15, native_modules=_flux_native,
    family=lambda transformer: "flux_dev" if transformer.config.guidance_embeds else "flux_schnell",
    reads_xlabs=True)

SD3 = DitRecipe(
    pipeline_class="StableDiffusion3Pipeline", transformer_class="SD3Transformer2DModel",
    text_encoders=(_CLIP_L, TextEncoderSlot(TEXT_ENCODER_2, "tokenizer_2", "clip_g", "lora_te2_", clip=True),
                   TextEncoderSlot(TEXT_ENCODER_3, "tokenizer_3", "t5xxl", "lora_te3_", clip=False)),
    encode=_encode_sd3, packs_latents=False, timestep_divisor=1.0, timestep_in_model_dtype=False,
    batched_cfg=True, flux_sigmas=False, default_max_shift=1.16, native_modules=_sd3_native,
    family=lambda transformer: "sd3")

RECIPES = {recipe.pipeline_class: recipe for recipe in (FLUX, SD3)}


# --- XLabs' Flux LoRAs ------------------------------------------------------------------------

def is_xlabs(tensors) -> bool:
    """XLabs' layout: attention-processor LoRAs (``double_blocks.0.processor.qkv_lora1.down.weight``)."""
    return any(".processor." in key and "_lora" in key for key in tensors)


def from_xlabs(lora: LoraFile) -> LoraFile:
    """An XLabs Flux LoRA in diffusers' spelling, by diffusers' own converter (which
    ``FluxLoraLoaderMixin`` uses for these files; XLabs files carry no alpha: scale 1)."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    try:
        tensors = _convert_xlabs_flux_lora_to_diffusers(dict(lora.tensors))
    except (ValueError, KeyError, AttributeError, AssertionError) as exc:
        raise LoraFormatError(lora.name, f"its XLabs-style keys are not all readable by diffusers' converter: "
                              f"{exc}") from None
    return dataclasses.replace(lora, tensors=tensors)


# --- layers ------------------------------------------------------------------------------------

def dit_modules(recipe: DitRecipe, transformer: torch.nn.Module,
                text_encoders: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Every module by canonical name: ``unet.<transformer path>`` and ``<attribute>.<path>`` of
    each text encoder present (CLIP paths with ``text_model.``, as published files spell them)."""
    modules = {f"{UNET}.{n}": m for n, m in transformer.named_modules() if n}
    for slot in recipe.text_encoders:
        encoder = text_encoders.get(slot.attribute)
        if encoder is not None:
            path = _text_path if slot.clip else (lambda name: name)
            modules.update({f"{slot.attribute}.{path(n)}": m for n, m in encoder.named_modules() if n})
    return modules


def dit_table(recipe: DitRecipe, modules: dict[str, torch.nn.Module], architecture: str) -> LayerTable:
    """The layer table, with the spellings files use for the layers and the one merged files are
    written in: diffusers' ``transformer.<path>`` for the denoiser and ``text_encoder(_2).text_model...``
    for the CLIPs' encoder layers, which both diffusers' and ComfyUI's loaders map; kohya's
    ``lora_teN_`` for a CLIP's projection and T5, which ComfyUI maps only so (and diffusers'
    Flux/SD3 loaders not at all)."""
    layers = LayerTable.from_modules(modules.items()).layers
    slots = {slot.attribute: slot for slot in recipe.text_encoders}
    file_keys, aliases = {}, {}
    for name in layers:
        component, _, path = name.partition(".")
        flat = path.replace(".", "_")
        if component == UNET:
            file_keys[name] = DENOISER_PREFIX + path
            spellings = [DENOISER_PREFIX + path, "lora_transformer_" + flat, "lycoris_" + flat]
        else:
            slot = slots[component]
            spellings = [f"text_encoders.{slot.comfy_name}.transformer.{path}", slot.kohya_prefix + flat]
            plain = slot.clip and path != "text_projection"
            file_keys[name] = name if plain else slot.kohya_prefix + flat
        aliases.update({spelling: name for spelling in spellings})
    return LayerTable(layers, architecture=architecture, file_format="peft", file_keys=file_keys,
                      extra_aliases=aliases)


# --- latents -----------------------------------------------------------------------------------

def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for an (h, w) latent."""
    b, _, channels = tokens.shape
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positions of the packed tokens of an (h, w) latent: ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """The pipelines' resolution-dependent shift ``mu``: linear in the image's token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def _placement(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when there is one) and forward dtype (bf16 on a GPU, the precision these
    models are released and usually run in) of a backend."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


# --- the backend -------------------------------------------------------------------------------

class DitBackend(ModuleTableMixin):
    """A diffusers FluxPipeline or StableDiffusion3Pipeline as a
    :class:`~iteris_core.backends.base.ModelBackend`."""

    def __init__(self, pipe, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
                 max_sequence_length: int | None = None):
        recipe = RECIPES.get(type(pipe).__name__)
        if recipe is None:
            raise IterisError(f"the diffusers DiT backend takes {' or '.join(RECIPES)}, not {type(pipe).__name__}")
        self.recipe = recipe
        self.device, self.dtype = _placement(device, dtype)
        self.transformer = self._place(pipe.transformer)
        self.text_encoders: dict[str, torch.nn.Module] = {}
        self.tokenizers = {}
        for slot in recipe.text_encoders:
            encoder = getattr(pipe, slot.attribute, None)
            if encoder is not None:   # SD3 runs without T5 (zeros in its place)
                self.text_encoders[slot.attribute] = self._place(encoder)
                self.tokenizers[slot.attribute] = getattr(pipe, slot.tokenizer)
        self.clip_length = pipe.tokenizer_max_length
        # the pipelines' own default T5 length (512 for Flux, 256 for SD3), unless told otherwise
        default_length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        self.max_sequence_length = max_sequence_length or default_length
        self.vae_scale_factor = pipe.vae_scale_factor
        self.default_side = pipe.default_sample_size * pipe.vae_scale_factor
        self.scheduler_config = dict(pipe.scheduler.config)
        self.architecture = recipe.family(self.transformer)
        self.family = family_by_id(self.architecture)
        self.identity = getattr(pipe, "identity", None) or f"{type(pipe).__name__} ({self.family.name})"
        self.pipe = pipe
        self._modules = dit_modules(recipe, self.transformer, self.text_encoders)
        self._table = dit_table(recipe, self._modules, self.architecture)
        # the original-model modules (kohya, ComfyUI names) that LoRA files may name, split on reading
        self.native_modules = recipe.native_modules(self.transformer)

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        # cast only when needed: diffusers warns about every cast of a model, even to its own dtype
        module = module.to(self.device)
        if any(p.dtype != self.dtype for p in module.parameters()):
            module = module.to(self.dtype)
        return module.eval()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None, *,
                        config: str | Path | None = None, max_sequence_length: int | None = None) -> DitBackend:
        """Load a local diffusers Flux.1 or SD3 folder, or a single-file transformer checkpoint with
        ``config``: a local diffusers folder of the same family, whose transformer configuration,
        text encoders, tokenizers and scheduler it is loaded with (single files hold only the
        transformer, or lack the tokenizers)."""
        path = Path(path)
        _, dtype = _placement(device, dtype)   # loaded in it: a full-size Flux.1 in fp32 takes ~70 GB
        if path.is_dir():
            pipe = load_pipeline_folder(path, dtype)
            pipe.identity = path.name
        elif path.is_file():
            pipe = load_single_file_pipeline(path, config, dtype)
        else:
            raise IterisError(f"base model {path} not found: give a diffusers folder or a .safetensors checkpoint")
        return cls(pipe, device, dtype, max_sequence_length=max_sequence_length)

    # -- ModelBackend (table, modules and base weights come from ModuleTableMixin) ----------------
    def roots(self, component: str) -> list[torch.nn.Module]:
        if component == UNET:
            return [self.transformer]
        encoder = self.text_encoders.get(component)
        return [] if encoder is None else [encoder]

    def weights_bytes(self, component: str) -> int:
        return sum(p.numel() * p.element_size() for root in self.roots(component) for p in root.parameters())

    def read_lora(self, lora: LoraFile) -> NormalizedLora:
        """The LoRA placed on this model's layers: a file that names another family is refused
        first; XLabs' Flux files go through diffusers' own converter; original-model modules
        (kohya, ComfyUI) are split onto the diffusers layers."""
        check_lora_family(lora.name, lora.tensors, lora.metadata, self.family)
        if self.recipe.reads_xlabs and is_xlabs(lora.tensors):
            lora = from_xlabs(lora)
        parsed = split_native(parse_lora(lora), self.native_modules, DENOISER_PREFIX)
        return normalize_lora(parsed, self._table, self.base_weight, sha256=lora.sha256, metadata=lora.metadata)

    def encode_text(self, prompts: Sequence[str]) -> list[TextBatch]:
        """One batch through the text encoders, split into one-row conditionings (on the CPU)."""
        batch = self.recipe.encode(self, prompts).to("cpu")
        return [batch.select([row]) for row in range(len(prompts))]

    def resolution(self, settings: SamplingSettings) -> tuple[int, int]:
        height, width = settings.height or self.default_side, settings.width or self.default_side
        step = self.vae_scale_factor * self._patch
        if height % step or width % step:
            raise SettingsError(f"{self.family.name} samples sides that are multiples of {step} pixels, not "
                                f"{height} x {width}")
        return height, width

    @property
    def _patch(self) -> int:
        """Latent pixels per image token side: Flux's 2x2 packing, SD3's patch size."""
        return 2 if self.recipe.packs_latents else self.transformer.config.patch_size

    def _latent_shape(self, settings: SamplingSettings) -> tuple[int, int, int]:
        height, width = self.resolution(settings)
        channels = self.transformer.config.in_channels // (4 if self.recipe.packs_latents else 1)
        return channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def activation_bytes(self, settings: SamplingSettings) -> int:
        """The SD estimate's formula over the transformer's joint sequence (image and text tokens)
        at its width, for the largest call: SD3 batches both conditionings, Flux calls them apart."""
        _, h, w = self._latent_shape(settings)
        tokens = (h // self._patch) * (w // self._patch) + self.max_sequence_length + \
            (self.clip_length if self.recipe.batched_cfg else 0)
        rows = settings.batch_size * (2 if settings.uses_cfg and self.recipe.batched_cfg else 1)
        config = self.transformer.config
        hidden = config.num_attention_heads * config.attention_head_dim
        return unet_activation_bytes(tokens, hidden, rows, config.num_attention_heads * tokens * tokens,
                                     torch.finfo(self.dtype).bits // 8,
                                     attention_materialised=self.device.type == "cpu")

    # -- the denoiser ----------------------------------------------------------------------------
    def _guidance(self, rows: int, settings: SamplingSettings) -> torch.Tensor | None:
        """Flux.1 dev's embedded guidance (the settings', else the family's default), else None."""
        if not self.transformer.config.get("guidance_embeds", False):
            return None
        value = settings.distilled_guidance
        value = self.family.defaults.guidance if value is None else value
        return torch.full([rows], float(value), device=self.device, dtype=torch.float32)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextBatch,
                settings: SamplingSettings) -> torch.Tensor:
        """One transformer call: ``latents`` (B, C, h, w) at ``timesteps`` (B,) under ``cond``
        (B rows); the prediction in the latents' layout."""
        rows, _, h, w = latents.shape
        hidden = cond.tensors["encoder_hidden_states"].to(self.device, self.dtype)
        pooled = cond.tensors["pooled_projections"].to(self.device, self.dtype)
        x = latents.to(self.device, self.dtype)
        t = timesteps.to(self.device)
        t = (t.to(self.dtype) if self.recipe.timestep_in_model_dtype else t) / self.recipe.timestep_divisor
        if not self.recipe.packs_latents:
            return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                                    pooled_projections=pooled, return_dict=False)[0]
        out = self.transformer(hidden_states=pack(x), timestep=t, guidance=self._guidance(rows, settings),
                               pooled_projections=pooled, encoder_hidden_states=hidden,
                               txt_ids=torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype),
                               img_ids=image_ids(h, w, self.device, self.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def _calls(self, latents: torch.Tensor, timesteps: torch.Tensor, positive: TextBatch, negative: TextBatch | None,
               settings: SamplingSettings) -> list[torch.Tensor]:
        """The transformer calls of one step, as the pipeline makes them: [prompt] without CFG;
        SD3 one call on [negative, prompt]; Flux's true CFG the prompt, then the negative. Each
        call may be stopped early by the engine (its statistics are in): it then predicts zeros."""
        rows = latents.shape[0]   # the conditionings are one prompt's (one row each)

        def call(x: torch.Tensor, t: torch.Tensor, cond: TextBatch) -> torch.Tensor:
            try:
                return self.predict(x, t, cond, settings)
            except StopPass:
                return torch.zeros_like(x, dtype=self.dtype, device=self.device)

        cond = TextBatch.cat([positive] * rows)
        if negative is None:
            return [call(latents, timesteps, cond)]
        uncond = TextBatch.cat([negative] * rows)
        if self.recipe.batched_cfg:
            both = call(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), TextBatch.cat([uncond, cond]))
            uncond_pred, cond_pred = both.chunk(2)
            return [uncond_pred, cond_pred]
        cond_pred = call(latents, timesteps, cond)
        return [call(latents, timesteps, uncond), cond_pred]

    def _scheduler(self, settings: SamplingSettings, tokens: int):
        """The pipeline's scheduler, set to ``settings.steps`` as its pipeline sets it."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        config = scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", self.recipe.default_max_shift))
        if self.recipe.flux_sigmas and not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / settings.steps, settings.steps)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(settings.steps, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    def _check_sampler(self, settings: SamplingSettings) -> None:
        schedules = {"normal", self.family.defaults.scheduler}
        if settings.sampler != "euler" or settings.scheduler not in schedules:
            raise SettingsError(f"the diffusers backend samples {self.family.name} with flow-matching Euler on its "
                                f"pipeline's own schedule (sampler 'euler', scheduler "
                                f"{' or '.join(sorted(schedules))}), not {settings.sampler} / {settings.scheduler}")

    def sample(self, positive: TextBatch, negative: TextBatch | None, seeds: Sequence[int], settings: SamplingSettings,
               keep_steps: Sequence[int], on_step: StepCallback) -> list[list[LatentSample]]:
        self._check_sampler(settings)
        shape = self._latent_shape(settings)
        # one generator per seed, as the pipeline draws a list of generators' noise (in its dtype)
        noise = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s)), dtype=self.dtype)
                 for s in seeds]
        latents = torch.cat(noise).to(self.device)
        scheduler = self._scheduler(settings, (shape[1] // self._patch) * (shape[2] // self._patch))
        keep = set(keep_steps)
        kept: list[list[LatentSample]] = [[] for _ in seeds]
        for step, t in enumerate(scheduler.timesteps):
            if step in keep:
                for j in range(len(seeds)):
                    kept[j].append(LatentSample(latents[j].detach().to("cpu", torch.float32),
                                                t.detach().to("cpu", torch.float32).reshape(()), step))
            on_step(step)
            timesteps = t.expand(latents.shape[0])
            predictions = self._calls(latents, timesteps, positive, negative, settings)
            if negative is None:
                prediction = predictions[0]
            else:
                uncond_pred, cond_pred = predictions
                prediction = uncond_pred + settings.guidance * (cond_pred - uncond_pred)
            # the pipelines step the packed latents; the scheduler's update is elementwise, so
            # stepping them unpacked is the same arithmetic
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        return kept

    def replay(self, positive: TextBatch, negative: TextBatch | None, samples: Sequence[LatentSample],
               settings: SamplingSettings) -> None:
        """The step's transformer calls on the stored samples, as the sampler made them."""
        latents = torch.stack([s.latent for s in samples]).to(self.dtype)
        timesteps = torch.stack([s.timestep.reshape(()) for s in samples])
        self._calls(latents, timesteps, positive, negative, settings)


# --- loading -----------------------------------------------------------------------------------

def pipeline_class_of_folder(path: Path) -> str | None:
    """The pipeline class a diffusers folder names (``model_index.json``), or None."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        return None


def load_pipeline_folder(path: Path, dtype: torch.dtype = torch.float32):
    """A local diffusers Flux or SD3 folder, offline, in ``dtype``, without its VAE (a merge never
    decodes)."""
    import diffusers

    name = pipeline_class_of_folder(path)
    if name not in RECIPES:
        raise IterisError(f"{path} is not a diffusers Flux.1 or SD3 folder (model_index.json names {name!r}; "
                          f"expected one of {', '.join(RECIPES)})")
    try:
        return getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, vae=None, torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise IterisError(f"cannot load the diffusers folder {path}: {exc}") from None


# tensor-name prefixes of each family's original (BFL, SAI) transformer checkpoints
_SINGLE_FILE_SIGNS = {"FluxPipeline": ("double_blocks.", "single_blocks."),
                      "StableDiffusion3Pipeline": ("joint_blocks.",)}


def single_file_pipeline_class(path: Path) -> str | None:
    """The DiT pipeline a single-file checkpoint's transformer belongs to (from its tensor names,
    read from the header only), or None when it is not a Flux.1 or SD3 transformer."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except (OSError, SafetensorError):   # not a safetensors file: the SD loader says why
        return None
    bare = [k.removeprefix("model.diffusion_model.") for k in keys]
    for name, signs in _SINGLE_FILE_SIGNS.items():
        if any(k.startswith(signs) for k in bare):
            return name
    return None


def load_single_file_pipeline(path: Path, config: str | Path | None, dtype: torch.dtype = torch.float32):
    """A pipeline in ``dtype`` whose transformer is the single file's and whose other parts come
    from ``config``, a local diffusers folder of the same family."""
    import diffusers

    name = single_file_pipeline_class(path)
    if name is None:
        raise IterisError(f"{path.name} is not a Flux.1 or SD3 transformer checkpoint")
    recipe = RECIPES[name]
    if config is None:
        raise IterisError(f"{path.name} is a single-file {recipe.transformer_class} checkpoint: give a local diffusers "
                          f"{name} folder as its config (--config DIR, or config= in the API), whose transformer "
                          "configuration, text encoders, tokenizers and scheduler it is loaded with; single files "
                          "carry no tokenizers and diffusers would download the rest")
    config = Path(config)
    if pipeline_class_of_folder(config) != name:
        raise IterisError(f"the config folder {config} is not a diffusers {name} folder (model_index.json names "
                          f"{pipeline_class_of_folder(config)!r})")
    try:
        transformer = getattr(diffusers, recipe.transformer_class).from_single_file(
            str(path), config=str(config), subfolder="transformer", local_files_only=True, torch_dtype=dtype)
        pipe = getattr(diffusers, name).from_pretrained(str(config), transformer=transformer, vae=None,
                                                        local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as exc:
        raise IterisError(f"cannot load {path.name} with the config folder {config}: {exc}") from None
    pipe.identity = f"{path.name} ({name})"
    return pipe


def is_dit_model(path: Path) -> bool:
    """Whether a base-model path is a Flux.1 or SD3 pipeline folder or single-file transformer."""
    if path.is_dir():
        return pipeline_class_of_folder(path) in RECIPES
    return path.is_file() and single_file_pipeline_class(path) is not None
