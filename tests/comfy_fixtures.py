"""Test support for running the real ComfyUI 0.3.75 in-process (no server, CPU only).

Nothing here is a test. Two things are provided:

* :func:`import_comfy` imports ComfyUI from :data:`COMFYUI_HOME` in the order ``main.py`` uses and
  registers the built-in nodes once; it returns ComfyUI's ``nodes`` module.
* :func:`build_tiny_sd15_checkpoint` writes a randomly initialised checkpoint (fp16 safetensors) that
  ComfyUI's ``CheckpointLoaderSimple`` detects as SD1.5: a one-level UNet with the real SD1.5 widths
  (25.8 M parameters), the real-size CLIP-L text encoder (123 M) and a TAESD-shaped VAE (2.4 M).
  The file is about 302 MB; build it once per session into a cache directory the caller chooses.

ComfyUI's top-level module names (``nodes``, ``utils``, ``server``, ``execution``, ``folder_paths``,
``comfy``, ``app``, ``protocol``) shadow same-named modules, so test modules must not use them.
See ``/work/shared/notes/comfyui-offline.md`` for the environment this expects.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

ITERIS_ENV: str = os.environ.get("ITERIS_ENV", os.path.expanduser("~/.cache/comfyui-iteris"))
"""Folder made by ``scripts/setup_env.sh``: holds ``venv/`` and ``ComfyUI/``."""


def _resolve_comfyui_home() -> Path:
    """``$COMFYUI_HOME`` if set, else ``$ITERIS_ENV/ComfyUI``.

    ``comfyui-offline.md`` uses ``COMFYUI_HOME`` for the folder *containing* ``ComfyUI/``; that spelling is
    accepted too.
    """
    home = Path(os.environ.get("COMFYUI_HOME") or ITERIS_ENV + "/ComfyUI").expanduser()
    if not (home / "main.py").is_file() and (home / "ComfyUI" / "main.py").is_file():
        home = home / "ComfyUI"
    return home


COMFYUI_HOME: Path = _resolve_comfyui_home()
"""The ComfyUI source tree (the folder holding ``main.py``)."""

_nodes: ModuleType | None = None
_base_directory: str | None = None


def import_comfy(base_directory: str | os.PathLike[str] | None = None) -> ModuleType:
    """Import ComfyUI in-process and register its built-in nodes; return the ``nodes`` module.

    Idempotent: later calls return the same module at once. Call it from synchronous code (it runs
    ``asyncio.run``); it takes about 3 s and logs harmless "IMPORT FAILED: nodes_audio*.py" warnings
    (no torchaudio). The order matters:
    ``args.cpu`` must be set before ``comfy.model_management`` is imported (else CUDA is probed),
    and ``utils.extra_config`` before ``nodes`` (``nodes`` puts ``comfy/`` first on ``sys.path``,
    after which ``import utils`` would find ``comfy/utils.py``).

    Args:
        base_directory: like ``--base-directory``: where ``models/``, ``output/``, ``input/``,
            ``temp/`` and ``user/`` live. Only the first call can set it (``folder_paths`` reads it
            at import); a later call asking for another folder raises ``RuntimeError``.
    """
    global _nodes, _base_directory
    wanted = os.path.abspath(base_directory) if base_directory is not None else None
    if _nodes is not None:
        if wanted is not None and wanted != _base_directory:
            raise RuntimeError(f"ComfyUI was already imported with base directory {_base_directory!r}; "
                               f"cannot switch to {wanted!r} in the same process")
        return _nodes
    if not (COMFYUI_HOME / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {COMFYUI_HOME}: run scripts/setup_env.sh or set COMFYUI_HOME")

    if str(COMFYUI_HOME) not in sys.path:
        sys.path.insert(0, str(COMFYUI_HOME))
    from comfy.cli_args import args  # in-process, comfy parses no command line: defaults only

    args.cpu = True
    if wanted is not None:
        args.base_directory = wanted
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import utils.extra_config  # noqa: F401  (must come before `nodes`)
    import server  # noqa: F401  (main.py's import order)
    import execution  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _nodes, _base_directory = nodes, wanted
    return nodes


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


def _component_shapes() -> dict[str, torch.Size]:
    """Checkpoint key -> shape, taken from ComfyUI's own modules built on the meta device."""
    import_comfy()
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**TINY_SD15_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
        vae = comfy.taesd.taesd.TAESD()
    shapes: dict[str, torch.Size] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.", clip),
                           ("first_stage_model.", vae)):
        for key, tensor in module.state_dict().items():
            shapes[prefix + key] = tensor.shape
    # Real SD1.5 checkpoints carry neither; ComfyUI does not ask for them.
    shapes.pop("cond_stage_model.logit_scale", None)
    shapes.pop("cond_stage_model.transformer.text_projection.weight", None)
    return shapes


def _random_tensor(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, other weights N(0, 1/fan_in): finite activations at any depth."""
    if key.endswith("vae_scale"):
        return torch.ones(shape)
    if key.endswith("vae_shift") or key.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # GroupNorm / LayerNorm weights
        return torch.ones(shape)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def build_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a random-weight SD1.5-type checkpoint (fp16 .safetensors) to ``path`` and return it.

    151.3 M parameters, 302.7 MB; about 1-2 s on a 2-core CPU. ComfyUI detects it as
    ``supported_models.SD15`` (EPS); ``CheckpointLoaderSimple`` loads it in about 0.1-0.5 s and a
    2-step euler ``KSampler`` at 64x64 takes about 0.1 s. The same ``seed`` gives the same bytes.
    An existing file at ``path`` is overwritten; the write goes to a temporary file first, so an
    interrupted build never leaves a partial checkpoint. Put it where ``CheckpointLoaderSimple``
    looks (``folder_paths.get_folder_paths("checkpoints")``) or register its folder with
    ``folder_paths.add_model_folder_path("checkpoints", folder, is_default=True)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    state = {key: _random_tensor(key, shape, gen).to(torch.float16)
             for key, shape in sorted(_component_shapes().items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # One metadata entry only: safetensors writes the metadata map in per-process random order, so two
    # entries would make the bytes differ from run to run.
    try:
        save_file(state, str(partial), metadata={"iteris_test": f"tiny-sd15 seed={seed}"})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


PACK_DIR = Path(__file__).resolve().parents[1]
"""This repository: the node pack ComfyUI loads."""


def load_pack(nodes: ModuleType) -> dict[str, type]:
    """Load this node pack into the imported ComfyUI (as ``load_custom_node`` does at start-up) and
    return its node classes by node id."""
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if "IterIS_MergeLoras" not in before:
        ok = asyncio.run(nodes.load_custom_node(str(PACK_DIR), ignore=before))
        if not ok:
            raise RuntimeError("ComfyUI could not load the pack (see the log above)")
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("IterIS_")}


class _StubServer:
    """What PromptExecutor needs of the PromptServer when no server runs."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


def make_executor():
    import execution

    return execution.PromptExecutor(_StubServer(), cache_type=execution.CacheType.CLASSIC,
                                     cache_args={"lru": 0, "ram": 0})


def run_prompt(prompt: dict, executor=None) -> tuple[bool, list, dict]:
    """Validate and execute an API-format prompt in-process. Returns (success, status messages,
    outputs); a prompt that fails validation returns (False, [("validation", error, node_errors)], {})."""
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    if not ok:
        return False, [("validation", error, node_errors)], {}
    executor = executor or make_executor()
    executor.execute(prompt, "test", {}, outputs)
    return executor.success, executor.status_messages, executor.history_result.get("outputs", {})


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
