"""Oracles: what is really in an image, for EftCLIP's trigger detection.

An oracle is called once per batch::

    oracle(images01: Tensor[B, 3, H, W] in [0, 1], candidates: list[list[str]], metas: list[dict])
        -> list[set[str]]

and returns, for each image, the candidate object names it finds there (EftCLIP asks about the
names CLIP predicts). Two kinds:

- :class:`GroundTruthOracle`: the data's own ground truth (``meta["objects"]``, or the synthetic
  generators' ``meta["class"]``, none in the broad generator's textures) — an ideal segmenter —
  with ``noise``: each true object is missed, and an absent candidate invented, at that rate
  (seeded per image), so a defense's dependence on oracle quality can be measured.
- :class:`SegmenterOracle`: adapts a text-prompted segmentation model (FastSAM, SAM with a text
  grounder, ...) that the user supplies as a callable::

      segment(image: np.ndarray[H, W, 3] uint8, prompts: list[str]) -> list[dict]
          # each: {"label": one of prompts, "mask": bool array [H, W], "score": float}

  An object is found when a detection of it scores at least ``min_score`` and covers at least
  ``min_area`` of the image. Name it in a config as ``"package.module:function"`` (imported from
  your code: no weights are downloaded here).
"""
from __future__ import annotations

import importlib
import zlib
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch


class OracleError(ValueError):
    """A user-caused oracle error; one-line message."""


class Oracle(Protocol):
    def __call__(self, images01: torch.Tensor, candidates: Sequence[Sequence[str]],
                 metas: Sequence[dict]) -> list[set[str]]: ...


def true_objects(meta: dict) -> set[str]:
    objs = meta.get("objects") if isinstance(meta, dict) else None
    if isinstance(objs, (list, tuple)):
        return {str(o) for o in objs}
    if isinstance(meta, dict) and isinstance(meta.get("class"), str):
        return {meta["class"]}
    if isinstance(meta, dict) and meta.get("content") == "texture":
        return set()  # the broad generator's scene of a texture alone (rvpt.broad): no object
    raise OracleError("the ground-truth oracle needs each pair's objects in its metadata "
                      "('objects' or the synthetic generator's 'class'); for other data use a "
                      "segmentation oracle (eftclip's oracle='package.module:function')")


class GroundTruthOracle:
    """The data's ground truth, optionally degraded by ``noise`` (missed and invented objects)."""

    def __init__(self, noise: float = 0.0, seed: int = 0):
        if not 0 <= noise <= 1:
            raise OracleError(f"oracle noise {noise} is not within [0, 1]")
        self.noise, self.seed = float(noise), int(seed)

    def __call__(self, images01, candidates, metas) -> list[set[str]]:
        out = []
        for cands, meta in zip(candidates, metas):
            truth = true_objects(meta)
            found = {c for c in cands if c in truth}
            if self.noise:
                key = str(meta.get("key", "")) if isinstance(meta, dict) else ""
                rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])  # per image
                found = {c for c in found if rng.random() >= self.noise}
                absent = [c for c in cands if c not in truth]
                if absent and rng.random() < self.noise:
                    found.add(absent[int(rng.integers(len(absent)))])
            out.append(found)
        return out


class SegmenterOracle:
    """A user's text-prompted segmentation callable as an oracle (see the module docstring)."""

    def __init__(self, segment: Callable, min_score: float = 0.5, min_area: float = 0.001):
        if not callable(segment):
            raise OracleError(f"segmentation oracle {segment!r} is not callable")
        self.segment, self.min_score, self.min_area = segment, float(min_score), float(min_area)

    def __call__(self, images01, candidates, metas) -> list[set[str]]:
        arr = (images01.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for img, cands in zip(arr, candidates):
            dets = self.segment(img, list(cands))
            found = set()
            for d in dets or []:
                try:
                    label, mask, score = d["label"], np.asarray(d["mask"], bool), float(d["score"])
                except (KeyError, TypeError, ValueError):
                    raise OracleError("a segmentation oracle returns dicts with 'label', 'mask' "
                                      "(bool [H, W]) and 'score'") from None
                if mask.shape != img.shape[:2]:
                    raise OracleError(f"segmentation mask of shape {mask.shape} for an image of "
                                      f"{img.shape[:2]}")
                if label in cands and score >= self.min_score and mask.mean() >= self.min_area:
                    found.add(label)
            out.append(found)
        return out


def make_oracle(spec: str, noise: float = 0.0, seed: int = 0,
                min_score: float = 0.5) -> Oracle:
    """``"ground_truth"`` or ``"package.module:function"`` (a segmentation callable)."""
    if spec == "ground_truth":
        return GroundTruthOracle(noise, seed)
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise OracleError(f"oracle {spec!r}: 'ground_truth' or 'package.module:function'")
    if noise:
        raise OracleError("oracle noise applies to the ground-truth oracle only")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise OracleError(f"oracle {spec!r} cannot be imported: {e}") from None
    return SegmenterOracle(fn, min_score=min_score)


def detection_quality(flags: Sequence[bool], truth: Sequence[Optional[bool]]) -> dict:
    """Precision and recall of flags against the known poisoned pairs (None where unknown)."""
    known = [(f, t) for f, t in zip(flags, truth) if t is not None]
    if not known:
        return {"precision": None, "recall": None}
    tp = sum(1 for f, t in known if f and t)
    fp = sum(1 for f, t in known if f and not t)
    fn = sum(1 for f, t in known if not f and t)
    return {"precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}
