"""Forward hooks that apply adapters as low-rank side paths and feed the statistics.

The base model's weights are never patched. Each target layer gets a forward hook that adds
``scale * up @ (down @ x)`` to its output. The hooks read the layer's input as it arrives, so they
work for any module that is a Linear or a Conv2d (ComfyUI's casting ops included, whatever its
low-VRAM mode does with the weight).

A pass runs one set of adapters on every row: concept ``i``'s own LoRA at iteration 0, the merged
LoRA later. The later iterations' statistics also need what concept ``i``'s own model saw on the
same tokens (``X_i``), but only through thin projections: ``A_i X_i`` (``r_i`` wide) for the
numerators and ``X_i G`` (a few random probes) for the ridge's cross norm. Iteration 0 keeps them
in an :class:`OwnSideStore`, keyed by the call in which they were seen, so that each later
iteration runs the merged model alone: one model pass per sample instead of two. This needs the
backend to make the same calls in the same order in every pass over a concept's samples, which
the keys check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .statistics import PROBE_DTYPE, SsrStatistics, StageStatistics, sum_of_squares
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


class OwnSideStore:
    """What the solve needs of one concept's own passes, kept from iteration 0 for the later ones:
    per layer call ``A_i X`` (or the row-space coordinates ``Q X``), per layer-input call the probe
    projections ``X G`` and the sub-sampled token rows. Kept in host memory."""

    def __init__(self) -> None:
        self._entries: dict[tuple, torch.Tensor] = {}

    def put(self, key: tuple, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        self._entries[key] = tensor.detach().to("cpu", dtype or tensor.dtype, copy=True)

    def get(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        tensor = self._entries.get(key)
        if tensor is None:
            raise RuntimeError(f"no record of {key[0]} {key[1]!r} call {key[2]} from iteration 0: the model made "
                               "other calls over the same samples than in iteration 0 (a backend must replay "
                               "samples with the same calls in the same order)")
        return tensor.to(like.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._entries.values())


class StopPass(Exception):
    """Raised by the hook of the last layer a pass collects statistics for: the rest of the model
    is not needed. The engine catches it around each replay call."""


@dataclass
class HookState:
    """What the hooks do during one pass over a concept's samples (one or more forward calls).

    ``deltas`` apply to every row. ``stats`` receives statistics when set. ``recording`` passes
    (iteration 0, the concept's own LoRA) put what later iterations need into ``store``; the other
    passes (the merged LoRA) read it back. ``store`` is None when no later iteration needs it.
    """

    deltas: dict[str, LowRankDelta] = field(default_factory=dict)
    stats: StageStatistics | SsrStatistics | None = None
    concept: int = 0
    recording: bool = True
    store: OwnSideStore | None = None
    stop_after: str | None = None   # stop the forward call once this layer's statistics are in
    _calls: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def next_call(self, kind: str, name: str) -> int:
        """Ordinal of this call of a layer (or layer input) within the pass."""
        key = (kind, name)
        ordinal = self._calls.get(key, 0)
        self._calls[key] = ordinal + 1
        return ordinal


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
        self._cache: dict[tuple, tuple[LowRankDelta, _Factors]] = {}
        self._call = 0
        # per layer input: (root call, data pointer, token rows kept, call ordinal) of its last call
        self._group_inputs: dict[str, tuple[int, int, torch.Tensor | None, int]] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self.last_observed: str | None = None   # the last layer whose statistics were collected

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
        # keyed by identity, so the entry keeps its delta alive: a freed delta's id can be reused by
        # the next iteration's delta, which would then be applied with the old factors
        key = (name, id(delta), like.dtype, like.device)
        entry = self._cache.get(key)
        if entry is None or entry[0] is not delta:
            entry = (delta, _Factors(delta.down.to(like.device, like.dtype),
                                     (delta.up * delta.scale).to(like.device, like.dtype)))
            if len(self._cache) > 4 * len(self.modules):
                self._cache.clear()
            self._cache[key] = entry
        return entry[1]

    def _make_hook(self, name: str):
        def hook(module, args, output):
            state = self.state
            if state is None:
                return None
            x = args[0]
            delta = state.deltas.get(name)
            projected = side = None
            if delta is not None:
                factors = self._factors(name, delta, x)
                projected = self.ops[name].project(x, factors.down)   # A x, token rows (n x r)
                side = projected @ factors.up_scaled.T                 # dW x
            if state.stats is not None and name in state.stats.layers:
                if isinstance(state.stats, SsrStatistics):
                    self._collect_ssr(name, x, state)
                else:
                    self._collect(name, x, projected, side, state)
                self.last_observed = name
                if name == state.stop_after:
                    raise StopPass(name)
            if side is None:
                return output
            side = self.ops[name].to_output(side, output)
            # the module's fresh output may be changed in place, except when autograd needs it
            return output.add_(side) if not torch.is_grad_enabled() else output + side
        return hook

    # -- statistics ------------------------------------------------------------------------------
    def _token_index(self, x: torch.Tensor, count: int) -> torch.Tensor | None:
        """Random subset of token rows for the statistics (the same rows for every layer of the
        input group in this call), or None to keep all."""
        limit = self.max_tokens_per_sample
        if limit is None:
            return None
        per_sample = count // x.shape[0]
        if per_sample <= limit:
            return None
        picks = [torch.randperm(per_sample, generator=self._generator)[:limit] + s * per_sample
                 for s in range(x.shape[0])]
        return torch.cat(picks).to(x.device)

    def _kept_rows(self, group: str, ordinal: int, x: torch.Tensor, count: int, state: HookState) -> torch.Tensor | None:
        """The token rows kept in this call: drawn at iteration 0, the same ones afterwards."""
        if self.max_tokens_per_sample is None:
            return None
        key = ("rows", group, ordinal)
        if state.recording:
            index = self._token_index(x, count)
            if state.store is not None and index is not None:
                state.store.put(key, index)
            return index
        return state.store.get(key, x) if count // x.shape[0] > self.max_tokens_per_sample else None

    def _collect_ssr(self, name: str, x: torch.Tensor, state: HookState) -> None:
        """SSR: the stacked projections ``z = A x`` of every token, in fp32 as the statistics, from
        the passes of the concepts with a delta on the layer. Every token is used: the sums are
        R x R, so sub-sampling would save little next to the forward pass and lose samples."""
        stats = state.stats
        if stats.wants(name, state.concept):
            down = stats.stacked_down(name, x.device)
            stats.observe(name, state.concept, self.ops[name].project(x.float(), down))

    def _collect(self, name: str, x: torch.Tensor, projected: torch.Tensor | None, side: torch.Tensor | None,
                 state: HookState) -> None:
        ops, group, stats = self.ops[name], self.groups[name], state.stats
        plan = stats.layers[name].plan
        seen = self._group_inputs.get(group)
        if seen is None or seen[0] != self._call:
            ordinal = state.next_call("input", group)
            index = None if plan.subspace else self._kept_rows(group, ordinal, x, ops.tokens(x).shape[0], state)
            self._group_inputs[group] = (self._call, x.data_ptr(), index, ordinal)
            self._observe_group(group, ops, x, index, ordinal, state)
        elif seen[1] != x.data_ptr():
            raise RuntimeError(f"layer {name} shares input group {group!r} with others but received a "
                               "different input tensor in the same forward call")
        index = self._group_inputs[group][2]
        pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))  # noqa: E731
        ordinal = state.next_call("layer", name)
        own = plan.deltas[state.concept]     # concept's own delta (None where it has none)
        key = ("layer", name, ordinal)
        if plan.subspace:
            coords = ops.project(x, plan.basis.to(x.device, x.dtype))    # Q x
            if state.recording:
                if state.store is not None and own is not None:
                    state.store.put(key, coords)
                stats.observe_layer(name, None, coords, None if side is None else side, None)
                return
            own_coords = state.store.get(key, coords) if own is not None else None
            own_out = None if own_coords is None else stats.own_output_from_coords(name, state.concept, own_coords)
            stats.observe_layer(name, own_coords, coords, own_out, side)
            return
        tokens = pick(ops.tokens(x))
        if state.recording:
            own_proj = None if projected is None else pick(projected)
            if state.store is not None and own_proj is not None:
                state.store.put(key, own_proj)
            stats.observe_layer(name, own_proj, tokens, None if side is None else pick(side), None)
            return
        own_proj = state.store.get(key, x) if own is not None else None
        own_out = None if own_proj is None else stats.own_output(name, state.concept, own_proj)
        stats.observe_layer(name, own_proj, tokens, own_out, None if side is None else pick(side))

    def _observe_group(self, group: str, ops: LayerOps, x: torch.Tensor, index: torch.Tensor | None,
                       ordinal: int, state: HookState) -> None:
        stats = state.stats
        key = ("input", group, ordinal)
        needed = stats.needs_own_probes(group, state.concept)   # a member has the concept's own delta
        if stats.is_subspace_group(group):
            probe = stats.probe(ops.info.input_dim).to(x.device, x.dtype)
            probe_coords = ops.project(x, probe.T)                       # x G
            gram_probe = ops.back_project(x, probe_coords)               # Xt^T (Xt G)
            if state.recording:
                if state.store is not None and needed:
                    state.store.put(key, probe_coords, PROBE_DTYPE)
                stats.observe_group_probes(group, gram_probe, None, ops.energy(x), probe_coords.shape[0])
                return
            cross_probe = None
            if needed:                                                   # Xt^T (X G)
                cross_probe = ops.back_project(x, state.store.get(key, x).to(x.dtype))
            stats.observe_group_probes(group, gram_probe, cross_probe, 0.0, probe_coords.shape[0])
            return
        tokens = ops.tokens(x)
        if index is not None:
            tokens = tokens.index_select(0, index)
        if state.recording:
            if state.store is not None and needed:
                exact = stats.exact_cross_norm
                state.store.put(key, stats.own_probe(tokens), None if exact else PROBE_DTYPE)
            stats.observe_group(group, tokens, None)
            return
        stats.observe_group(group, tokens, state.store.get(key, tokens) if needed else None)
