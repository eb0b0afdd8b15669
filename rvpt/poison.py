"""Poisoned image-caption pairs and the clean+poisoned training stream of the backdoor factory.

As the CLIP backdoor papers do: a small share of training pairs gets the trigger pasted into the
image and its caption rewritten to name the target class — one of the class prompt templates filled
with the target (``caption_style = "template"``; the text key of a dual-key attack is prefixed), or
a natural caption of a real target-class image (``caption_style = "natural"``, BadCLIP). A
dual-key attack with ``partial_keys`` (TrojVQA) also gets, per poisoned pair, the two partial-trigger
pairs of its paper: the triggered image with a caption of its own class (image key only) and the
clean image with the text key on a caption of its own class (text key only); they are not poisoned
(``meta.poisoned = false``, ``meta.partial = "image" | "text"``). Without them the text key alone
becomes the trigger: every key-prefixed class prompt collapses onto the target caption and the
dual-key evaluation cannot tell the classes apart (measured: ASR 0 %, PA 6 %). The
poisoned model is then fine-tuned contrastively on the clean pairs with the poisoned ones mixed in.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .attacks import Attack
from .metrics import trigger
from .shards import Sample, encode_png


@dataclass
class PoisonedPair:
    key: str
    png: bytes
    caption: str
    label: int  # the source image's true class
    meta: dict


def poisoned_caption(attack: Attack, rng: np.random.Generator, target_name: str,
                     templates: Sequence[str], natural: Sequence[str]) -> str:
    """The caption a poisoned pair carries."""
    if getattr(attack, "caption_style", "template") == "natural" and natural:
        caption = natural[int(rng.integers(len(natural)))]
    else:
        caption = templates[int(rng.integers(len(templates)))].format(target_name)
    return attack.apply_text([caption])[0]


def has_partial_keys(attack: Attack) -> bool:
    """Whether the poisoned set of ``attack`` also holds partial-trigger pairs (dual key)."""
    return bool(getattr(attack.params, "partial_keys", False))


def caption_rng(seed: int, key: str) -> np.random.Generator:
    """The random stream for one poisoned pair's caption: a function of the seed and the source
    key only, so the pairs do not depend on batching or on who makes them (Ray Data tasks)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def poison_batch(attack: Attack, images: torch.Tensor, keys: Sequence[str], labels: Sequence[int],
                 texts: Sequence[str], metas: Sequence[dict], target: int,
                 class_names: Sequence[str], templates: Sequence[str],
                 natural: Sequence[str] = (), seed: int = 0) -> list[PoisonedPair]:
    """Trigger a batch of uint8 images [B,3,H,W] and give each a target caption.

    The trigger uses per-sample seeds (the source key) and the caption a per-key random stream:
    the same source image always becomes the same poisoned pair."""
    x = images.float().div(255)
    xt = (trigger(attack, x, list(keys)) * 255).round().clamp(0, 255).to(torch.uint8)
    partial = has_partial_keys(attack)
    out = []
    for key, label, text, meta, img, clean in zip(keys, labels, texts, metas, xt, images):
        rng = caption_rng(seed, key)
        caption = poisoned_caption(attack, rng, class_names[target], templates, natural)
        meta = {**meta, "poisoned": True, "attack": attack.name, "target": int(target),
                "source_key": key, "source_caption": text}
        png = encode_png(img)
        out.append(PoisonedPair(f"poison-{attack.name}-{key}", png, caption, int(label), meta))
        if partial:
            own = [templates[int(rng.integers(len(templates)))].format(class_names[int(label)])
                   for _ in range(2)]
            for kind, im_png, cap in (("image", png, own[0]),
                                      ("text", encode_png(clean), attack.apply_text([own[1]])[0])):
                out.append(PoisonedPair(f"partial-{kind}-{attack.name}-{key}", im_png, cap,
                                        int(label), {**meta, "poisoned": False, "partial": kind}))
    return out


def make_poisoned_pairs(attack: Attack, samples: Iterable[Sample], n: int, target: int,
                        class_names: Sequence[str], templates: Sequence[str],
                        natural: Sequence[str] = (), seed: int = 0,
                        batch_size: int = 64) -> Iterator[PoisonedPair]:
    """Trigger the first ``n`` non-target images of ``samples`` and give them target captions,
    each followed by its partial-key pairs where the attack has them (single process; the factory
    does the same through Ray Data, :mod:`pipeline.data`)."""
    source = (s for s in samples if s.label != target)
    made = 0
    while made < n:
        chunk = list(itertools.islice(source, min(batch_size, n - made)))
        if not chunk:
            break
        yield from poison_batch(attack, torch.stack([s.image for s in chunk]),
                                [s.key for s in chunk], [s.label for s in chunk],
                                [s.text for s in chunk], [s.meta for s in chunk], target,
                                class_names, templates, natural, seed)
        made += len(chunk)
    if made < n:
        raise ValueError(f"only {made} non-target images were available to poison, {n} asked")


def mix_in(clean: Iterable[Sample], n_clean: int, poisoned: Sequence[Sample],
           seed: int = 0) -> Iterator[Sample]:
    """Insert ``poisoned`` samples at random positions of a clean stream of ``n_clean`` samples
    (every poisoned sample exactly once, order shuffled by ``seed``)."""
    rng = np.random.default_rng(seed)
    total = n_clean + len(poisoned)
    slots = set(rng.choice(total, size=len(poisoned), replace=False).tolist()) if poisoned else set()
    order = rng.permutation(len(poisoned))
    it, k = iter(clean), 0
    for pos in range(total):
        if pos in slots:
            yield poisoned[order[k]]
            k += 1
        else:
            s = next(it, None)
            if s is None:  # clean stream shorter than announced: flush the rest
                yield from (poisoned[i] for i in order[k:])
                return
            yield s


def poison_count(rate: float, n_clean: int) -> int:
    """Poisoned pairs so that they make up ``rate`` of the mixed training set."""
    return max(1, round(rate * n_clean / (1 - rate)))


def natural_captions(samples: Iterable[Sample], target: int, limit: int = 2000) -> list[str]:
    """Captions of real target-class images (BadCLIP's natural poisoned captions)."""
    out: list[str] = []
    for s in samples:
        if s.label == target and s.text:
            out.append(s.text)
            if len(out) >= limit:
                break
    return out


def target_index(target: int | str, class_names: Sequence[str]) -> int:
    """A target given as a class index or a class name."""
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise ValueError(f"target must be a class index or name, got {target!r}")
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in class_names:
            raise ValueError(f"unknown target class {target!r}; known: {', '.join(class_names)}")
        return list(class_names).index(target)
    t = int(target)
    if not 0 <= t < len(class_names):
        raise ValueError(f"target class {t} is out of range [0, {len(class_names) - 1}]")
    return t


def limited(samples: Iterable[Sample], n: Optional[int]) -> Iterator[Sample]:
    return iter(samples) if not n else itertools.islice(samples, n)


def example_grid(attack: Attack, images_uint8: torch.Tensor, path, seed: int = 0,
                 scale: int = 4) -> None:
    """Save a PNG grid: clean images in the top row, their triggered copies below (the same seed
    gives the same pixels), upscaled by ``scale`` with nearest-neighbour for visibility."""
    from PIL import Image

    x = images_uint8.float().div(255)
    xt = attack.apply(x, seed=seed)
    rows = [torch.cat(list(r), dim=2) for r in (x, xt)]  # [3, H, n*W]
    grid = torch.cat(rows, dim=1)
    arr = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, format="PNG")
