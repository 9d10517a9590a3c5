"""LoRA Stack to Concepts (IterIS): the ``LORA_STACK`` that stacker nodes pass (Efficiency Nodes,
Comfyroll: a list of ``(lora_name, strength_model, strength_clip)``) turned into the pack's concepts,
so an existing stacker graph feeds the merge unchanged."""

from __future__ import annotations

from typing import Sequence

from comfy_api.v0_0_2 import io, ui

from ..iteris_core.errors import IterisError
from ..iteris_core.lora_io import read_lora_file
from .comfy_lora import check_adapter_file
from .concept_node import STRENGTH_RANGE, concept_prompts, lora_path
from .types import Concepts, ConceptSpec

LoraStack = io.Custom("LORA_STACK")
"""The stacker packs' list of ``(lora_name, strength_model, strength_clip)`` tuples."""

BLOCK_SEPARATOR = "---"


def stack_entries(stack: Sequence) -> list[tuple[str, float, float]]:
    """The stack's ``(lora_name, strength_model, strength_clip)`` entries, checked; "None" names
    (an empty slot in a stacker) are skipped, as the stackers' own loaders skip them."""
    entries = []
    for index, entry in enumerate(stack or ()):
        if not isinstance(entry, (tuple, list)) or len(entry) < 3:
            raise IterisError(f"lora_stack entry {index + 1} is {entry!r}: expected (lora_name, strength_model, "
                              "strength_clip), as LoRA stacker nodes make")
        name, model_strength, clip_strength = entry[0], entry[1], entry[2]
        if name in (None, "", "None"):
            continue
        for what, value in (("strength_model", model_strength), ("strength_clip", clip_strength)):
            if not isinstance(value, (int, float)) or not STRENGTH_RANGE[0] <= value <= STRENGTH_RANGE[1]:
                raise IterisError(f"lora_stack entry {index + 1} ({name}): {what} must be a number between "
                                  f"{STRENGTH_RANGE[0]:g} and {STRENGTH_RANGE[1]:g}, got {value!r}")
        entries.append((str(name), float(model_strength), float(clip_strength)))
    if not entries:
        raise IterisError("lora_stack holds no LoRA: add LoRAs to the stacker")
    return entries


def prompt_blocks(text: str, count: int) -> list[str]:
    """The typed prompts for each of ``count`` LoRAs: blocks separated by lines of ``---``, in the
    stack's order; missing or empty blocks leave a LoRA to its file's metadata."""
    blocks = [[]]
    for line in (text or "").splitlines():
        if line.strip() == BLOCK_SEPARATOR:
            blocks.append([])
        else:
            blocks[-1].append(line)
    if len(blocks) > count:
        raise IterisError(f"prompts has {len(blocks)} blocks separated by '{BLOCK_SEPARATOR}' but the stack holds "
                          f"{count} LoRAs: give one block per LoRA, in the stack's order")
    texts = ["\n".join(block) for block in blocks]
    return texts + [""] * (count - len(texts))


class IterisLoraStack(io.ComfyNode):
    """Every LoRA of a LORA_STACK as a concept for Merge LoRAs (IterIS)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IterIS_LoraStack",
            display_name="LoRA Stack to Concepts (IterIS)",
            category="loaders/IterIS",
            description="Turns a LORA_STACK from a LoRA stacker node into concepts for Merge LoRAs (IterIS), each "
                        "with its strengths; prompts are made from each file's trigger words and training tags "
                        "unless typed.",
            inputs=[
                LoraStack.Input("lora_stack", tooltip="A LORA_STACK: (lora_name, strength_model, strength_clip) "
                                                      "per LoRA, as LoRA stacker nodes make."),
                io.String.Input("prompts", multiline=True, default="",
                                placeholder="optional: one block of prompts per LoRA, blocks separated by a line "
                                            "'---'; an empty block uses the file's metadata",
                                tooltip="Prompts for the stack's LoRAs, in its order: one block per LoRA (one "
                                        "prompt per line), blocks separated by a line '---'. A LoRA without a "
                                        "block gets prompts made from its file's trigger words and tags."),
                io.String.Input("negative_prompt", multiline=True, default="", optional=True,
                                tooltip="Negative prompt for every concept's samples (optional)."),
                Concepts.Input("previous", optional=True,
                               tooltip="Concepts from other LoRA Concept nodes: the stack's are added to them."),
            ],
            outputs=[Concepts.Output(display_name="concepts",
                                     tooltip="The stack's concepts after the previous ones, for Merge LoRAs (IterIS)."),
                     io.String.Output(display_name="prompts",
                                      tooltip="The prompts each concept uses, blocks separated by '---'.")],
        )

    @classmethod
    def execute(cls, lora_stack, prompts="", negative_prompt="", previous=None) -> io.NodeOutput:
        entries = stack_entries(lora_stack)
        specs, shown, notes = [], [], []
        for (name, model_strength, clip_strength), typed in zip(entries, prompt_blocks(prompts, len(entries))):
            path = lora_path(name)
            if path is None:
                raise IterisError(f"lora_stack: LoRA '{name}' is not in models/loras")
            lora = read_lora_file(path)
            check_adapter_file(lora)
            prompt_list, source = concept_prompts(name, lora, typed)
            specs.append(ConceptSpec(name, lora.sha256, model_strength, clip_strength, prompt_list,
                                     (negative_prompt or "").strip(), lora, source))
            shown.append("\n".join(prompt_list))
            notes.append(f"{name}: {source}")
        text = f"\n{BLOCK_SEPARATOR}\n".join(shown)
        return io.NodeOutput(tuple(previous or ()) + tuple(specs), text,
                             ui=ui.PreviewText("\n".join(notes) + "\n\n" + text))
