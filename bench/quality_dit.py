"""Merge quality on a flow-matching DiT: bench/quality.py's measures on a small SD3-type MMDiT.

    python -m bench.quality_dit            # about 30 minutes on 2 shared CPU cores (3 with the models cached)
    python -m bench.quality_dit --quick    # under 10 minutes: fewer training steps, pairs only

(Both reuse bench/quality.py's VAE when that bench has run; without it a VAE is trained first.)

1. The synthetic world of bench/world.py (coloured, textured shapes with captions) and its VAE
   (the SD1 world's, from its cache when bench/quality.py has trained it with this seed and VAE
   steps, else trained here the same way on the same images) train a small SD3-type model from
   random initialisation: an SD3Transformer2DModel (joint blocks, patch 2 on the VAE's 8 x 8
   latents, RMS q/k norm) and two small CLIP text encoders with projections, T5 off as SD3
   allows, with the rectified-flow objective (x_t = (1 - t) x0 + t eps, target eps - x0, SD3's
   logit-normal t) and 10% empty captions for classifier-free guidance.
2. The four concepts of the world get DreamBooth-style LoRAs (PEFT, rank 8) on the transformer's
   attention and MLPs (both streams) and both CLIPs' attention, saved by
   ``StableDiffusion3Pipeline.save_lora_weights`` and read back by ``DitBackend.read_lora``.
3. Every pair and triple is merged with every method of bench/quality.py through ``merge_loras``
   on the DitBackend (flow-matching Euler, CFG), and measured as there, on velocities instead of
   noise predictions:
   * fidelity: how close the merged model's velocity predictions at fixed t on held-out noised
     latents are to the concept's own LoRA model's, relative to the base's (1 = the single LoRA,
     0 = no better than the base);
   * presence: the concept's colour in images generated with CFG (the DitBackend's sampler,
     decoded by the VAE) relative to its training images, for its own prompt and a joint prompt;
   * cross-talk: how far a prompt of another concept moves towards the concept (velocities: 0 =
     not at all, 1 = as far as the concept's own LoRA would move it).
Results: bench/results/quality_dit.{json,md} and bench/results/quality_dit_grid.png.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import CACHE, RESULTS, machine, machine_line, markdown_table, save_results
from bench.quality import METHODS, applied, decode, encode, save_grid, summarise, text_batch, to_tensor, train_vae
from bench.world import CONCEPTS, any_colour_sample, colour_presence, concept_images, to_uint8, world_sample

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)   # flow-matching times the velocities are compared at (1 = pure noise)
STEPS, GUIDANCE = 20, 5.0             # the sampler: 20 Euler steps, CFG 5 (as the SD1 world)
SUBSAMPLED_TOKENS = 4                 # iteris_subsampled: 4 of the 16 image tokens (the SD1 world keeps 16 of 64)
T5_TOKENS = 1                         # T5 is off: SD3 puts zeros in its place; one zero token keeps them cheap
# bench/quality.py's training steps (its main's): its cache folders are named by them; its VAE is reused
SD1_STEPS = {"quick": {"vae": 300, "base": 600, "lora": 150}, "full": {"vae": 1500, "base": 3000, "lora": 600}}
METHOD_NOTES = (" ssr: SSR-Merge at its defaults (one seed per prompt, the first, pure-noise step); "
                "ssr_iteris_samples: SSR on the samples IterIS uses (2 seeds per prompt, 4 timesteps). "
                f"iteris_subsampled: IterIS with its statistics on {SUBSAMPLED_TOKENS} tokens per sample (of the "
                "16 image tokens; the text stream's 33 and the CLIPs' 32 likewise).")


@dataclass(frozen=True)
class DitSpec:
    """Widths of the SD3-type base: ``blocks`` joint blocks of ``heads`` x ``head_dim``, two CLIPs."""

    blocks: int = 3
    heads: int = 2
    head_dim: int = 64
    clip_width: int = 32       # CLIP-L and CLIP-G stand-ins: hidden and projection width
    clip_layers: int = 3       # SD3 reads the penultimate layer: the last one only feeds the pooled vector
    text_length: int = 32      # CLIP tokens (the world's longest caption has 27 characters)
    latent_side: int = 8       # the SD1 world's VAE: 32-pixel images, 8 x 8 x 4 latents

    def tag(self) -> str:
        return f"b{self.blocks}h{self.heads}x{self.head_dim}c{self.clip_width}x{self.clip_layers}"


# --- the base model ----------------------------------------------------------------------------

def _clip(spec: DitSpec, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from iteris_core.backends.tiny import VOCAB_SIZE

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=spec.clip_width, intermediate_size=4 * spec.clip_width, num_attention_heads=2,
                            num_hidden_layers=spec.clip_layers, vocab_size=VOCAB_SIZE, max_position_embeddings=77,
                            bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
                            hidden_act="quick_gelu", projection_dim=spec.clip_width)
    return CLIPTextModelWithProjection(config)


def _tokenizer(folder: Path, length: int, pad_token: str):
    """The pack's offline character-level CLIP tokenizer, cut to ``length`` tokens (the pipeline
    and the backend pad every prompt to the tokenizer's length: 77 would be mostly padding here)."""
    from transformers import CLIPTokenizer

    from iteris_core.backends.tiny import write_char_tokenizer

    return CLIPTokenizer.from_pretrained(str(write_char_tokenizer(folder, pad_token=pad_token)), model_max_length=length)


