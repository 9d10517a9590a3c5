"""Test support for the DiT families: tiny models of :mod:`bench.dit_families` in a ComfyUI base
folder, loaded in-process (LoRA files and the denoiser's output come from :mod:`bench.dit_tools`).

Nothing here is a test.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from pathlib import Path

import bench.dit_families as dit
from bench.comfy import load_pack

TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"


@dataclass
class TinyDit:
    """A family's tiny model files in ComfyUI's model folders, the MODEL and CLIP that ComfyUI's
    loaders made of them, and the executor that keeps them loaded for the family's tests."""

    family: str
    unet_name: str
    text_encoder_names: str          # comma-separated, as the test loader node takes them
    vae_name: str
    executor: object = None
    model: object = None
    clip: object = None
    loras: dict[str, str] = field(default_factory=dict)   # label -> file name in models/loras

    def loaders(self) -> dict:
        """The prompt nodes "1" (UNETLoader) and "2" (the tests' text-encoder loader)."""
        return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": self.unet_name, "weight_dtype": "default"}},
                "2": {"class_type": "IterISTest_TinyTextEncoderLoader",
                      "inputs": {"family": self.family, "text_encoder_names": self.text_encoder_names}}}


def load_test_nodes(nodes) -> None:
    """Register the tests' own node pack (the tiny text-encoder loader) in the in-process ComfyUI."""
    if "IterISTest_TinyTextEncoderLoader" not in nodes.NODE_CLASS_MAPPINGS:
        if not asyncio.run(nodes.load_custom_node(str(TEST_NODES), ignore=set(nodes.NODE_CLASS_MAPPINGS))):
            raise RuntimeError("ComfyUI could not load tests/comfy_test_nodes")


def build_tiny_dit(family: str, models: Path, nodes) -> TinyDit:
    """Write the family's files under ``models`` (ComfyUI's folder names) and load them with
    UNETLoader and the tests' text-encoder loader in one executor, whose cache then serves every
    prompt of the family's tests (each model is loaded once)."""
    from bench.comfy import make_executor, run_prompt

    load_pack(nodes)
    load_test_nodes(nodes)
    unet = models / "diffusion_models" / f"tiny_{family}.safetensors"
    unet.parent.mkdir(parents=True, exist_ok=True)
    if not unet.exists():
        dit.write_diffusion_model(family, unet)
    encoders = dit.write_text_encoders(family, models / "text_encoders")
    vae_name = dit.write_vae(family, models / "vae", models / "vae_approx")
    tiny = TinyDit(family, unet.name, ",".join(p.name for p in encoders), vae_name, make_executor())
    prompt = tiny.loaders()
    prompt.update({"8": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
                   "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}})
    ok, messages, _ = run_prompt(prompt, tiny.executor)
    if not ok:
        raise RuntimeError(f"{family}: the loaders failed: {messages}")
    tiny.model = tiny.executor.caches.outputs.get("1").outputs[0][0]
    tiny.clip = tiny.executor.caches.outputs.get("2").outputs[0][0]
    return tiny


def release(tiny: TinyDit) -> None:
    """Free a family's models before the next family loads (they take gigabytes)."""
    import comfy.model_management

    tiny.model = tiny.clip = tiny.executor = None
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()
