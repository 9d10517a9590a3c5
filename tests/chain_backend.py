"""A chain of Linear layers as a ModelBackend: the smallest model on which the IterIS loop runs
end to end, with inputs small enough to recompute every statistic by brute force.

Concept ``c``'s samples are tokens drawn around a mean that its prompt decides, so concepts see
different input distributions, as real concepts do.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from iteris_core.backends.base import LatentSample, TextBatch
from iteris_core.layers import LayerTable
from iteris_core.low_rank import LowRankDelta


class Chain(nn.Module):
    def __init__(self, depth: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor, deltas: list[torch.Tensor] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if deltas is not None and deltas[i] is not None:
                y = y + x @ deltas[i].T
            x = torch.tanh(y)
        return x


class ChainBackend:
    architecture = "custom"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, depth: int = 4, width: int = 16, tokens: int = 6, seed: int = 0):
        torch.manual_seed(seed)
        self.chain = Chain(depth, width).eval()
        self.width, self.tokens = width, tokens
        self.names = [f"unet.layers.{i}" for i in range(depth)]
        self._table = LayerTable.from_modules(zip(self.names, self.chain.layers))

    # ModelBackend
    def layer_table(self) -> LayerTable:
        return self._table

    def modules(self):
        return dict(zip(self.names, self.chain.layers))

    def roots(self, component):
        return [self.chain] if component == "unet" else []

    def base_weight(self, name):
        return self.modules()[name].weight.detach().float()

    def resolution(self, settings):
        return (64, 64)

    def weights_bytes(self, component):
        return sum(p.numel() * 4 for p in self.chain.parameters()) if component == "unet" else 0

    def activation_bytes(self, settings):
        return 0

    def read_lora(self, lora):
        raise NotImplementedError("chain tests pass NormalizedLora objects")

    def prompt_mean(self, prompt: str) -> torch.Tensor:
        seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        return torch.randn(self.width, generator=torch.Generator().manual_seed(seed))

    def encode_text(self, prompts):
        return [TextBatch({"mean": self.prompt_mean(p)[None]}) for p in prompts]

    def inputs(self, mean: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.randn(self.tokens, self.width, generator=torch.Generator().manual_seed(seed))
        return mean + noise

    def sample(self, positive, negative, seeds, settings, keep_steps, on_step):
        x = torch.stack([self.inputs(positive.tensors["mean"][0], int(s)) for s in seeds])
        on_step(0)
        self.chain(x)
        return [[LatentSample(x[j].clone(), torch.tensor(0.0), 0)] for j in range(len(seeds))]

    def replay(self, positive, negative, samples, settings):
        self.chain(torch.stack([s.latent for s in samples]))

    # brute force helpers ----------------------------------------------------------------------
    @torch.no_grad()
    def layer_inputs(self, x: torch.Tensor, deltas: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Inputs (tokens x width) of every layer when the chain runs with dense ``deltas``."""
        seen = []
        for i, layer in enumerate(self.chain.layers):
            seen.append(x.reshape(-1, self.width))
            y = layer(x) + (x @ deltas[i].T if deltas[i] is not None else 0)
            x = torch.tanh(y)
        return seen

    @torch.no_grad()
    def output(self, x: torch.Tensor, deltas: list[torch.Tensor | None]) -> torch.Tensor:
        return self.chain(x, deltas)


def random_deltas(backend: ChainBackend, seed: int, rank: int = 2, scale: float = 0.8) -> dict[str, LowRankDelta]:
    g = torch.Generator().manual_seed(seed)
    return {name: LowRankDelta(torch.randn(backend.width, rank, generator=g) * scale / rank ** 0.5,
                               torch.randn(rank, backend.width, generator=g) / backend.width ** 0.5)
            for name in backend.names}
