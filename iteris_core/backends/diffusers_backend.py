"""The diffusers backend: SD1.x, SD2.x and SDXL pipelines (the only diffusers/transformers user).

Text conditioning follows the pipelines' ``encode_prompt``: SD1.x/SD2.x take the encoder's last
hidden state; SDXL concatenates both encoders' penultimate hidden states and passes the second
encoder's projected pooled output and the size/crop ids as added conditioning. Sampling is Euler
with classifier-free guidance on the pipeline's own noise schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import IterisError, SettingsError
from ..layers import TEXT_ENCODER, TEXT_ENCODER_2, UNET, LayerTable
from ..memory import activation_estimate
from ..settings import SamplingSettings
from .base import LatentSample, ModuleTableMixin, StepCallback, TextBatch

_ARCHITECTURE_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _text_path(name: str) -> str:
    """transformers 5's CLIPTextModel drops ``text_model.``; canonical names keep it."""
    return name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name


class DiffusersBackend(ModuleTableMixin):
    """A diffusers Stable Diffusion pipeline as a :class:`~iteris_core.backends.base.ModelBackend`."""

    def __init__(self, pipe, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.unet = pipe.unet.to(self.device, self.dtype).eval()
        self.text_encoder = pipe.text_encoder.to(self.device, self.dtype).eval()
        self.tokenizer = pipe.tokenizer
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        if self.text_encoder_2 is not None:
            self.text_encoder_2 = self.text_encoder_2.to(self.device, self.dtype).eval()
        self.scheduler_config = dict(pipe.scheduler.config)
        self.identity = getattr(pipe, "identity", None) or type(pipe).__name__
        self.pipe = pipe
        self.sdxl = self.text_encoder_2 is not None
        context = self.unet.config.cross_attention_dim
        self.architecture = _ARCHITECTURE_BY_CONTEXT.get(context, "custom") if self._standard_width() else "custom"
        self._modules = self._collect_modules()
        self._table = LayerTable.from_modules(self._modules.items(), architecture=self.architecture,
                                              unet_layers_per_block=self._layers_per_block())

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None, *,
                        tokenizer: str | Path | None = None, prediction_type: str | None = None) -> DiffusersBackend:
        """Load a local diffusers folder (``model_index.json``) or a single-file checkpoint
        (``tokenizer``: a local CLIP tokenizer folder, which single files lack)."""
        path = Path(path)
        if path.is_dir():
            pipe = _load_folder(path)
            pipe.identity = path.name
            return cls(pipe, device, dtype)
        if path.is_file():
            from .single_file import load_single_file
            return cls(load_single_file(path, tokenizer, prediction_type), device, dtype)
        raise IterisError(f"base model {path} not found: give a diffusers folder or a .safetensors checkpoint")

    def _standard_width(self) -> bool:
        return self.unet.config.block_out_channels[0] == 320

    def _layers_per_block(self) -> int | None:
        value = self.unet.config.layers_per_block
        return value if isinstance(value, int) else (value[0] if len(set(value)) == 1 else None)

    def _collect_modules(self) -> dict[str, torch.nn.Module]:
        modules = {f"{UNET}.{n}": m for n, m in self.unet.named_modules() if n}
        modules.update({f"{TEXT_ENCODER}.{_text_path(n)}": m for n, m in self.text_encoder.named_modules() if n})
        if self.text_encoder_2 is not None:
            modules.update({f"{TEXT_ENCODER_2}.{_text_path(n)}": m
                            for n, m in self.text_encoder_2.named_modules() if n})
        return modules

    # -- ModelBackend (table, modules and base weights come from ModuleTableMixin) ----------------
    def roots(self, component: str) -> list[torch.nn.Module]:
        return {UNET: [self.unet], TEXT_ENCODER: [self.text_encoder],
                TEXT_ENCODER_2: [self.text_encoder_2] if self.text_encoder_2 is not None else []}[component]

    def weights_bytes(self, component: str) -> int:
        module = {UNET: self.unet, TEXT_ENCODER: self.text_encoder, TEXT_ENCODER_2: self.text_encoder_2}[component]
        return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())

    def _tokens(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        # the encoder's positions, not tokenizer.model_max_length: some tokenizer configs say 8192
        length = self.text_encoder.config.max_position_embeddings
        ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode_text(self, prompts: Sequence[str]) -> list[TextBatch]:
        """One batch through the encoder(s), split into one-row conditionings (on the CPU)."""
        if not self.sdxl:
            hidden = self.text_encoder(self._tokens(self.tokenizer, prompts))[0]
            batch = TextBatch({"encoder_hidden_states": hidden})
        else:
            out_1 = self.text_encoder(self._tokens(self.tokenizer, prompts), output_hidden_states=True)
            out_2 = self.text_encoder_2(self._tokens(self.tokenizer_2, prompts), output_hidden_states=True)
            hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
            batch = TextBatch({"encoder_hidden_states": hidden, "text_embeds": out_2.text_embeds})
        batch = batch.to("cpu")
        return [batch.select([row]) for row in range(len(prompts))]

    def resolution(self, settings: SamplingSettings) -> tuple[int, int]:
        native = self.unet.config.sample_size * 8
        return settings.height or native, settings.width or native

    def _added_conditioning(self, cond: TextBatch, height: int, width: int) -> dict | None:
        if not self.sdxl:
            return None
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=self.dtype, device=self.device)
        rows = cond.rows
        return {"text_embeds": cond.tensors["text_embeds"].to(self.device, self.dtype),
                "time_ids": ids.expand(rows, 6)}

    def _unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextBatch, height: int, width: int) -> torch.Tensor:
        hidden = cond.tensors["encoder_hidden_states"].to(self.device, self.dtype)
        return self.unet(latents.to(self.dtype), timesteps, encoder_hidden_states=hidden,
                         added_cond_kwargs=self._added_conditioning(cond, height, width)).sample

    def activation_bytes(self, settings: SamplingSettings) -> int:
        height, width = self.resolution(settings)
        return activation_estimate(self._table, height, width, settings.batch_size, settings.guidance, self.dtype,
                                   self.device.type)

    def sample(self, positive: TextBatch, negative: TextBatch | None, seeds: Sequence[int], settings: SamplingSettings,
               keep_steps: Sequence[int], on_step: StepCallback) -> list[list[LatentSample]]:
        from diffusers import EulerDiscreteScheduler

        if (settings.sampler, settings.scheduler) != ("euler", "normal"):
            raise SettingsError(f"the diffusers backend samples with euler on the normal schedule, not "
                                f"{settings.sampler} / {settings.scheduler}")
        rows = len(seeds)
        cond = TextBatch.cat([positive] * rows)
        uncond = None if negative is None else TextBatch.cat([negative] * rows)
        scheduler = EulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=self.device)
        height, width = self.resolution(settings)
        shape = (4, height // 8, width // 8)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        latents = noise.to(self.device, torch.float32) * scheduler.init_noise_sigma
        use_cfg = uncond is not None
        both = TextBatch.cat([uncond, cond]) if use_cfg else cond
        kept: list[list[LatentSample]] = [[] for _ in seeds]
        for step, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            if step in keep_steps:
                for j in range(len(seeds)):
                    kept[j].append(LatentSample(model_input[j].detach().to("cpu", torch.float32),
                                                t.detach().to("cpu").reshape(()), step))
            on_step(step)
            batch = torch.cat([model_input, model_input]) if use_cfg else model_input
            prediction = self._unet(batch, t.expand(batch.shape[0]), both, height, width).float()
            if use_cfg:
                uncond_pred, cond_pred = prediction.chunk(2)
                prediction = uncond_pred + settings.guidance * (cond_pred - uncond_pred)
            latents = scheduler.step(prediction, t, latents).prev_sample
        return kept

    def replay(self, positive: TextBatch, negative: TextBatch | None, samples: Sequence[LatentSample],
               settings: SamplingSettings) -> None:
        """One UNet call on the samples: rows [negative..., positive...] under guidance, as the
        sampler batched them."""
        latents = torch.stack([s.latent for s in samples])
        timesteps = torch.stack([s.timestep for s in samples])
        conds = [positive] if negative is None else [negative, positive]
        cond = TextBatch.cat([c for c in conds for _ in samples])
        self.predict_noise(latents.repeat(len(conds), *[1] * (latents.dim() - 1)), timesteps.repeat(len(conds)), cond)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextBatch) -> torch.Tensor:
        """The UNet's prediction for ``latents`` at ``timesteps`` (one per row) under ``cond``."""
        return self._unet(latents.to(self.device), timesteps.to(self.device), cond, latents.shape[-2] * 8,
                          latents.shape[-1] * 8)


def _load_folder(path: Path):
    """A diffusers folder, offline. Only the parts a merge needs are loaded (no VAE)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise IterisError(f"{path} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if "text_encoder_2" in index else StableDiffusionPipeline
    extra = {} if "text_encoder_2" in index else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return pipeline_class.from_pretrained(str(path), local_files_only=True, vae=None, **extra)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise IterisError(f"cannot load the diffusers folder {path}: {exc}") from None
