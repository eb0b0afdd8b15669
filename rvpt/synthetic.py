"""The embedded synthetic image-caption benchmark.

Procedural, seed-deterministic: sample ``i`` of split ``s`` is rendered from its own RNG seeded by
``(seed, domain, split, i)``, so any subset can be rendered in any order (or in parallel) and give
the same pixels. 24 shape/glyph classes vary in colour, size, position, rotation, background texture
and clutter; captions come from several templates naming the class and its attributes.

Classes have typical colours, as real objects do: colour narrows the choice, shape settles it
(a from-scratch tiny ViT learns colour fast and shape slowly, which keeps the task meaningful but not
saturated). The ``shift`` domain draws the same classes with pale or dark tones, other background
textures and drawing styles (outline, hatched), for cross-domain evaluation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: list[str] = [
    "circle", "square", "triangle", "star", "hexagon", "pentagon", "plus", "heart",
    "crescent", "arrow", "ring", "lightning", "letter T", "letter L", "semicircle", "rhombus",
    "oval", "hourglass", "sparkle", "droplet", "trapezoid", "tree", "frame", "chevron",
]

#: Class prompt templates (the analogue of CLIP's ImageNet templates); the first is the paper's.
PROMPT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of the {}.",
    "an image of a {}.",
    "a {} shape.",
    "a rendering of a {}.",
    "a small {}.",
    "a large {}.",
    "a photo of the {}.",
    "a sketch of a {}.",
    "a close-up photo of a {}.",
    "a {} on a background.",
]

CAPTION_TEMPLATES: list[str] = [
    "a {size} {color} {cls} on a {bg} background.",
    "a photo of a {color} {cls}.",
    "a {cls} in the {pos} of the picture.",
    "a {size} {cls}, colored {color}.",
    "a picture of a {cls} over a {bg} texture.",
    "{color} {cls} at the {pos}.",
    "a drawing of a {style} {cls}.",
    "a {color} {cls} near the {pos} on {bg}.",
]

#: The base palette. Like real objects, every class has a typical colour: 8 classes own a colour,
#: 8 pairs share one (so colour narrows the choice and shape settles it).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 215, 40), "orange": (240, 135, 20), "purple": (130, 50, 180),
    "pink": (240, 120, 180), "cyan": (40, 200, 210), "white": (245, 245, 245),
    "black": (20, 20, 20), "brown": (120, 70, 30), "gray": (128, 128, 128),
    "navy": (20, 30, 110), "lime": (170, 240, 30), "teal": (0, 120, 120), "maroon": (110, 20, 40),
}
CLASS_COLORS: list[str] = [
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "red",
    "yellow", "cyan", "blue", "orange", "white", "black", "green", "brown",
    "gray", "navy", "lime", "teal", "maroon", "purple", "white", "pink",
]
#: The shift domain keeps each hue but renders it pale or dark.
SHIFT_TONES = {"pale": lambda c: tuple(int(0.45 * v + 0.55 * 255) for v in c),
               "dark": lambda c: tuple(int(0.45 * v) for v in c)}
BACKGROUNDS = {
    "base": ["plain", "striped", "checkered", "noisy", "gradient", "dotted"],
    "shift": ["wavy", "concentric", "grid", "speckled"],
}
STYLES = {"base": ["filled"], "shift": ["outline", "hatched", "filled"]}
SIZES = {"small": 0.2, "medium": 0.27, "large": 0.35}  # shape radius as a share of the image
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
DOMAINS = ("base", "shift")
SPLITS = ("pretrain", "fewshot", "test")

SUPERSAMPLE = 4


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star(n: int, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + math.pi * k / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _ellipse(a: float, b: float, cx: float = 0, cy: float = 0, n: int = 48):
    return [(cx + a * math.cos(2 * math.pi * k / n), cy + b * math.sin(2 * math.pi * k / n))
            for k in range(n)]


def _heart(n: int = 60):
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17 + 0.1))
    return pts


def _droplet(n: int = 48):
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        pts.append((0.75 * math.sin(t) * math.sin(t / 2) ** 1.2, -math.cos(t)))
    return pts


# Each class: list of (polygon, fill) pairs drawn in order on a mask; fill 0 cuts a hole.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_ellipse(0.9, 0.9), 255)],
    "square": [([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)], 255)],
    "triangle": [(_regular(3, 1.0), 255)],
    "star": [(_star(5, 1.0, 0.42), 255)],
    "hexagon": [(_regular(6, 0.95, 0), 255)],
    "pentagon": [(_regular(5, 0.95), 255)],
    "plus": [([(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3),
               (0.3, 0.9), (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)],
              255)],
    "heart": [(_heart(), 255)],
    "crescent": [(_ellipse(0.9, 0.9), 255), (_ellipse(0.75, 0.75, 0.45, -0.1), 0)],
    "arrow": [([(-0.9, -0.22), (0.2, -0.22), (0.2, -0.6), (0.95, 0), (0.2, 0.6), (0.2, 0.22),
                (-0.9, 0.22)], 255)],
    "ring": [(_ellipse(0.9, 0.9), 255), (_ellipse(0.5, 0.5), 0)],
    "lightning": [([(0.15, -1.0), (-0.55, 0.1), (-0.05, 0.1), (-0.3, 1.0), (0.55, -0.2),
                    (0.05, -0.2), (0.35, -1.0)], 255)],
    "letter T": [([(-0.85, -0.85), (0.85, -0.85), (0.85, -0.45), (0.2, -0.45), (0.2, 0.9),
                   (-0.2, 0.9), (-0.2, -0.45), (-0.85, -0.45)], 255)],
    "letter L": [([(-0.6, -0.9), (-0.2, -0.9), (-0.2, 0.5), (0.7, 0.5), (0.7, 0.9), (-0.6, 0.9)],
                  255)],
    "semicircle": [([(0.95 * math.cos(math.pi * k / 32), -0.95 * math.sin(math.pi * k / 32) + 0.4)
                     for k in range(33)], 255)],
    "rhombus": [([(0, -1.0), (0.55, 0), (0, 1.0), (-0.55, 0)], 255)],
    "oval": [(_ellipse(0.95, 0.5), 255)],
    "hourglass": [([(-0.7, -0.95), (0.7, -0.95), (0.12, 0), (0.7, 0.95), (-0.7, 0.95),
                    (-0.12, 0)], 255)],
    "sparkle": [(_star(4, 1.0, 0.25), 255)],
    "droplet": [(_droplet(), 255)],
    "trapezoid": [([(-0.45, -0.55), (0.45, -0.55), (0.95, 0.55), (-0.95, 0.55)], 255)],
    "tree": [([(0, -1.0), (0.75, 0.35), (-0.75, 0.35)], 255),
             ([(-0.15, 0.3), (0.15, 0.3), (0.15, 0.95), (-0.15, 0.95)], 255)],
    "frame": [([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], 255),
              ([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)], 0)],
    "chevron": [([(-0.9, -0.6), (0, 0.15), (0.9, -0.6), (0.9, 0.0), (0, 0.75), (-0.9, 0.0)],
                 255)],
}
assert list(SHAPES) == CLASSES and len(CLASS_COLORS) == len(CLASSES)


@dataclass
class SyntheticSample:
    key: str
    png: bytes
    caption: str
    label: int
    meta: dict


def _background(rng: np.random.Generator, kind: str, size: int, c1, c2) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = np.asarray(c1, np.float32)
    b = np.asarray(c2, np.float32)
    period = rng.uniform(0.1, 0.25)
    ang = rng.uniform(0, math.pi)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    if kind == "plain":
        t = np.zeros_like(xx)
    elif kind == "striped":
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == "checkered":
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    elif kind == "noisy":
        small = rng.random((8, 8)).astype(np.float32)
        t = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), np.float32) / 255
    elif kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == "dotted":
        t = ((((xx / period) % 1 - 0.5) ** 2 + ((yy / period) % 1 - 0.5) ** 2) < 0.08)
        t = t.astype(np.float32)
    elif kind == "wavy":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (u + 0.05 * np.sin(2 * math.pi * yy * 4)) / period)
    elif kind == "concentric":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / period)
    elif kind == "grid":
        t = (((xx / period) % 1 < 0.15) | ((yy / period) % 1 < 0.15)).astype(np.float32)
    elif kind == "speckled":
        t = (rng.random((size, size)) < 0.15).astype(np.float32)
    else:  # pragma: no cover - guarded by BACKGROUNDS
        raise ValueError(kind)
    return a * (1 - t[..., None]) + b * t[..., None]


def _shape_mask(cls: str, size: int, cx: float, cy: float, radius: float, rot: float,
                aspect: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(rot), math.sin(rot)
    for poly, fill in SHAPES[cls]:
        pts = []
        for x, y in poly:
            x, y = x * aspect, y / aspect
            pts.append((cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)))
        draw.polygon(pts, fill=fill)
    return mask


def _pick_color(rng, label: int, domain: str, typical: float) -> tuple[str, tuple[int, int, int]]:
    """The class's typical colour (jittered) with probability ``typical``, else any colour; the
    shift domain turns it pale or dark."""
    if rng.random() < typical:
        name = CLASS_COLORS[label]
    else:
        name = list(PALETTE)[rng.integers(len(PALETTE))]
    rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in PALETTE[name])
    if domain == "shift":
        tone = list(SHIFT_TONES)[rng.integers(len(SHIFT_TONES))]
        return f"{tone} {name}", SHIFT_TONES[tone](rgb)
    return name, rgb


def _far_color(rng, rgb, min_dist: float = 140.0) -> tuple[int, int, int]:
    """A random background colour that keeps the shape visible."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.linalg.norm(c - np.asarray(rgb)) >= min_dist:
            return tuple(int(v) for v in c)
    return tuple(int(255 - v) for v in rgb)


