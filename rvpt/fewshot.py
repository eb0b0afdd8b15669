"""Few-shot data for the defender: k clean shots per class, seeded, and their epoch batches."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Iterator

import numpy as np

from .shards import Sample, collate


def pick_shots(n_pool: int, shots: int, seed: int, label: int) -> list[int]:
    """Indices of the shots within one class's pool (sorted by sample key). One generator per
    (seed, class), so a per-class group (Ray Data ``map_groups``) picks the same images."""
    if n_pool < shots:
        raise ValueError(f"class {label} has {n_pool} images in the few-shot pool, {shots} shots asked")
    rng = np.random.default_rng([int(seed), int(label)])
    return sorted(rng.choice(n_pool, shots, replace=False).tolist())


def split_few_shot(samples: Iterable[Sample], shots: int, num_classes: int,
                   seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """``(shots, rest)``: ``shots`` samples of every class drawn by ``seed`` (the same seed gives the
    same set whatever the order of the pool), and the rest of the pool — the defender's own held-out
    clean images, for a validation accuracy it can see."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    chosen: list[Sample] = []
    rest: list[Sample] = []
    for c in range(num_classes):
        pool = sorted(by_class.get(c, []), key=lambda s: s.key)
        idx = set(pick_shots(len(pool), shots, seed, c))
        chosen += [s for i, s in enumerate(pool) if i in idx]
        rest += [s for i, s in enumerate(pool) if i not in idx]
    return chosen, rest


def sample_few_shot(samples: Iterable[Sample], shots: int, num_classes: int,
                    seed: int = 0) -> list[Sample]:
    """``shots`` samples of every class, drawn without replacement by ``seed``."""
    return split_few_shot(samples, shots, num_classes, seed)[0]


def epoch_batches(samples: list[Sample], batch_size: int,
                  seed: int = 0) -> Callable[[int], Iterator[dict]]:
    """``f(epoch)`` yields the samples in a fresh seeded order, batched (the last batch may be
    short)."""
    def batches(epoch: int) -> Iterator[dict]:
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(len(samples))
        for i in range(0, len(order), batch_size):
            yield collate([samples[j] for j in order[i:i + batch_size]])
    return batches
