"""The Python API: one call merges LoRAs on a base model and returns the LoRA and a report.

    from iteris_core import Concept, MergeSettings, merge_loras
    result = merge_loras("models/sd15", [Concept("cat.safetensors", ["a photo of sks cat"]),
                                         Concept("style.safetensors", ["a painting in xyz style"])])
    result.lora.save("merged.safetensors")
    print(result.report.summary())
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import __version__
from .backends.base import ModelBackend
from .baselines import concat_merge, linear_merge, ties_merge
from .errors import IterisError, SettingsError
from .iteris import IterisLoop, LogFn, PreparedConcept, ProgressFn, StopFn
from .layers import UNET
from .lora_io import LoraFile, read_lora_file
from .lora_normalize import NormalizedLora
from .lora_prompts import DerivedPrompts, derive_prompts, missing_prompts_message
from .lora_writer import MergedLora
from .low_rank import LowRankDelta, truncate
from .memory import GB, Placement, available_bytes, choose_plan
from .report import InputReport, LayerReport, MergeReport
from .settings import MergeSettings, Method

LoraSource = str | Path | LoraFile | NormalizedLora | Mapping[str, torch.Tensor]


@dataclass
class Concept:
    """One LoRA to merge, with its strengths and the prompts that show its concept.

    ``lora`` is a file path, a read :class:`LoraFile`, a :class:`NormalizedLora`, or a state dict.
    ``strength`` scales its UNet layers and ``text_strength`` (default: ``strength``) its text
    encoder layers. ``prompts`` (one or more) and ``negative_prompt`` are used to sample the
    concept's own images, whose layer inputs drive the merge; without prompts, they are derived
    from the LoRA's trigger words and training tags (its metadata and sidecar files, see
    :mod:`~iteris_core.lora_prompts`).
    """

    lora: LoraSource
    prompts: Sequence[str] = ()
    strength: float = 1.0
    text_strength: float | None = None
    negative_prompt: str = ""
    name: str | None = None

    def display_name(self, index: int) -> str:
        if self.name:
            return self.name
        if isinstance(self.lora, (str, Path)):
            return Path(self.lora).name
        if isinstance(self.lora, (LoraFile, NormalizedLora)):
            return self.lora.name
        return f"LoRA {index + 1}"


@dataclass
class MergeResult:
    lora: MergedLora
    report: MergeReport
    inputs: list[NormalizedLora] = field(default_factory=list)


def open_backend(base: ModelBackend | str | Path, device: str | None = None, dtype: torch.dtype | None = None,
                 **load_options) -> ModelBackend:
    """A backend for ``base``: a backend object is used as is; a path (diffusers folder or
    single-file checkpoint) is loaded with diffusers. Flux.1 and SD3/SD3.5 (a folder whose
    ``model_index.json`` names FluxPipeline or StableDiffusion3Pipeline, or a single-file
    transformer) go to the DiT backend, ``load_options``: ``config`` (the local diffusers folder a
    single file is loaded with), ``max_sequence_length`` (T5 tokens); SD1.x, SD2.x and SDXL to the
    SD backend: ``tokenizer``, ``prediction_type`` for single files. Options given as None are
    left out; an option the model's backend does not take is an error naming it."""
    if not isinstance(base, (str, Path)):
        return base
    from .backends.diffusers_backend import DiffusersBackend
    from .backends.diffusers_dit import DitBackend, is_dit_model

    dit = is_dit_model(Path(base))
    backend = DitBackend if dit else DiffusersBackend
    accepted = {"config", "max_sequence_length"} if dit else {"tokenizer", "prediction_type"}
    given = {name: value for name, value in load_options.items() if value is not None}
    if set(given) - accepted:
        kind = "Flux.1/SD3" if dit else "SD1.x/SD2.x/SDXL"
        raise SettingsError(f"{', '.join(sorted(set(given) - accepted))}: not an option for {Path(base).name}, a "
                            f"{kind} model (its options: {', '.join(sorted(accepted))})")
    return backend.from_pretrained(base, device=device, dtype=dtype, **given)


def load_concept_lora(concept: Concept, index: int, backend: ModelBackend) -> NormalizedLora:
    """The concept's LoRA placed on the backend's layers (by the backend's own reader); errors
    name the concept."""
    table = backend.layer_table()
    source = concept.lora
    if isinstance(source, NormalizedLora):
        unknown = [n for n in source.layers if n not in table]
        if unknown:
            raise IterisError(f"{source.name}: layer {unknown[0]} is not in the base model")
        return source
    if isinstance(source, Mapping):
        source = LoraFile(concept.display_name(index), dict(source))
    elif not isinstance(source, LoraFile):
        source = read_lora_file(source)
    return backend.read_lora(source)


