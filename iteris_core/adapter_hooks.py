"""Forward hooks that apply adapters as low-rank side paths and feed the statistics.

The base model's weights are never patched. Each target layer gets a forward hook that adds
``scale * up @ (down @ x)`` to its output, possibly a different adapter for each half of the
batch: in a *paired* pass the first half of the rows carries concept ``i``'s own LoRA and the
second half the current merged LoRA, on the same samples, so that every hook sees ``X_i`` and
``Xt_i`` for the same tokens at once (the cross statistics need both). The hooks read the layer's
input as it arrives, so they work for any module that is a Linear or a Conv2d (ComfyUI's casting
ops included, whatever its low-VRAM mode does with the weight).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .activation_stats import StageStatistics, sum_of_squares
from .layers import LayerInfo
from .low_rank import LowRankDelta


class LayerOps:
    """Linear algebra on a layer's input seen as a token matrix (rows are tokens).

    A Linear's tokens are its input rows; a conv's tokens are its output positions, each reading
    a ``C x kh x kw`` patch. Projections onto ``m`` directions use the conv itself, so patches
    are only unfolded when the full ``d x d`` statistics are asked for.
    """

    def __init__(self, info: LayerInfo):
        self.info = info
        self.conv = info.kind == "conv"
        self.pointwise = info.is_pointwise and info.padding == (0, 0)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return x.reshape(-1, x.shape[-1])
        if self.pointwise:
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        i = self.info
        patches = F.unfold(x, i.kernel, dilation=i.dilation, padding=i.padding, stride=i.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``tokens(x) @ weight.T`` for ``weight`` (m x d), without unfolding a conv's input."""
        if not self.conv or self.pointwise:
            return self.tokens(x) @ weight.T
        i = self.info
        kernel = weight.reshape(weight.shape[0], i.in_features, *i.kernel)
        out = F.conv2d(x, kernel, stride=i.stride, padding=i.padding, dilation=i.dilation)
        return out.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])

    def back_project(self, x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``tokens(x).T @ coefficients`` (d x m), a conv's weight gradient for convs."""
        if not self.conv or self.pointwise:
            return self.tokens(x).T @ coefficients
        i = self.info
        batch = x.shape[0]
        height, width = self._output_size(x)
        grad = coefficients.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        weight = torch.nn.grad.conv2d_weight(x, (coefficients.shape[1], i.in_features, *i.kernel), grad,
                                             stride=i.stride, padding=i.padding, dilation=i.dilation)
        return weight.reshape(coefficients.shape[1], -1).T

    def energy(self, x: torch.Tensor) -> float:
        """``sum ||token||^2`` (each input value counted once per patch that reads it)."""
        if not self.conv or self.pointwise:
            return sum_of_squares(x)
        i = self.info
        ones = torch.ones(1, i.in_features, *i.kernel, dtype=torch.float32, device=x.device)
        return float(F.conv2d(x.float().pow(2), ones, stride=i.stride, padding=i.padding, dilation=i.dilation).sum())

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        i = self.info
        size = []
        for dim, k, s, p, d in zip(x.shape[2:], i.kernel, i.stride, i.padding, i.dilation):
            size.append((dim + 2 * p - d * (k - 1) - 1) // s + 1)
        return size[0], size[1]

    def to_output(self, tokens: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Token rows (n x o) back in the layer's output layout (``output`` gives the shape)."""
        if not self.conv:
            return tokens.reshape(*output.shape[:-1], tokens.shape[-1])
        batch, channels, height, width = output.shape
        return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


@dataclass
class _Factors:
    """An adapter's factors cast for the forward pass (cached per dtype and device)."""

    down: torch.Tensor
    up_scaled: torch.Tensor  # (out, r), scale folded in


@dataclass
class HookState:
    """What the hooks do during the next forward calls.

    ``first`` applies to all rows (single pass) or to the first half (paired pass);
    ``second`` to the second half of a paired pass. ``stats`` receives statistics when set.
    """

    first: dict[str, LowRankDelta] = field(default_factory=dict)
    second: dict[str, LowRankDelta] | None = None
    stats: StageStatistics | None = None
    concept: int = 0

    @property
    def paired(self) -> bool:
        return self.second is not None


class HookSession:
    """Installs the hooks on a stage's layers for the duration of a ``with`` block."""

    def __init__(self, modules: dict[str, torch.nn.Module], infos: dict[str, LayerInfo],
                 roots: list[torch.nn.Module], groups: dict[str, str], *,
                 max_tokens_per_sample: int | None = None, seed: int = 0):
        self.modules = modules
        self.ops = {name: LayerOps(infos[name]) for name in modules}
        self.roots = roots
        self.groups = groups
        self.max_tokens_per_sample = max_tokens_per_sample
        self.state: HookState | None = None
        self._handles: list = []
        self._cache: dict[tuple, _Factors] = {}
        self._call = 0
        self._group_inputs: dict[str, tuple[int, int, torch.Tensor | None]] = {}
        self._generator = torch.Generator().manual_seed(seed)

    # -- installation ----------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
        for root in self.roots:
            self._handles.append(root.register_forward_pre_hook(self._new_call))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()  # hooks never outlive the merge, even on interrupt or error
        self._handles.clear()
        self._cache.clear()
        self.state = None

    @contextlib.contextmanager
    def active(self, state: HookState) -> Iterator[None]:
        previous, self.state = self.state, state
        try:
            yield
        finally:
            self.state = previous

    def _new_call(self, module, args) -> None:
        self._call += 1

    # -- the hook --------------------------------------------------------------------------------
    def _factors(self, name: str, delta: LowRankDelta, like: torch.Tensor) -> _Factors:
        key = (name, id(delta), like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is None:
            cached = _Factors(delta.down.to(like.device, like.dtype),
                              (delta.up * delta.scale).to(like.device, like.dtype))
            if len(self._cache) > 4 * len(self.modules):
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def _side(self, name: str, delta: LowRankDelta | None, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(down-projection tokens, side-path output tokens) of one adapter on ``x``."""
        if delta is None:
            return None, None
        f = self._factors(name, delta, x)
        projected = self.ops[name].project(x, f.down)
        return projected, projected @ f.up_scaled.T

    def _make_hook(self, name: str):
        def hook(module, args, output):
            state = self.state
            if state is None:
                return None
            x = args[0]
            ops = self.ops[name]
            # the module's fresh output may be changed in place, except when autograd needs it
            in_place = not torch.is_grad_enabled()
            if not state.paired:
                own_proj, own_out = self._side(name, state.first.get(name), x)
                if state.stats is not None:
                    self._collect(name, x, None, own_proj, own_out, None, state.stats)
                if own_out is None:
                    return output
                side = ops.to_output(own_out, output)
                return output.add_(side) if in_place else output + side
            half = x.shape[0] // 2
            x1, x2 = x[:half], x[half:]
            own_proj, own_out = self._side(name, state.first.get(name), x1)
            merged_proj, merged_out = self._side(name, state.second.get(name), x2)
            if state.stats is not None:
                self._collect(name, x1, x2, own_proj, own_out, merged_out, state.stats)
            if not in_place:
                output = output.clone()
            if own_out is not None:
                output[:half] += ops.to_output(own_out, output[:half])
            if merged_out is not None:
                output[half:] += ops.to_output(merged_out, output[half:])
            return output
        return hook

    # -- statistics ------------------------------------------------------------------------------
    def _token_index(self, group: str, x: torch.Tensor, count: int) -> torch.Tensor | None:
        """Random subset of token rows for the statistics (same rows for both halves and for
        every layer of the group in this call), or None to keep all."""
        limit = self.max_tokens_per_sample
        if limit is None:
            return None
        per_sample = count // x.shape[0]
        if per_sample <= limit:
            return None
        picks = [torch.randperm(per_sample, generator=self._generator)[:limit] + s * per_sample
                 for s in range(x.shape[0])]
        return torch.cat(picks).to(x.device)

    def _collect(self, name: str, x1: torch.Tensor, x2: torch.Tensor | None, own_proj, own_out, merged_out,
                 stats: StageStatistics) -> None:
        ops, group = self.ops[name], self.groups[name]
        plan = stats.layers[name].plan
        seen = self._group_inputs.get(group)
        first_in_call = seen is None or seen[0] != self._call
        if first_in_call:
            n_tokens = (ops.tokens(x1).shape[0] if not plan.subspace else None)
            index = self._token_index(group, x1, n_tokens) if n_tokens is not None else None
            self._group_inputs[group] = (self._call, x1.data_ptr(), index)
            self._observe_group(group, ops, x1, x2, index, stats)
        elif seen[1] != x1.data_ptr():
            raise RuntimeError(f"layer {name} shares input group {group!r} with others but received a "
                               "different input tensor in the same forward call")
        index = self._group_inputs[group][2]
        pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))  # noqa: E731
        if plan.subspace:
            basis = plan.basis.to(x1.device, x1.dtype)
            merged_input = ops.project(x1 if x2 is None else x2, basis)
            own_coords = None if x2 is None else ops.project(x1, basis)
            stats.observe_layer(name, own_coords, merged_input, own_out, merged_out)
        else:
            merged_tokens = ops.tokens(x1 if x2 is None else x2)
            stats.observe_layer(name, None if own_proj is None else pick(own_proj), pick(merged_tokens),
                                None if own_out is None else pick(own_out),
                                None if merged_out is None else pick(merged_out))

    def _observe_group(self, group: str, ops: LayerOps, x1: torch.Tensor, x2: torch.Tensor | None,
                       index: torch.Tensor | None, stats: StageStatistics) -> None:
        if stats.is_subspace_group(group):
            probe = stats.probe(ops.info.input_dim).to(x1.device, x1.dtype)
            merged = x1 if x2 is None else x2
            probe_coords = ops.project(merged, probe.T)
            gram_probe = ops.back_project(merged, probe_coords)
            cross_probe = None if x2 is None else ops.back_project(x1, probe_coords)
            stats.observe_group_probes(group, gram_probe, cross_probe, ops.energy(x1), probe_coords.shape[0])
            return
        own = ops.tokens(x1)
        merged = None if x2 is None else ops.tokens(x2)
        if index is not None:
            own = own.index_select(0, index)
            merged = None if merged is None else merged.index_select(0, index)
        stats.observe_group(group, own, merged)
