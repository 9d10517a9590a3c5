"""Save Merged LoRA (IterIS): write a LORA_MODEL into models/loras, where LoraLoader lists it."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..iteris_core.errors import IterisError
from ..iteris_core.lora_io import atomic_write_safetensors, sanitize_file_name, unique_path
from ..iteris_core.lora_writer import SAVE_DTYPES, cast_for_file


def _name_problem(filename: str) -> str | None:
    try:
        sanitize_file_name(filename)
    except IterisError as exc:
        return str(exc)
    return None


class IterisSaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IterIS_SaveLora",
            display_name="Save Merged LoRA (IterIS)",
            category="loaders/IterIS",
            description="Writes the merged LoRA into models/loras as a .safetensors file (kohya format, with the "
                        "merge's metadata) that the stock Load LoRA node lists and loads.",
            is_output_node=True,
            inputs=[
                io.LoraModel.Input("lora", tooltip="The merged LoRA from Merge LoRAs (IterIS) (any LORA_MODEL works)."),
                io.String.Input("filename", default="iteris_merged",
                                tooltip="File name in models/loras (no folders); .safetensors is added."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name. Off: a free name like name_00001 is used."),
                io.Combo.Input("precision", options=list(SAVE_DTYPES), default="fp16",
                               tooltip="Precision of the saved weights (fp16 is the usual LoRA size)."),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The saved file's name, as LoraLoader lists it.")],
        )

    @classmethod
    def validate_inputs(cls, filename) -> bool | str:
        if filename is None:
            return True
        return _name_problem(filename) or True

    @classmethod
    def execute(cls, lora, filename, overwrite, precision) -> io.NodeOutput:
        problem = _name_problem(filename)
        if problem:
            raise IterisError(problem)
        if not lora:
            raise IterisError("the LoRA is empty: nothing to save")
        folder = Path(folder_paths.get_folder_paths("loras")[0])
        path = folder / sanitize_file_name(filename)
        if path.exists() and not overwrite:
            path = unique_path(path)
        dtype = SAVE_DTYPES[precision]
        tensors = cast_for_file(dict(lora), dtype)
        metadata = dict(getattr(lora, "metadata", {}) or {})
        comfy.model_management.throw_exception_if_processing_interrupted()
        atomic_write_safetensors(tensors, path, metadata, overwrite=overwrite)
        folder_paths.filename_list_cache.pop("loras", None)  # LoraLoader lists the new file at once
        text = f"saved {path.name} ({len(tensors)} tensors, {precision}) in {folder}"
        return io.NodeOutput(path.name, ui=ui.PreviewText(text))
