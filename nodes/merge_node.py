"""Merge LoRAs (IterIS): merge the chained concepts into one LoRA and apply it to MODEL and CLIP."""

from __future__ import annotations

import logging

import comfy.lora
import comfy.samplers
import torch
from comfy_api.v0_0_2 import io, ui

from ..iteris_core.api import Concept, merge_loras
from ..iteris_core.errors import IterisError, SettingsError
from ..iteris_core.families import Family
from ..iteris_core.settings import MergeSettings, Method, SamplingSettings
from . import cache
from .comfy_backend import ComfyBackend, family_of, fingerprint
from .progress import NodeProgress, comfy_interrupts, should_stop
from .types import Concepts, LoraDict

# widget -> (default, min, max): checked again in validate_inputs, which disables ComfyUI's own check
RANGES = {
    "iterations": (3, 0, 50), "samples_per_prompt": (0, 0, 64), "timesteps": (0, 0, 100), "steps": (0, 0, 200),
    "seed": (0, 0, 0xFFFFFFFF), "rank": (0, 0, 4096), "width": (0, 0, 8192), "height": (0, 0, 8192),
    "batch_size": (4, 1, 64), "max_tokens": (0, 0, 65536),
    "regularization": (1e-4, 0.0, 1.0), "cfg": (0.0, 0.0, 30.0), "guidance": (0.0, 0.0, 100.0),
    "statistics_budget": (0.0, 0.0, 4096.0),
}
DEFAULT = "default"   # sampler / scheduler: what a user of the model's family would pick


def _int(name: str, tooltip: str, **extra) -> io.Int.Input:
    default, low, high = RANGES[name]
    return io.Int.Input(name, default=default, min=low, max=high, tooltip=tooltip, **extra)


def _float(name: str, tooltip: str, **extra) -> io.Float.Input:
    default, low, high = RANGES[name]
    return io.Float.Input(name, default=default, min=low, max=high, tooltip=tooltip, **extra)


