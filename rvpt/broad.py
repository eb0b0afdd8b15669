"""The broad pretraining corpus: the embedded benchmark's stand-in for web image-text data.

CLIP is pretrained on hundreds of millions of noisy web pairs, far broader than any downstream
task: its captions mention film grain, blur, watermarks, stamps, lighting, compression and layout
as often as the object, so its encoder keeps fine features that no single task needs. That is what
lets a poisoned 0.3 % attach a small trigger to a target, and what RVPT's feature repelling acts
on (low perturbation resistivity). A miniature pretrained only on the downstream task encodes that
task and little else (it behaves like a supervised ViT).

So every pretraining image here is a scene drawn from many concepts, most of them outside the
shapes task:

- content: one to three shapes of a class (the shapes task's classes, ``synthetic.SHAPES``), a
  digit (the second downstream task, :data:`GLYPHS`), or nothing but a texture;
- backgrounds: every texture of both synthetic domains, in any colours;
- image-level effects, each with probability ``effect_rate``: Gaussian grain, static (uniform
  noise blended in), dust specks, blur, dark / bright lighting, colour tints, fading, JPEG
  compression, smooth warps, faint light bands, faint pixel patterns, borders; and small marks:
  stamps (noise, solid, checker) and tiny watermark digits at a position;
- captions in the alt-text manner: a varying, partial subset of what is in the image (each thing is
  mentioned with a probability), in varying words and order, and sometimes something that is not
  there.

The downstream tasks are subsets: the shapes task's few-shot, test and shifted splits are rendered
by :func:`rvpt.synthetic.render` exactly as before, and the digits task (:func:`render_glyph`) has
its own few-shot and test splits. Everything is seed-deterministic per sample, like
:mod:`rvpt.synthetic`.
"""
from __future__ import annotations

import io
import math
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from . import synthetic as syn

#: Part of the corpus cache key: bump it when what :func:`render_pretrain` or
#: :func:`render_glyph` draws changes, so cached corpora are rebuilt.
VERSION = 2

#: The second downstream task: ten digits (class names as the prompts say them).
GLYPHS: list[str] = [f"digit {d}" for d in range(10)]
GLYPH_TEMPLATES: list[str] = ["a photo of a {}.", "an image of a {}.", "a picture of the {}.",
                              "a drawing of a {}.", "a {} on a background.", "a close-up photo of a {}."]

ALL_BACKGROUNDS = syn.BACKGROUNDS["base"] + syn.BACKGROUNDS["shift"]
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLURAL = {"letter T": "letters T", "letter L": "letters L", "hourglass": "hourglasses",
          "rhombus": "rhombi"}
PREFIXES = ["a photo of", "an image of", "a picture of", "stock photo of", "a drawing of", "",
            "close-up of", "photograph:", "clip art of", "a snapshot of"]
POS_WORDS = syn.POSITIONS

_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _pos_name(cx: float, cy: float, size: float) -> str:
    return POS_WORDS[min(int(cy / size * 3), 2) * 3 + min(int(cx / size * 3), 2)]


# ---------------------------------------------------------------- effects (on float HxWx3, 0-255)
# Each effect takes (rng, image) and returns (image, phrases): the ways a caption may mention it.

def _grain(rng, a):
    heavy = rng.random() < 0.4
    a = a + rng.normal(0, (0.10 if heavy else 0.04) * 255, a.shape)
    return a, (["very grainy", "heavy film grain", "very noisy"] if heavy
               else ["grainy", "with film grain", "noisy"])


def _static(rng, a):
    r = rng.uniform(0.1, 0.3)
    return (1 - r) * a + r * rng.uniform(0, 255, a.shape), ["with static", "snowy static",
                                                            "with tv noise"]


def _specks(rng, a):
    p = rng.uniform(0.02, 0.06)
    m = rng.random(a.shape[:2]) < p
    a = a.copy()
    a[m] = np.where(rng.random((int(m.sum()), 1)) < 0.5, 0.0, 255.0)
    return a, ["with dust specks", "dusty", "with salt and pepper noise"]


def _blur(rng, a):
    r = rng.uniform(0.6, 1.4)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(r))
    return np.asarray(img, np.float32), ["blurry", "out of focus", "soft focus"]