def _validate(concepts: Sequence[Concept], settings: MergeSettings) -> None:
    if len(concepts) < 1:
        raise SettingsError("give at least one LoRA to merge")
    for i, concept in enumerate(concepts):
        label = concept.display_name(i)
        for what, value in (("strength", concept.strength), ("text_strength", concept.text_strength)):
            if value is not None and not (-10.0 <= value <= 10.0):
                raise SettingsError(f"{label}: {what} must be between -10 and 10, got {value}")
        if settings.method.needs_model:
            prompts = [p for p in concept.prompts if p.strip()]
            if not prompts:
                raise SettingsError(f"{missing_prompts_message(label)} ({settings.method.value} samples the "
                                    "concept's own images to merge)")


def _has_prompts(concept: Concept) -> bool:
    return any(p.strip() for p in concept.prompts)


def _with_derived_prompts(concept: Concept, settings: MergeSettings) -> tuple[Concept, DerivedPrompts | None]:
    """The concept with prompts derived from its LoRA's metadata and sidecar files when it has none
    and the method samples; typed prompts always win. A path is read here (its sidecars are beside
    it) and the read file replaces it, so it is not read twice; the caller's concept is not changed."""
    if _has_prompts(concept) or not settings.method.needs_model:
        return concept, None
    source = concept.lora
    if isinstance(source, (str, Path)):
        source = read_lora_file(source)
    if isinstance(source, LoraFile):
        derived = derive_prompts(source.metadata, lora_path=source.path)
    elif isinstance(source, NormalizedLora):
        derived = derive_prompts(source.metadata)
    else:
        derived = None       # a bare state dict has no metadata
    if derived is None:
        return replace(concept, lora=source), None
    return replace(concept, lora=source, prompts=list(derived.prompts)), derived


def _prompt_source(concept: Concept, derived: DerivedPrompts | None) -> str:
    """Where a concept's prompts came from, for the report."""
    if derived is not None:
        return derived.describe()
    return "typed" if _has_prompts(concept) else "none"


def _prepare(concept: Concept, lora: NormalizedLora) -> PreparedConcept:
    text_strength = concept.strength if concept.text_strength is None else concept.text_strength
    return PreparedConcept(lora.name, lora.at_strength(concept.strength, text_strength),
                           [p.strip() for p in concept.prompts if p.strip()], concept.negative_prompt)


def _sample_key(concept: Concept, lora: NormalizedLora) -> tuple | None:
    """What a concept's own samples depend on (besides the model and the sampling settings)."""
    if lora.sha256 is None:
        return None
    return (lora.sha256, concept.strength, concept.text_strength, tuple(p.strip() for p in concept.prompts if p.strip()),
            concept.negative_prompt)


def _keep_components(deltas: dict[str, LowRankDelta], settings: MergeSettings) -> dict[str, LowRankDelta]:
    return {n: d for n, d in deltas.items()
            if (settings.merge_unet if n.startswith(UNET + ".") else settings.merge_text_encoder)}


def _resident_bytes(backend: ModelBackend, components) -> int:
    """Bytes of the model's weights that already live on its device (loaded models on the CPU, a
    diffusers model moved to the GPU; ComfyUI loads its models to the GPU only when sampling)."""
    device_type = torch.device(backend.device).type
    seen, total = set(), 0
    for component in components:
        for root in backend.roots(component):
            for tensor in list(root.parameters()) + list(root.buffers()):
                if tensor.device.type == device_type and id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
    return total


def _memory_plan(backend: ModelBackend, loop: IterisLoop, settings: MergeSettings, forced: Placement | None):
    """The memory plan of the statistics for this merge on this backend, the layers it solves in
    the row space, and the memory the plan had (free plus the model's weights already on the
    device; None if unknown)."""
    table = backend.layer_table()
    model_bytes = sum(backend.weights_bytes(c) for c in table.components)
    activations = backend.activation_bytes(settings.sampling)
    stages = loop.stage_plans()
    budget = None if settings.statistics_budget_gb is None else int(settings.statistics_budget_gb * GB)
    free = available_bytes(backend.device)
    if free is not None:   # weights already on the device are in the model's bytes, not free memory
        free += _resident_bytes(backend, table.components)
    plan = choose_plan(backend.device, stages, settings.effective_iterations, model_bytes, activations,
                       free, forced, exact_cross_norm=settings.exact_cross_norm, budget_bytes=budget)
    return plan, {p.name for stage in stages for p in stage if p.subspace}, free


