"""Backdoor metrics over batches: CA, ASR, ASR_all and PA, as summable counts.

- ``ca``: top-1 zero-shot accuracy on clean images.
- ``asr``: share of triggered images classified as the target, images of the target class excluded.
- ``asr_all``: the same with target-class images included.
- ``pa``: accuracy of triggered images against their true labels.

Every function returns counts beside the rates, so results computed on parts of the data (workers,
shards) are combined with :func:`merge_counts` then :func:`rates`.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Optional

import torch

from .models import LoadedClip
from .zeroshot import predict

COUNT_KEYS = ("n", "correct", "n_trig", "hit_all", "n_nontarget", "hit_nontarget", "pa_correct")


def key_seed(key: str) -> int:
    """A trigger seed that depends only on the sample's key."""
    return zlib.crc32(str(key).encode()) & 0x7FFFFFFF


def trigger(attack, images01: torch.Tensor, keys: Optional[list] = None,
            seed: int = 0) -> torch.Tensor:
    """Triggered copies of a batch. With sample keys every image gets its own seed, so the pixels
    depend only on the sample — not on the batch it falls in, nor on who evaluates it — and split
    evaluation (Ray Data, several workers) matches a single loop exactly."""
    if not keys:
        return attack.apply(images01, seed=seed)
    return torch.cat([attack.apply(images01[i:i + 1], seed=key_seed(k)) for i, k in enumerate(keys)])


@torch.no_grad()
def backdoor_counts(loaded: LoadedClip, batches: Iterable[dict], classifier: torch.Tensor,
                    attack=None, target: Optional[int] = None,
                    trigger_classifier: Optional[torch.Tensor] = None, encode=None,
                    progress: Optional[object] = None, head=None) -> dict:
    """Counts for CA (and, given an attack and target, ASR / ASR_all / PA) over labelled batches.

    ``batches`` yield ``image`` (uint8 [B,3,H,W]), ``label`` and optionally ``key``.
    ``trigger_classifier`` classifies triggered images (dual-key attacks put their text key on the
    class prompts); it defaults to ``classifier``. ``encode`` replaces ``loaded.encode_images``
    (e.g. a prompted encoder); ``head`` scores its embeddings instead of the class prompts (a
    defense with its own classifier).
    """
    encode = encode or loaded.encode_images
    trig_clf = classifier if trigger_classifier is None else trigger_classifier
    loaded.model.eval()
    c = dict.fromkeys(COUNT_KEYS, 0)
    for i, batch in enumerate(batches):
        x = batch["image"].float().div(255)
        y = batch["label"].to(classifier.device)
        c["n"] += len(y)
        c["correct"] += int((predict(encode, x, classifier, head) == y).sum())
        if attack is not None:
            xt = trigger(attack, x, batch.get("key"), seed=i)
            pt = predict(encode, xt, trig_clf, head)
            hit = pt == target
            nontarget = y != target
            c["n_trig"] += len(y)
            c["hit_all"] += int(hit.sum())
            c["n_nontarget"] += int(nontarget.sum())
            c["hit_nontarget"] += int((hit & nontarget).sum())
            c["pa_correct"] += int((pt == y).sum())
        if progress is not None:
            progress.update(len(y))
    return c


def merge_counts(parts: Iterable[dict]) -> dict:
    out = dict.fromkeys(COUNT_KEYS, 0)
    for p in parts:
        for k in COUNT_KEYS:
            out[k] += int(p.get(k, 0))
    return out


def rates(c: dict) -> dict:
    """``ca``, ``asr``, ``asr_all``, ``pa`` (None where there was nothing to measure) plus counts."""
    div = lambda a, b: (a / b) if b else None
    out = {"ca": div(c["correct"], c["n"])}
    if c["n_trig"]:
        out.update(asr=div(c["hit_nontarget"], c["n_nontarget"]),
                   asr_all=div(c["hit_all"], c["n_trig"]), pa=div(c["pa_correct"], c["n_trig"]))
    return {**out, "counts": {k: c[k] for k in COUNT_KEYS}}


def evaluate_accuracy(loaded: LoadedClip, batches: Iterable[dict], classifier: torch.Tensor,
                      progress: Optional[object] = None) -> dict:
    """Top-1 zero-shot accuracy over batches with ``image`` (uint8) and ``label``; returns counts
    too, so results from split data can be summed."""
    c = backdoor_counts(loaded, batches, classifier, progress=progress)
    return {"acc": c["correct"] / c["n"] if c["n"] else float("nan"), "correct": c["correct"],
            "total": c["n"]}