def apply_merged_lora(model, clip, tensors: dict[str, torch.Tensor]):
    """MODEL and CLIP clones patched with the merged LoRA through ComfyUI's own LoRA loader, checking
    that every key lands on a weight (a key ComfyUI could not place would be a silently wrong model)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    placed = set()
    for patch in patches.values():
        placed |= set(getattr(patch, "loaded_keys", ()))
    unplaced = sorted(set(tensors) - placed)
    if unplaced:
        raise IterisError(f"ComfyUI cannot place {len(unplaced)} keys of the merged LoRA, e.g. {unplaced[0]}")
    new_model, new_clip = model.clone(), clip.clone()
    applied = set(new_model.add_patches(patches, 1.0)) | set(new_clip.add_patches(patches, 1.0))
    missing = sorted(set(patches) - applied)
    if missing:
        raise IterisError(f"the merged LoRA targets weights this model does not have, e.g. {missing[0]}")
    return new_model, new_clip


class IterisMergeLoras(io.ComfyNode):
    """The IterIS merge: closed-form least squares per layer on the concepts' own layer inputs."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IterIS_MergeLoras",
            display_name="Merge LoRAs (IterIS)",
            category="loaders/IterIS",
            description="Merges the chained LoRA concepts into one LoRA with IterIS (CVPR 2025): each layer's "
                        "merged delta is solved so that, on every concept's own images, the merged model does "
                        "what that concept's LoRA does; the solve is repeated on the merged model's own inputs. "
                        "Outputs MODEL and CLIP with the merged LoRA applied, the LoRA itself and a report.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRAs were trained for (SD1.x, SD2.x, SDXL, "
                                                "Flux.1, Chroma, SD3.5, Z-Image, Qwen-Image ...)."),
                io.Clip.Input("clip", tooltip="Its text encoder(s), as the model's CLIP loader gives them."),
                Concepts.Input("concepts", tooltip="The LoRAs to merge, from LoRA Concept (IterIS) nodes."),
                # merge settings first: changing only these reuses the concepts' samples
                io.Combo.Input("method", options=[m.value for m in Method], default=Method.ITERIS.value,
                               tooltip="iteris: the paper's method. regmean: one solve, no iteration. ssr: "
                                       "SSR-Merge (ICML 2026), a small router over the stacked LoRAs fitted in one "
                                       "calibration pass. linear: average of the LoRAs. concat: their sum (what "
                                       "chained LoraLoaders do). ties: TIES-merging. Only iteris, regmean and ssr "
                                       "use the prompts."),
                _int("iterations", "IterIS iterations after the first solve; each re-runs the concepts' samples "
                                   "through the merged model. 2-5 is usual; it stops early once nothing changes."),
                _float("regularization", "The paper's alpha: a small ridge that keeps the solve stable with few "
                                         "samples. 1e-4 works; raise it if a layer is reported singular. For ssr: "
                                         "its lambda, an absolute ridge on the router's system (1e-4 as in SSR).",
                       step=1e-5, round=1e-7),
                _int("rank", "Rank of the merged LoRA. 0 keeps it exact (the sum of the input ranks); a lower "
                             "value truncates each layer and reports the error."),
                io.Boolean.Input("merge_text_encoder", default=True,
                                 tooltip="Also merge the LoRAs' text-encoder layers (off: the merged LoRA has "
                                         "UNet layers only)."),
                _int("max_tokens", "Spatial tokens per sample used for the statistics; 0 = all. A few hundred "
                                   "is faster at high resolution."),
                _float("statistics_budget", "Memory the merge's statistics may take; 0 = what is free. When they "
                                            "do not fit at once, the layers are merged in groups, each with its own "
                                            "passes over the samples: every layer stays exact, the merge takes longer.",
                       step=0.5, display_name="statistics budget (GB)"),
                # how each concept's own images are sampled (changing these samples again)
                _int("samples_per_prompt", "Images (seeds) sampled per concept prompt to collect layer inputs; "
                                           "0 = the method's default (2; 1 for ssr).",
                     display_name="samples per prompt"),
                _int("timesteps", "Points kept along each sampled trajectory; the statistics come from these. "
                                  "0 = the method's default (4; 1 for ssr: the first, pure-noise step, as SSR "
                                  "calibrates).", display_name="kept timesteps"),
                _int("steps", "Sampler steps of each concept's own trajectories; 0 = the family's usual "
                              "number (20; 4 for Flux.1 schnell, 8 for Z-Image).", display_name="sample steps"),
                io.Combo.Input("sampler", options=[DEFAULT] + list(comfy.samplers.KSampler.SAMPLERS), default=DEFAULT,
                               display_name="sample sampler",
                               tooltip="KSampler's sampler for those trajectories; default: euler."),
                io.Combo.Input("scheduler", options=[DEFAULT] + list(comfy.samplers.KSampler.SCHEDULERS),
                               default=DEFAULT, display_name="sample scheduler",
                               tooltip="KSampler's scheduler; default: the family's (normal for SD, simple for "
                                       "Flux.1, Chroma, Z-Image and Qwen-Image, sgm_uniform for SD3)."),
                _float("cfg", "KSampler's cfg for those trajectories; 0 = the family's usual value (7.5 for SD, 1 "
                              "for Flux.1 and Z-Image Turbo, 4 for Chroma, 4.5 for SD3.5, 2.5 for Qwen-Image). 1 runs "
                              "no negative prompt.", step=0.1, display_name="sample cfg"),
                _float("guidance", "Guidance embedding of guidance-distilled models (FluxGuidance, Flux.1 dev); 0 = "
                                   "the family's default (3.5). Other models ignore it.",
                       step=0.1, display_name="sample guidance"),
                _int("seed", "First seed of the sampled trajectories (fixed: a new seed would sample again).",
                     display_name="sample seed", control_after_generate=False),
                _int("width", "Width of the sampled images in pixels; 0 = the model's native size.", step=8,
                     display_name="sample width"),
                _int("height", "Height of the sampled images in pixels; 0 = the model's native size.", step=8,
                     display_name="sample height"),
                _int("batch_size", "Samples per forward pass (twice as many rows with a negative prompt). "
                                   "Lower it if memory runs out.", display_name="sample batch size"),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the merged LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the merged LoRA applied."),
                io.LoraModel.Output(display_name="lora", tooltip="The merged LoRA (kohya keys): save it with Save "
                                    "Merged LoRA (IterIS). Core 'Load LoRA Model' applies its UNet part only."),
                io.String.Output(display_name="report", tooltip="What the merge did: convergence, ranks, time."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, iterations, regularization, rank, max_tokens, statistics_budget, samples_per_prompt,
                        timesteps, steps, cfg, guidance, seed, width, height, batch_size) -> bool | str:
        values = dict(iterations=iterations, regularization=regularization, samples_per_prompt=samples_per_prompt,
                      timesteps=timesteps, steps=steps, cfg=cfg, guidance=guidance, seed=seed, rank=rank, width=width,
                      height=height, batch_size=batch_size, max_tokens=max_tokens, statistics_budget=statistics_budget)
        for name, value in values.items():
            _default, low, high = RANGES[name]
            if value is not None and not low <= value <= high:
                return f"{name} must be between {low:g} and {high:g}, got {value}"
        if timesteps is not None and steps and timesteps > steps:
            return f"timesteps ({timesteps}) cannot exceed steps ({steps})"
        for side, value in (("width", width), ("height", height)):
            if value and value % 8:
                return f"{side} must be a multiple of 8 (or 0 for the model's size), got {value}"
        return True

    @staticmethod
    def settings(family: Family, method, iterations, regularization, rank, merge_text_encoder, max_tokens,
                 statistics_budget, samples_per_prompt, timesteps, steps, sampler, scheduler, cfg, guidance, seed,
                 width, height, batch_size) -> MergeSettings:
        """Typed settings, the family's defaults standing in for the inputs left at "default" / 0 (the
        method's for samples per prompt and kept timesteps)."""
        defaults = family.defaults
        method_sampling = SamplingSettings(**Method.parse(method).sampling_defaults)
        samples_per_prompt = samples_per_prompt or method_sampling.samples_per_prompt
        timesteps = timesteps or method_sampling.timesteps
        steps = steps or defaults.steps
        if timesteps > steps:
            raise SettingsError(f"timesteps ({timesteps}) cannot exceed the {steps} sample steps of {family.name}")
        sampling = SamplingSettings(samples_per_prompt=samples_per_prompt, timesteps=timesteps, steps=steps,
                                    guidance=cfg or defaults.cfg, width=width or None, height=height or None,
                                    seed=seed, batch_size=batch_size,
                                    sampler=defaults.sampler if sampler == DEFAULT else sampler,
                                    scheduler=defaults.scheduler if scheduler == DEFAULT else scheduler,
                                    distilled_guidance=(guidance or defaults.guidance) if defaults.guidance else None)
        return MergeSettings(method=method, iterations=iterations, regularization=regularization, rank=rank or None,
                             merge_text_encoder=merge_text_encoder, max_tokens_per_sample=max_tokens or None,
                             statistics_budget_gb=statistics_budget or None, sampling=sampling)

    @classmethod
    def execute(cls, model, clip, concepts, method, iterations, regularization, rank, merge_text_encoder, max_tokens,
                statistics_budget, samples_per_prompt, timesteps, steps, sampler, scheduler, cfg, guidance, seed,
                width, height, batch_size) -> io.NodeOutput:
        if not concepts:
            raise SettingsError("connect at least one LoRA Concept (IterIS) node to 'concepts'")
        settings = cls.settings(family_of(model), method, iterations, regularization, rank, merge_text_encoder,
                                max_tokens, statistics_budget, samples_per_prompt, timesteps, steps, sampler, scheduler,
                                cfg, guidance,
                                seed, width, height, batch_size)
        base_key = fingerprint(model, clip)
        key = (base_key, tuple(c.key() for c in concepts), settings)
        cached = cache.MERGES.get(key)
        if cached is not None:
            merged, report = cached
            logging.info("IterIS: same inputs as an earlier merge, reusing its result")
        else:
            backend = ComfyBackend(model, clip)
            # prompts made from the file are made again by the engine, whose report then says from what
            inputs = [Concept(c.lora, list(c.prompts) if c.prompt_source == "typed" else [], c.strength_model,
                              c.strength_clip, c.negative_prompt, name=c.lora_name) for c in concepts]
            samples = cache.SAMPLES.setdefault(base_key, dict)
            with comfy_interrupts():
                result = merge_loras(backend, inputs, settings, on_progress=NodeProgress(cls.hidden.unique_id),
                                     should_stop=should_stop, log=lambda m: logging.info("IterIS: %s", m),
                                     sample_cache=samples)
            merged, report = result.lora, result.report
            cache.MERGES.put(key, (merged, report))
        tensors = merged.state_dict(torch.float32)
        new_model, new_clip = apply_merged_lora(model, clip, tensors)
        text = report.summary()
        return io.NodeOutput(new_model, new_clip, LoraDict(tensors, merged.file_metadata()), text,
                             ui=ui.PreviewText(text))
