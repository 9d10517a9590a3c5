"""Errors that the engine raises for bad input. Each names the file, key, layer or setting at fault
and says what was expected, so that the CLI, the Python API and the ComfyUI nodes can show the
message as is."""

from __future__ import annotations

from pathlib import Path


class IterisError(Exception):
    """Base class of every error the engine raises on purpose."""


class LoraFileError(IterisError):
    """A LoRA file that cannot be read: missing, truncated, corrupt, pickled, or not safetensors."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{Path(path).name}: {problem} (file: {path})")


class LoraFormatError(IterisError):
    """A readable file whose keys or tensors do not form a LoRA this engine understands."""

    def __init__(self, source: str, problem: str, key: str | None = None):
        self.source = source
        self.key = key
        self.problem = problem
        where = f" key {key!r}:" if key else ""
        super().__init__(f"{source}:{where} {problem}")


class BaseModelMismatchError(LoraFormatError):
    """A LoRA made for another base model (other architecture or layer shapes)."""


class SettingsError(IterisError, ValueError):
    """A setting or input value out of range."""


class SolverError(IterisError):
    """A per-layer system that cannot be solved (singular, or not finite)."""

    def __init__(self, layer: str, problem: str):
        self.layer = layer
        super().__init__(f"layer {layer}: {problem}")


class MergeInterrupted(IterisError):
    """The caller asked the merge to stop (ComfyUI's Cancel, Ctrl-C in the CLI)."""