def build_dit_pipeline(spec: DitSpec, vae, seed: int):
    """A StableDiffusion3Pipeline with random weights (seeded) around ``vae``: no T5, no shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    width = spec.heads * spec.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=spec.latent_side, patch_size=2, in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=spec.blocks, attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads, joint_attention_dim=2 * spec.clip_width, caption_projection_dim=width,
        pooled_projection_dim=2 * spec.clip_width, pos_embed_max_size=spec.latent_side // 2, qk_norm="rms_norm")
    # SD3 shifts its schedule towards noise for 1024-pixel images; 8 x 8 latents need no shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp) / "tok", spec.text_length, "<|endoftext|>")
        tokenizer_2 = _tokenizer(Path(tmp) / "tok2", spec.text_length, "!")   # as SD3's CLIP-G pads
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=_clip(spec, seed + 1), tokenizer=tokenizer,
                                    text_encoder_2=_clip(spec, seed + 2), tokenizer_2=tokenizer_2,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_backend(pipe):
    from iteris_core.backends.diffusers_dit import DitBackend

    return DitBackend(pipe, device="cpu", dtype=torch.float32, max_sequence_length=T5_TOKENS)


def world_images(seed: int) -> tuple[list[tuple[np.ndarray, str]], list[np.ndarray]]:
    """The world's captioned images and the VAE's extra arbitrary-colour shapes, drawn in the order
    bench/quality.py draws them (so the same seed gives the same images)."""
    rng = random.Random(seed)
    world = [world_sample(rng) for _ in range(3000)]
    return world, [any_colour_sample(rng) for _ in range(1500)]


def world_vae(seed: int, steps: int, world: list, extra: list, folder: Path):
    """The SD1 world's VAE when bench/quality.py has cached it for this seed and VAE steps (one VAE
    for both worlds keeps their latents alike); otherwise one trained here by its recipe."""
    from diffusers import AutoencoderKL

    from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline

    shared = sorted(CACHE.glob(f"quality_base_seed{seed}_vae{steps}_*/vae/config.json"))
    if shared:
        return AutoencoderKL.from_pretrained(str(shared[0].parent)).eval(), str(shared[0].parent.parent.name)
    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(folder)).eval(), folder.name
    # bench/quality.py's spec: its VAE (16, 32, 32 channels) maps 32-pixel images to 8 x 8 latents
    spec = TinySpec(channels=(32, 64), layers_per_block=1, text_width=64, sample_size=8, vae_channels=(16, 32, 32))
    vae = build_tiny_pipeline(spec, seed=seed).vae
    train_vae(vae, to_tensor([image for image, _ in world] + extra), steps, seed)
    vae.save_pretrained(str(folder))
    return vae, folder.name


def logit_normal(count: int, generator: torch.Generator) -> torch.Tensor:
    """SD3's training times: sigmoid of a standard normal (most weight on the middle of the path)."""
    return torch.sigmoid(torch.randn(count, generator=generator))


