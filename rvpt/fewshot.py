"""Few-shot data for the defender: k clean shots per class, seeded, and their epoch batches."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Iterator

import numpy as np

from .shards import Sample, collate


def sample_few_shot(samples: Iterable[Sample], shots: int, num_classes: int,
                    seed: int = 0) -> list[Sample]:
    """``shots`` samples of every class, drawn without replacement by ``seed`` (the same seed gives
    the same set whatever the order of the pool)."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for c in range(num_classes):
        pool = sorted(by_class.get(c, []), key=lambda s: s.key)
        if len(pool) < shots:
            raise ValueError(f"class {c} has {len(pool)} images in the few-shot pool, "
                             f"{shots} shots asked")
        out += [pool[i] for i in sorted(rng.choice(len(pool), shots, replace=False))]
    return out


def epoch_batches(samples: list[Sample], batch_size: int,
                  seed: int = 0) -> Callable[[int], Iterator[dict]]:
    """``f(epoch)`` yields the samples in a fresh seeded order, batched (the last batch may be
    short)."""
    def batches(epoch: int) -> Iterator[dict]:
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(len(samples))
        for i in range(0, len(order), batch_size):
            yield collate([samples[j] for j in order[i:i + batch_size]])
    return batches
