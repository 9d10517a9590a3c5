"""What a merge did, in numbers: per stage and iteration, per layer, timings and memory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .iteris import IterationRecord, StageResult


@dataclass
class InputReport:
    name: str
    sha256: str | None
    strength: float
    text_strength: float
    prompts: int
    layers: int
    rank: int                  # largest rank over its layers
    skipped: list[str] = field(default_factory=list)
    # "typed", "none" (a method that does not sample), or what the prompts were derived from
    prompt_source: str = "typed"


@dataclass
class LayerReport:
    rank: int
    # "closed form" ("..., token space"), "row space", "ssr" (routed; "ssr, one LoRA (unchanged)" where a
    # single LoRA changes the layer), or the baseline's name
    mode: str
    objective: list[float] = field(default_factory=list)   # relative, per iteration >= 1
    change: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)     # lam_i per concept
    truncation_error: float | None = None


@dataclass
class MergeReport:
    method: str
    settings: dict
    base: dict
    inputs: list[InputReport]
    iterations: list[IterationRecord] = field(default_factory=list)
    converged: dict[str, bool] = field(default_factory=dict)
    layers: dict[str, LayerReport] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add_stage(self, stage: StageResult, plans_subspace: set[str]) -> None:
        self.iterations.extend(stage.iterations)
        if stage.unreached_layers:
            self.warnings.append(f"{len(stage.unreached_layers)} layers that the concepts' samples never run are not in "
                                 f"the merged LoRA (e.g. {stage.unreached_layers[0]}): no input reached them")
        if stage.iterations:
            self.converged[stage.iterations[0].stage] = stage.converged
        token_space = set(stage.token_space_layers)
        for name, delta in stage.merged.items():
            mode = "row space" if name in plans_subspace else "closed form"
            mode += ", token space" if name in token_space else ""
            self.layers[name] = LayerReport(
                rank=delta.rank, mode=stage.layer_modes.get(name, mode),
                objective=stage.layer_objective.get(name, []), change=stage.layer_change.get(name, []),
                weights=list(stage.weights[name].lam) if name in stage.weights else [])

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def summary(self) -> str:
        """A few lines for people: what was merged, how it converged, how long it took."""
        architecture = self.base.get("architecture", "?")
        identity = self.base.get("identity")
        about = f"{identity}; " if identity and identity != architecture else ""
        lines = [f"{self.method} merge of {len(self.inputs)} LoRAs on {architecture} "
                 f"({about}{len(self.layers)} layers, total rank {sum(l.rank for l in self.layers.values())})"]
        for item in self.inputs:
            typed = f", {item.prompts} typed prompt{'' if item.prompts == 1 else 's'}"
            prompts = {"typed": typed, "none": ""}.get(item.prompt_source, f", {item.prompt_source}")
            lines.append(f"  {item.name}: strength {item.strength:g} (text {item.text_strength:g}), "
                         f"{item.layers} layers, rank {item.rank}{prompts}")
        for record in self.iterations:
            text = f"  [{record.stage}] iteration {record.iteration}: {record.seconds:.1f} s"
            if record.objective is not None:
                text += (f", relative objective {record.objective:.4f}, change max {record.max_change:.2e} "
                         f"mean {record.mean_change:.2e}")
            lines.append(text)
        for stage, done in self.converged.items():
            if sum(r.stage == stage for r in self.iterations) > 1:   # one solve (RegMean, SSR): nothing to converge
                lines.append(f"  {stage}: {'converged' if done else 'stopped at the iteration limit'}")
        errors = [l.truncation_error for l in self.layers.values() if l.truncation_error is not None]
        if errors:
            lines.append(f"  rank truncation: relative error mean {sum(errors) / len(errors):.3f}, "
                         f"max {max(errors):.3f}")
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        if self.memory:
            line = f"  memory plan: {self.memory.get('total_gb', 0):.2f} GB on {self.memory.get('device')}"
            counts = [c for c in self.memory.get("group_counts", []) if c > 1]
            if counts:
                line += (f", layers merged in {' and '.join(map(str, counts))} groups to fit the "
                         f"{self.memory.get('budget_gb', 0):.2f} GB statistics budget")
            lines.append(line)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)