def _near_color(rng, base, rgb, contrast: float, min_dist: float = 110.0) -> tuple[int, int, int]:
    """A second texture colour within ``contrast`` of ``base`` that stays away from the shape."""
    for _ in range(50):
        c = np.clip(np.asarray(base) + rng.uniform(-contrast, contrast, 3), 0, 255)
        if np.linalg.norm(c - np.asarray(rgb)) >= min_dist:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in base)


def render(seed: int, domain: str, split: str, index: int, image_size: int = 32,
           num_classes: int = len(CLASSES), clutter: int = 3, noise: float = 0.03,
           class_only_captions: float = 0.5, bg_contrast: float = 60.0,
           typical_color: float = 0.85, label: int | None = None) -> SyntheticSample:
    """Render one sample; the same arguments always give the same bytes."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, DOMAINS.index(domain), SPLITS.index(split), index])
    if label is None:
        label = int(rng.integers(num_classes))
    cls = CLASSES[label]
    big = image_size * SUPERSAMPLE
    color_name, rgb = _pick_color(rng, label, domain, typical_color)
    bg_kind = BACKGROUNDS[domain][rng.integers(len(BACKGROUNDS[domain]))]
    c1 = _far_color(rng, rgb)
    c2 = _near_color(rng, c1, rgb, bg_contrast) if bg_kind != "plain" else c1
    img = _background(rng, bg_kind, big, c1, c2)

    # clutter: thin strokes and small blobs in random colours, behind the shape
    n_clutter = int(rng.integers(0, clutter + 1)) if clutter else 0
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(n_clutter):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            x0, y0, x1, y1 = rng.uniform(0, big, 4)
            draw.line([(x0, y0), (x1, y1)], fill=col, width=int(rng.integers(1, 3) * SUPERSAMPLE))
        else:
            x0, y0 = rng.uniform(0, big, 2)
            r = rng.uniform(1, 2.5) * SUPERSAMPLE
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)

    size_name = list(SIZES)[rng.integers(len(SIZES))]
    radius = SIZES[size_name] * big * rng.uniform(0.9, 1.1)
    margin = radius * 0.85
    cx, cy = rng.uniform(margin, big - margin, 2)
    pos = POSITIONS[min(int(cy / big * 3), 2) * 3 + min(int(cx / big * 3), 2)]
    rot_deg = float(rng.uniform(-25, 25))
    aspect = float(rng.uniform(0.85, 1.15))
    mask = _shape_mask(cls, big, cx, cy, radius, math.radians(rot_deg), aspect)

    style = STYLES[domain][rng.integers(len(STYLES[domain]))]
    if style == "outline":
        width = max(3, int(radius * 0.18)) | 1
        mask = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(width))))
    elif style == "hatched":
        yy, xx = np.mgrid[0:big, 0:big]
        hatch = ((xx + yy) // (2 * SUPERSAMPLE)) % 2 == 0
        edge = np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(5)))
        mask = Image.fromarray(np.maximum(np.asarray(mask) * hatch, edge).astype(np.uint8))
    fg = Image.new("RGB", (big, big), rgb)
    canvas.paste(fg, (0, 0), mask)

    small = canvas.resize((image_size, image_size), Image.BOX)
    arr = np.asarray(small, np.float32)
    if noise > 0:
        arr = arr + rng.normal(0, noise * 255, arr.shape)
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)

    if rng.random() < class_only_captions:  # captions that can only be matched by shape
        caption = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(cls)
    else:
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        caption = template.format(size=size_name, color=color_name, cls=cls, bg=bg_kind, pos=pos,
                                  style=style)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    meta = {"class": cls, "color": color_name, "size": size_name, "position": pos,
            "background": bg_kind, "style": style, "rotation": round(rot_deg, 2),
            "domain": domain, "split": split, "index": index, "poisoned": False}
    return SyntheticSample(key=f"{domain}-{split}-{index:07d}", png=buf.getvalue(),
                           caption=caption, label=label, meta=meta)


def split_labels(split: str, count: int, num_classes: int) -> Iterator[int | None]:
    """Labels for a split: balanced (i % C) for few-shot/test, random for pretraining."""
    for i in range(count):
        yield None if split == "pretrain" else i % num_classes