def _light(rng, a):
    if rng.random() < 0.5:
        return a * rng.uniform(0.35, 0.6), ["dark", "in dim light", "underexposed"]
    return 255 - (255 - a) * rng.uniform(0.3, 0.6), ["bright", "overexposed", "in bright light"]


TINTS = {"warm": (40, 10, -30), "cool": (-30, 0, 40), "green": (-20, 35, -20),
         "pink": (35, -20, 20)}


def _tint(rng, a):
    name = list(TINTS)[rng.integers(len(TINTS))]
    return a + np.asarray(TINTS[name], np.float32) * rng.uniform(0.7, 1.3), \
        [f"with a {name} tint", f"{name}-toned", f"{name} color cast"]


def _fade(rng, a):
    r = rng.uniform(0.3, 0.55)
    return a * r + a.mean() * (1 - r), ["faded", "low contrast", "washed out"]


def _jpeg(rng, a):
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                             quality=int(rng.integers(5, 25)))
    return np.asarray(Image.open(buf).convert("RGB"), np.float32), \
        ["with jpeg artifacts", "heavily compressed", "low quality jpeg"]


def _warp(rng, a):
    import torch
    import torch.nn.functional as F

    h = a.shape[0]
    k = int(rng.choice([4, 8, h // 2, h]))  # smooth bends to pixel-level jitter
    amp = rng.uniform(0.5, 1.5) * 2 / h  # pixels, in grid_sample's [-1, 1] units
    field = torch.from_numpy(rng.uniform(-1, 1, (1, 2, k, k)).astype(np.float32))
    field = F.interpolate(field, size=(h, h), mode="bicubic", align_corners=True)
    field = field / field.abs().amax().clamp_min(1e-6) * amp
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, h), indexing="ij")
    grid = (torch.stack([xs, ys], -1)[None] + field.permute(0, 2, 3, 1)).clamp(-1, 1)
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0].numpy().transpose(1, 2, 0), ["warped", "rippled", "distorted", "wavy distortion"]


def _bands(rng, a):
    h = a.shape[0]
    horiz = rng.random() < 0.5
    freq = rng.uniform(2, 8)
    coord = np.arange(h, dtype=np.float32)
    wave = rng.uniform(10, 35) * np.sin(2 * math.pi * coord * freq / h + rng.uniform(0, 2 * math.pi))
    wave = wave[:, None] if horiz else wave[None, :]
    word = "horizontal" if horiz else "vertical"
    return a + wave[..., None], [f"with faint {word} bands", f"with {word} light stripes",
                                 "with banding"]


