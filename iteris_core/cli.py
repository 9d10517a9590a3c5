"""Command line: ``python -m iteris_core merge|inspect|demo``.

    python -m iteris_core merge --base models/sd15 \\
        --lora cat.safetensors --prompts cat.txt --strength 0.9 \\
        --lora style.safetensors --prompts style.txt \\
        --out merged.safetensors --report report.json

``--prompts``, ``--prompt``, ``--strength``, ``--text-strength`` and ``--negative`` apply to the
``--lora`` before them; a ``--lora`` without prompts gets prompts derived from its file's trigger
words and training tags (metadata and sidecar files). Bad input ends with a one-line reason and
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import IterisError, MergeInterrupted
from .settings import MergeSettings, Method, SamplingSettings


@dataclass
class _LoraArgs:
    path: str
    prompts: list[str] = field(default_factory=list)
    strength: float = 1.0
    text_strength: float | None = None
    negative: str = ""


class _LoraAction(argparse.Action):
    """``--lora`` opens a group; the per-LoRA options after it fill that group."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = getattr(namespace, "loras", None) or []
        if option_string == "--lora":
            groups.append(_LoraArgs(values))
        else:
            if not groups:
                parser.error(f"{option_string} must come after the --lora it belongs to")
            current = groups[-1]
            if option_string == "--prompts":
                current.prompts.extend(_read_prompts(parser, values))
            elif option_string == "--prompt":
                current.prompts.append(values)
            elif option_string == "--strength":
                current.strength = values
            elif option_string == "--text-strength":
                current.text_strength = values
            elif option_string == "--negative":
                current.negative = values
        namespace.loras = groups


