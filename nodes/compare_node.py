"""Before/After Grid (IterIS): for one prompt per concept at a fixed seed, that concept's own LoRA
beside the merged model, as a labelled IMAGE grid, so that a user sees identity kept or lost before
saving the merge."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.sd
import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageDraw, ImageFont

from ..iteris_core.errors import IterisError
from .comfy_backend import ComfyBackend, family_of
from .merge_node import DEFAULT, IterisMergeLoras
from .progress import NodeProgress
from .types import Concepts

LABEL_HEIGHT = 24


def label_strip(text: str, width: int) -> np.ndarray:
    """A white strip of ``LABEL_HEIGHT`` pixels with ``text`` in black, as float RGB in [0, 1]."""
    strip = Image.new("RGB", (width, LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    while len(text) > 4 and draw.textlength(text, font=font) > width - 8:
        text = text[:-4] + "..."   # shorten long file names until they fit
    draw.text((4, (LABEL_HEIGHT - 11) // 2), text, fill="black", font=font)
    return np.asarray(strip, dtype=np.float32) / 255.0


def grid(cells: list[list[tuple[str, torch.Tensor]]]) -> torch.Tensor:
    """Rows of labelled images (each ``H x W x 3`` in [0, 1], all one size) as one IMAGE ``[1, H', W', 3]``."""
    rows = []
    for row in cells:
        columns = []
        for text, image in row:
            picture = image.detach().float().cpu().clamp(0, 1)
            strip = torch.from_numpy(label_strip(text, picture.shape[1]))
            columns.append(torch.cat([strip, picture], dim=0))
        rows.append(torch.cat(columns, dim=1))
    return torch.cat(rows, dim=0).unsqueeze(0)


class IterisCompareGrid(io.ComfyNode):
    """Each concept's own LoRA beside the merged model, one row per concept."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IterIS_CompareGrid",
            display_name="Before/After Grid (IterIS)",
            category="loaders/IterIS",
            description="For one prompt per concept at a fixed seed: the concept's own LoRA (left) beside the "
                        "merged model (right), one row per concept, to see identity kept or lost before saving.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the concepts' LoRAs were trained for (the merge's input)."),
                io.Clip.Input("clip", tooltip="The base CLIP (the merge's input)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the images."),
                Concepts.Input("concepts", tooltip="The concepts the merge took."),
                io.Model.Input("merged_model", tooltip="The merge's MODEL output."),
                io.Clip.Input("merged_clip", tooltip="The merge's CLIP output."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of every image (the same for both)."),
                io.Int.Input("steps", default=0, min=0, max=200,
                             tooltip="Sampling steps; 0 = the model family's default."),
                io.Combo.Input("sampler", options=[DEFAULT] + list(comfy.samplers.KSampler.SAMPLERS), default=DEFAULT,
                               tooltip="Sampler; default = the family's."),
                io.Combo.Input("scheduler", options=[DEFAULT] + list(comfy.samplers.KSampler.SCHEDULERS),
                               default=DEFAULT, tooltip="Scheduler; default = the family's."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale; 0 = the family's default."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance of guidance-distilled models (Flux.1 dev); 0 = the family's default."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height."),
            ],
            outputs=[io.Image.Output(display_name="grid",
                                     tooltip="One row per concept: its own LoRA, then the merged model.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, concepts, merged_model, merged_clip, seed, steps, sampler, scheduler, cfg,
                guidance, width, height) -> io.NodeOutput:
        if not concepts:
            raise IterisError("concepts is empty: connect the concepts the merge took")
        family = family_of(model)
        settings = IterisMergeLoras.settings(
            family, method="iteris", iterations=0, regularization=1e-4, rank=0, merge_text_encoder=True, max_tokens=0,
            statistics_budget=0.0, samples_per_prompt=1, timesteps=1, steps=steps, sampler=sampler,
            scheduler=scheduler, cfg=cfg, guidance=guidance, seed=seed, width=width, height=height,
            batch_size=1).sampling
        progress = NodeProgress(cls.hidden.unique_id)
        total = 2 * len(concepts) * settings.steps
        done = 0

        def image(backend: ComfyBackend, prompt: str, negative: str) -> torch.Tensor:
            nonlocal done
            positive, *rest = backend.encode_text([prompt] + ([negative] if negative else []))
            start = done

            def on_step(step: int) -> None:
                comfy.model_management.throw_exception_if_processing_interrupted()
                progress(start + step + 1, total, "")

            latent = backend.render(positive, rest[0] if rest else None, seed, settings, on_step)
            done = start + settings.steps
            decoded = vae.decode(latent)
            return decoded.reshape(-1, *decoded.shape[-3:])[0]   # video-shaped VAEs add a frame axis

        merged = ComfyBackend(merged_model, merged_clip)
        rows = []
        for spec in concepts:
            own_model, own_clip = comfy.sd.load_lora_for_models(model, clip, spec.lora.tensors, spec.strength_model,
                                                                spec.strength_clip)
            prompt = spec.prompts[0]
            rows.append([(f"{spec.lora_name}: own LoRA", image(ComfyBackend(own_model, own_clip), prompt,
                                                               spec.negative_prompt)),
                         ("merged", image(merged, prompt, spec.negative_prompt))])
        return io.NodeOutput(grid(rows))
