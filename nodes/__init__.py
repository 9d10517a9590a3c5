"""ComfyUI nodes of the IterIS pack (V3 API, pinned to comfy_api v0.0.2). Thin: the math is in
``iteris_core``; ``comfy_backend`` is the only module that touches ComfyUI's model internals."""

from comfy_api.v0_0_2 import ComfyExtension, io

from .compare_node import IterisCompareGrid
from .concept_node import IterisLoraConcept
from .merge_node import IterisMergeLoras
from .save_node import IterisSaveLora
from .stack_node import IterisLoraStack

NODES = [IterisLoraConcept, IterisLoraStack, IterisMergeLoras, IterisSaveLora, IterisCompareGrid]


class IterisExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> IterisExtension:
    return IterisExtension()