def merge_loras(base: ModelBackend | str | Path, concepts: Sequence[Concept], settings: MergeSettings | None = None,
                *, device: str | None = None, dtype: torch.dtype | None = None,
                statistics_device: str | None = None, on_progress: ProgressFn | None = None,
                should_stop: StopFn | None = None, log: LogFn | None = None, sample_cache: dict | None = None,
                **load_options) -> MergeResult:
    """Merge ``concepts`` on ``base`` (a backend, a diffusers folder or a checkpoint file).

    ``on_progress(done, total, message)`` is called after every model call; ``should_stop()``
    is checked before each and a true value raises :class:`~iteris_core.errors.MergeInterrupted`.
    ``statistics_device`` puts the statistics elsewhere than the model (default: the model's
    device, or the CPU when the plan does not fit in free GPU memory). ``load_options`` go to
    :func:`open_backend` when ``base`` is a path. ``sample_cache``, a dict the caller keeps for one
    base model, lets a later merge of the same concepts with other merge settings reuse the
    sampled trajectories.
    """
    settings = settings or MergeSettings()
    log = log or (lambda message: None)
    started = time.perf_counter()    # reading a file for its prompts is part of loading it
    completed = [_with_derived_prompts(c, settings) for c in concepts]
    concepts = [c for c, _ in completed]
    derived = [d for _, d in completed]
    for i, (concept, found) in enumerate(completed):
        if found is not None:
            log(f"{concept.display_name(i)}: no prompts given; {found.describe()}: " + " | ".join(found.prompts))
    _validate(concepts, settings)
    backend = open_backend(base, device, dtype, **load_options)
    table = backend.layer_table()
    loras = [load_concept_lora(c, i, backend) for i, c in enumerate(concepts)]
    prepared = [_prepare(c, lora) for c, lora in zip(concepts, loras)]
    for p in prepared:
        p.deltas = _keep_components(p.deltas, settings)
    if not any(p.deltas for p in prepared):
        raise SettingsError("nothing to merge: every LoRA is at strength 0 or targets only components that "
                            "are switched off")
    timings = {"load": time.perf_counter() - started}
    report = MergeReport(method=settings.method.value, settings=settings.to_dict(),
                         base={"architecture": table.architecture, "layers": len(table),
                               "identity": getattr(backend, "identity", table.architecture)},
                         inputs=[InputReport(lora.name, lora.sha256, c.strength,
                                             c.strength if c.text_strength is None else c.text_strength,
                                             len(p.prompts), len(p.deltas), max(lora.ranks().values()),
                                             list(lora.skipped), _prompt_source(c, d))
                                 for c, d, lora, p in zip(concepts, derived, loras, prepared)])
    for lora in loras:
        report.warnings.extend(f"{lora.name}: {note}" for note in lora.skipped)

    method = settings.method
    subspace_layers: set[str] = set()
    if method.needs_model:
        keys = [_sample_key(c, lora) for c, lora in zip(concepts, loras)] if sample_cache is not None else None
        loop = IterisLoop(backend, prepared, settings, log=log, on_progress=on_progress, should_stop=should_stop,
                          sample_cache=sample_cache, sample_keys=keys)
        forced = Placement(statistics_device, statistics_device, settings.exact_cross_norm) if statistics_device else None
        plan, subspace_layers, free = _memory_plan(backend, loop, settings, forced)
        loop.placement = plan.placement
        loop.set_groups({"text": plan.groups[0], "unet": plan.groups[1]})
        log(plan.describe())
        if free is not None and plan.device_gb * GB > free:
            log(f"warning: only {free / GB:.2f} GB are free on {backend.device} (counting the model's weights already "
                "there); the merge may run out of memory (lower the batch size or sub-sample tokens)")
            report.warnings.append(f"planned {plan.device_gb:.2f} GB on {backend.device}, {free / GB:.2f} GB free "
                                   "with the model's weights")
        report.memory = plan.to_dict()
        try:
            text, unet = loop.run()
        except torch.cuda.OutOfMemoryError:
            raise IterisError(f"out of GPU memory ({plan.describe()}): lower the batch size, sub-sample tokens "
                              "(max_tokens_per_sample), or keep the statistics on the CPU") from None
        merged: dict[str, LowRankDelta] = {}
        for stage in (text, unet):
            if stage is not None:
                merged.update(stage.merged)
                report.add_stage(stage, subspace_layers)
                timings[stage.iterations[0].stage] = sum(r.seconds for r in stage.iterations)
    else:
        deltas = [p.deltas for p in prepared]
        if method is Method.LINEAR:
            merged = linear_merge(deltas)
        elif method is Method.CONCAT:
            merged = concat_merge(deltas)
        else:
            merged, errors = ties_merge(deltas, settings.ties_density, settings.rank)
        for name, delta in merged.items():
            report.layers[name] = LayerReport(rank=delta.rank, mode=method.value,
                                              truncation_error=errors.get(name) if method is Method.TIES else None)

    if settings.rank is not None and method is not Method.TIES:
        for name, delta in list(merged.items()):
            cut = truncate(delta, settings.rank)
            merged[name] = cut.delta
            report.layers[name].rank = cut.delta.rank
            report.layers[name].truncation_error = cut.relative_error

    timings["total"] = time.perf_counter() - started
    report.timings = timings
    metadata = {"iteris_version": __version__, "iteris_method": method.value,
                "iteris_settings": json.dumps(settings.to_dict(), sort_keys=True),
                "iteris_inputs": json.dumps([{"name": i.name, "sha256": i.sha256, "strength": i.strength,
                                              "text_strength": i.text_strength} for i in report.inputs]),
                "iteris_base": json.dumps(report.base, sort_keys=True)}
    return MergeResult(MergedLora(merged, table, metadata), report, loras)
