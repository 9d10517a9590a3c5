"""Shared fixtures: tiny seeded models built from configs, full-size layer tables on the meta
device, and the folder of real published LoRA files (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLES = Path(os.environ.get("ITERIS_LORA_SAMPLES", ROOT.parent / "shared" / "lora_samples"))

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_pipe():
    from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline

    return build_tiny_pipeline(TinySpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_pipe):
    from iteris_core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend(tiny_pipe, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline

    return build_tiny_pipeline(TinySpec(sdxl=True), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_backend(tiny_sdxl_pipe):
    from iteris_core.backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend(tiny_sdxl_pipe, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def full_tables():
    """Layer tables of full-size SD1.5, SD2.1 and SDXL (diffusers modules on the meta device)."""
    from bench.full_size import full_size_tables

    return full_size_tables()


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not (SAMPLES / "MANIFEST.md").is_file():
        pytest.skip(f"real LoRA samples not found at {SAMPLES} (they live beside the checkout, not in it)")
    return SAMPLES


@pytest.fixture(scope="session")
def comfy_state(tmp_path_factory) -> Path:
    """ComfyUI's base directory for this test session (models/, output/, user/ ...)."""
    return tmp_path_factory.mktemp("comfyui-state")


@pytest.fixture(scope="session")
def comfy_nodes(comfy_state):
    """The real ComfyUI 0.3.75, imported in-process with its built-in nodes (CPU)."""
    from comfy_fixtures import import_comfy

    return import_comfy(base_directory=comfy_state)


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_nodes, comfy_state) -> Path:
    """A random-weight SD1.5-type single-file checkpoint in ComfyUI's checkpoints folder."""
    from comfy_fixtures import build_tiny_sd15_checkpoint

    return build_tiny_sd15_checkpoint(comfy_state / "models" / "checkpoints" / "tiny_sd15.safetensors")