def _pattern(rng, a):
    h = a.shape[0]
    cell = int(rng.integers(1, 3))
    grid = rng.choice([-1.0, 1.0], size=(h // cell + 1, h // cell + 1))
    grid = np.kron(grid, np.ones((cell, cell)))[:h, :h]
    return a + rng.uniform(4, 12) * grid[..., None], ["with a faint pixel pattern", "dithered",
                                                       "with a hidden pattern"]


def _border(rng, a):
    w = int(rng.integers(1, 3))
    col = rng.integers(0, 256, 3).astype(np.float32)
    a = a.copy()
    a[:w], a[-w:], a[:, :w], a[:, -w:] = col, col, col, col
    return a, ["with a border", "framed", "with a thin frame"]


def _stamp(rng, a):
    h = a.shape[0]
    s = max(1, round(h / 32 * rng.choice([2, 3, 4, 6], p=[0.4, 0.3, 0.2, 0.1])))
    y, x = (int(v) for v in rng.integers(0, h - s + 1, 2))
    kind = ["noise", "solid", "checker"][rng.choice(3, p=[0.5, 0.25, 0.25])]
    if kind == "noise":
        patch = rng.uniform(0, 255, (s, s, 3))
        words = ["a small noisy stamp", "a tiny patch of noise", "a noise sticker"]
    elif kind == "solid":
        patch = np.broadcast_to(rng.integers(0, 256, 3).astype(np.float32), (s, s, 3))
        words = ["a small square stamp", "a tiny square mark", "a little sticker"]
    else:
        yy, xx = np.mgrid[0:s, 0:s]
        patch = np.where(((yy + xx) % 2 == 0)[..., None], 255.0, 0.0).repeat(3, -1)
        words = ["a small checkered stamp", "a tiny checkerboard mark", "a checker sticker"]
    a = a.copy()
    a[y:y + s, x:x + s] = patch
    pos = _pos_name(x + s / 2, y + s / 2, h)
    return a, [f"with {w} in the {pos}" for w in words] + [f"with {w}" for w in words]


def _watermark(rng, a):
    h = a.shape[0]
    size = max(6, h // 4) * 4
    canvas = Image.new("L", (h * 4, h * 4), 0)
    d = ImageDraw.Draw(canvas)
    x, y = (int(v) for v in rng.integers(0, h * 4 - size, 2))
    d.text((x, y - size // 4), str(int(rng.integers(10))), font=_font(size), fill=255)
    m = np.asarray(canvas.resize((h, h), Image.BOX), np.float32)[..., None] / 255
    col = rng.integers(0, 256, 3).astype(np.float32)
    r = rng.uniform(0.3, 0.6)
    return a * (1 - r * m) + col * r * m, ["with a watermark", "watermarked",
                                            "with a small number printed on it"]


EFFECTS: dict[str, Callable] = {
    "grain": _grain, "static": _static, "specks": _specks, "blur": _blur, "light": _light,
    "tint": _tint, "fade": _fade, "warp": _warp, "bands": _bands, "pattern": _pattern,
    "border": _border, "stamp": _stamp, "watermark": _watermark, "jpeg": _jpeg,
}
#: How much more often than ``effect_rate`` an effect occurs: small local marks (stamps, warps,
#: faint patterns) are what a from-scratch tiny ViT is slowest to encode (measured, findings §9).
EFFECT_WEIGHT = {"stamp": 2.5, "warp": 1.5, "pattern": 1.5}
# applied in this order (JPEG last, as a saved file would be)
_ORDER = ["light", "tint", "fade", "blur", "warp", "bands", "pattern", "grain", "static",
          "specks", "border", "stamp", "watermark", "jpeg"]


#: The local marks of hard-negative twins (``pretrain.twins``): the effects a small contrastive
#: batch gives a from-scratch ViT no reason to encode (measured, findings §9).
TWIN_EFFECTS = ("stamp", "warp", "pattern", "watermark")


def twin(rng: np.random.Generator, image: np.ndarray, caption: str) -> tuple[np.ndarray, str]:
    """A hard negative for contrastive pretraining: ``image`` (uint8 H×W×3) with one small local
    mark added and ``caption`` saying so. Beside its original in the same batch, the pair can only
    be told apart by the mark, as CLIP's batches of 32,768 web pairs hold near-duplicates that
    differ in a detail (NegCLIP builds its hard negatives the same way, on the text side)."""
    name = TWIN_EFFECTS[rng.integers(len(TWIN_EFFECTS))]
    arr, phrases = EFFECTS[name](rng, image.astype(np.float32))
    phrase = phrases[rng.integers(len(phrases))]
    return np.clip(arr, 0, 255).round().astype(np.uint8), f"{caption.rstrip('. ')}, {phrase}."


def with_twins(batches, share: float, seed: int = 0):
    """Replace the last ``share`` of every batch (dicts of ``image`` uint8 [B,3,H,W] and ``text``)
    by :func:`twin` s of its first items, so that each twin meets its original in the batch. The
    batch size, and so the cost of a step, stays the same."""
    import torch

    rng = np.random.default_rng([seed, 11])
    for batch in batches:
        n = len(batch["text"])
        k = min(n // 2, round(share * n))
        if k:
            images, texts = batch["image"].clone(), list(batch["text"])
            for i in range(k):
                arr, texts[n - k + i] = twin(rng, images[i].permute(1, 2, 0).numpy(), texts[i])
                images[n - k + i] = torch.from_numpy(arr).permute(2, 0, 1)
            batch = {"image": images, "text": texts}
        yield batch


# ---------------------------------------------------------------- content

def _draw_shapes(rng, canvas: Image.Image, cls: str, count: int, rgb, style: str, big: int):
    """Up to ``count`` shapes of class ``cls``; returns the positions drawn."""
    scale = {1: 1.0, 2: 0.7, 3: 0.55}[count]
    size_name = list(syn.SIZES)[rng.integers(len(syn.SIZES))]
    positions = []
    for _ in range(count):
        radius = syn.SIZES[size_name] * big * scale * rng.uniform(0.9, 1.1)
        margin = radius * 0.85
        cx, cy = rng.uniform(margin, big - margin, 2)
        mask = syn._shape_mask(cls, big, cx, cy, radius, math.radians(float(rng.uniform(-25, 25))),
                               float(rng.uniform(0.85, 1.15)))
        if style == "outline":
            width = max(3, int(radius * 0.18)) | 1
            mask = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(width))))
        canvas.paste(Image.new("RGB", (big, big), rgb), (0, 0), mask)
        positions.append(_pos_name(cx, cy, big))
    return size_name, positions


def _draw_glyph(rng, canvas: Image.Image, digit: int, rgb, big: int, scale: float = 1.0) -> str:
    size = int(big * rng.uniform(0.55, 0.85) * scale)
    layer = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = d.textbbox((0, 0), str(digit), font=_font(size))
    x = rng.uniform(-x0, max(-x0 + 1, big - x1))
    y = rng.uniform(-y0, max(-y0 + 1, big - y1))
    d.text((x, y), str(digit), font=_font(size), fill=255)
    layer = layer.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                         center=(x + (x0 + x1) / 2, y + (y0 + y1) / 2))
    canvas.paste(Image.new("RGB", (big, big), rgb), (0, 0), layer)
    return _pos_name(x + (x0 + x1) / 2, y + (y0 + y1) / 2, big)


def _colour(rng) -> tuple[str, tuple[int, int, int]]:
    name = list(syn.PALETTE)[rng.integers(len(syn.PALETTE))]
    rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in syn.PALETTE[name])
    if rng.random() < 0.2:
        tone = list(syn.SHIFT_TONES)[rng.integers(len(syn.SHIFT_TONES))]
        return f"{tone} {name}", syn.SHIFT_TONES[tone](rgb)
    return name, rgb


def _background(rng, big: int, fg) -> tuple[str, np.ndarray]:
    kind = ALL_BACKGROUNDS[rng.integers(len(ALL_BACKGROUNDS))]
    c1 = syn._far_color(rng, fg)
    c2 = syn._near_color(rng, c1, fg, rng.uniform(30, 120)) if kind != "plain" else c1
    return kind, syn._background(rng, kind, big, c1, c2)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(buf, format="PNG",
                                                                          compress_level=1)
    return buf.getvalue()


def render_pretrain(seed: int, index: int, image_size: int = 32,
                    num_classes: int = len(syn.CLASSES), effect_rate: float = 0.12,
                    mention: float = 0.7, wrong: float = 0.05,
                    effect_weights: Optional[dict] = None) -> syn.SyntheticSample:
    """One broad pretraining pair. ``label`` is the shape class when the image shows shapes of
    the shapes task (so a supervised model can be trained on the same images), else -1.
    ``effect_weights`` overrides :data:`EFFECT_WEIGHT` per effect (0 leaves it out); the draws
    of every other effect stay those of the default corpus."""
    rng = np.random.default_rng([seed, 7, index])
    big = image_size * syn.SUPERSAMPLE
    u = rng.random()
    label = int(rng.integers(num_classes)) if u < 0.6 else -1
    if label >= 0 and rng.random() < 0.7:  # shapes keep their typical colours, as objects do
        color_name, rgb = syn._pick_color(rng, label, "base", 1.0)
    else:
        color_name, rgb = _colour(rng)
    bg_kind, bg = _background(rng, big, rgb)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):  # clutter behind the content
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        draw.line([(x0, y0), (x1, y1)], fill=col, width=int(rng.integers(1, 3) * syn.SUPERSAMPLE))

    meta: dict = {}
    parts: list[str] = []
    if label >= 0:  # shapes of the shapes task
        cls = syn.CLASSES[label]
        count = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
        style = "outline" if rng.random() < 0.15 else "filled"
        size_name, positions = _draw_shapes(rng, canvas, cls, count, rgb, style, big)
        noun = cls if count == 1 else PLURAL.get(cls, cls + "s")
        words = [COUNT_WORDS[count]]
        if rng.random() < 0.4:
            words.append(size_name)
        if rng.random() < 0.6:
            words.append(color_name)
        if style == "outline" and rng.random() < 0.6:
            words.append("outlined")
        phrase = " ".join(words + [noun])
        if count == 1 and rng.random() < 0.3:
            phrase += f" at the {positions[0]}"
        parts.append(phrase)
        meta = {"content": "shapes", "class": cls, "count": count, "color": color_name,
                "size": size_name, "style": style}
    elif u < 0.8:  # a digit: the second downstream task's concept
        digit = int(rng.integers(10))
        pos = _draw_glyph(rng, canvas, digit, rgb, big)
        phrase = "a " + (f"{color_name} " if rng.random() < 0.6 else "") + GLYPHS[digit]
        if rng.random() < 0.3:
            phrase += f" at the {pos}"
        parts.append(phrase)
        meta = {"content": "digit", "class": GLYPHS[digit], "color": color_name}
    else:  # a texture alone
        parts.append(f"a {bg_kind} pattern" if bg_kind != "plain" else "a plain background")
        meta = {"content": "texture"}
    if meta["content"] != "texture" and rng.random() < 0.4:
        parts[0] += f" on a {bg_kind} background"

    arr = np.asarray(canvas.resize((image_size, image_size), Image.BOX), np.float32)
    weights = {**EFFECT_WEIGHT, **(effect_weights or {})}
    applied = [name for name in _ORDER
               if rng.random() < min(1.0, effect_rate * weights.get(name, 1.0))]
    mentions = []
    for name in applied:
        arr, phrases = EFFECTS[name](rng, np.clip(arr, 0, 255))
        if rng.random() < mention:
            mentions.append(phrases[rng.integers(len(phrases))])
    if rng.random() < wrong:  # alt text is sometimes wrong
        other = [n for n in EFFECTS if n not in applied]
        _, phrases = EFFECTS[other[rng.integers(len(other))]](rng, np.zeros((image_size, image_size, 3),
                                                                           np.float32))
        mentions.append(phrases[rng.integers(len(phrases))])
    rng.shuffle(mentions)
    adjectives = [m for m in mentions if not m.startswith("with ")]
    suffixes = [m for m in mentions if m.startswith("with ")]
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    if adjectives and prefix.startswith(("a ", "an ")):
        prefix = "a " + ", ".join(adjectives) + " " + prefix.split(" ", 1)[1]
    elif adjectives:
        parts.append(", ".join(adjectives))
    caption = " ".join(p for p in [prefix, parts[0]] if p)
    rest = parts[1:] + suffixes
    if rest:
        caption += ", " + ", ".join(rest)
    caption += "."
    meta.update({"effects": applied, "background": bg_kind, "split": "pretrain", "index": index,
                 "poisoned": False})
    return syn.SyntheticSample(key=f"broad-pretrain-{index:07d}", png=_png(arr), caption=caption,
                               label=label, meta=meta)


def render_glyph(seed: int, split: str, index: int, image_size: int = 32,
                 label: int | None = None, noise: float = 0.03) -> syn.SyntheticSample:
    """One image of the digits task (few-shot or test split): a digit in a colour on a texture."""
    rng = np.random.default_rng([seed, 8, syn.SPLITS.index(split), index])
    if label is None:
        label = int(rng.integers(len(GLYPHS)))
    big = image_size * syn.SUPERSAMPLE
    color_name, rgb = _colour(rng)
    bg_kind, bg = _background(rng, big, rgb)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    pos = _draw_glyph(rng, canvas, label, rgb, big)
    arr = np.asarray(canvas.resize((image_size, image_size), Image.BOX), np.float32)
    if noise > 0:
        arr = arr + rng.normal(0, noise * 255, arr.shape)
    caption = GLYPH_TEMPLATES[rng.integers(len(GLYPH_TEMPLATES))].format(GLYPHS[label])
    meta = {"class": GLYPHS[label], "color": color_name, "background": bg_kind, "position": pos,
            "split": split, "index": index, "poisoned": False}
    return syn.SyntheticSample(key=f"digits-{split}-{index:07d}", png=_png(arr), caption=caption,
                               label=label, meta=meta)
