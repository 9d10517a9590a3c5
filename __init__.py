"""ComfyUI-IterIS: merge several LoRAs into one with IterIS (CVPR 2025).

ComfyUI imports this package and calls ``comfy_entrypoint`` (V3 node API); the engine it stands on,
``iteris_core``, has no ComfyUI dependency and also serves the Python API and the CLI.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint
else:  # imported outside ComfyUI (by pytest, which collects the checkout as a package): no nodes
    comfy_entrypoint = None

__all__ = ["comfy_entrypoint"]
