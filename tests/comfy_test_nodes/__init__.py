"""A ComfyUI node pack for tests only: loads the tiny random text encoders of ``bench.dit_families``,
and makes a ``LORA_STACK`` the way LoRA stacker packs (Efficiency Nodes, Comfyroll) do.

``CR LoRA Stack`` stands in for Comfyroll Studio's node of that name (class ``CR_LoRAStack`` in
Suzie1/ComfyUI_Comfyroll_CustomNodes, ``nodes/nodes_lora.py``): same node type, inputs, outputs
and stacking rules, so that a shared workflow made with the real node loads, converts and runs in
the tests, where Comfyroll itself is not installed. The tests never install both packs in one
ComfyUI, so the two never compete for the name.

ComfyUI's own CLIPLoader cannot pass the ``model_options`` that make those encoders tiny, so tests
put this pack in a ``custom_nodes`` folder (usually as a symlink) next to the IterIS pack and use
``IterISTest_TinyTextEncoderLoader`` where a workflow would use CLIPLoader / DualCLIPLoader.
"""

from __future__ import annotations

import os
import sys

# ComfyUI imports the pack through its custom_nodes symlink: resolve it to find the repository.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

import folder_paths  # noqa: E402  (ComfyUI's)

from bench.dit_families import FAMILIES, load_text_encoder  # noqa: E402


class IterISTest_TinyTextEncoderLoader:
    """Load a family's tiny text-encoder files from the ``text_encoders`` model folder."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "family": (list(FAMILIES),),
            "text_encoder_names": ("STRING", {"default": "", "tooltip": "comma-separated file names in "
                                              "models/text_encoders, as bench.dit_families writes them"}),
        }}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "IterIS/tests"

    def load(self, family: str, text_encoder_names: str) -> tuple:
        """Resolve the names in ComfyUI's ``text_encoders`` folder and load them as ``family``'s CLIP."""
        names = [name.strip() for name in text_encoder_names.split(",") if name.strip()]
        if not names:
            raise ValueError("text_encoder_names is empty")
        paths = []
        for name in names:
            path = folder_paths.get_full_path("text_encoders", name)
            if path is None:
                raise FileNotFoundError(f"{name!r} is not in the text_encoders model folder")
            paths.append(path)
        return (load_text_encoder(family, paths),)


class IterISTest_LoraStacker:
    """A LORA_STACK as the stacker packs pass it: a list of (lora_name, strength_model, strength_clip),
    with "None" for an empty slot."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora_names": ("STRING", {"default": "", "tooltip": "comma-separated names in models/loras; None: empty slot"}),
            "strengths_model": ("STRING", {"default": "", "tooltip": "comma-separated, one per name"}),
            "strengths_clip": ("STRING", {"default": "", "tooltip": "comma-separated, one per name"}),
        }}

    RETURN_TYPES = ("LORA_STACK",)
    FUNCTION = "stack"
    CATEGORY = "IterIS/tests"

    def stack(self, lora_names: str, strengths_model: str, strengths_clip: str) -> tuple:
        names = [n.strip() for n in lora_names.split(",")]
        model = [float(v) for v in strengths_model.split(",")]
        clip = [float(v) for v in strengths_clip.split(",")]
        return ([(n, m, c) for n, m, c in zip(names, model, clip)],)


CR_SLOTS = 3
"""LoRA slots of Comfyroll's CR LoRA Stack."""
CR_WEIGHT = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
CR_HELP = "https://github.com/Suzie1/ComfyUI_Comfyroll_CustomNodes/wiki/LoRA-Nodes#cr-lora-stack"


class CRLoraStackStandIn:
    """Comfyroll's ``CR LoRA Stack``: three switchable LoRA slots appended to an optional incoming
    stack (its "None" entries dropped), as ``(lora_name, model_weight, clip_weight)``."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        loras = ["None"] + folder_paths.get_filename_list("loras")
        required = {}
        for slot in range(1, CR_SLOTS + 1):   # Comfyroll's order: switch, name, model, clip per slot
            required[f"switch_{slot}"] = (["Off", "On"],)
            required[f"lora_name_{slot}"] = (loras,)
            required[f"model_weight_{slot}"] = CR_WEIGHT
            required[f"clip_weight_{slot}"] = CR_WEIGHT
        return {"required": required, "optional": {"lora_stack": ("LORA_STACK",)}}

    RETURN_TYPES = ("LORA_STACK", "STRING")
    RETURN_NAMES = ("LORA_STACK", "show_help")
    FUNCTION = "lora_stacker"
    CATEGORY = "🧩 Comfyroll Studio/✨ Essential/💊 LoRA"

    def lora_stacker(self, lora_stack=None, **slots) -> tuple:
        """The incoming stack without its "None" entries, then every slot that is "On" and names a file."""
        stack = [entry for entry in (lora_stack or []) if entry[0] != "None"]
        for slot in range(1, CR_SLOTS + 1):
            name = slots[f"lora_name_{slot}"]
            if name != "None" and slots[f"switch_{slot}"] == "On":
                stack.append((name, slots[f"model_weight_{slot}"], slots[f"clip_weight_{slot}"]))
        return (stack, CR_HELP)


NODE_CLASS_MAPPINGS = {"IterISTest_TinyTextEncoderLoader": IterISTest_TinyTextEncoderLoader,
                       "IterISTest_LoraStacker": IterISTest_LoraStacker,
                       "CR LoRA Stack": CRLoraStackStandIn}
NODE_DISPLAY_NAME_MAPPINGS = {"IterISTest_TinyTextEncoderLoader": "Tiny text encoder loader (IterIS tests)",
                              "IterISTest_LoraStacker": "LoRA stacker (IterIS tests)",
                              "CR LoRA Stack": "💊 CR LoRA Stack"}
