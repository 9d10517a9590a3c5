"""LoRA Concept (IterIS): one LoRA file with its strengths and the prompts that show its concept."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..iteris_core.errors import IterisError
from ..iteris_core.lora_io import LoraFile, read_lora_file
from ..iteris_core.lora_prompts import derive_prompts, missing_prompts_message
from .comfy_lora import check_adapter_file
from .types import Concepts, ConceptSpec, split_prompts

STRENGTH_RANGE = (-10.0, 10.0)


def lora_path(lora_name: str) -> str | None:
    """The full path of a file in models/loras, or None."""
    return folder_paths.get_full_path("loras", lora_name) if lora_name else None


class IterisLoraConcept(io.ComfyNode):
    """Chain one of these per LoRA into Merge LoRAs (IterIS)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IterIS_LoraConcept",
            display_name="LoRA Concept (IterIS)",
            category="loaders/IterIS",
            description="One LoRA to merge, with its strengths and a few prompts that show its concept "
                        "(e.g. 'a photo of sks dog'). Chain several into Merge LoRAs (IterIS).",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The LoRA file, from models/loras."),
                io.Float.Input("strength_model", default=1.0, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.01,
                               tooltip="Strength on the diffusion model, as in LoraLoader. The merge reproduces "
                                       "the LoRA at this strength."),
                io.Float.Input("strength_clip", default=1.0, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.01,
                               tooltip="Strength on the text encoder (CLIP), as in LoraLoader."),
                io.String.Input("prompts", multiline=True, default="",
                                placeholder="prompts that show this LoRA's concept, one per line (empty: made "
                                            "from the file's trigger words and training tags)",
                                tooltip="Prompts that show this LoRA's concept, one per line (use its trigger "
                                        "words). The merge samples these with the LoRA alone and keeps that "
                                        "behaviour. 2-5 varied prompts are plenty; lines starting with # are "
                                        "ignored; emphasis weights like (word:1.2) are not applied. Left empty, "
                                        "they are made from what the file and its sidecar files say (trigger "
                                        "words, class word, most frequent training tags) and shown on the node."),
                io.String.Input("negative_prompt", multiline=True, default="", optional=True,
                                placeholder="negative prompt for those samples (optional)",
                                tooltip="Negative prompt for those samples (the merged model will see it too)."),
                Concepts.Input("previous", optional=True,
                               tooltip="Concepts from other LoRA Concept nodes: this one is added to them."),
            ],
            outputs=[Concepts.Output(display_name="concepts",
                                     tooltip="This concept and the previous ones, for Merge LoRAs (IterIS)."),
                     io.String.Output(display_name="prompts",
                                      tooltip="The prompts this concept uses, one per line: the typed ones, or "
                                              "those made from the file's metadata.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name, strength_model, strength_clip) -> bool | str:
        # linked inputs arrive as None here; ComfyUI checks neither combo values nor, once they are
        # named here, numeric ranges, so both are checked by hand
        if lora_name is not None and lora_path(lora_name) is None:
            return f"LoRA '{lora_name}' is not in models/loras (refresh the list, or pick another file)"
        for name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if value is not None and not STRENGTH_RANGE[0] <= value <= STRENGTH_RANGE[1]:
                return f"{name} must be between {STRENGTH_RANGE[0]:g} and {STRENGTH_RANGE[1]:g}, got {value}"
        return True

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_kwargs):
        # re-run when the file changes on disk, not only when another file is picked
        path = lora_path(lora_name)
        if path is None:
            return lora_name
        stat = os.stat(path)
        return (lora_name, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, lora_name, strength_model, strength_clip, prompts, negative_prompt="", previous=None) -> io.NodeOutput:
        path = lora_path(lora_name)
        if path is None:
            raise IterisError(f"LoRA '{lora_name}' is not in models/loras")
        lora = read_lora_file(path)
        check_adapter_file(lora)
        prompt_list, source = concept_prompts(lora_name, lora, prompts)
        spec = ConceptSpec(lora_name, lora.sha256, float(strength_model), float(strength_clip), prompt_list,
                           (negative_prompt or "").strip(), lora, source)
        shown = "\n".join(prompt_list)
        text = shown if source == "typed" else f"{source}\n\n{shown}"
        return io.NodeOutput(tuple(previous or ()) + (spec,), shown, ui=ui.PreviewText(text))


def concept_prompts(lora_name: str, lora: LoraFile, typed: str) -> tuple[tuple[str, ...], str]:
    """The concept's prompts and where they came from: the typed ones ("typed"), or, when none are
    typed, those made from the file's metadata and sidecars (their description). Nothing to go on
    is an error that asks for prompts."""
    prompt_list = split_prompts(typed or "")
    if prompt_list:
        return prompt_list, "typed"
    derived = derive_prompts(lora.metadata, lora_path=lora.path)
    if derived is None:
        raise IterisError(missing_prompts_message(lora_name))
    return tuple(derived.prompts), derived.describe()
