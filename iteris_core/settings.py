"""Typed, validated settings. Strings (from the CLI or a ComfyUI widget) become these objects at the
edge; everything inside the engine takes them."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from .errors import SettingsError


class Method(str, enum.Enum):
    """Merge methods. IterIS is the point of the pack; the others are baselines and options."""

    ITERIS = "iteris"    # closed form on the merged model's own inputs, iterated
    REGMEAN = "regmean"  # closed form on each LoRA model's inputs, uniform weights, no iteration
    LINEAR = "linear"    # average of the deltas (strength / N each)
    CONCAT = "concat"    # sum of the deltas: what stacked LoraLoaders do
    TIES = "ties"        # trim, elect sign, disjoint mean on dense deltas, then factorised
    # SSR-Merge (ICML 2026): per layer, the stacked LoRAs re-routed by an R x R router fitted on
    # their projections of each concept's own inputs; one calibration pass, no iteration
    SSR = "ssr"

    @property
    def needs_model(self) -> bool:
        """Whether the method runs the model to collect layer statistics."""
        return self in (Method.ITERIS, Method.REGMEAN, Method.SSR)

    @property
    def sampling_defaults(self) -> dict[str, int]:
        """The :class:`SamplingSettings` fields whose default differs for this method (what the
        engine, the CLI and the node use when the caller sets none of them)."""
        return dict(_SAMPLING_DEFAULTS.get(self.value, {}))

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise SettingsError(f"method must be one of {choices}, got {value!r}") from None


# SSR's runner calibrates on one seed per prompt with a single denoiser call at the start of
# sampling (pure noise): one sample per prompt, the first step of the trajectory kept
_SAMPLING_DEFAULTS: dict[str, dict[str, int]] = {"ssr": {"samples_per_prompt": 1, "timesteps": 1}}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


@dataclass(frozen=True)
class SamplingSettings:
    """How the samples that feed the statistics are made.

    For each concept, every prompt is sampled with ``samples_per_prompt`` seeds by the concept's
    own LoRA model for ``steps`` steps of ``sampler`` on ``scheduler``'s noise levels (names as in
    ComfyUI's KSampler; the diffusers backend has Euler on the normal schedule), with
    classifier-free guidance ``guidance`` (KSampler's cfg; 1 or less: none) and, for
    guidance-distilled models (Flux.1 dev), the embedded ``distilled_guidance``; the latents at
    ``timesteps`` evenly spread points of that trajectory are kept and reused, unchanged, in every
    IterIS iteration. A UNet sample is one kept latent with the prompt's conditioning (and one with
    the negative prompt when the sampler uses both).
    """

    samples_per_prompt: int = 2
    timesteps: int = 4
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None    # None: the model's native resolution (512 for SD1.x, 1024 for SDXL)
    height: int | None = None
    seed: int = 0
    batch_size: int = 4         # UNet samples per forward
    sampler: str = "euler"
    scheduler: str = "normal"
    distilled_guidance: float | None = None   # Flux.1 dev's guidance embedding (FluxGuidance)

    def __post_init__(self) -> None:
        _check(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(1 <= self.timesteps <= self.steps,
               f"timesteps must be between 1 and steps ({self.steps}), got {self.timesteps}")
        _check(self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.distilled_guidance is None or self.distilled_guidance >= 0,
               f"distilled_guidance must be >= 0, got {self.distilled_guidance}")
        for side, value in (("width", self.width), ("height", self.height)):
            _check(value is None or (value >= 64 and value % 8 == 0),
                   f"{side} must be a multiple of 8 and >= 64, got {value}")

    @property
    def uses_cfg(self) -> bool:
        """Whether the sampler also runs the negative prompt (classifier-free guidance)."""
        return self.guidance > 1.0

    def kept_steps(self) -> list[int]:
        """Indices (0-based, into the sampler's steps) of the latents kept as samples: evenly
        spread from the first step (pure noise) towards the end, never the final denoised image."""
        if self.timesteps == 1:
            return [0]
        last = self.steps - 1
        return sorted({round(i * last / self.timesteps) for i in range(self.timesteps)})


@dataclass(frozen=True)
class MergeSettings:
    """Everything that decides the merged LoRA. Frozen, so it can key caches."""

    method: Method = Method.ITERIS
    iterations: int = 3          # IterIS iterations after iteration 0 (which is RegMean-like)
    # IterIS/RegMean: the paper's alpha, ridge a*||G||_F*I added to each Gram matrix (relative);
    # SSR: its lambda, an absolute ridge lam*I on the mean R x R projection Gram
    regularization: float = 1e-4
    adaptive_weights: bool = True  # the paper's lambda_i; RegMean uses uniform weights
    tolerance: float = 1e-3       # stop when every stage's relative change of the deltas is below
    rank: int | None = None       # None: exact merged rank (sum of input ranks); else truncate
    ties_density: float = 0.2     # TIES: fraction of each delta's entries kept
    # approximate, explicit only: layers with a wider input are solved in the LoRAs' row space (less
    # memory, lower fidelity); None solves every layer exactly
    row_space_width: int | None = None
    # GB of memory the statistics may take on their device; None: what the planner finds free. When
    # they do not fit at once, the layers are merged in groups, each with its own passes
    statistics_budget_gb: float | None = None
    max_tokens_per_sample: int | None = None  # spatial token sub-sampling for the statistics
    # The ridge on the cross term scales with ||X Xt^T||_F. Exact: iteration 0 keeps the concepts'
    # own layer inputs X (host memory, as large as the activations) and each later pass sums Xt^T X;
    # otherwise an unbiased estimate from 32 random probes X G (much cheaper; the ridge is 1e-4 of
    # the Gram's scale, so the merge moves by ~1e-4 relative).
    exact_cross_norm: bool = False
    merge_text_encoder: bool = True
    merge_unet: bool = True
    # None: the method's default sampling (SamplingSettings with Method.sampling_defaults); always
    # a SamplingSettings once constructed
    sampling: SamplingSettings = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method.parse(self.method))
        if self.sampling is None:
            object.__setattr__(self, "sampling", SamplingSettings(**self.method.sampling_defaults))
        _check(0 <= self.iterations <= 100, f"iterations must be between 0 and 100, got {self.iterations}")
        _check(self.regularization >= 0, f"regularization must be >= 0, got {self.regularization}")
        _check(self.tolerance >= 0, f"tolerance must be >= 0, got {self.tolerance}")
        _check(self.rank is None or self.rank >= 1, f"rank must be >= 1 (or None for exact), got {self.rank}")
        _check(0 < self.ties_density <= 1, f"ties_density must be in (0, 1], got {self.ties_density}")
        _check(self.row_space_width is None or self.row_space_width >= 1,
               f"row_space_width must be >= 1 or None, got {self.row_space_width}")
        _check(self.statistics_budget_gb is None or self.statistics_budget_gb > 0,
               f"statistics_budget_gb must be > 0 or None, got {self.statistics_budget_gb}")
        _check(self.max_tokens_per_sample is None or self.max_tokens_per_sample >= 1,
               f"max_tokens_per_sample must be >= 1 or None, got {self.max_tokens_per_sample}")
        _check(self.merge_text_encoder or self.merge_unet, "nothing to merge: both merge_unet and "
               "merge_text_encoder are off")

    @property
    def effective_iterations(self) -> int:
        """Iterations actually run after iteration 0 (RegMean and SSR never iterate)."""
        return self.iterations if self.method is Method.ITERIS else 0

    @property
    def uses_adaptive_weights(self) -> bool:
        return self.adaptive_weights and self.method is Method.ITERIS

    def replace(self, **changes) -> MergeSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able form (for metadata and reports)."""
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        return out