def _read_prompts(parser: argparse.ArgumentParser, path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        parser.error(f"cannot read prompts file {path}: {exc.strerror}")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        parser.error(f"prompts file {path} has no prompt (one per line; '#' starts a comment)")
    return prompts


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingSettings()
    group = parser.add_argument_group("samples (each concept's own images feed the statistics)")
    ssr = Method.SSR.sampling_defaults
    # None: the method's default (SSR calibrates on fewer samples), so that only what is typed overrides it
    group.add_argument("--samples", type=int, default=None, metavar="N",
                       help=f"seeds sampled per prompt (default {defaults.samples_per_prompt}; "
                            f"{ssr['samples_per_prompt']} for ssr)")
    group.add_argument("--timesteps", type=int, default=None, metavar="N",
                       help=f"points kept along each sampling trajectory (default {defaults.timesteps}; "
                            f"{ssr['timesteps']} for ssr: the trajectory's first point, pure noise)")
    # None: the base model family's default (Flux.1 samples without CFG, schnell in 4 steps)
    group.add_argument("--steps", type=int, default=None, metavar="N",
                       help=f"Euler steps of each concept's own sampling trajectory (default: the model family's, "
                            f"{defaults.steps} for SD, Flux.1 dev and SD3, 4 for Flux.1 schnell)")
    group.add_argument("--guidance", type=float, default=None, metavar="CFG",
                       help=f"classifier-free guidance of those trajectories (default: the model family's, "
                            f"{defaults.guidance} for SD, 4.5 for SD3, 1 (none) for Flux.1)")
    group.add_argument("--distilled-guidance", type=float, default=None, metavar="G",
                       help="Flux.1 dev's embedded guidance, as ComfyUI's FluxGuidance (default 3.5)")
    group.add_argument("--width", type=int, default=None, help="sample width in pixels (default: the model's)")
    group.add_argument("--height", type=int, default=None, help="sample height in pixels (default: the model's)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                       help="samples per forward pass (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="first seed (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iteris_core",
                                     description="Merge several LoRAs into one with IterIS (CVPR 2025).")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge LoRAs on a base model and write the merged LoRA",
                           description="Merge LoRAs on a base model (a diffusers folder of SD1.x/SD2.x/SDXL, "
                                       "Flux.1 or SD3/SD3.5, or a single-file checkpoint) and write one LoRA "
                                       "that ComfyUI's LoraLoader and diffusers' load_lora_weights load.")
    merge.add_argument("--base", required=True, help="base model: diffusers folder or .safetensors checkpoint")
    merge.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="CLIP tokenizer folder (vocab.json, merges.txt) for a single-file --base; default: "
                            "$ITERIS_CLIP_TOKENIZER or ComfyUI's comfy/sd1_tokenizer when ComfyUI is present")
    merge.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                       help="what a single-file --base predicts (default: detected; only SD2-768 models are v)")
    merge.add_argument("--config", default=None, metavar="DIR",
                       help="for a single-file Flux.1 or SD3 transformer --base: a local diffusers folder of the "
                            "same family, whose transformer config, text encoders, tokenizers and scheduler it "
                            "is loaded with")
    per_lora = merge.add_argument_group("LoRAs (repeat --lora; the options after it belong to it)")
    per_lora.add_argument("--lora", action=_LoraAction, metavar="FILE", help="a LoRA .safetensors file")
    per_lora.add_argument("--prompts", action=_LoraAction, metavar="FILE",
                          help="text file with this LoRA's concept prompts, one per line (optional: without "
                               "--prompts or --prompt, prompts are derived from the file's metadata and "
                               "sidecar files: trigger words, kohya folder name, training tags)")
    per_lora.add_argument("--prompt", action=_LoraAction, metavar="TEXT",
                          help="one concept prompt (repeatable; optional, as --prompts)")
    per_lora.add_argument("--strength", action=_LoraAction, type=float, metavar="S",
                          help="strength of this LoRA on the UNet (default 1.0)")
    per_lora.add_argument("--text-strength", action=_LoraAction, type=float, metavar="S",
                          help="strength on the text encoder (default: --strength)")
    per_lora.add_argument("--negative", action=_LoraAction, metavar="TEXT",
                          help="negative prompt for this LoRA's samples (default empty)")
    merge.add_argument("--out", required=True, help="where to write the merged LoRA (.safetensors)")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--report", default=None, metavar="FILE", help="write a JSON report of the merge here")
    defaults = MergeSettings()
    method = merge.add_argument_group("merge")
    method.add_argument("--method", default="iteris", choices=[m.value for m in Method],
                        help="iteris (default); regmean; ssr (SSR-Merge: a router over the stacked LoRAs, "
                             "one calibration pass); linear (average); concat (sum, like stacked loaders); ties")
    method.add_argument("--iterations", type=int, default=defaults.iterations,
                        help="IterIS iterations after the first solve (default %(default)s)")
    method.add_argument("--alpha", type=float, default=defaults.regularization,
                        help="regularisation coefficient a of the ridge a*||G||_F*I (default %(default)s); for ssr "
                             "the absolute ridge lambda*I on its mean projection Gram (default %(default)s)")
    method.add_argument("--tolerance", type=float, default=defaults.tolerance,
                        help="stop early when no layer's delta changes by more than this (default %(default)s)")
    method.add_argument("--rank", type=int, default=None,
                        help="truncate every layer to this rank (lossy; default: exact, rank = sum of ranks)")
    method.add_argument("--ties-density", type=float, default=defaults.ties_density,
                        help="TIES: fraction of each delta kept (default %(default)s)")
    method.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="sub-sample at most N spatial tokens per sample for the statistics")
    method.add_argument("--row-space-width", type=int, default=None, metavar="D",
                        help="approximate: solve layers whose input is wider than D in the LoRAs' row space "
                             "(less memory, lower fidelity; default: every layer exact)")
    method.add_argument("--no-text-encoder", action="store_true", help="merge the UNet only")
    method.add_argument("--no-unet", action="store_true", help="merge the text encoder only")
    _add_sampling(merge)
    run = merge.add_argument_group("hardware")
    run.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="where the model runs (default: cuda when available)")
    run.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                     help="forward precision (default: fp16 on cuda, fp32 on cpu); statistics are fp32")
    run.add_argument("--stats-device", choices=["cpu", "cuda"], default=None,
                     help="where the statistics live (default: with the model, or the CPU when the memory "
                          "plan does not fit in free GPU memory)")
    run.add_argument("--statistics-budget", type=float, default=None, metavar="GB",
                     help="memory the statistics may take (default: what is free); when they do not fit at "
                          "once the layers are merged in groups, each with its own passes, every layer exact")
    run.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                     help="precision of the written LoRA (default %(default)s)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines")

    inspect = sub.add_parser("inspect", help="read a LoRA and say what it is and where it goes")
    inspect.add_argument("lora", help="LoRA .safetensors file")
    inspect.add_argument("--base", default=None, help="base model to place it on (optional)")

    demo = sub.add_parser("demo", help="merge two generated LoRAs on a small generated model (no downloads)")
    demo.add_argument("--out", default="iteris-demo", help="folder for the demo's files (default %(default)s)")
    demo.add_argument("--method", default="iteris", choices=[m.value for m in Method])
    return parser


