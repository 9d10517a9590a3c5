"""ComfyUI's MODEL and CLIP as an IterIS model backend, for every family ComfyUI loads.

Nothing here knows a family's layers, keys, sampler or text encoders: ComfyUI's own machinery
does each job. The model's class (``comfy/supported_models.py``, chosen by ComfyUI's detection)
names the family in :mod:`iteris_core.families`; LoRAs are placed by ComfyUI's key maps and
parser (:mod:`.comfy_lora`); prompts are encoded by the CLIP object itself, whatever its text
encoders; trajectories are sampled by ``comfy.samplers.KSampler`` with the model's own
model_sampling and conditioning, their points kept through the sampler's callback; and stored
points are replayed through a ``CFGGuider``, so the family's own cond processing (pooled
vectors, Flux's guidance, attention masks) and wrappers apply. The LoRAs are applied by the
engine's hooks on the shared modules, as side paths: the weights of the models given to the node
are never changed, so the clones other nodes hold stay valid.

Layers are every Linear and Conv2d of the diffusion model (``unet.<path>``) and of the CLIP
(its own state-dict path, ``clip_l.transformer...``); the merged file uses, for each, the kohya
spelling that ComfyUI's key map accepts (``lora_unet_<path>``, ``lora_te1_...``), else ComfyUI's
generic ``text_encoders.<path>``.
"""

from __future__ import annotations

from typing import Sequence

import torch

import comfy.sample
import comfy.samplers
import node_helpers

from ..iteris_core.adapter_hooks import StopPass
from ..iteris_core.backends.base import LatentSample, ModuleTableMixin, StepCallback
from ..iteris_core.families import Family, family_of_comfy_class
from ..iteris_core.layers import UNET, LayerTable
from ..iteris_core.lora_io import LoraFile
from ..iteris_core.lora_normalize import NormalizedLora
from ..iteris_core.settings import SamplingSettings
from . import comfy_lora

Conditioning = list   # ComfyUI's CONDITIONING: [[tensor, {"pooled_output": ..., ...}], ...]


def family_of(model) -> Family:
    """The family of a ComfyUI MODEL, from the class ComfyUI's detection chose (refused ones raise)."""
    return family_of_comfy_class(type(model.model.model_config).__name__)


def _file_key(name: str, aliases: list[str], text_encoders: int) -> str:
    """The spelling a merged file uses for a layer: kohya's, as ComfyUI maps it for this family.

    Diffusion-model layers: ``lora_unet_`` and the native path, which ComfyUI maps for every
    family. Text-encoder layers: kohya's ``lora_te_`` with one text encoder, its numbered
    ``lora_teN_`` with several (the highest number, as kohya numbers T5 after the CLIPs), else
    ComfyUI's generic ``text_encoders.`` spelling, which it maps for every text encoder.
    """
    component, _, path = name.partition(".")
    if component == UNET:
        return "lora_unet_" + path.replace(".", "_")
    kohya = [a for a in aliases if a.startswith("lora_te")]
    plain = [a for a in kohya if a.startswith("lora_te_")]
    numbered = sorted(a for a in kohya if not a.startswith("lora_te_"))
    if text_encoders == 1 and plain:
        return plain[0]
    if numbered:
        return numbered[-1]
    return plain[0] if plain else f"text_encoders.{name}"


class _Replay(comfy.samplers.Sampler):
    """A "sampler" that makes one denoiser call per stored batch, at the stored noise levels."""

    def __init__(self, latents: torch.Tensor, sigmas: torch.Tensor):
        self.latents, self.sigmas = latents, sigmas

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_wrap(self.latents.to(noise.device), self.sigmas.to(noise.device), **extra_args)
        return latent_image


def _one_call_per_cond(args: dict) -> list[torch.Tensor]:
    """ComfyUI's cond batching, one conditioning at a time: the calls a replay makes never depend
    on free memory, so every pass over the same samples makes the same calls (an absent negative
    predicts zeros, as ``calc_cond_batch`` does). A call the engine stops early (its statistics are
    in) predicts zeros too: a replay's predictions are never used."""
    x = args["input"]
    out = []
    for cond in args["conds"]:
        prediction = torch.zeros_like(x)
        if cond is not None:
            try:
                prediction = comfy.samplers.calc_cond_batch(args["model"], [cond], x, args["sigma"],
                                                            args["model_options"])[0]
            except StopPass:
                pass
        out.append(prediction)
    return out


