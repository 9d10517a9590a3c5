"""The engine's progress and stop callbacks, wired to ComfyUI's ProgressBar and Cancel button."""

from __future__ import annotations

import contextlib
from typing import Iterator

import comfy.model_management
import comfy.utils

from ..iteris_core.errors import MergeInterrupted


class NodeProgress:
    """``on_progress(done, total, message)`` for the engine: drives a ProgressBar (created on first
    use, when the total is known). In the server, updating it may itself raise the interrupt."""

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id
        self.bar: comfy.utils.ProgressBar | None = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.bar.update_absolute(done, total)


def should_stop() -> bool:
    """True once the user pressed Cancel (ComfyUI's interrupt flag)."""
    return comfy.model_management.processing_interrupted()


@contextlib.contextmanager
def comfy_interrupts() -> Iterator[None]:
    """Turn the engine's stop into ComfyUI's own interrupt, which the UI shows as "interrupted"."""
    try:
        yield
    except MergeInterrupted:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise comfy.model_management.InterruptProcessingException() from None
