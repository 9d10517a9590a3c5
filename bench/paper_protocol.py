"""The IterIS paper's multi-concept evaluation, for people who have real weights.

    python -m bench.paper_protocol --base path/to/sd15 --clip path/to/clip-vit-large-patch14 \\
        --lora dog.safetensors --prompts dog.txt --lora cat.safetensors --prompts cat.txt \\
        --eval-prompts both.txt

Every method (linear, concatenation, TIES, RegMean, IterIS) merges the LoRAs; each merged model
draws every evaluation prompt (several concepts in one prompt) from the same seeds with DDPM, 100
steps and guidance 12, as in the paper. CLIP then scores each image:
  * text alignment: cosine of the image's and the prompt's CLIP embeddings;
  * image alignment: cosine of the image's embedding with each concept's reference images
    (``--reference`` folders, or, by default, images that the concept's own LoRA draws for its own
    prompts), averaged over the concepts.
Everything is local: ``--base`` is a diffusers folder, ``--clip`` a folder with a transformers
``CLIPModel``, its tokenizer and image processor. Results: bench/results/paper_protocol_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, machine, machine_line, markdown_table, save_results

METHODS = ("linear", "concat", "ties", "regmean", "iteris")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP embeddings of images and texts (unit vectors), from a local folder. Images are prepared
    as CLIP's processor does (bicubic resize of the short side, centre crop, normalise), with the
    folder's ``preprocessor_config.json`` values when it has them."""

    def __init__(self, folder: Path, device: torch.device):
        import json

        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        config_file = folder / "preprocessor_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.side = self.model.config.vision_config.image_size
        self.mean = np.asarray(config.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.asarray(config.get("image_std", CLIP_STD), dtype=np.float32)
        self.device = device

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        picture = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        scale = self.side / min(picture.size)
        picture = picture.resize((max(self.side, round(picture.width * scale)), max(self.side, round(picture.height * scale))),
                                 Image.BICUBIC)
        left, top = (picture.width - self.side) // 2, (picture.height - self.side) // 2
        array = np.asarray(picture.crop((left, top, left + self.side, top + self.side)), dtype=np.float32) / 255.0
        return ((array - self.mean) / self.std).transpose(2, 0, 1)

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([self._pixels(image) for image in images])).to(self.device)
        return _unit(_features(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(_features(self.model.get_text_features(**tokens)))


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 may wrap them in a model output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"error: {what} file {path} not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise SystemExit(f"error: {what} file {path} holds no prompt (one per line)")
    return lines


def read_images(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    if not folder.is_dir():
        raise SystemExit(f"error: reference folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"error: reference folder {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in files]


def load_vae(base: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if not (base / "vae").is_dir():
        raise SystemExit(f"error: {base} has no vae/ folder: give a diffusers model folder as --base")
    return AutoencoderKL.from_pretrained(str(base / "vae"), local_files_only=True).to(device, dtype).eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n" + __doc__.split("\n\n")[1])
    parser.add_argument("--base", type=Path, required=True, help="the base model: a local diffusers folder (SD1.x, SD2.x, SDXL)")
    parser.add_argument("--clip", type=Path, required=True,
                        help="a local folder with a transformers CLIPModel, its tokenizer and image processor "
                             "(e.g. a download of openai/clip-vit-large-patch14)")
    parser.add_argument("--lora", type=Path, action="append", required=True, help="a concept LoRA (repeat per concept)")
    parser.add_argument("--prompts", type=Path, action="append", required=True,
                        help="the concept prompts of the --lora before it, one per line (used for the merge "
                             "and for default references)")
    parser.add_argument("--eval-prompts", type=Path, required=True,
                        help="evaluation prompts naming several concepts, one per line (not used for the merge)")
    parser.add_argument("--reference", type=Path, action="append", default=[],
                        help="a folder of reference images of a concept, one per --lora in the same order "
                             "(default: images the concept's own LoRA draws for its prompts)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=4, help="images per evaluation prompt (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=100, help="DDPM sampling steps (the paper: 100)")
    parser.add_argument("--guidance", type=float, default=12.0, help="classifier-free guidance scale (the paper: 12)")
    parser.add_argument("--resolution", type=int, default=0, help="image side in pixels (0 = the model's native size)")
    parser.add_argument("--iterations", type=int, default=3, help="IterIS iterations")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="run", help="results are written as paper_protocol_<name>.{json,md}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="folder for the results (default bench/results)")
    args = parser.parse_args(argv)
    if len(args.lora) != len(args.prompts):
        parser.error("give one --prompts file after each --lora")
    if args.reference and len(args.reference) != len(args.lora):
        parser.error("give one --reference folder per --lora, or none")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    for path, what in [(args.base, "--base"), (args.clip, "--clip")]:
        if not path.exists():
            parser.error(f"{what} {path} not found")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from bench.quality import generate
    from iteris_core import Concept, MergeSettings, SamplingSettings, merge_loras
    from iteris_core.api import load_concept_lora
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.errors import IterisError

    started = time.perf_counter()
    device = torch.device(args.device)
    try:
        backend = DiffusersBackend.from_pretrained(args.base, device=args.device)
        concepts = [Concept(lora, read_lines(prompts, "--prompts"))
                    for lora, prompts in zip(args.lora, args.prompts)]
        loras = [load_concept_lora(concept, i, backend) for i, concept in enumerate(concepts)]
    except IterisError as exc:
        raise SystemExit(f"error: {exc}") from None
    eval_prompts = read_lines(args.eval_prompts, "--eval-prompts")
    vae = load_vae(args.base, device, backend.dtype)
    clip = ClipScorer(args.clip, device)
    seeds = list(range(args.seeds))
    side = args.resolution or None

    def draw(deltas: dict, prompt: str, draw_seeds: list[int]) -> list[np.ndarray]:
        return list(generate(backend, vae, deltas, prompt, draw_seeds, steps=args.steps, guidance=args.guidance,
                             sampler="ddpm", side=side))

    if args.reference:
        references = [clip.images(read_images(folder)) for folder in args.reference]
    else:                                   # each concept's own LoRA on its own prompts
        references = [clip.images([image for prompt in concept.prompts for image in draw(lora.layers, prompt, seeds[:1])])
                      for concept, lora in zip(concepts, loras)]
    reference_means = torch.stack([_unit(r.mean(0)) for r in references])
    prompt_embeddings = clip.texts(eval_prompts)

    sampling = SamplingSettings(samples_per_prompt=2, timesteps=4, steps=20, guidance=7.5)
    rows = []
    for method in args.methods:
        merge_started = time.perf_counter()
        merged = merge_loras(backend, concepts, MergeSettings(method=method, iterations=args.iterations,
                                                              sampling=sampling)).lora.layers
        merge_seconds = time.perf_counter() - merge_started
        text_scores, image_scores = [], []
        for prompt, text in zip(eval_prompts, prompt_embeddings):
            embeddings = clip.images(draw(merged, prompt, seeds))
            text_scores += (embeddings @ text).tolist()
            image_scores += (embeddings @ reference_means.T).mean(1).tolist()
        rows.append({"method": method, "text_alignment": float(np.mean(text_scores)),
                     "text_alignment_std": float(np.std(text_scores)), "image_alignment": float(np.mean(image_scores)),
                     "image_alignment_std": float(np.std(image_scores)), "merge_seconds": merge_seconds,
                     "images": len(text_scores)})
        print(f"{method}: text {rows[-1]['text_alignment']:.4f}, image {rows[-1]['image_alignment']:.4f}", flush=True)

    info = machine()
    result = {**info, "protocol": {"sampler": "DDPM", "steps": args.steps, "guidance": args.guidance,
                                   "seeds": len(seeds), "resolution": side or "native"},
              "base": str(args.base), "clip": str(args.clip), "loras": [str(p) for p in args.lora],
              "eval_prompts": eval_prompts, "references": "folders" if args.reference else "own LoRA images",
              "rows": rows, "seconds": time.perf_counter() - started}
    columns = [("method", "method"), ("text_alignment", "CLIP text alignment"), ("text_alignment_std", "±"),
               ("image_alignment", "CLIP image alignment"), ("image_alignment_std", "±"), ("merge_seconds", "merge s")]
    markdown = (f"# The paper's protocol: {args.name}\n\n{machine_line(info)}, "
                f"{args.device}. Base {args.base.name}, CLIP {args.clip.name}, {len(args.lora)} LoRAs, "
                f"{len(eval_prompts)} evaluation prompts x {len(seeds)} seeds, DDPM {args.steps} steps, guidance "
                f"{args.guidance:g}; references: {result['references']}.\n\n" + markdown_table(rows, columns) + "\n")
    save_results(f"paper_protocol_{args.name}", result, markdown, args.out_dir)
    print(markdown)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
