"""IterIS LoRA merging engine: exact, streaming, framework-independent (torch + safetensors).

The ComfyUI nodes, the CLI (``python -m iteris_core``) and the Python API all stand on it:

    from iteris_core import Concept, MergeSettings, merge_loras
"""

__version__ = "0.1.0"

from .api import Concept, MergeResult, merge_loras, open_backend  # noqa: E402
from .errors import (BaseModelMismatchError, IterisError, LoraFileError, LoraFormatError,  # noqa: E402
                     MergeInterrupted, SettingsError, SolverError)
from .lora_normalize import NormalizedLora, load_lora  # noqa: E402
from .lora_writer import MergedLora  # noqa: E402
from .settings import MergeSettings, Method, SamplingSettings  # noqa: E402

__all__ = ["Concept", "MergeResult", "merge_loras", "open_backend", "MergeSettings", "Method", "SamplingSettings",
           "NormalizedLora", "load_lora", "MergedLora", "IterisError", "LoraFileError", "LoraFormatError",
           "BaseModelMismatchError", "SettingsError", "SolverError", "MergeInterrupted"]