def flow_loss(backend, latents: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss: the velocity eps - x0 at x_t = (1 - t) x0 + t eps, through the
    backend's own conditioning and transformer call (so training and merging read the same inputs)."""
    from iteris_core.settings import SamplingSettings

    noise = torch.randn(latents.shape, generator=generator)
    t = logit_normal(len(latents), generator)
    noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
    cond = backend.recipe.encode(backend, prompts)
    velocity = backend.predict(noisy, t * 1000, cond, SamplingSettings())   # SD3 reads t in scheduler units
    return F.mse_loss(velocity, noise - latents)


def trainable_modules(backend) -> list[torch.nn.Module]:
    return [backend.transformer, *backend.text_encoders.values()]


def pretrain(backend, latents: torch.Tensor, captions: list[str], steps: int, seed: int) -> list[float]:
    """Train the transformer and both CLIPs on the world (10% empty captions, for guidance)."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    modules = trainable_modules(backend)
    parameters = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=4e-4, weight_decay=0.0)
    # a short warm-up (a transformer from random init diverges easily at its full rate), then a
    # cosine decay to a tenth: the last steps settle the model instead of rattling around
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / 100, 0.1 + 0.45 * (1 + np.cos(np.pi * min(step / steps, 1.0)))))
    for module in modules:
        module.train()
    losses = []
    for step in range(steps):
        index = torch.randint(len(latents), (32,), generator=generator)
        prompts = [captions[i] if rng.random() > 0.1 else "" for i in index.tolist()]
        loss = flow_loss(backend, latents[index], prompts, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
        if step % 250 == 0:
            print(f"  base step {step}: loss {np.mean(losses[-50:]):.4f}", flush=True)
    for module in modules:
        module.eval()
    return losses


def trained_base(spec: DitSpec, steps: dict, seed: int, folder: Path) -> tuple[object, dict]:
    """The SD3-type base trained on the world, loaded from ``folder`` when an earlier run with the
    same seed, steps and widths saved it; and its training record (losses, where its VAE came
    from, seconds), saved with it so that a rerun reports the training it reuses."""
    from diffusers import StableDiffusion3Pipeline

    if (folder / "training.json").is_file():
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe, json.loads((folder / "training.json").read_text())
    started = time.perf_counter()
    world, extra = world_images(seed)
    vae, vae_source = world_vae(seed, steps["vae"], world, extra, CACHE / f"quality_dit_vae_seed{seed}_vae{steps['vae']}")
    pipe = build_dit_pipeline(spec, vae, seed)
    latents = encode(vae, to_tensor([image for image, _ in world]))
    losses = pretrain(dit_backend(pipe), latents, [caption for _, caption in world], steps["base"], seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder))
    record = {"losses": losses, "vae": vae_source, "seconds": time.perf_counter() - started}
    (folder / "training.json").write_text(json.dumps(record))   # last: its presence means the folder is complete
    return pipe, record


# --- concept LoRAs -----------------------------------------------------------------------------

TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def train_concept_lora(pipe, concept, latents: torch.Tensor, steps: int, seed: int, folder: Path) -> dict:
    """DreamBooth-style LoRA (transformer and both CLIPs, rank 8) saved the way diffusers saves SD3
    LoRAs in ``folder/<token>``; its training record (the last 50 steps' mean loss, seconds)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    started = time.perf_counter()
    view = dit_backend(copy.deepcopy(pipe))   # the backend is built first: its layer table has no adapters
    configs = {"transformer": LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                         target_modules=TRANSFORMER_TARGETS),
               "text_encoder": LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TEXT_TARGETS),
               "text_encoder_2": LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                            target_modules=TEXT_TARGETS)}
    models = {"transformer": view.transformer, **view.text_encoders}
    for name, model in models.items():
        for p in model.parameters():
            p.requires_grad_(False)
        model.add_adapter(configs[name])
        model.train()
    trainable = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    prompts = [f"a photo of {concept.token}", f"{concept.token}"]
    losses = []
    for step in range(steps):
        batch = latents[torch.randint(len(latents), (len(latents),), generator=generator)]
        loss = flow_loss(view, batch, [prompts[step % 2]] * len(batch), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    target = folder / concept.token
    target.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        str(target), transformer_lora_layers=get_peft_model_state_dict(models["transformer"]),
        text_encoder_lora_layers=get_peft_model_state_dict(models["text_encoder"]),
        text_encoder_2_lora_layers=get_peft_model_state_dict(models["text_encoder_2"]),
        transformer_lora_adapter_metadata=configs["transformer"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(), safe_serialization=True)
    record = {"loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - started}
    (target / "training.json").write_text(json.dumps(record))
    return record


def read_concept_lora(backend, path: Path):
    """The file read by the DitBackend's own reader; every trained module must land on a layer.
    (The last joint block's text queries, add_q_proj, feed no output, as SD3's last block keeps
    only its image tokens: their LoRA up factor stays zero and the reader rightly skips it.)"""
    from safetensors.torch import load_file

    from iteris_core.lora_io import read_lora_file

    lora = backend.read_lora(read_lora_file(path))
    trained = sum(1 for key, tensor in load_file(str(path)).items()
                  if key.endswith("lora_B.weight") and bool(tensor.any()))
    if len(lora.layers) != trained:
        raise RuntimeError(f"{path}: {trained} trained LoRA modules saved, {len(lora.layers)} read")
    return lora


# --- measures ----------------------------------------------------------------------------------

def _settings(**changes):
    from iteris_core.settings import SamplingSettings

    return SamplingSettings(steps=STEPS, guidance=GUIDANCE, batch_size=4, **changes)


@torch.no_grad()
def velocities(backend, deltas: dict, latents: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
    """The model's velocity predictions on ``latents`` noised to each of SIGMAS (one row per latent
    and time; the noise depends only on ``seed``, so models are compared on the same inputs)."""
    generator = torch.Generator().manual_seed(seed)
    rows, times = [], []
    for sigma in SIGMAS:
        noise = torch.randn(latents.shape, generator=generator)
        rows.append((1 - sigma) * latents + sigma * noise)
        times.append(torch.full((len(latents),), sigma * 1000))
    x = torch.cat(rows)
    with applied(backend, deltas):
        return backend.predict(x, torch.cat(times), text_batch(backend, [prompt] * len(x)), _settings())


@torch.no_grad()
def trajectory(backend, deltas: dict, prompt: str, seeds: list[int], negative_prompt: str = "") -> list[torch.Tensor]:
    """The latents before each flow-matching Euler step with CFG, and the final one: SD3's sampler,
    as DitBackend.sample runs it (same noise per seed, one batched call on [negative, prompt]),
    which keeps only the steps it is asked for and never the final latent."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shape = (backend.transformer.config.in_channels, backend.transformer.config.sample_size,
             backend.transformer.config.sample_size)
    latents = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backend.scheduler_config)
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(0)
    n = len(seeds)
    with applied(backend, deltas):
        both = text_batch(backend, [negative_prompt] * n + [prompt] * n)
        path = [latents]
        for t in scheduler.timesteps:
            uncond, cond = backend.predict(torch.cat([latents, latents]), t.expand(2 * n), both, _settings()).chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents, return_dict=False)[0]
            path.append(latents)
    return path


def generate(backend, vae, deltas: dict, prompt: str, seeds: list[int]) -> np.ndarray:
    """Images (n x h x w x 3 in [0, 1]) for ``prompt`` from ``seeds`` with ``deltas`` applied."""
    return decode(vae, trajectory(backend, deltas, prompt, seeds)[-1])


def sampler_agreement(backend, deltas: dict, prompt: str, seeds: list[int]) -> float:
    """Largest difference between :func:`trajectory` and DitBackend.sample's kept latents (the
    merge's own samples) at every step: the images are measured on the sampler the merge uses."""
    with applied(backend, deltas):   # the text encoders' layers too: the conditioning is the LoRA model's
        positive, negative = text_batch(backend, [prompt]), text_batch(backend, [""])
        kept = backend.sample(positive, negative, seeds, _settings(), list(range(STEPS)), lambda step: None)
    mine = trajectory(backend, deltas, prompt, seeds)
    return max(float((sample.latent - mine[sample.step][j]).abs().max())
               for j, samples in enumerate(kept) for sample in samples)


def fidelity(mine: torch.Tensor, own: torch.Tensor, base: torch.Tensor) -> float:
    """1 - |v - v_own|^2 / |v_base - v_own|^2: 1 = the concept's own LoRA, 0 = the base model."""
    return 1 - float((mine - own).pow(2).mean() / (base - own).pow(2).mean())


def crosstalk(moved: torch.Tensor, towards: torch.Tensor) -> float:
    """The projection of a prompt's move onto the move the concept's own LoRA makes on it."""
    return float((moved * towards).sum() / towards.pow(2).sum().clamp_min(1e-12))


def merge(backend, loras: list, tokens: list[str], method: str, adaptive_weights: bool = True) -> dict:
    """The group's merged layers by ``method`` (bench/quality.py's settings, on this sampler)."""
    from iteris_core import Concept, MergeSettings, merge_loras
    from iteris_core.settings import Method

    engine_method = next((m for m in ("iteris", "ssr") if method.startswith(m)), method)
    samples = dict(samples_per_prompt=2, timesteps=4)
    if method == "ssr":   # its own calibration; the sampler settings stay the bench's
        samples.update(Method.SSR.sampling_defaults)
    settings = MergeSettings(method=engine_method, iterations=3, adaptive_weights=adaptive_weights,
                             max_tokens_per_sample=SUBSAMPLED_TOKENS if method == "iteris_subsampled" else None,
                             sampling=_settings(**samples))
    concepts = [Concept(lora, [f"a photo of {token}", token], negative_prompt="") for lora, token in zip(loras, tokens)]
    return merge_loras(backend, concepts, settings).lora.layers


@dataclass
class References:
    """What every group is measured against: the base's and each single LoRA's velocities."""

    base: dict[int, torch.Tensor]                  # concept i's prompt on its held-out latents, base model
    own: dict[int, torch.Tensor]                   # the same with concept i's own LoRA
    other_base: dict[tuple[int, int], torch.Tensor]     # (i, j): concept j's prompt and latents, base model
    other_towards: dict[tuple[int, int], torch.Tensor]  # how far concept i's own LoRA moves them


def references(backend, loras: list, held_out: dict) -> References:
    count = len(CONCEPTS)
    prompt = {i: f"a picture of {CONCEPTS[i].token}" for i in range(count)}
    base = {i: velocities(backend, {}, held_out[i], prompt[i], 7) for i in range(count)}
    own = {i: velocities(backend, loras[i].layers, held_out[i], prompt[i], 7) for i in range(count)}
    other_base = {j: velocities(backend, {}, held_out[j], prompt[j], 11) for j in range(count)}
    pairs = [(i, j) for i in range(count) for j in range(count) if i != j]
    towards = {(i, j): velocities(backend, loras[i].layers, held_out[j], prompt[j], 11) - other_base[j]
               for i, j in pairs}
    return References(base, own, {(i, j): other_base[j] for i, j in pairs}, towards)


def evaluate_group(backend, vae, group: list[int], loras: list, held_out: dict, targets: dict, refs: References,
                   seeds: list[int], figure: dict | None) -> list[dict]:
    concepts = [CONCEPTS[i] for i in group]
    tokens = [c.token for c in concepts]
    joint_prompt = " and ".join(tokens)
    rows = []
    for method in METHODS:
        started = time.perf_counter()
        merged = merge(backend, [loras[i] for i in group], tokens, method)
        merge_seconds = time.perf_counter() - started
        scores, presence_own, presence_joint, leaks = {}, [], [], []
        joint_images = generate(backend, vae, merged, joint_prompt, seeds)
        for i, concept in zip(group, concepts):
            mine = velocities(backend, merged, held_out[i], f"a picture of {concept.token}", 7)
            scores[concept.token] = fidelity(mine, refs.own[i], refs.base[i])
            images = generate(backend, vae, merged, f"a photo of {concept.token}", seeds)
            reference = float(np.mean([colour_presence(t, concept) for t in targets[i]]))
            presence_own.append(float(np.mean([colour_presence(im, concept) for im in images])) / reference)
            presence_joint.append(float(np.mean([colour_presence(im, concept) for im in joint_images])) / reference)
            for j in group:                     # prompts of another concept: does concept i leak in?
                if j != i:
                    moved = velocities(backend, merged, held_out[j], f"a picture of {CONCEPTS[j].token}", 11) \
                        - refs.other_base[i, j]
                    leaks.append(crosstalk(moved, refs.other_towards[i, j]))
            if figure is not None:
                figure.setdefault(method, {})[concept.token] = images[0]
        if figure is not None:
            figure.setdefault(method, {})[joint_prompt] = joint_images[0]
        values = list(scores.values())
        rows.append({"group": "+".join(tokens), "size": len(group), "method": method,
                     "fidelity": float(np.mean(values)), "fidelity_min": float(np.min(values)),
                     "fidelity_per_concept": scores,
                     "presence_own": float(np.mean(presence_own)), "presence_joint": float(np.mean(presence_joint)),
                     "presence_joint_min": float(np.min(presence_joint)), "crosstalk": float(np.mean(leaks)),
                     "merge_seconds": merge_seconds})
        print(f"  {rows[-1]['group']} {method}: fidelity {rows[-1]['fidelity']:.3f} "
              f"presence {rows[-1]['presence_own']:.2f} cross-talk {rows[-1]['crosstalk']:.2f} "
              f"({merge_seconds:.1f} s)", flush=True)
    if figure is not None:
        for i, concept in zip(group, concepts):
            figure.setdefault("single LoRA", {})[concept.token] = \
                generate(backend, vae, loras[i].layers, f"a photo of {concept.token}", seeds[:1])[0]
        figure.setdefault("base", {})[joint_prompt] = generate(backend, vae, {}, joint_prompt, seeds[:1])[0]
    return rows


def single_lora_presence(backend, vae, loras: list, targets: dict, seeds: list[int]) -> list[dict]:
    """Each concept's presence under its own LoRA and under the base (the scale presence is read on)."""
    rows = []
    for i, concept in enumerate(CONCEPTS):
        reference = float(np.mean([colour_presence(t, concept) for t in targets[i]]))
        prompt = f"a photo of {concept.token}"
        own = generate(backend, vae, loras[i].layers, prompt, seeds)
        base = generate(backend, vae, {}, prompt, seeds)
        rows.append({"concept": concept.token, "training_images": reference,
                     "single_lora": float(np.mean([colour_presence(im, concept) for im in own])) / reference,
                     "base": float(np.mean([colour_presence(im, concept) for im in base])) / reference})
    return rows


# --- why: diagnostics ----------------------------------------------------------------------------

def prompt_selectivity(predict: Callable[[int | None, int, int], torch.Tensor]) -> dict[str, float]:
    """Per concept: how far its own LoRA moves the predictions for another concept's prompt,
    relative to its own prompt, on its own held-out latents with the same noise (squared norms;
    0 = the LoRA acts on its prompt only, 1 = on any prompt alike). ``predict(lora, latents,
    prompt)`` takes concept indices (lora None: the base model). A LoRA that acts whatever the
    prompt changes the layers' outputs on inputs every concept shares, where merged layers cannot
    serve two LoRAs at once."""
    out = {}
    for i, concept in enumerate(CONCEPTS):
        own = (predict(i, i, i) - predict(None, i, i)).pow(2).sum()
        ratios = [float((predict(i, i, j) - predict(None, i, j)).pow(2).sum() / own)
                  for j in range(len(CONCEPTS)) if j != i]
        out[concept.token] = float(np.mean(ratios))
    return out


def relative_effect(predict: Callable[[int | None, int, int], torch.Tensor]) -> dict[str, float]:
    """Per concept: how large its own LoRA's change of the model's predictions is, relative to the
    base model's predictions (squared norms, its own prompt and held-out latents)."""
    out = {}
    for i, concept in enumerate(CONCEPTS):
        base = predict(None, i, i)
        out[concept.token] = float((predict(i, i, i) - base).pow(2).sum() / base.pow(2).sum())
    return out


def diagnostics(predict: Callable[[int | None, int, int], torch.Tensor]) -> dict[str, dict[str, float]]:
    return {"prompt_selectivity": prompt_selectivity(predict), "relative_effect": relative_effect(predict)}


def dit_diagnostics(backend, loras: list, held_out: dict) -> dict[str, dict[str, float]]:
    return diagnostics(lambda lora, latents, prompt: velocities(
        backend, {} if lora is None else loras[lora].layers, held_out[latents],
        f"a picture of {CONCEPTS[prompt].token}", 7))


def sd1_diagnostics(seed: int, steps: dict) -> dict[str, dict[str, float]] | None:
    """:func:`diagnostics` in bench/quality.py's SD1 world (its cached base and LoRAs, on its noise
    predictions), or None when that bench has not been run with this seed and steps."""
    from diffusers import StableDiffusionPipeline

    from bench.quality import noise_predictions
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.lora_normalize import load_lora

    tag = f"seed{seed}_" + "_".join(f"{k}{v}" for k, v in steps.items())
    folder, lora_folder = CACHE / f"quality_base_{tag}", CACHE / f"quality_loras_{tag}"
    paths = [lora_folder / c.token / "pytorch_lora_weights.safetensors" for c in CONCEPTS]
    if not (folder / "model_index.json").is_file() or not all(p.is_file() for p in paths):
        return None
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    backend = DiffusersBackend(pipe, device="cpu", dtype=torch.float32)
    loras = [load_lora(p, backend.layer_table()) for p in paths]
    held_out = {i: encode(pipe.vae, to_tensor(concept_images(c, 4, seed=5000 + i))) for i, c in enumerate(CONCEPTS)}
    return diagnostics(lambda lora, latents, prompt: noise_predictions(
        backend, {} if lora is None else loras[lora].layers, held_out[latents],
        f"a picture of {CONCEPTS[prompt].token}", 7))


def uniform_weights(backend, groups: list, loras: list, held_out: dict, refs: References) -> list[dict]:
    """IterIS's fidelity per group with uniform concept weights instead of its adaptive ones (the
    paper's lambda_i): whether those weights decide which concept of a group is kept."""
    out = []
    for group in groups:
        tokens = [CONCEPTS[i].token for i in group]
        merged = merge(backend, [loras[i] for i in group], tokens, "iteris", adaptive_weights=False)
        scores = {CONCEPTS[i].token: fidelity(velocities(backend, merged, held_out[i],
                                                         f"a picture of {CONCEPTS[i].token}", 7),
                                              refs.own[i], refs.base[i]) for i in group}
        out.append({"group": "+".join(tokens), "fidelity": float(np.mean(list(scores.values()))),
                    "fidelity_min": float(min(scores.values())), "per_concept": scores})
    return out


# --- where IterIS leads --------------------------------------------------------------------------

def leaders(rows: list[dict]) -> list[dict]:
    """Per group: the method with the best mean fidelity, IterIS's, and the best other method's."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = {r["method"]: r for r in rows if r["group"] == group}
        others = {m: r for m, r in mine.items() if not m.startswith("iteris")}
        rival = max(others, key=lambda m: others[m]["fidelity"])
        best = max(mine, key=lambda m: mine[m]["fidelity"])
        out.append({"group": group, "best": best, "iteris": mine["iteris"]["fidelity"],
                    "iteris_min": mine["iteris"]["fidelity_min"], "rival": rival,
                    "rival_fidelity": others[rival]["fidelity"],
                    "margin": mine["iteris"]["fidelity"] - others[rival]["fidelity"],
                    "iteris_per_concept": mine["iteris"]["fidelity_per_concept"],
                    "rival_per_concept": others[rival]["fidelity_per_concept"]})
    return out


def per_concept(rows: list[dict]) -> list[dict]:
    """Per method: each concept's fidelity, averaged over the groups that hold it."""
    out = []
    for method in METHODS:
        scores = [r["fidelity_per_concept"] for r in rows if r["method"] == method]
        out.append({"method": method, **{c.token: float(np.mean([s[c.token] for s in scores if c.token in s]))
                                         for c in CONCEPTS}})
    return out


def leader_text(lead: list[dict], summary: list[dict]) -> str:
    """Plain sentences on where IterIS leads on fidelity (by the numbers, nothing else)."""
    overall = {e["method"]: e["fidelity"] for e in summary}
    rivals = {m: v for m, v in overall.items() if not m.startswith("iteris")}
    rival = max(rivals, key=rivals.get)
    ahead = [e for e in lead if e["margin"] > 0]
    text = (f"Overall, IterIS's mean fidelity is {overall['iteris']:.3f} against {rival}'s {rivals[rival]:.3f}, the best "
            f"other method: IterIS {'leads' if overall['iteris'] > rivals[rival] else 'does not lead'}. "
            f"It leads the other methods in {len(ahead)} of {len(lead)} groups.")
    behind = [e for e in lead if e["margin"] <= 0]
    if behind:
        text += " It does not lead in: " + "; ".join(
            f"{e['group']} ({e['rival']} {e['rival_fidelity']:.3f} vs {e['iteris']:.3f}; per concept IterIS "
            + ", ".join(f"{k} {v:.2f}" for k, v in e["iteris_per_concept"].items()) + f", {e['rival']} "
            + ", ".join(f"{k} {v:.2f}" for k, v in e["rival_per_concept"].items()) + ")" for e in behind) + "."
    return text


def why_text(rows: list[dict], uniform: list[dict], worlds: dict) -> str:
    """Sentences on what the diagnostics show about IterIS's fidelity here (numbers only; a cause
    is named as ruled out only when the numbers rule it out)."""
    def worst(method: str) -> float:
        return float(np.mean([r["fidelity_min"] for r in rows if r["method"] == method]))

    adaptive_mean = float(np.mean([r["fidelity"] for r in rows if r["method"] == "iteris"]))
    uniform_mean = float(np.mean([u["fidelity"] for u in uniform]))
    uniform_worst = float(np.mean([u["fidelity_min"] for u in uniform]))
    text = (f"Balance: the mean over groups of the worst concept's fidelity is {worst('iteris'):.3f} for IterIS, "
            f"{worst('linear'):.3f} for linear, {worst('regmean'):.3f} for regmean and {worst('ssr_iteris_samples'):.3f} "
            "for ssr_iteris_samples (per concept and group: the json's rows)")
    others = {m: worst(m) for m in METHODS if not m.startswith("iteris")}
    steadiest = max(others, key=others.get)
    if others[steadiest] > worst("iteris"):
        mine = [r["fidelity_per_concept"] for r in rows if r["method"] == "iteris"]
        lost = [min(scores, key=scores.get) for scores in mine]
        split = sum(1 for scores in mine if max(scores.values()) - min(scores.values()) > 0.3)
        counts = ", ".join(f"{token} in {lost.count(token)}" for token in dict.fromkeys(sorted(lost, key=lost.count,
                                                                                             reverse=True)))
        text += (f": on the worst concept of a group IterIS does not lead ({steadiest} does). In {split} of the {len(mine)} "
                 "groups IterIS's best and worst concept lie more than 0.3 apart (one kept, one lost); its worst "
                 f"concept is {counts} of the {len(lost)} groups. ")
    else:
        text += ": IterIS leads on the worst concept of a group too. "
    text += (f"Concept weights: with uniform weights IterIS's mean fidelity is {uniform_mean:.3f} (adaptive "
             f"{adaptive_mean:.3f}) and its mean worst concept {uniform_worst:.3f} (adaptive {worst('iteris'):.3f})")
    weights_matter = abs(uniform_worst - worst("iteris")) > 0.1
    text += (": the adaptive weights move which concept is kept." if weights_matter else
             ": the adaptive weights do not decide which concept is lost.")
    if worlds.get("sd1") is not None:
        def mean(world: str, key: str) -> float:
            return float(np.mean(list(worlds[world][key].values())))

        dit, sd1 = mean("dit", "prompt_selectivity"), mean("sd1", "prompt_selectivity")
        text += (f" Prompt specificity: a single LoRA moves other concepts' prompts {dit:.2f} as far as its own here "
                 f"and {sd1:.2f} in the SD1 world")
        text += (": the LoRAs are no less prompt-specific here, so that does not explain the gap between the worlds."
                 if dit - sd1 < 0.2 else ": the LoRAs here are less prompt-specific than the SD1 world's.")
        dit, sd1 = mean("dit", "relative_effect"), mean("sd1", "relative_effect")
        text += (f" Size: a single LoRA changes the predictions by {dit:.2f} of their squared norm here and by "
                 f"{sd1:.2f} in the SD1 world ({dit / sd1:.1f} times as much)")
        text += (": the concepts here are far larger edits of the model; whether that causes the gap, this bench "
                 "does not test." if dit > 2 * sd1 else ".")
    return text


# --- the run -----------------------------------------------------------------------------------

COLUMNS = [("method", "method"), ("fidelity", "fidelity"), ("fidelity_std", "±"),
           ("presence_own", "presence (own prompt)"), ("presence_own_std", "±"),
           ("presence_joint", "presence (joint prompt)"), ("presence_joint_std", "±"),
           ("crosstalk", "cross-talk"), ("crosstalk_std", "±"), ("merge_seconds", "merge s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps, pairs only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on cores shared with other jobs, two threads stall each "
                             "other at every kernel's barrier, here 10-50x slower than one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    spec = DitSpec()
    steps = ({"vae": SD1_STEPS["quick"]["vae"], "base": 600, "lora": 150} if args.quick
             else {"vae": SD1_STEPS["full"]["vae"], "base": 8000, "lora": 600})
    tag = f"seed{args.seed}_{spec.tag()}_" + "_".join(f"{k}{v}" for k, v in steps.items())
    pipe, base_record = trained_base(spec, steps, args.seed, CACHE / f"quality_dit_base_{tag}")
    losses, vae_source = base_record["losses"], base_record["vae"]
    print(f"base: loss {losses[0]:.3f} -> {np.mean(losses[-50:]):.3f} ({base_record['seconds']:.0f} s)", flush=True)
    vae = pipe.vae
    backend = dit_backend(pipe)
    folder = CACHE / f"quality_dit_loras_{tag}"
    targets, held_out, lora_files, lora_records = {}, {}, [], {}
    for index, concept in enumerate(CONCEPTS):
        targets[index] = concept_images(concept, 6, seed=1000 + index)
        held_out[index] = encode(vae, to_tensor(concept_images(concept, 4, seed=5000 + index)))
        record = folder / concept.token / "training.json"
        if not record.is_file():     # trained once per seed, steps and widths; reruns reuse the files
            train_concept_lora(pipe, concept, encode(vae, to_tensor(targets[index])), steps["lora"],
                               args.seed + index, folder)
        lora_records[concept.token] = json.loads(record.read_text())
        lora_files.append(folder / concept.token / "pytorch_lora_weights.safetensors")
    training = {"base": base_record["seconds"], "loras": sum(r["seconds"] for r in lora_records.values())}
    evaluation_started = time.perf_counter()
    print(f"LoRAs: {lora_records}", flush=True)
    loras = [read_concept_lora(backend, path) for path in lora_files]
    seeds = [9000, 9001, 9002, 9003]
    agreement = sampler_agreement(backend, loras[0].layers, f"a photo of {CONCEPTS[0].token}", seeds[:2])
    refs = references(backend, loras, held_out)
    singles = single_lora_presence(backend, vae, loras, targets, seeds)
    groups = list(itertools.combinations(range(len(CONCEPTS)), 2))
    if not args.quick:
        groups += list(itertools.combinations(range(len(CONCEPTS)), 3))
    rows, figure = [], {}
    for n, group in enumerate(groups):
        rows += evaluate_group(backend, vae, list(group), loras, held_out, targets, refs, seeds,
                               figure if n == 0 else None)
    worlds = {"dit": dit_diagnostics(backend, loras, held_out),
              "sd1": sd1_diagnostics(args.seed, SD1_STEPS["quick" if args.quick else "full"])}
    uniform = uniform_weights(backend, groups, loras, held_out, refs)
    summary = summarise(rows)
    by_size = {size: summarise(rows, size) for size in sorted({r["size"] for r in rows})}
    lead = leaders(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "quality_dit_quick" if args.quick else "quality_dit"
    grid = RESULTS / f"{name}_grid.png"
    save_grid(figure, grid)
    info = machine()
    evaluation = time.perf_counter() - evaluation_started
    this_run = time.perf_counter() - started
    result = {**info, "quick": args.quick, "seed": args.seed, "spec": asdict(spec), "training_steps": steps,
              "vae": vae_source, "sampler": {"steps": STEPS, "guidance": GUIDANCE, "shift": 1.0},
              "fidelity_sigmas": list(SIGMAS), "sampler_agreement_max_abs": agreement,
              "base_loss_first_last": [losses[0], float(np.mean(losses[-50:]))], "loras": lora_records,
              "concepts": [c.token for c in CONCEPTS], "single_lora_presence": singles, "groups": len(groups),
              "summary": summary, "summary_by_size": {str(size): entries for size, entries in by_size.items()},
              "leaders": lead, "per_concept": per_concept(rows),
              "diagnostics": worlds, "iteris_uniform_weights": uniform, "rows": rows,
              "seconds": {"base_training": training["base"], "lora_training": training["loras"],
                          "evaluation": evaluation, "this_run": this_run,
                          "total": training["base"] + training["loras"] + evaluation}}
    width = spec.heads * spec.head_dim
    markdown = (
        f"# Merge quality on a flow-matching DiT{' (quick run)' if args.quick else ''}\n\n"
        f"{machine_line(info)}, torch threads: {args.threads}; run time {result['seconds']['total'] / 60:.0f} minutes "
        f"(training the base {training['base'] / 60:.1f}, the LoRAs {training['loras'] / 60:.1f}, merging and "
        f"measuring {evaluation / 60:.1f}). "
        f"{len(CONCEPTS)} DreamBooth-style concept LoRAs (rank 8, transformer attention and MLPs of both streams "
        f"+ both CLIPs' attention, saved by diffusers' StableDiffusion3Pipeline.save_lora_weights, read by the "
        f"pack's DitBackend) on a small SD3-type MMDiT ({spec.blocks} joint blocks, width {width}, patch 2 on 8 x 8 "
        f"x 4 latents, two {spec.clip_layers}-layer CLIPs of width {spec.clip_width}, no T5) trained from random "
        f"init with the rectified-flow objective on the synthetic world of bench/quality.py ({steps['base']} steps; "
        f"VAE: {vae_source}); {len(groups)} groups ({'pairs' if args.quick else 'pairs and triples'}); held-out "
        f"latents, prompts and seeds; merges and images with flow-matching Euler, {STEPS} steps, CFG {GUIDANCE}. "
        "Mean and spread over groups. fidelity: velocity predictions at t = "
        f"{', '.join(str(s) for s in SIGMAS)}, 1 = the concept's own LoRA, 0 = the base model; presence: concept "
        "colour in generated images relative to its training images; cross-talk: 0 = prompts without the concept "
        "are untouched, 1 = moved as far as the concept's own LoRA would move them."
        f"{METHOD_NOTES}\n\n" + markdown_table(summary, COLUMNS) + "\n")
    names = {2: "Pairs", 3: "Triples"}
    for size, entries in by_size.items():
        count = sum(1 for g in groups if len(g) == size)
        markdown += f"\n## {names.get(size, f'Groups of {size}')} ({count} groups)\n\n" + markdown_table(entries, COLUMNS) + "\n"
    markdown += "\n## Where IterIS leads on fidelity\n\n" + leader_text(lead, summary) + "\n\n" + markdown_table(
        lead, [("group", "group"), ("best", "best method"), ("iteris", "iteris"), ("iteris_min", "iteris (worst concept)"),
               ("rival", "best other"), ("rival_fidelity", "its fidelity"), ("margin", "iteris - other")]) + "\n"
    concept_columns = [("method", "method")] + [(c.token, c.token) for c in CONCEPTS]
    markdown += ("\n## Fidelity per concept\n\nMean over the groups that hold the concept.\n\n"
                 + markdown_table(per_concept(rows), concept_columns) + "\n")
    adaptive = {r["group"]: r for r in rows if r["method"] == "iteris"}
    weights_rows = [{"group": u["group"], "adaptive": adaptive[u["group"]]["fidelity"],
                     "adaptive_min": adaptive[u["group"]]["fidelity_min"], "uniform": u["fidelity"],
                     "uniform_min": u["fidelity_min"]} for u in uniform]
    markdown += ("\n## IterIS's concept weights\n\nIterIS's fidelity with its adaptive concept weights (the "
                 "paper's lambda_i, the default) and with uniform ones; mean and worst concept of each group.\n\n"
                 + markdown_table(weights_rows, [("group", "group"), ("adaptive", "adaptive"),
                                                 ("adaptive_min", "adaptive, worst"), ("uniform", "uniform"),
                                                 ("uniform_min", "uniform, worst")]) + "\n")
    named = [("SD3-type DiT (this bench), velocity", worlds["dit"]),
             ("SD1-type UNet (bench/quality.py), noise", worlds["sd1"])]
    world_columns = [("world", "world")] + [(c.token, c.token) for c in CONCEPTS]
    markdown += ("\n## The single LoRAs in both worlds\n\nPrompt specificity: how far each concept's own LoRA "
                 "moves the model's predictions for another concept's prompt, relative to its own prompt (its "
                 "held-out latents, same noise; squared norms, mean over the other prompts): 0 = it acts on its own "
                 "prompt only, 1 = on any prompt alike.\n\n"
                 + markdown_table([{"world": name, **values["prompt_selectivity"]} for name, values in named
                                   if values is not None], world_columns)
                 + "\n\nSize: the squared norm of the LoRA's change of the predictions relative to the base "
                 "model's predictions (its own prompt and held-out latents).\n\n"
                 + markdown_table([{"world": name, **values["relative_effect"]} for name, values in named
                                   if values is not None], world_columns) + "\n")
    markdown += "\n## What the diagnostics say\n\n" + why_text(rows, uniform, worlds) + "\n"
    markdown += ("\n## Single LoRAs\n\nPresence of each concept under its own LoRA and under the base model (its "
                 "own prompt; relative to its training images, whose concept-colour fraction is given).\n\n"
                 + markdown_table(singles, [("concept", "concept"), ("training_images", "training images"),
                                            ("single_lora", "single LoRA"), ("base", "base")]) + "\n")
    markdown += f"\n![grid]({grid.name})\n"
    save_results(name, result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