class ComfyBackend(ModuleTableMixin):
    """A ComfyUI ModelPatcher and CLIP as a :class:`~iteris_core.backends.base.ModelBackend`."""

    def __init__(self, model, clip):
        self.model, self.clip = model, clip
        self.family = family_of(model)
        self.architecture = self.family.id
        base = model.model
        self.device = model.load_device
        self.dtype = base.get_dtype()
        self.identity = f"{self.family.name} (ComfyUI {type(base.model_config).__name__})"
        self.v_prediction = getattr(getattr(base, "model_type", None), "name", "") == "V_PREDICTION"
        self.key_map = comfy_lora.key_map(model, clip)
        self._modules = self._collect_modules()
        table = LayerTable.from_modules(self._modules.items(), architecture=self.architecture)
        table.file_keys.update(self._file_keys(table))
        self._table = table
        self._replay_model = model.clone()
        self._replay_model.set_model_sampler_calc_cond_batch_function(_one_call_per_cond)

    # -- layers ----------------------------------------------------------------------------------
    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        """The CLIP's sub-encoders by attribute (``clip_l``, ``t5xxl``, ``qwen3_4b``...)."""
        if self.clip is None:
            return {}
        return dict(self.clip.cond_stage_model.named_children())

    def _collect_modules(self) -> dict[str, torch.nn.Module]:
        modules = {f"{UNET}.{n}": m for n, m in self.model.model.diffusion_model.named_modules() if n}
        for attribute, encoder in self._text_encoders().items():
            modules.update({f"{attribute}.{n}": m for n, m in encoder.named_modules() if n})
        return modules

    def _file_keys(self, table: LayerTable) -> dict[str, str]:
        aliases: dict[str, list[str]] = {}
        for lora_key, target in self.key_map.items():
            if isinstance(target, str) and (name := comfy_lora.layer_name(target)) in table:
                aliases.setdefault(name, []).append(lora_key)
        encoders = len(self._text_encoders())
        return {name: _file_key(name, aliases.get(name, []), encoders) for name in table.layers}

    def _weight_of(self, weight_key: str) -> torch.Tensor:
        name = comfy_lora.layer_name(weight_key)
        if name not in self._modules:
            raise KeyError("which this model does not have")
        if name not in self._table:
            raise KeyError(f"a {type(self._modules[name]).__name__}, not a Linear or Conv2d: the merge solves only "
                           "those")
        return self._modules[name].weight.detach().float().cpu()

    # -- ModelBackend (table, modules and base weights come from ModuleTableMixin) ----------------
    def roots(self, component: str) -> list[torch.nn.Module]:
        if component == UNET:
            return [self.model.model.diffusion_model]
        encoder = self._text_encoders().get(component)
        return [] if encoder is None else [encoder]

    def read_lora(self, lora: LoraFile) -> NormalizedLora:
        return comfy_lora.read_lora(lora, self.key_map, self._weight_of, self.family)

    def weights_bytes(self, component: str) -> int:
        if component == UNET:
            return self.model.model_size()
        encoder = self._text_encoders().get(component)
        return 0 if encoder is None else sum(p.numel() * p.element_size() for p in encoder.parameters())

    def resolution(self, settings: SamplingSettings) -> tuple[int, int]:
        defaults = self.family.defaults
        side = defaults.side_v_prediction if (self.v_prediction and defaults.side_v_prediction) else defaults.side
        return settings.height or side, settings.width or side

    def _empty_latent(self, rows: int, settings: SamplingSettings) -> torch.Tensor:
        """An empty latent the way EmptyLatentImage makes it, with the family's channels and dims."""
        latent_format = self.model.get_model_object("latent_format")
        downscale = getattr(latent_format, "spacial_downscale_ratio", 8)
        height, width = self.resolution(settings)
        latent = torch.zeros(rows, 4, height // downscale, width // downscale)
        return comfy.sample.fix_empty_latent_channels(self.model, latent)

    def activation_bytes(self, settings: SamplingSettings) -> int:
        # ComfyUI's own estimate, the one its samplers use to batch conds
        rows = settings.batch_size * (2 if settings.uses_cfg else 1)
        shape = list(self._empty_latent(1, settings).shape)
        return int(self.model.model.memory_required([rows] + shape[1:]))

    # -- text ------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> list[Conditioning]:
        """What CLIPTextEncode makes of each prompt."""
        return [self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt)) for prompt in prompts]

    def _conditioning(self, positive: Conditioning, negative: Conditioning | None,
                      settings: SamplingSettings) -> tuple[Conditioning, Conditioning, float]:
        """Positive and negative as the sampler takes them, with the family's guidance embedding
        (FluxGuidance) and KSampler's cfg (1, skipping the negative, when there is none)."""
        guidance = settings.distilled_guidance
        if guidance is None:
            guidance = self.family.defaults.guidance
        if guidance is not None:
            positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance})
            negative = None if negative is None else node_helpers.conditioning_set_values(negative, {"guidance": guidance})
        if negative is None:
            return positive, positive, 1.0
        return positive, negative, settings.guidance

    # -- denoiser --------------------------------------------------------------------------------
    def _ksampler(self, settings: SamplingSettings) -> comfy.samplers.KSampler:
        """KSampler's sampler with these settings' steps, sampler and scheduler, on this model."""
        return comfy.samplers.KSampler(self.model, steps=settings.steps, device=self.device, sampler=settings.sampler,
                                       scheduler=settings.scheduler, denoise=1.0, model_options=self.model.model_options)

    def sample(self, positive: Conditioning, negative: Conditioning | None, seeds: Sequence[int],
               settings: SamplingSettings, keep_steps: Sequence[int], on_step: StepCallback) -> list[list[LatentSample]]:
        positive, negative, cfg = self._conditioning(positive, negative, settings)
        latent = self._empty_latent(len(seeds), settings)
        noise = torch.cat([comfy.sample.prepare_noise(latent[j:j + 1], int(seed)) for j, seed in enumerate(seeds)])
        sampler = self._ksampler(settings)
        sigmas = sampler.sigmas.detach().cpu()
        keep = set(keep_steps)
        kept: list[list[LatentSample]] = [[] for _ in seeds]

        def callback(step: int, _denoised, x: torch.Tensor, _total: int) -> None:
            if step in keep:   # x is the sampler's x_t at sigmas[step], before the step
                for j in range(len(seeds)):
                    kept[j].append(LatentSample(x[j].detach().to("cpu", torch.float32), sigmas[step].clone(), step))
            on_step(step)

        sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent, callback=callback, disable_pbar=True,
                       seed=int(seeds[0]))
        return kept

    def render(self, positive: Conditioning, negative: Conditioning | None, seed: int, settings: SamplingSettings,
               on_step: StepCallback) -> torch.Tensor:
        """One image's final latent, sampled as KSampler samples it (with the family's guidance)."""
        positive, negative, cfg = self._conditioning(positive, negative, settings)
        latent = self._empty_latent(1, settings)
        noise = comfy.sample.prepare_noise(latent, int(seed))
        sampler = self._ksampler(settings)
        return sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent,
                              callback=lambda step, *_: on_step(step), disable_pbar=True, seed=int(seed))

    def replay(self, positive: Conditioning, negative: Conditioning | None, samples: Sequence[LatentSample],
               settings: SamplingSettings) -> None:
        positive, negative, cfg = self._conditioning(positive, negative, settings)
        latents = torch.stack([s.latent for s in samples])
        sigmas = torch.stack([s.timestep.reshape(()) for s in samples])
        guider = comfy.samplers.CFGGuider(self._replay_model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        schedule = torch.cat([sigmas.sort(descending=True).values, sigmas.new_zeros(1)])
        guider.sample(torch.zeros_like(latents), torch.zeros_like(latents), _Replay(latents, sigmas), schedule,
                      disable_pbar=True, seed=0)


def fingerprint(model, clip) -> tuple:
    """What makes two MODEL/CLIP inputs the same base for a merge: the shared modules, the patches
    upstream nodes added (e.g. LoraLoaders) and the model's sampling object."""
    def patches(patcher) -> tuple:
        return tuple(sorted((key, tuple((p[0], id(p[1]), p[2]) for p in value)) for key, value in patcher.patches.items()))

    sampling = model.get_model_object("model_sampling")
    return (id(model.model), patches(model), id(sampling), tuple(sorted(model.object_patches)),
            id(clip.cond_stage_model), patches(clip.patcher))
