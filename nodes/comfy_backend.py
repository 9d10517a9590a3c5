"""ComfyUI's MODEL and CLIP as an IterIS model backend.

Everything runs through ComfyUI's own machinery: ``load_models_gpu`` places the models (whatever
the VRAM mode), the CLIP's own tokenizer and sub-encoders encode the prompts, the model's own
``model_sampling`` and ``calculate_sigmas`` give the noise schedule, ``extra_conds`` builds the
conditioning (SDXL's added vector included) and ``apply_model`` runs the UNet. The LoRAs are
applied by the engine's hooks on the shared modules, as side paths: the weights of the models
given to the node are never changed, so the clones other nodes hold stay valid.

The sampler is Euler with classifier-free guidance on the "normal" schedule, the same
computation as ``KSampler(euler, normal)``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..iteris_core.backends.base import LatentSample, ModuleTableMixin, StepCallback, TextBatch
from ..iteris_core.errors import IterisError
from ..iteris_core.layers import TEXT_ENCODER, TEXT_ENCODER_2, UNET, LayerTable
from ..iteris_core.settings import SamplingSettings

# ComfyUI text-encoder class -> its sub-encoders (attribute, tokenizer key) and their canonical component
TEXT_ENCODERS = {
    "SD1ClipModel": [("clip_l", "l", TEXT_ENCODER)],
    "SD2ClipModel": [("clip_h", "h", TEXT_ENCODER)],
    "SDXLClipModel": [("clip_l", "l", TEXT_ENCODER), ("clip_g", "g", TEXT_ENCODER_2)],
}
ARCHITECTURES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
NATIVE_SIDE = {"sd1": 512, "sd2": 512, "sdxl": 1024}
SCHEDULER = "normal"


def _unsupported(what: str) -> IterisError:
    return IterisError(f"{what}: IterIS merges LoRAs for SD1.x, SD2.x and SDXL models (with their own CLIP); "
                       "load one of those with a checkpoint loader")


class ComfyBackend(ModuleTableMixin):
    """A ComfyUI ModelPatcher (UNet) and CLIP as a :class:`~iteris_core.backends.base.ModelBackend`."""

    def __init__(self, model, clip):
        self.model, self.clip = model, clip
        base = model.model
        config = base.model_config
        encoder_class = type(clip.cond_stage_model).__name__
        unet_config = config.unet_config
        context = unet_config.get("context_dim")
        if encoder_class not in TEXT_ENCODERS:
            raise _unsupported(f"this CLIP is a {encoder_class}")
        if context not in ARCHITECTURES or type(base.diffusion_model).__name__ != "UNetModel":
            raise _unsupported(f"this model is {type(config).__name__}")
        self.architecture = ARCHITECTURES[context]
        self.encoders = TEXT_ENCODERS[encoder_class]
        self.device = model.load_device
        self.dtype = base.get_dtype()
        self.identity = f"{type(config).__name__} (ComfyUI)"
        self.v_prediction = getattr(getattr(base, "model_type", None), "name", "") == "V_PREDICTION"
        self._modules = self._collect_modules(unet_config)
        blocks = unet_config.get("num_res_blocks") or []
        layers_per_block = blocks[0] if blocks and len(set(blocks)) == 1 else None
        self._table = LayerTable.from_modules(self._modules.items(), architecture=self.architecture,
                                              unet_layers_per_block=layers_per_block)
        self.truncated_prompts: set[str] = set()

    def _collect_modules(self, unet_config) -> dict[str, torch.nn.Module]:
        # ComfyUI's own diffusers <-> LDM map names the UNet's modules canonically
        to_diffusers = {ldm[: -len(".weight")]: diffusers[: -len(".weight")]
                        for diffusers, ldm in comfy.utils.unet_to_diffusers(unet_config).items()
                        if diffusers.endswith(".weight")}
        modules = {}
        for name, module in self.model.model.diffusion_model.named_modules():
            if name in to_diffusers:
                modules[f"{UNET}.{to_diffusers[name]}"] = module
        for attribute, _key, component in self.encoders:
            transformer = getattr(self.clip.cond_stage_model, attribute).transformer
            for name, module in transformer.named_modules():
                if name.startswith("text_model.encoder.layers.") or name == "text_projection":
                    modules[f"{component}.{name}"] = module
        return modules

    # -- ModelBackend (table, modules and base weights come from ModuleTableMixin) ----------------
    def roots(self, component: str) -> list[torch.nn.Module]:
        if component == UNET:
            return [self.model.model.diffusion_model]
        return [getattr(self.clip.cond_stage_model, a) for a, _k, c in self.encoders if c == component]

    def weights_bytes(self, component: str) -> int:
        if component == UNET:
            return self.model.model_size()
        return self.clip.patcher.model_size() // len(self.encoders)

    def resolution(self, settings: SamplingSettings) -> tuple[int, int]:
        side = 768 if (self.architecture == "sd2" and self.v_prediction) else NATIVE_SIDE[self.architecture]
        return settings.height or side, settings.width or side

    # -- text ------------------------------------------------------------------------------------
    def _sections(self, key: str, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt's first 77-token section (weights of ``(word:1.2)`` are not
        applied: the samples only need the concept's prompts, not their emphasis)."""
        rows = []
        for prompt in prompts:
            sections = self.clip.tokenize(prompt)[key]
            if len(sections) > 1 and prompt not in self.truncated_prompts:
                self.truncated_prompts.add(prompt)
                logging.warning("IterIS: prompt longer than one CLIP section, only its first 75 tokens are used: %r",
                                prompt[:80])
            rows.append([int(token[0]) for token in sections[0]])
        return rows

    def encode_text(self, prompts: Sequence[str]) -> TextBatch:
        # the same set-up as CLIP.encode_from_tokens: honours CLIPSetLastLayer (clip skip)
        self.clip.cond_stage_model.reset_clip_options()
        if self.clip.layer_idx is not None:
            self.clip.cond_stage_model.set_clip_options({"layer": self.clip.layer_idx})
        self.clip.load_model()
        hidden, pooled = [], None
        for attribute, key, _component in self.encoders:
            encoder = getattr(self.clip.cond_stage_model, attribute)
            z, pool = encoder.encode(self._sections(key, prompts))
            hidden.append(z)
            pooled = pool if pool is not None else pooled
        width = min(h.shape[1] for h in hidden)
        out = {"cross_attn": torch.cat([h[:, :width] for h in hidden], dim=-1).float()}
        if pooled is not None:
            out["pooled_output"] = pooled.float()
        return TextBatch(out)

    # -- UNet ------------------------------------------------------------------------------------
    def _model_kwargs(self, cond: TextBatch, noise: torch.Tensor) -> dict:
        height, width = noise.shape[-2] * 8, noise.shape[-1] * 8
        conds = self.model.model.extra_conds(
            cross_attn=cond.tensors["cross_attn"].to(self.device), pooled_output=cond.tensors.get("pooled_output"),
            width=width, height=height, target_width=width, target_height=height, crop_w=0, crop_h=0,
            noise=noise, device=self.device)
        kwargs = {name: value.cond.to(self.device) for name, value in conds.items()}
        options = self.model.model_options.get("transformer_options")
        if options:
            kwargs["transformer_options"] = options
        return kwargs

    def _apply(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return self.model.model.apply_model(x, sigma, **kwargs)

    def sample(self, cond: TextBatch, uncond: TextBatch, seeds: Sequence[int], settings: SamplingSettings,
               keep_steps: Sequence[int], on_step: StepCallback) -> list[list[LatentSample]]:
        comfy.model_management.load_models_gpu([self.model])
        sampling = self.model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(sampling, SCHEDULER, settings.steps).to(self.device)
        height, width = self.resolution(settings)
        latent = torch.zeros(len(seeds), 4, height // 8, width // 8)
        latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
        noise = torch.cat([comfy.sample.prepare_noise(latent[j:j + 1], int(seed)) for j, seed in enumerate(seeds)])
        x = sampling.noise_scaling(sigmas[0], noise.to(self.device), latent.to(self.device), max_denoise=True)
        use_cfg = settings.guidance > 1.0
        both = TextBatch.cat([cond, uncond]) if use_cfg else cond
        kwargs = self._model_kwargs(both, torch.cat([x, x]) if use_cfg else x)
        kept: list[list[LatentSample]] = [[] for _ in seeds]
        for step in range(settings.steps):
            sigma = sigmas[step]
            if step in keep_steps:
                for j in range(len(seeds)):
                    kept[j].append(LatentSample(x[j].detach().to("cpu", torch.float32), sigma.detach().cpu(), step))
            on_step(step)
            batch = torch.cat([x, x]) if use_cfg else x
            denoised = self._apply(batch, sigma.expand(batch.shape[0]), kwargs).float()
            if use_cfg:
                conditioned, unconditioned = denoised.chunk(2)
                denoised = unconditioned + (conditioned - unconditioned) * settings.guidance
            x = x + (x - denoised) / sigma * (sigmas[step + 1] - sigma)
        return kept

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextBatch) -> None:
        comfy.model_management.load_models_gpu([self.model])
        latents = latents.to(self.device)
        self._apply(latents, timesteps.to(self.device), self._model_kwargs(cond, latents))


def fingerprint(model, clip) -> tuple:
    """What makes two MODEL/CLIP inputs the same base for a merge: the shared modules, the patches
    upstream nodes added (e.g. LoraLoaders) and the model's sampling object."""
    def patches(patcher) -> tuple:
        return tuple(sorted((key, tuple((p[0], id(p[1]), p[2]) for p in value)) for key, value in patcher.patches.items()))

    sampling = model.get_model_object("model_sampling")
    return (id(model.model), patches(model), id(sampling), tuple(sorted(model.object_patches)),
            id(clip.cond_stage_model), patches(clip.patcher))
