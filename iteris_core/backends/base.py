"""The model side of a merge, as an interface: diffusers and ComfyUI models plug in here.

A backend exposes its target layers (canonical names, torch modules), reads LoRA files onto them,
and runs its model: the text encoders on prompts, the sampler along a trajectory, and replays of
stored samples. It never applies adapters itself: the engine's hooks do, on every row of a pass.

One rule makes iterations cheap (see :mod:`iteris_core.adapter_hooks`): given the same inputs, a
backend's :meth:`~ModelBackend.encode_text` and :meth:`~ModelBackend.replay` make the same module
calls in the same order, with the same rows, every time; the engine checks it. When the layers
are merged in groups (a statistics budget), a hook may raise
:class:`~iteris_core.adapter_hooks.StopPass` once a replay's last needed layer is done: a backend
whose one replay makes several denoiser calls absorbs it per call; otherwise it reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from ..layers import LayerTable
from ..lora_io import LoraFile
from ..lora_normalize import NormalizedLora, load_lora
from ..settings import SamplingSettings

Conditioning = Any
"""One prompt's text conditioning, as its backend makes and reads it (kept on the CPU)."""


@dataclass
class TextBatch:
    """Text conditioning for a batch of prompts: named tensors with one row per prompt on dim 0
    (e.g. the hidden states the UNet cross-attends to, and SDXL's pooled embedding)."""

    tensors: dict[str, torch.Tensor]

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, rows: Sequence[int]) -> TextBatch:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return TextBatch({k: v.index_select(0, index.to(v.device)) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch({k: v.to(device) for k, v in self.tensors.items()})

    @staticmethod
    def cat(batches: Sequence[TextBatch]) -> TextBatch:
        keys = batches[0].tensors.keys()
        return TextBatch({k: torch.cat([b.tensors[k] for b in batches]) for k in keys})


@dataclass
class LatentSample:
    """One kept point of a sampling trajectory: what the UNet reads at that step."""

    latent: torch.Tensor     # (C, h, w), in the backend's own convention (stored on the CPU)
    timestep: torch.Tensor   # scalar, in the backend's own time variable
    step: int                # sampler step index it was taken at


StepCallback = Callable[[int], None]


@runtime_checkable
class ModelBackend(Protocol):
    """What the engine needs from a base model."""

    architecture: str           # the family: "sd1", "sd2", "sdxl", "flux_dev", ... or "custom"
    device: torch.device        # where forwards run
    dtype: torch.dtype          # forward dtype (statistics are always fp32)

    def layer_table(self) -> LayerTable:
        """Target layers by canonical name (see :mod:`iteris_core.layers`)."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """The torch module of every layer in :meth:`layer_table`."""

    def roots(self, component: str) -> list[torch.nn.Module]:
        """Top modules whose one forward call is one pass of ``component`` (call boundaries)."""

    def base_weight(self, name: str) -> torch.Tensor:
        """A layer's base weight (fp32, CPU), for adapters that depend on it (DoRA)."""

    def read_lora(self, lora: LoraFile) -> NormalizedLora:
        """The LoRA placed on this model's layers, at strength 1; errors name the file and a key."""

    def encode_text(self, prompts: Sequence[str]) -> list[Conditioning]:
        """Each prompt's conditioning, in order."""

    def sample(self, positive: Conditioning, negative: Conditioning | None, seeds: Sequence[int],
               settings: SamplingSettings, keep_steps: Sequence[int], on_step: StepCallback) -> list[list[LatentSample]]:
        """Sample ``len(seeds)`` trajectories of one prompt (``negative`` is None without
        classifier-free guidance), calling ``on_step(k)`` at every step ``k``, and return each
        trajectory's samples at ``keep_steps``."""

    def replay(self, positive: Conditioning, negative: Conditioning | None, samples: Sequence[LatentSample],
               settings: SamplingSettings) -> None:
        """Run the denoiser once on each stored sample of one prompt (one batch), as the sampler
        did at that step (with the negative prompt too under guidance)."""

    def resolution(self, settings: SamplingSettings) -> tuple[int, int]:
        """(height, width) in pixels that samples are made at: the settings', or the model's own."""

    def weights_bytes(self, component: str) -> int:
        """Bytes of the component's weights on the device (for the memory plan)."""

    def activation_bytes(self, settings: SamplingSettings) -> int:
        """Bytes of live activations of the largest forward the merge makes (for the memory plan)."""


class ModuleTableMixin:
    """The table-and-modules half of :class:`ModelBackend` for backends that keep their target
    modules in ``self._modules`` (canonical name -> module) and their table in ``self._table``."""

    _modules: dict[str, torch.nn.Module]
    _table: LayerTable

    def layer_table(self) -> LayerTable:
        return self._table

    def modules(self) -> dict[str, torch.nn.Module]:
        return {n: self._modules[n] for n in self._table.layers}

    def base_weight(self, name: str) -> torch.Tensor:
        return self._modules[name].weight.detach().float().cpu()

    def read_lora(self, lora: LoraFile) -> NormalizedLora:
        """The engine's own readers (every format in :mod:`~iteris_core.lora_formats`)."""
        return load_lora(lora, self._table, self.base_weight)
