"""Test support for running the real ComfyUI 0.3.75 in-process (no server, CPU only).

Nothing here is a test. :func:`import_comfy` (from ``bench/comfy.py``) imports ComfyUI in-process;
:func:`load_pack` loads this pack into it; :func:`run_prompt` executes API-format prompts;
:func:`build_tiny_sd15_checkpoint` writes a randomly initialised checkpoint (fp16 safetensors) that
  ComfyUI's ``CheckpointLoaderSimple`` detects as SD1.5: a one-level UNet with the real SD1.5 widths
  (25.8 M parameters), the real-size CLIP-L text encoder (123 M) and a TAESD-shaped VAE (2.4 M).
  The file is about 302 MB; build it once per session into a cache directory the caller chooses.

"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.checkpoints import component_shapes, write_checkpoint
from bench.comfy import (COMFYUI_HOME, ITERIS_ENV, PACK_DIR, import_comfy, load_pack, make_executor,  # noqa: F401
                         run_prompt)


# The smallest UNet that comfy.model_detection still matches to supported_models.SD15: the real
# SD1.5 width (model_channels=320, context_dim=768, 8 heads, conv proj_in/proj_out) with one level,
# one res block and one transformer block per level, plus the middle block.
TINY_SD15_UNET_CONFIG: dict[str, object] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "num_heads": 8,
    "context_dim": 768,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
}


def build_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a random-weight SD1.5-type checkpoint (fp16 .safetensors) to ``path`` and return it.

    151.3 M parameters, 302.7 MB; about 1-2 s on a 2-core CPU. ComfyUI detects it as
    ``supported_models.SD15`` (EPS); ``CheckpointLoaderSimple`` loads it in about 0.1-0.5 s and a
    2-step euler ``KSampler`` at 64x64 takes about 0.1 s. The same ``seed`` gives the same bytes;
    the write goes through a temporary file, so an interrupted build leaves no partial checkpoint.
    """
    import_comfy()
    return write_checkpoint(component_shapes(TINY_SD15_UNET_CONFIG, sdxl=False), path, seed, "tiny-sd15")


def comfy_sd15_key_map(with_shapes: bool = False):
    """ComfyUI's own LoRA key map for a full-size SD1.5 model (UNet and CLIP-L built on the meta
    device: no weights), to ask which files ComfyUI itself can load for SD1.x; with the model's
    weight shapes by key if asked."""
    import inspect
    import re

    import_comfy()
    import comfy.lora
    import comfy.model_detection
    import comfy.sd1_clip

    source = inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet)
    config = eval(re.search(r"\n    SD15 = (\{.*?\})\n", source, re.S).group(1), {"dtype": torch.float16})
    with torch.device("meta"):
        model = comfy.model_detection.model_config_from_unet_config(dict(config)).get_model({}, device="meta")
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        comfy.lora.model_lora_keys_clip(clip, key_map)
    if not with_shapes:
        return key_map
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    shapes.update({k: v.shape for k, v in clip.state_dict().items()})
    return key_map, shapes


def comfy_places_every_patch(path, key_map: dict, shapes: dict) -> bool:
    """Whether ComfyUI loads this file onto SD1.5 completely: it reads it, maps at least one key, and
    applies every patch without error. ComfyUI maps keys by name and finds a shape mismatch only when
    it patches; it then logs an error and skips that weight."""
    import logging

    import comfy.lora
    import comfy.utils

    try:
        patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(path), safe_load=True), key_map,
                                       log_missing=False)
    except Exception:  # noqa: BLE001 - any failure to read means "ComfyUI cannot load it"
        return False
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                errors.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    try:
        for key, patch in patches.items():
            comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], torch.zeros(shapes[key]), key)
    finally:
        logging.getLogger().removeHandler(handler)
    return bool(patches) and not errors


def comfy_base_directory(base: Path, checkpoint: Path, checkpoint_name: str, loras: dict[str, int],
                         include: str | None = None) -> Path:
    """A ComfyUI base folder (``--base-directory``) with this pack in ``custom_nodes``, the
    checkpoint linked under ``checkpoint_name`` and random LoRAs for it (file name -> seed)."""
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import ATTENTION_MLP, random_lora_deltas
    from iteris_core.lora_writer import MergedLora

    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-IterIS").symlink_to(PACK_DIR)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint_name).symlink_to(checkpoint)
    (base / "models" / "loras").mkdir(parents=True)
    table = DiffusersBackend.from_pretrained(checkpoint, device="cpu").layer_table()
    for name, seed in loras.items():
        deltas = random_lora_deltas(table, seed, rank=4, scale=0.2, include=include or ATTENTION_MLP)
        MergedLora(deltas, table).save(base / "models" / "loras" / name)
    return base
