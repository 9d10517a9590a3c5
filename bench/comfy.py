"""The real ComfyUI, imported in-process (CPU), for tests and benchmarks.

ComfyUI's top-level module names (``nodes``, ``utils``, ``server``, ``execution``, ``folder_paths``,
``comfy``, ``app``, ``protocol``) shadow same-named modules, so callers must not use them.
See ``/work/shared/notes/comfyui-offline.md`` for the environment this expects
(``scripts/setup_env.sh`` builds it).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import ModuleType

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


def import_comfy(base_directory: str | os.PathLike[str] | None = None, **flags) -> ModuleType:
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
    for flag, value in flags.items():   # command-line flags, e.g. use_pytorch_cross_attention=True
        setattr(args, flag, value)
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


PACK_DIR = Path(__file__).resolve().parent.parent
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
