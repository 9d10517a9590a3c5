"""The IterIS loop over a model's stages, in DAG order: text encoders first, then the UNet.

Per stage, iteration 0 collects each concept's statistics on its own LoRA model (``Xt_i = X_i``)
and solves: with uniform weights that is RegMean. It also keeps the thin projections of the
concept's own layer inputs that the later solves need (:class:`~.adapter_hooks.OwnSideStore`).
Every later iteration runs each concept's samples through the current merged model alone,
re-collects the statistics on its real inputs and solves again, until the merged deltas stop
moving or the iteration budget is spent. The UNet's samples are points of each concept's own
sampling trajectory; iteration 0 replays them with the concept's own LoRA and text conditioning,
later iterations with the merged LoRA and the merged text encoder's conditioning. They are made
once and reused unchanged in every iteration.

SSR-Merge runs the same way with its own statistics (:class:`~.statistics.SsrStatistics`): one
pass of each concept's own samples (iteration 0 only), on the text encoders with the concept's
prompts as for IterIS, then on the denoiser; a stage whose layers are each changed by one
concept only is merged without running the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .statistics import TOKEN_FRACTION, LayerPlan, LayerWeights, SsrStatistics, StageStatistics
from .adapter_hooks import HookSession, HookState, OwnSideStore, StopPass
from .buffers import MatrixPool
from .backends.base import Conditioning, LatentSample, ModelBackend
from .errors import IterisError, MergeInterrupted, SettingsError
from .layers import UNET, LayerTable, input_group
from .low_rank import LowRankDelta
from .memory import Placement
from .settings import MergeSettings, Method
from .solver import row_space_basis

ProgressFn = Callable[[int, int, str], None]
StopFn = Callable[[], bool]
LogFn = Callable[[str], None]


@dataclass
class PreparedConcept:
    """A concept as the loop uses it: deltas at strength, and its prompts."""

    name: str
    deltas: dict[str, LowRankDelta]
    prompts: list[str]
    negative_prompt: str = ""


@dataclass
class IterationRecord:
    stage: str
    iteration: int
    seconds: float
    passes_seconds: float = 0.0         # running the model (sampling included, at iteration 0)
    solve_seconds: float = 0.0          # folding the statistics and solving the layers
    objective: float | None = None      # mean relative objective of the model that made the inputs
    max_change: float | None = None     # max over layers of ||D_t - D_{t-1}|| / ||D_{t-1}||
    mean_change: float | None = None


@dataclass
class StageResult:
    merged: dict[str, LowRankDelta]
    iterations: list[IterationRecord] = field(default_factory=list)
    layer_objective: dict[str, list[float]] = field(default_factory=dict)  # per layer, per iteration >= 1
    layer_change: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, LayerWeights] = field(default_factory=dict)
    converged: bool = False
    samples: int = 0                     # model inputs per concept (rows per pass)
    token_space_layers: list[str] = field(default_factory=list)   # solved through T x T systems
    unreached_layers: list[str] = field(default_factory=list)     # never run by the samples: not merged
    layer_modes: dict[str, str] = field(default_factory=dict)     # how a layer was merged, where not the closed form


def relative_change(new: LowRankDelta, old: LowRankDelta) -> float:
    """``||new - old||_F / ||old||_F`` from the factors, without forming either matrix."""
    difference = LowRankDelta(torch.cat([new.up * new.scale, -old.up * old.scale], dim=1),
                              torch.cat([new.down, old.down], dim=0))
    reference = old.frobenius_sq()
    return math.sqrt(max(difference.frobenius_sq(), 0.0) / reference) if reference > 0 else 0.0


class Progress:
    """Counts model calls against a planned total; checks for a stop request before each."""

    def __init__(self, total: int, on_progress: ProgressFn | None, should_stop: StopFn | None):
        self.total = max(total, 1)
        self.done = 0
        self.on_progress = on_progress
        self.should_stop = should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise MergeInterrupted("merge interrupted")

    def step(self, message: str, count: int = 1) -> None:
        self.done = min(self.done + count, self.total)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total, message)


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


Pass = Callable[[int, int, HookSession, HookState], None]   # (concept, iteration, session, state)
Samples = list[tuple[int, LatentSample]]                    # (prompt index, sample), in sampling order


class IterisLoop:
    """Runs IterIS (or RegMean: no iteration, uniform weights; or SSR: its router, one pass) on a backend."""

    def __init__(self, backend: ModelBackend, concepts: list[PreparedConcept], settings: MergeSettings,
                 *, placement: Placement | None = None, log: LogFn | None = None,
                 on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 sample_cache: dict | None = None, sample_keys: list | None = None,
                 token_fraction: float = TOKEN_FRACTION):
        if not concepts:
            raise SettingsError("no concept to merge")
        self.backend = backend
        self.concepts = concepts
        self.settings = settings
        self.table: LayerTable = backend.layer_table()
        here = str(backend.device)
        self.placement = placement or Placement(here, here, True)
        self.log = log or (lambda message: None)
        self.sampling = settings.sampling
        self.use_cfg = self.sampling.uses_cfg
        order = list(self.table.layers).index
        self.text_layers = sorted({n for c in concepts for n in c.deltas if not n.startswith(UNET + ".")},
                                  key=order) if settings.merge_text_encoder else []
        self.unet_layers = sorted({n for c in concepts for n in c.deltas if n.startswith(UNET + ".")},
                                  key=order) if settings.merge_unet else []
        # samples depend only on the model, the concept and the sampling settings, not on the merge
        # settings: a caller that passes a cache and a key per concept gets them reused
        self.sample_cache = sample_cache if sample_cache is not None else {}
        self.sample_keys = [None if k is None else (k, self.sampling) for k in sample_keys] if sample_keys else None
        self.layer_groups: dict[str, list[list[str]]] = {}   # per stage; none: one group (set_groups)
        self.progress = Progress(self.planned_calls(), on_progress, should_stop)
        self.token_fraction = token_fraction   # 0: every layer with d x d sums (same result, for tests)
        self.own_side_bytes = 0                # host memory kept for the later iterations (largest stage)
        self.ssr = settings.method is Method.SSR
        if self.ssr and settings.max_tokens_per_sample is not None:
            self.log("SSR uses every token of its samples: its statistics are R x R per layer, so max_tokens_per_sample "
                     "(which bounds d x d sums) does not apply")

    # -- planning --------------------------------------------------------------------------------
    def text_prompts(self, concept: PreparedConcept) -> list[str]:
        """The text samples of a concept: its prompts, then its negative prompt when CFG uses it."""
        return list(concept.prompts) + ([concept.negative_prompt] if self.use_cfg else [])

    def trajectories(self, concept: PreparedConcept) -> list[tuple[int, int]]:
        """(prompt index, seed) of each trajectory sampled for a concept."""
        s = self.sampling
        return [(p, s.seed + p * s.samples_per_prompt + k) for p in range(len(concept.prompts))
                for k in range(s.samples_per_prompt)]

    def planned_calls(self) -> int:
        """Model calls the merge will make at most (for progress reporting)."""
        passes = 1 + self.settings.effective_iterations
        text = len(self.concepts) * (passes * self._group_count("text") + 1)
        unet = 0
        if self.unet_layers:
            s = self.sampling
            kept = len(s.kept_steps())
            for c in self.concepts:
                per_prompt = math.ceil(s.samples_per_prompt / s.batch_size) * s.steps
                per_prompt += math.ceil(s.samples_per_prompt * kept / s.batch_size) * passes * self._group_count("unet")
                unet += len(c.prompts) * per_prompt
        return text + unet

    def stage_plans(self) -> list[list[LayerPlan]]:
        """The layer plans of the text stage and of the UNet stage (for memory planning)."""
        return [self._plans(self.text_layers), self._plans(self.unet_layers)]

    def _plans(self, layers: list[str]) -> list[LayerPlan]:
        plans = []
        for name in layers:
            info = self.table[name]
            deltas = [c.deltas.get(name) for c in self.concepts]
            present = [d for d in deltas if d is not None]
            width = self.settings.row_space_width
            # SSR keeps no d x d statistics: the row space would only lose accuracy
            needs_row_space = width is not None and info.input_dim > width and not self.ssr
            basis = row_space_basis(present) if needs_row_space else None
            plans.append(LayerPlan(name, info, input_group(name), deltas, basis, ssr=self.ssr))
        return plans

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> tuple[StageResult | None, StageResult | None]:
        """Merge the text encoders, then the UNet. Returns their results (None if not merged)."""
        text = self._run_text() if self.text_layers else None
        own_cond, merged_cond = self._conditioning(text.merged if text else {})
        unet = self._run_unet(own_cond, merged_cond) if self.unet_layers else None
        return text, unet

    def _session(self, layers: list[str], component_roots: list[torch.nn.Module]) -> HookSession:
        modules = self.backend.modules()
        return HookSession({n: modules[n] for n in layers}, {n: self.table[n] for n in layers}, component_roots,
                           {n: input_group(n) for n in layers},
                           max_tokens_per_sample=self.settings.max_tokens_per_sample, seed=self.sampling.seed)

    def _stats(self, plans: list[LayerPlan], weights: dict[str, LayerWeights] | None,
               pool: MatrixPool, dense_groups: set[str]) -> StageStatistics | SsrStatistics:
        if self.ssr:
            return SsrStatistics(plans, self.settings.regularization, device=self.placement.scratch)
        return StageStatistics(plans, regularization=self.settings.regularization,
                               adaptive=self.settings.uses_adaptive_weights, device=self.placement.scratch,
                               system_device=self.placement.systems,
                               exact_cross_norm=self.placement.exact_cross_norm,
                               packed=self.placement.packed, weights=weights, seed=self.sampling.seed,
                               pool=pool, token_fraction=self.token_fraction, dense_groups=dense_groups)

    def set_groups(self, groups: dict[str, list[list[str]]]) -> None:
        """Merge each stage's layers in these groups, one after another, each with its own passes
        over the same samples (the memory plan's grouping; default: one group per stage)."""
        self.layer_groups = {stage: [g for g in stage_groups if g] for stage, stage_groups in groups.items()}
        self.progress.total = max(self.planned_calls(), 1)

    def _group_count(self, stage: str) -> int:
        return max(len(self.layer_groups.get(stage, [])), 1)

    def _iterate(self, stage: str, layers: list[str], roots: list[torch.nn.Module], run_pass: Pass,
                 early_stop: bool = False) -> StageResult:
        """The stage's iterations. Each group of layers (all of them, unless the memory plan split
        them) gets its own pass over every concept's samples; a group's later passes stop right
        after its last layer when ``early_stop`` (the denoiser, whose replays allow it)."""
        plans = {p.name: p for p in self._plans(layers)}
        if self.ssr and not any(p.shared for p in plans.values()):
            return self._unshared(stage, list(plans.values()))
        groups = self.layer_groups.get(stage) or [layers]
        result = StageResult(merged={})
        pool = MatrixPool()   # the stage's d x d matrices, reused by every iteration
        dense_groups: set[str] = set()
        later = self.settings.effective_iterations > 0
        stores = [OwnSideStore() if later else None for _ in self.concepts]
        stop_after: dict[int, str] = {}   # group -> its last layer in the model's order, learnt in its first pass
        if len(groups) > 1:
            self.log(f"[{stage}] {len(layers)} layers in {len(groups)} groups ({', '.join(str(len(g)) for g in groups)} "
                     "layers): every layer exact, each group with its own passes")
        with self._session(layers, roots) as session:
            for iteration in range(self.settings.effective_iterations + 1):
                started = time.perf_counter()
                passes = folding = 0.0
                merged: dict[str, LowRankDelta] = {}
                objective: dict[str, float] = {}
                for index, group in enumerate(groups):
                    stats = self._stats([plans[n] for n in group], result.weights if iteration else None, pool,
                                        dense_groups)
                    for i, concept in enumerate(self.concepts):
                        if iteration == 0:   # the concept's own LoRA, recording what the later solves need
                            own = {n: d for n, d in concept.deltas.items() if n in plans}
                            state = HookState(own, stats, i, recording=True, store=stores[i])
                        else:                # the merged LoRA alone
                            state = HookState(result.merged, stats, i, recording=False, store=stores[i])
                        state.stop_after = stop_after.get(index) if early_stop else None
                        session.last_observed = None
                        tick = time.perf_counter()
                        run_pass(i, iteration, session, state)
                        tock = time.perf_counter()
                        if early_stop and index not in stop_after and session.last_observed is not None:
                            stop_after[index] = session.last_observed
                        stats.finish_concept(i)
                        passes += tock - tick
                        folding += time.perf_counter() - tock
                    if iteration == 0:
                        result.weights.update(stats.weights)
                        result.token_space_layers += stats.token_space_layers
                        result.unreached_layers += stats.unreached_layers
                        if isinstance(stats, SsrStatistics):
                            result.layer_modes.update(stats.modes)
                    dense_groups |= stats.dense_groups
                    objective.update(stats.relative_objective())
                    tick = time.perf_counter()
                    merged.update(stats.solve())
                    folding += time.perf_counter() - tick
                    if len(groups) > 1:
                        pool.clear()   # the next group's inputs may have other widths
                if iteration == 0:
                    if self.ssr:
                        routed = sum(p.shared for p in plans.values())
                        self.log(f"[{stage}] SSR: {routed} of {len(layers)} layers routed, the others changed by one "
                                 "LoRA only and kept as they are")
                    else:
                        self.log(f"[{stage}] {len(result.token_space_layers)} of {len(layers)} layers solved in token "
                                 "space (fewer tokens than half their input width)")
                    if result.unreached_layers:
                        self.log(f"[{stage}] {len(result.unreached_layers)} layers that the samples never run are left "
                                 f"out of the merge, e.g. {result.unreached_layers[0]}")
                    if later:
                        kept = sum(store.nbytes for store in stores)
                        self.own_side_bytes = max(self.own_side_bytes, kept)
                        self.log(f"[{stage}] kept {kept / 2 ** 20:.1f} MiB of the concepts' own-side projections "
                                 "in host memory: each later iteration runs the merged model alone")
                if not merged:
                    raise IterisError(f"none of the {len(layers)} {stage} layers the LoRAs change is run by the "
                                      "concepts' samples: there is nothing to merge them on")
                record = IterationRecord(stage, iteration, 0.0, passes_seconds=passes, solve_seconds=folding)
                if iteration:
                    for name, value in objective.items():
                        result.layer_objective.setdefault(name, []).append(value)
                    record.objective = sum(objective.values()) / max(len(objective), 1)
                    changes = {n: relative_change(merged[n], result.merged[n]) for n in merged}
                    for name, value in changes.items():
                        result.layer_change.setdefault(name, []).append(value)
                    record.max_change = max(changes.values())
                    record.mean_change = sum(changes.values()) / len(changes)
                result.merged = merged
                record.seconds = time.perf_counter() - started
                result.iterations.append(record)
                self.log(self._describe(record))
                if record.max_change is not None and record.max_change < self.settings.tolerance:
                    result.converged = True
                    break
        pool.clear()
        return result

    def _unshared(self, stage: str, plans: list[LayerPlan]) -> StageResult:
        """SSR on a stage where no layer is changed by two concepts: each layer keeps its one delta,
        so the model need not run (the record says the stage took no pass)."""
        stats = SsrStatistics(plans, self.settings.regularization)
        self.log(f"[{stage}] SSR: each of the {len(plans)} layers is changed by one LoRA only: kept as they are, "
                 "without sampling")
        record = IterationRecord(stage, 0, 0.0)
        return StageResult(merged=stats.solve(), iterations=[record], layer_modes=stats.modes)

    @staticmethod
    def _describe(record: IterationRecord) -> str:
        text = f"[{record.stage}] iteration {record.iteration}: {record.seconds:.1f} s"
        if record.objective is not None:
            text += f", objective {record.objective:.4g}, change max {record.max_change:.3g} mean {record.mean_change:.3g}"
        return text

    # -- text encoders ---------------------------------------------------------------------------
    def _text_roots(self) -> list[torch.nn.Module]:
        components = sorted({self.table[n].component for n in self.text_layers})
        return [root for c in components for root in self.backend.roots(c)]

    def _run_text(self) -> StageResult:
        self._own_text: dict[int, list[Conditioning]] = {}

        def encode(i: int, iteration: int, session: HookSession, state: HookState) -> None:
            self.progress.check()
            with session.active(state), torch.no_grad():
                conditioning = self.backend.encode_text(self.text_prompts(self.concepts[i]))
            if iteration == 0:
                self._own_text.setdefault(i, conditioning)
            self.progress.step(f"text encoder: concept {i + 1}/{len(self.concepts)}")

        self.log(f"[text] merging {len(self.text_layers)} layers of {len(self.concepts)} concepts")
        return self._iterate("text", self.text_layers, self._text_roots(), encode)

    def _conditioning(self, merged_text: dict[str, LowRankDelta]) -> tuple[list[list[Conditioning]],
                                                                          list[list[Conditioning]]]:
        """Each concept's text conditioning (per prompt, negative last under CFG) under its own LoRA
        and under the merged LoRA."""
        own_cached = getattr(self, "_own_text", {})
        text_layers = [n for n in self.table.layers if not n.startswith(UNET + ".")]
        own, merged = [], []
        with self._session(text_layers, []) as session:
            for i, concept in enumerate(self.concepts):
                prompts = self.text_prompts(concept)
                if i in own_cached:
                    own.append(own_cached[i])
                else:
                    state = HookState({n: d for n, d in concept.deltas.items() if n in session.modules})
                    with session.active(state), torch.no_grad():
                        own.append(self.backend.encode_text(prompts))
                self.progress.check()
                with session.active(HookState(dict(merged_text))), torch.no_grad():
                    merged.append(self.backend.encode_text(prompts))
                self.progress.step(f"text conditioning: concept {i + 1}/{len(self.concepts)}")
        return own, merged

    # -- UNet ------------------------------------------------------------------------------------
    def _negative(self, conditioning: list[Conditioning]) -> Conditioning | None:
        return conditioning[-1] if self.use_cfg else None

    def _replay(self, i: int, session: HookSession, state: HookState, samples: Samples,
                conditioning: list[Conditioning], label: str) -> None:
        """Run a concept's stored samples through the denoiser, one batch of one prompt at a time."""
        by_prompt: dict[int, list[LatentSample]] = {}
        for prompt, sample in samples:
            by_prompt.setdefault(prompt, []).append(sample)
        for prompt, stored in by_prompt.items():
            for chunk in _chunks(stored, self.sampling.batch_size):
                self.progress.check()
                with session.active(state), torch.no_grad():
                    try:
                        self.backend.replay(conditioning[prompt], self._negative(conditioning), chunk, self.sampling)
                    except StopPass:   # the group's last layer is done: the rest of the model is not needed
                        pass
                self.progress.step(f"UNet: {label}, concept {i + 1}/{len(self.concepts)}")

    def _sample(self, i: int, session: HookSession, conditioning: list[Conditioning]) -> Samples:
        """Sample the concept's trajectories with its own model; returns the kept samples."""
        concept = self.concepts[i]
        keep = self.sampling.kept_steps()
        own = HookState({n: d for n, d in concept.deltas.items() if n in session.modules})
        kept_samples: Samples = []
        for prompt in range(len(concept.prompts)):
            seeds = [seed for p, seed in self.trajectories(concept) if p == prompt]
            for chunk in _chunks(seeds, self.sampling.batch_size):
                def on_step(step: int) -> None:
                    self.progress.check()
                    self.progress.step(f"UNet: sampling concept {i + 1}/{len(self.concepts)} (step {step + 1})")

                with session.active(own), torch.no_grad():
                    kept = self.backend.sample(conditioning[prompt], self._negative(conditioning), list(chunk),
                                               self.sampling, keep, on_step)
                for trajectory in kept:
                    kept_samples.extend((prompt, s) for s in trajectory)
        return kept_samples

    def _samples_of(self, i: int, session: HookSession, conditioning: list[Conditioning]) -> Samples:
        """The concept's samples: from the caller's cache when it has them, else sampled (and cached)."""
        key = self.sample_keys[i] if self.sample_keys else None
        if key is not None and key in self.sample_cache:
            self.log(f"[unet] concept {i + 1}: reusing its {len(self.sample_cache[key])} cached samples")
            return self.sample_cache[key]
        samples = self._sample(i, session, conditioning)
        if key is not None:
            self.sample_cache[key] = samples
        return samples

    def _run_unet(self, own_cond: list[list[Conditioning]], merged_cond: list[list[Conditioning]]) -> StageResult:
        samples: dict[int, Samples] = {}

        def denoise(i: int, iteration: int, session: HookSession, state: HookState) -> None:
            if iteration == 0:
                if i not in samples:   # (an earlier group of layers sampled it already)
                    samples[i] = self._samples_of(i, session, own_cond[i])
                self._replay(i, session, state, samples[i], own_cond[i], "own samples")
            else:
                self._replay(i, session, state, samples[i], merged_cond[i], "iteration")

        keep = self.sampling.kept_steps()
        self.log(f"[unet] merging {len(self.unet_layers)} layers of {len(self.concepts)} concepts; "
                 f"{len(self.trajectories(self.concepts[0]))} trajectories per concept, "
                 f"{len(keep)} kept timesteps each")
        result = self._iterate("unet", self.unet_layers, self.backend.roots(UNET), denoise, early_stop=True)
        result.samples = sum(len(v) for v in samples.values())
        return result