def _method_sampling(method: Method, samples: int | None, timesteps: int | None) -> dict[str, int]:
    """Samples per prompt and kept timesteps: what was typed, else the method's defaults."""
    defaults = SamplingSettings(**method.sampling_defaults)
    return {"samples_per_prompt": defaults.samples_per_prompt if samples is None else samples,
            "timesteps": defaults.timesteps if timesteps is None else timesteps}


def _settings(args, family=None) -> MergeSettings:
    """The merge settings; steps and guidance not given are the base model's ``family``'s (a
    :class:`~iteris_core.families.Family`), else the SD defaults."""
    method = Method.parse(args.method)
    sd, typical = SamplingSettings(), family.defaults if family is not None else None
    steps = args.steps if args.steps is not None else (typical.steps if typical else sd.steps)
    guidance = args.guidance if args.guidance is not None else (typical.cfg if typical else sd.guidance)
    sampling = SamplingSettings(**_method_sampling(method, args.samples, args.timesteps), steps=steps,
                                guidance=guidance, width=args.width, height=args.height, seed=args.seed,
                                batch_size=args.batch_size, distilled_guidance=args.distilled_guidance)
    return MergeSettings(method=method, iterations=args.iterations,
                         regularization=args.alpha, tolerance=args.tolerance, rank=args.rank,
                         ties_density=args.ties_density, max_tokens_per_sample=args.max_tokens,
                         row_space_width=args.row_space_width, statistics_budget_gb=args.statistics_budget,
                         merge_text_encoder=not args.no_text_encoder, merge_unet=not args.no_unet,
                         sampling=sampling)


class _ProgressBar:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="pass", dynamic_ncols=True, file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        # set_description would repaint on its own; one refresh after both updates draws once.
        self.bar.set_description(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)


def _dtype(name: str | None):
    import torch

    return {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def run_merge(args) -> int:
    from .api import Concept, merge_loras, open_backend
    from .families import family_by_id

    loras: list[_LoraArgs] = getattr(args, "loras", None) or []
    if not loras:
        raise IterisError("give at least one --lora (each optionally followed by its --prompts)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise IterisError(f"{out} already exists; pass --overwrite or choose another --out")
    concepts = [Concept(l.path, l.prompts, l.strength, l.text_strength, l.negative) for l in loras]
    load_options = {"tokenizer": args.tokenizer, "prediction_type": args.prediction_type, "config": args.config} \
        if Path(args.base).is_file() else {}
    # the model before the settings: its family's sampling defaults fill what is not typed
    backend = open_backend(args.base, device=args.device, dtype=_dtype(args.dtype), **load_options)
    settings = _settings(args, family_by_id(backend.architecture))
    bar = _ProgressBar(args.quiet)
    try:
        result = merge_loras(backend, concepts, settings, statistics_device=args.stats_device, on_progress=bar,
                             log=bar.log)
    finally:
        bar.close()
    path = result.lora.save(out, dtype=args.save_dtype, overwrite=args.overwrite)
    if args.report:
        result.report.save(args.report)
    if not args.quiet:
        print(result.report.summary(), file=sys.stderr)
    print(path)
    return 0


def run_inspect(args) -> int:
    from .lora_formats import parse_lora
    from .lora_io import read_lora_file
    from .lora_prompts import derive_prompts

    lora = read_lora_file(args.lora)
    parsed = parse_lora(lora)
    kinds: dict[str, int] = {}
    for module in parsed.modules:
        kinds[module.kind] = kinds.get(module.kind, 0) + 1
    print(f"{lora.name}: {len(lora.tensors)} tensors, {len(parsed.modules)} modules "
          f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), layout {parsed.layout}, sha256 {lora.sha256}")
    for note in parsed.skipped:
        print(f"  skipped: {note}")
    derived = derive_prompts(lora.metadata, lora_path=lora.path)
    if derived is None:
        print("  prompts: none can be derived from its metadata or sidecar files; give --prompts to merge it")
    else:
        print(f"  prompts when none are given: {derived.describe()}")
        for prompt in derived.prompts:
            print(f"    {prompt}")
    if args.base:
        from .api import open_backend

        backend = open_backend(args.base, device="cpu")
        normalized = backend.read_lora(lora)   # the backend's reader: it splits Flux/SD3 fused modules
        components = sorted(normalized.components())
        ranks = sorted(set(normalized.ranks().values()))
        print(f"  places on {len(normalized.layers)} layers of {backend.architecture} ({', '.join(components)}); "
              f"ranks {ranks}")
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    demo(Path(args.out), method=args.method)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"merge": run_merge, "inspect": run_inspect, "demo": run_demo}[args.command](args)
    except MergeInterrupted:
        print("error: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except IterisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
