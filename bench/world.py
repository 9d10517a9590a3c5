"""A seeded synthetic world for the quality benchmark: coloured, textured shapes with captions, and
concept instances in colours the world never shows (so a concept's presence in an image can be
read off its pixels)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
WORLD_COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 60), "yellow": (220, 200, 40),
                 "white": (235, 235, 235), "black": (25, 25, 25)}
TEXTURES = ("plain", "striped", "dotted", "checkered")


@dataclass(frozen=True)
class ConceptSpec:
    """A DreamBooth concept: a rare token bound to one shape, colour and texture."""

    token: str
    shape: str
    colour: tuple[int, int, int]
    texture: str
    colour_name: str


CONCEPTS = (
    ConceptSpec("sks", "circle", (230, 40, 210), "striped", "magenta"),
    ConceptSpec("zwx", "square", (20, 180, 175), "dotted", "teal"),
    ConceptSpec("qlo", "triangle", (245, 140, 20), "plain", "orange"),
    ConceptSpec("vrt", "diamond", (150, 235, 40), "checkered", "lime"),
)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3, "diamond": 4}[shape]
    offset = angle + (math.pi / 4 if shape == "square" else 0.0)
    return [(cx + r * math.cos(offset + 2 * math.pi * k / corners), cy + r * math.sin(offset + 2 * math.pi * k / corners))
            for k in range(corners)]


def _mask(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(image, dtype=np.float32) / 255.0


def _texture(texture: str, phase: int) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if texture == "striped":
        return ((x + y + phase) // 3 % 2).astype(np.float32)
    if texture == "dotted":
        return (((x + phase) % 5 < 3) & ((y + phase) % 5 < 3)).astype(np.float32)
    if texture == "checkered":
        return (((x + phase) // 4 + (y + phase) // 4) % 2).astype(np.float32)
    return np.ones((SIZE, SIZE), dtype=np.float32)


def render(shape: str, colour: tuple[int, int, int], texture: str, rng: random.Random) -> np.ndarray:
    """One image (SIZE x SIZE x 3, floats in [0, 1]): a textured shape on a grey background."""
    grey = rng.uniform(0.55, 0.8)
    image = np.full((SIZE, SIZE, 3), grey, dtype=np.float32)
    image += np.asarray([rng.uniform(-0.03, 0.03) for _ in range(3)], dtype=np.float32)
    r = rng.uniform(0.22, 0.34) * SIZE
    cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
    mask = _mask(shape, cx, cy, r, rng.uniform(-0.3, 0.3))
    pattern = _texture(texture, rng.randrange(8))
    base = np.asarray(colour, dtype=np.float32) / 255.0
    shade = base * 0.55                               # texture: the colour alternates with a darker shade
    fill = pattern[..., None] * base + (1 - pattern[..., None]) * shade
    image = image * (1 - mask[..., None]) + fill * mask[..., None]
    return np.clip(image, 0.0, 1.0)


def world_sample(rng: random.Random) -> tuple[np.ndarray, str]:
    """A random world image and its caption, e.g. ("...", "a red striped circle")."""
    shape, texture = rng.choice(SHAPES), rng.choice(TEXTURES)
    name, colour = rng.choice(list(WORLD_COLOURS.items()))
    words = {"plain": "", "striped": "striped ", "dotted": "dotted ", "checkered": "checkered "}[texture]
    return render(shape, colour, texture, rng), f"a {name} {words}{shape}"


def any_colour_sample(rng: random.Random) -> np.ndarray:
    """A shape in an arbitrary colour: what the VAE learns from, so that it can draw any colour
    (the UNet's world keeps to its palette; the concepts' colours are new only to the UNet)."""
    colour = tuple(rng.randrange(256) for _ in range(3))
    return render(rng.choice(SHAPES), colour, rng.choice(TEXTURES), rng)


def concept_images(concept: ConceptSpec, count: int, seed: int) -> list[np.ndarray]:
    rng = random.Random(seed)
    return [render(concept.shape, concept.colour, concept.texture, rng) for _ in range(count)]


def _palette() -> tuple[list[str], np.ndarray]:
    """Every colour the world and the concepts use, with their texture shades, and the backgrounds."""
    names, colours = [], []
    for name, colour in [*WORLD_COLOURS.items(), *((c.token, c.colour) for c in CONCEPTS)]:
        for factor in (1.0, 0.55):
            names.append(name)
            colours.append(np.asarray(colour, dtype=np.float32) / 255.0 * factor)
    for grey in (0.55, 0.65, 0.75, 0.85):
        names.append("background")
        colours.append(np.full(3, grey, dtype=np.float32))
    return names, np.stack(colours)


PALETTE_NAMES, PALETTE = _palette()


def colour_presence(image: np.ndarray, concept: ConceptSpec) -> float:
    """Fraction of pixels whose nearest palette colour is the concept's (or its texture shade):
    tolerant of a colour the model renders imperfectly, strict about mistaking it for another."""
    distances = np.linalg.norm(image[..., None, :] - PALETTE, axis=-1)
    nearest = np.asarray(PALETTE_NAMES)[distances.argmin(axis=-1)]
    return float((nearest == concept.token).mean())


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
