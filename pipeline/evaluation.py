"""Distributed evaluation: CA / ASR / ASR_all / PA over full test shards by Ray Data actors.

Each actor loads the model, its attack and the defense state once, turns every batch into counts
(:func:`rvpt.metrics.backdoor_counts`), and the counts are summed; triggers are seeded per sample,
so the result equals the single-process loop over the same shards.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from rvpt.metrics import COUNT_KEYS, merge_counts, rates

from .data import STATS, merge_stats, read_split


class CountActor:
    """``__call__(batch) -> one row of counts``; built once per actor."""

    def __init__(self, model: str, class_names: list, templates: list, defense: str = "none",
                 defense_params: Optional[dict] = None, state=None,
                 ensemble: bool = False, threads: int = 1, defense_modules: Optional[dict] = None):
        import torch

        from rvpt.defenses import import_defenses, make_defense

        from .backdoor import load_backdoored

        torch.set_num_threads(threads)
        import_defenses(defense_modules)
        self.loaded, self.attack, self.target, _ = load_backdoored(model, None, class_names)
        self.defense = make_defense(defense, self.loaded, class_names, templates,
                                    **(defense_params or {}))
        if state is not None:  # a ray.train.Checkpoint (on the run's storage) or a local path
            if hasattr(state, "as_directory"):
                with state.as_directory() as d:
                    self.defense.load(d)
            else:
                self.defense.load(state)
        self.clf, self.trig = self.defense.classifiers(self.attack, ensemble)

    def __call__(self, batch: dict) -> dict:
        import torch

        from rvpt.metrics import backdoor_counts

        keep = batch[STATS] == ""
        read = merge_stats(batch[STATS][~keep])
        c = dict.fromkeys(COUNT_KEYS, 0)
        if keep.any():
            b = {"image": torch.from_numpy(batch["image"][keep]),
                 "label": torch.from_numpy(batch["label"][keep]),
                 "key": [str(k) for k in batch["key"][keep]]}
            c = backdoor_counts(self.loaded, [b], self.clf, self.attack, self.target,
                                trigger_classifier=self.trig, encode=self.defense.encode,
                                head=self.defense.head)
        return {**{k: np.array([c[k]], np.int64) for k in COUNT_KEYS},
                "read": np.array([json.dumps(read.as_dict())], dtype=object)}


def evaluate_distributed(corpus: str, split: str, model: str, image_size: int, class_names: list,
                         templates: list, defense: str = "none", defense_params: Optional[dict] = None,
                         state=None, ensemble: bool = False,
                         concurrency: int = 1, num_cpus: float = 0.5, num_gpus: float = 0.0,
                         batch_size: int = 256, resources: Optional[dict] = None,
                         rules=None, defense_modules: Optional[dict] = None) -> dict:
    """Rates and counts over a whole split, computed by ``concurrency`` Ray Data actors (each
    asking for ``resources`` besides its CPUs/GPUs), and the split's ReadStats (``read``, checked
    against the manifest's count). ``state`` is the defense's trained state: a
    ``ray.train.Checkpoint`` every node can read, or a local directory."""
    from ray.data import ActorPoolStrategy

    from rvpt.shards import ReadRules, open_corpus

    ds = read_split(corpus, split, image_size, rules or ReadRules(num_classes=len(class_names)),
                    batch_size)
    counts = ds.map_batches(
        CountActor, batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus, num_gpus=num_gpus or None, resources=resources or None,
        fn_constructor_kwargs={"model": model, "class_names": class_names, "templates": templates,
                               "defense": defense, "defense_params": defense_params,
                               "state": state, "ensemble": ensemble,
                               "threads": max(1, int(num_cpus)),
                               "defense_modules": defense_modules})
    rows = counts.take_all()
    read = merge_stats(r["read"] for r in rows).check_count(open_corpus(corpus).split(split).count)
    return {**rates(merge_counts(rows)), "read": read.as_dict()}
