"""Merge quality against the baselines, on concept LoRAs trained the way DreamBooth trains them.

    python -m bench.quality            # about 20-30 minutes on 2 CPU cores
    python -m bench.quality --quick    # a few minutes: fewer training steps, pairs only

1. A seeded synthetic world (bench/world.py) of coloured, textured shapes with captions trains a
   small SD1-type model from its random initialisation: its VAE, then its UNet and CLIP text
   encoder (so the base is a real, if tiny, text-to-image model).
2. Four concepts, each a shape in a colour the world never shows, bound to a rare token, get a
   LoRA on the UNet and the text encoder (PEFT, rank 8, the usual denoising loss) from 6 images.
3. Every pair and triple of concepts is merged with every method; on held-out prompts and seeds:
   * fidelity: how close the merged model's noise predictions are to the concept's own LoRA model,
     relative to the base model's distance (1 = the single LoRA, 0 = no better than the base);
   * presence: the concept's colour in generated images, relative to its training images, for the
     concept's own prompt and for a prompt naming all concepts of the group;
   * cross-talk: how far a prompt without the concept moves towards it (noise predictions: 0 =
     not at all, 1 = as far as the concept's own LoRA would move it).
Results: bench/results/quality.{json,md} and bench/results/quality_grid.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import CACHE, RESULTS, machine, machine_line, markdown_table, save_results
from bench.world import CONCEPTS, any_colour_sample, colour_presence, concept_images, to_uint8, world_sample

METHODS = ("linear", "concat", "ties", "regmean", "ssr", "ssr_iteris_samples", "iteris", "iteris_subsampled")
EVAL_STEPS = (100, 300, 500, 700, 900)
METHOD_NOTES = (" ssr: SSR-Merge (ICML 2026) at its defaults, one seed per prompt and one calibration step (the "
                "trajectory's first, pure-noise latent); ssr_iteris_samples: SSR on the samples IterIS uses (2 seeds "
                "per prompt, 4 timesteps). iteris_subsampled: IterIS with its statistics on 16 of the 64 spatial "
                "tokens per sample (the merge node's max_tokens).")


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2 - 1


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)]) \
        * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()


def train_vae(vae, images: torch.Tensor, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, 512, 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def text_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def denoising_loss(pipe, scheduler, latents: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, steps)
    prediction = pipe.unet(noisy, steps, encoder_hidden_states=text_embeddings(pipe, prompts)).sample
    return F.mse_loss(prediction, noise)


def pretrain(pipe, latents: torch.Tensor, captions: list[str], steps: int, seed: int) -> list[float]:
    """Train the UNet and text encoder on the world (10% empty captions, for guidance)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    parameters = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=4e-4, weight_decay=0.0)
    pipe.unet.train(), pipe.text_encoder.train()
    losses = []
    for step in range(steps):
        index = torch.randint(len(latents), (32,), generator=generator)
        prompts = [captions[i] if rng.random() > 0.1 else "" for i in index.tolist()]
        loss = denoising_loss(pipe, scheduler, latents[index], prompts, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    pipe.unet.eval(), pipe.text_encoder.eval()
    return losses


def train_concept_lora(pipe, concept, latents: torch.Tensor, steps: int, seed: int, folder: Path) -> Path:
    """DreamBooth-style LoRA (UNet and text encoder, rank 8) saved the way diffusers saves it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                                                "proj_in", "proj_out"]))
    text_encoder.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    trainable = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    view = SimpleNamespace(unet=unet, text_encoder=text_encoder, tokenizer=pipe.tokenizer)
    prompts = [f"a photo of {concept.token}", f"{concept.token}"]
    unet.train(), text_encoder.train()
    for step in range(steps):
        batch = latents[torch.randint(len(latents), (len(latents),), generator=generator)]
        loss = denoising_loss(view, scheduler, batch, [prompts[step % 2]] * len(batch), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / concept.token
    StableDiffusionPipeline.save_lora_weights(
        str(target), unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict(), safe_serialization=True)
    return target / "pytorch_lora_weights.safetensors"


@contextlib.contextmanager
def applied(backend, deltas: dict):
    """The backend's model with ``deltas`` applied (hook side paths, removed afterwards)."""
    from iteris_core.adapter_hooks import HookSession, HookState
    from iteris_core.layers import input_group

    table = backend.layer_table()
    modules = backend.modules()
    names = list(deltas)
    session = HookSession({n: modules[n] for n in names}, {n: table[n] for n in names}, [],
                          {n: input_group(n) for n in names})
    with session, session.active(HookState(deltas)), torch.no_grad():
        yield


def text_batch(backend, prompts: list[str]):
    """The prompts' conditioning as one batch (rows in order)."""
    from iteris_core.backends.base import TextBatch

    return TextBatch.cat(backend.encode_text(prompts))


@torch.no_grad()
def noise_predictions(backend, deltas: dict, latents: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
    """The model's noise predictions on ``latents`` noised at EVAL_STEPS (one row per latent and step)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(backend.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    rows, steps = [], []
    for t in EVAL_STEPS:
        noise = torch.randn(latents.shape, generator=generator)
        rows.append(scheduler.add_noise(latents, noise, torch.full((len(latents),), t)))
        steps.append(torch.full((len(latents),), t))
    x, t = torch.cat(rows), torch.cat(steps)
    with applied(backend, deltas):
        cond = text_batch(backend, [prompt] * len(x)).tensors["encoder_hidden_states"]
        return backend.unet(x, t, encoder_hidden_states=cond.to(backend.device)).sample


@torch.no_grad()
def generate(backend, vae, deltas: dict, prompt: str, seeds: list[int], steps: int = 20, guidance: float = 5.0,
             sampler: str = "euler", side: int | None = None, negative_prompt: str = "") -> np.ndarray:
    """Images (n x h x w x 3 in [0, 1]) for ``prompt`` from ``seeds``, with ``deltas`` applied:
    classifier-free guidance, the ``euler`` or ``ddpm`` sampler, ``side`` pixels (default: the
    UNet's native size)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    scheduler = {"euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}[sampler].from_config(backend.scheduler_config)
    scheduler.set_timesteps(steps)
    latent_side = (side // 8) if side else backend.unet.config.sample_size
    latents = torch.stack([torch.randn(4, latent_side, latent_side, generator=torch.Generator().manual_seed(s))
                           for s in seeds]).to(backend.device) * scheduler.init_noise_sigma
    with applied(backend, deltas):
        both = text_batch(backend, [prompt] * len(seeds) + [negative_prompt] * len(seeds))
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            cond, uncond = backend.predict_noise(x, t.reshape(1).repeat(len(x)), both).float().chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return decode(vae, latents.to(vae.device, vae.dtype))


def merge(backend, loras: list, tokens: list[str], method: str):
    from iteris_core import Concept, MergeSettings, SamplingSettings, merge_loras
    from iteris_core.settings import Method

    engine_method = next((m for m in ("iteris", "ssr") if method.startswith(m)), method)
    samples = dict(samples_per_prompt=2, timesteps=4)
    if method == "ssr":   # its own calibration; the sampler settings stay the bench's
        samples.update(Method.SSR.sampling_defaults)
    sampling = SamplingSettings(steps=20, guidance=5.0, batch_size=4, **samples)
    settings = MergeSettings(method=engine_method, iterations=3,
                             max_tokens_per_sample=16 if method == "iteris_subsampled" else None, sampling=sampling)
    concepts = [Concept(lora, [f"a photo of {token}", token], negative_prompt="") for lora, token in zip(loras, tokens)]
    return merge_loras(backend, concepts, settings).lora.layers


def evaluate_group(backend, vae, group: list[int], loras: list, held_out: dict, targets: dict, seeds: list[int],
                   figure: dict | None) -> list[dict]:
    concepts = [CONCEPTS[i] for i in group]
    tokens = [c.token for c in concepts]
    own = {i: loras[i].layers for i in group}
    joint_prompt = " and ".join(tokens)
    rows = []
    base_eps = {i: noise_predictions(backend, {}, held_out[i], f"a picture of {CONCEPTS[i].token}", 7) for i in group}
    own_eps = {i: noise_predictions(backend, own[i], held_out[i], f"a picture of {CONCEPTS[i].token}", 7) for i in group}
    for method in METHODS:
        started = time.perf_counter()
        merged = merge(backend, [loras[i] for i in group], tokens, method)
        merge_seconds = time.perf_counter() - started
        fidelity, presence_own, presence_joint, crosstalk = [], [], [], []
        joint_images = generate(backend, vae, merged, joint_prompt, seeds)
        for i, concept in zip(group, concepts):
            mine = noise_predictions(backend, merged, held_out[i], f"a picture of {concept.token}", 7)
            fidelity.append(1 - float((mine - own_eps[i]).pow(2).mean() / (base_eps[i] - own_eps[i]).pow(2).mean()))
            images = generate(backend, vae, merged, f"a photo of {concept.token}", seeds)
            reference = float(np.mean([colour_presence(t, concept) for t in targets[i]]))
            presence_own.append(float(np.mean([colour_presence(im, concept) for im in images])) / reference)
            presence_joint.append(float(np.mean([colour_presence(im, concept) for im in joint_images])) / reference)
            for j in group:                     # prompts of another concept: does concept i leak in?
                if j == i:
                    continue
                prompt = f"a picture of {CONCEPTS[j].token}"
                base = noise_predictions(backend, {}, held_out[j], prompt, 11)
                towards = noise_predictions(backend, own[i], held_out[j], prompt, 11) - base
                moved = noise_predictions(backend, merged, held_out[j], prompt, 11) - base
                crosstalk.append(float((moved * towards).sum() / towards.pow(2).sum().clamp_min(1e-12)))
            if figure is not None:
                figure.setdefault(method, {})[concept.token] = images[0]
        if figure is not None:
            figure.setdefault(method, {})[joint_prompt] = joint_images[0]
        rows.append({"group": "+".join(tokens), "size": len(group), "method": method,
                     "fidelity": float(np.mean(fidelity)), "fidelity_min": float(np.min(fidelity)),
                     "presence_own": float(np.mean(presence_own)), "presence_joint": float(np.mean(presence_joint)),
                     "presence_joint_min": float(np.min(presence_joint)), "crosstalk": float(np.mean(crosstalk)),
                     "merge_seconds": merge_seconds})
    if figure is not None:
        for i, concept in zip(group, concepts):
            figure.setdefault("single LoRA", {})[concept.token] = generate(backend, vae, own[i], f"a photo of {concept.token}", seeds[:1])[0]
        figure.setdefault("base", {})[joint_prompt] = generate(backend, vae, {}, joint_prompt, seeds[:1])[0]
    return rows


def save_grid(figure: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    columns = list(dict.fromkeys(c for row in figure.values() for c in row))
    names = ["single LoRA", *METHODS, "base"]
    names = [n for n in names if n in figure]
    cell, label = 96, 130
    canvas = Image.new("RGB", (label + cell * len(columns), 24 + cell * len(names)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        draw.text((label + c * cell + 4, 6), column[:20], fill="black")
    for r, name in enumerate(names):
        draw.text((6, 24 + r * cell + cell // 2 - 6), name, fill="black")
        for c, column in enumerate(columns):
            if column in figure[name]:
                tile = Image.fromarray(to_uint8(figure[name][column])).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (label + c * cell, 24 + r * cell))
    canvas.save(path)


def summarise(rows: list[dict], size: int | None = None) -> list[dict]:
    """Mean and spread per method over the groups (of ``size`` concepts only, when given)."""
    summary = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and size in (None, r["size"])]
        entry = {"method": method}
        for key in ("fidelity", "presence_own", "presence_joint", "crosstalk", "merge_seconds"):
            values = np.array([r[key] for r in mine])
            entry[key], entry[key + "_std"] = float(values.mean()), float(values.std())
        summary.append(entry)
    return summary


def trained_base(spec, steps: dict, seed: int, folder: Path):
    """The small text-to-image base model trained on the synthetic world (VAE first, then UNet and
    text encoder), loaded from ``folder`` when an earlier run with the same seed and steps saved it."""
    from diffusers import StableDiffusionPipeline

    from iteris_core.backends.tiny import build_tiny_pipeline

    if (folder / "model_index.json").is_file():
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
        return pipe, json.loads((folder / "losses.json").read_text())
    rng = random.Random(seed)
    world = [world_sample(rng) for _ in range(3000)]
    # the VAE also sees shapes in arbitrary colours: the concepts' colours are new to the UNet only
    vae_images = to_tensor([image for image, _ in world] + [any_colour_sample(rng) for _ in range(1500)])
    pipe = build_tiny_pipeline(spec, seed=seed)
    train_vae(pipe.vae, vae_images, steps["vae"], seed)
    latents = encode(pipe.vae, to_tensor([image for image, _ in world]))
    losses = pretrain(pipe, latents, [caption for _, caption in world], steps["base"], seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder))
    (folder / "losses.json").write_text(json.dumps(losses))
    return pipe, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps, pairs only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import TinySpec
    from iteris_core.lora_normalize import load_lora

    steps = {"vae": 300, "base": 600, "lora": 150} if args.quick else {"vae": 1500, "base": 3000, "lora": 600}
    spec = TinySpec(channels=(32, 64), layers_per_block=1, text_width=64, sample_size=8, vae_channels=(16, 32, 32))
    tag = f"seed{args.seed}_" + "_".join(f"{k}{v}" for k, v in steps.items())
    pipe, losses = trained_base(spec, steps, args.seed, CACHE / f"quality_base_{tag}")
    folder = CACHE / f"quality_loras_{tag}"
    targets, held_out, lora_files = {}, {}, []
    for index, concept in enumerate(CONCEPTS):
        targets[index] = concept_images(concept, 6, seed=1000 + index)
        held_out[index] = encode(pipe.vae, to_tensor(concept_images(concept, 4, seed=5000 + index)))
        path = folder / concept.token / "pytorch_lora_weights.safetensors"
        if not path.is_file():     # trained once per seed and step counts; reruns reuse the files
            train_concept_lora(pipe, concept, encode(pipe.vae, to_tensor(targets[index])), steps["lora"],
                               args.seed + index, folder)
        lora_files.append(path)
    trained_seconds = time.perf_counter() - started
    backend = DiffusersBackend(pipe, device="cpu", dtype=torch.float32)
    loras = [load_lora(path, backend.layer_table()) for path in lora_files]
    groups = list(itertools.combinations(range(len(CONCEPTS)), 2))
    if not args.quick:
        groups += list(itertools.combinations(range(len(CONCEPTS)), 3))
    seeds = [9000, 9001, 9002, 9003]
    rows, figure = [], {}
    for n, group in enumerate(groups):
        rows += evaluate_group(backend, pipe.vae, list(group), loras, held_out, targets, seeds,
                               figure if n == 0 else None)
    summary = summarise(rows)
    by_size = {size: summarise(rows, size) for size in sorted({r["size"] for r in rows})}
    RESULTS.mkdir(parents=True, exist_ok=True)
    grid = RESULTS / ("quality_grid_quick.png" if args.quick else "quality_grid.png")
    save_grid(figure, grid)
    info = machine()
    result = {**info, "quick": args.quick, "seed": args.seed, "training_steps": steps,
              "base_loss_first_last": [losses[0], float(np.mean(losses[-50:]))], "concepts": [c.token for c in CONCEPTS],
              "groups": len(groups), "summary": summary,
              "summary_by_size": {str(size): entries for size, entries in by_size.items()},
              "per_group": {g: {r["method"]: r["fidelity"] for r in rows if r["group"] == g}
                            for g in dict.fromkeys(r["group"] for r in rows)},
              "rows": rows, "seconds": {"training": trained_seconds, "total": time.perf_counter() - started}}
    columns = [("method", "method"), ("fidelity", "fidelity"), ("fidelity_std", "±"), ("presence_own", "presence (own prompt)"),
               ("presence_own_std", "±"), ("presence_joint", "presence (joint prompt)"), ("presence_joint_std", "±"),
               ("crosstalk", "cross-talk"), ("crosstalk_std", "±"), ("merge_seconds", "merge s")]
    markdown = (f"# Merge quality{' (quick run)' if args.quick else ''}\n\n"
                f"{machine_line(info)}. "
                f"{len(CONCEPTS)} DreamBooth-style concept LoRAs (rank 8, UNet + text encoder) on a small SD1-type "
                f"model trained on a synthetic world; {len(groups)} groups "
                f"({'pairs' if args.quick else 'pairs and triples'}); held-out prompts and seeds. Mean and spread "
                "over groups. fidelity: 1 = the concept's own LoRA, 0 = the base model; presence: concept colour "
                "in generated images relative to its training images; cross-talk: 0 = prompts without the "
                "concept are untouched, 1 = moved as far as the concept's own LoRA would move them."
                f"{METHOD_NOTES}\n\n"
                + markdown_table(summary, columns) + "\n")
    names = {2: "Pairs", 3: "Triples"}
    for size, entries in by_size.items():
        count = sum(1 for g in groups if len(g) == size)
        markdown += f"\n## {names.get(size, f'Groups of {size}')} ({count} groups)\n\n" + markdown_table(entries, columns) + "\n"
    markdown += f"\n![grid]({grid.name})\n"
    save_results("quality_quick" if args.quick else "quality", result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
