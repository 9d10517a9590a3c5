"""Data that travels between the pack's nodes."""

from __future__ import annotations

from dataclasses import dataclass, field

from comfy_api.v0_0_2 import io

from ..iteris_core.lora_io import LoraFile

Concepts = io.Custom("ITERIS_CONCEPTS")
"""A chain of LoRA concepts (a tuple of :class:`ConceptSpec`), built by LoRA Concept nodes."""


@dataclass(frozen=True)
class ConceptSpec:
    """One LoRA with its strengths and concept prompts, as chosen in a LoRA Concept node."""

    lora_name: str
    sha256: str
    strength_model: float
    strength_clip: float
    prompts: tuple[str, ...]
    negative_prompt: str
    lora: LoraFile = field(compare=False, hash=False, repr=False)
    prompt_source: str = "typed"   # or where the prompts were made from (the file's metadata)

    def key(self) -> tuple:
        """Everything about the concept that changes a merge (the file by content, not by name)."""
        return (self.sha256, self.strength_model, self.strength_clip, self.prompts, self.negative_prompt)


class LoraDict(dict):
    """A LORA_MODEL (dict of tensors, kohya keys) that also carries the merge's file metadata, so the
    Save node can write provenance; core nodes see an ordinary dict."""

    metadata: dict[str, str]

    def __init__(self, tensors, metadata: dict[str, str] | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


def split_prompts(text: str | None) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    lines = (line.strip() for line in (text or "").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))
