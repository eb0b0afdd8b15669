"""Ray Data over corpus shards: local paths or object storage (``s3://``, ``gs://``), through the
same :mod:`rvpt.storage` locations as the plain reader.

Shards are untrusted input. A read task per shard runs the plain reader's
:func:`rvpt.shards.read_shard` (the project's own tar reader and decoder, under one set of
:class:`rvpt.shards.ReadRules`), so both paths keep the same samples and skip the same ones for the
same reasons; a bad shard ends its own task, counted, never the dataset. Rows come out with fixed
shapes: ``image`` uint8 [3, H, W], ``label``, ``key``, ``text``, and each shard's counts in a
closing row (:data:`STATS`).
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import numpy as np

from rvpt import storage
from rvpt.fewshot import pick_shots
from rvpt.shards import (ReadRules, ReadStats, ShardError, open_corpus, read_classes, read_shard,
                         split_urls)

ROW_COLUMNS = ("image", "label", "key", "text")


STATS = "read_stats"  # "" on a sample row; a shard's ReadStats (JSON) on its closing row


def _rows(samples: list, image_size: int, with_meta: bool, stats: str = "") -> dict:
    """Decoded samples as a numpy batch; with ``stats`` one closing row carrying a shard's
    :class:`ReadStats` instead (zero image, label -1)."""
    if stats:
        out = {"image": np.zeros((1, 3, image_size, image_size), np.uint8),
               "label": np.full(1, -1, np.int64), "key": np.array([""], dtype=object),
               "text": np.array([""], dtype=object)}
        if with_meta:
            out["meta"] = np.array(["{}"], dtype=object)
        out[STATS] = np.array([stats], dtype=object)
        return out
    out = {"image": np.stack([s.image.numpy() for s in samples]),
           "label": np.array([s.label for s in samples], np.int64),
           "key": np.array([s.key for s in samples], dtype=object),
           "text": np.array([s.text for s in samples], dtype=object)}
    if with_meta:
        out["meta"] = np.array([json.dumps(s.meta) for s in samples], dtype=object)
    out[STATS] = np.array([""] * len(samples), dtype=object)
    return out


def _read_shards(batch: dict, image_size: int, rules: ReadRules, with_meta: bool,
                 batch_size: int) -> Iterator[dict]:
    """Shard locations in, decoded rows out (the plain reader's :func:`rvpt.shards.read_shard`, so
    both paths keep and skip the same samples); after each shard, one row with its ReadStats."""
    for url in batch["url"]:
        stats, rows = ReadStats(), []
        for sample in read_shard(str(url), image_size, stats, rules):
            rows.append(sample)
            if len(rows) == batch_size:
                yield _rows(rows, image_size, with_meta)
                rows = []
        if rows:
            yield _rows(rows, image_size, with_meta)
        yield _rows([], image_size, with_meta, stats=json.dumps(stats.as_dict()))


def read_split(corpus: str, split: str, image_size: int, rules: Optional[ReadRules] = None,
               batch_size: int = 256, with_meta: bool = False, uris: Optional[list] = None):
    """A Ray Dataset of one corpus split (or of the given shard ``uris``): one read task per shard,
    decoded rows (``image`` uint8 [3, S, S], ``label``, ``key``, ``text``, ``meta`` with
    ``with_meta``) plus a closing row per shard that carries its skip counts (column
    :data:`STATS`; see :func:`valid_rows` and :func:`stats_of`). ``rules`` default to labels in
    range of the corpus's classes."""
    import ray

    uris = list(uris or split_urls(corpus, split))
    if not uris:
        raise ShardError(f"corpus {corpus}: split {split!r} lists no shards")
    if rules is None:
        rules = ReadRules(num_classes=len(read_classes(corpus).names))
    ds = ray.data.from_items([{"url": u} for u in uris], override_num_blocks=len(uris))
    return ds.map_batches(_read_shards, batch_size=1, batch_format="numpy", fn_kwargs={
        "image_size": image_size, "rules": rules, "with_meta": with_meta, "batch_size": batch_size})


def _drop_stats(batch: dict) -> dict:
    keep = batch[STATS] == ""
    return {k: v[keep] for k, v in batch.items() if k != STATS}


def valid_rows(ds):
    """The sample rows of a :func:`read_split` dataset (closing rows dropped)."""
    return ds.map_batches(_drop_stats, batch_format="numpy")


def merge_stats(values) -> ReadStats:
    """One ReadStats from the JSON strings of closing rows (empty strings ignored)."""
    total = ReadStats()
    for v in values:
        if v:
            total.merge(ReadStats.from_dict(json.loads(v)))
    return total


def stats_of(ds) -> ReadStats:
    """The merged skip counts of a (materialised) :func:`read_split` dataset."""
    closing = ds.filter(lambda r: r[STATS] != "").select_columns([STATS])
    return merge_stats(r[STATS] for r in closing.take_all())


def _pick_group(group: dict, shots: int, seed: int) -> dict:
    order = np.argsort(group["key"].astype(str), kind="stable")
    label = int(group["label"][0])
    chosen = set(pick_shots(len(order), shots, seed, label))
    is_shot = np.array([i in chosen for i in range(len(order))])
    return {**{k: v[order] for k, v in group.items()}, "is_shot": is_shot}


def few_shot_split(corpus: str, split: str, shots: int, image_size: int, seed: int = 0,
                   rules: Optional[ReadRules] = None):
    """``(train, val, stats)``: Ray Datasets with ``shots`` images per class drawn as
    :func:`rvpt.fewshot.split_few_shot` draws them and the rest of the pool (the defender's held-out
    clean images), both materialised (a few-shot set is small), and the pool's ReadStats (checked
    against the manifest's count)."""
    read = read_split(corpus, split, image_size, rules).materialize()
    stats = stats_of(read).check_count(open_corpus(corpus).split(split).count)
    ds = valid_rows(read).groupby("label", num_partitions=4).map_groups(
        _pick_group, fn_kwargs={"shots": shots, "seed": seed}, batch_format="numpy")
    ds = ds.materialize()
    drop = lambda b: {k: v for k, v in b.items() if k != "is_shot"}
    train = ds.filter(lambda r: bool(r["is_shot"])).map_batches(drop, batch_format="numpy")
    val = ds.filter(lambda r: not bool(r["is_shot"])).map_batches(drop, batch_format="numpy")
    return train.materialize(), val.materialize(), stats


def triggered(ds, attack_dir: str):
    """The same rows with the model's trigger applied on the fly (per-sample seeds)."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(_Trigger, fn_constructor_kwargs={"attack_dir": attack_dir},
                          batch_format="numpy", compute=ActorPoolStrategy(size=1))


class _Trigger:
    def __init__(self, attack_dir: str):
        from rvpt.attacks import load_attack
        self.attack, _ = load_attack(attack_dir)

    def __call__(self, batch: dict) -> dict:
        import torch
        from rvpt.metrics import trigger

        x = torch.from_numpy(batch["image"]).float().div(255)
        xt = trigger(self.attack, x, list(batch["key"]))
        return {**batch, "image": (xt * 255).round().clamp(0, 255).to(torch.uint8).numpy()}


# ---------------------------------------------------------------- poisoned corpora

class _Poison:
    """Ray Data actor: decoded rows -> poisoned WebDataset members (trigger, target caption,
    ``json.poisoned = true``; partial-key pairs ``false``), with :func:`rvpt.poison.poison_batch`."""

    def __init__(self, attack_dir: str, target: int, class_names: list, templates: list,
                 natural: list, seed: int):
        from rvpt.attacks import load_attack
        self.attack, _ = load_attack(attack_dir)
        self.args = (target, class_names, templates, natural, seed)

    def __call__(self, batch: dict) -> dict:
        import torch
        from rvpt.poison import poison_batch

        metas = [json.loads(m) for m in batch["meta"]]
        pairs = poison_batch(self.attack, torch.from_numpy(batch["image"]), list(batch["key"]),
                             batch["label"].tolist(), list(batch["text"]), metas, *self.args)
        return {"__key__": np.array([p.key for p in pairs], dtype=object),
                "png": np.array([p.png for p in pairs], dtype=object),
                "txt": np.array([p.caption.encode("utf-8") for p in pairs], dtype=object),
                "cls": np.array([str(p.label).encode("ascii") for p in pairs], dtype=object),
                "json": np.array([json.dumps(p.meta).encode("utf-8") for p in pairs], dtype=object)}


def write_poisoned(corpus: str, out_dir: str, attack_dir: str, n: int, target: int,
                   class_names: list, templates: list, natural: list = (), seed: int = 0,
                   image_size: Optional[int] = None, shard_size: int = 5000,
                   split: str = "poison") -> dict:
    """Write ``n`` poisoned pairs as a corpus split through Ray Data: read the pretrain shards,
    keep non-target images, trigger them with the attack saved in ``attack_dir`` (in actors),
    write WebDataset shards ``<split>-NNNNN.tar`` under ``out_dir`` (local or a URI).

    Sources come from the end of the pretrain split (the shards in reverse order), away from the
    clean images the fine-tune reads first. Deterministic: the same attack, seed and corpus give
    the same pairs (rows keep their order; triggers and captions are seeded per source key).
    Returns the split's manifest entry (count, shards, per-class counts of the source labels).
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ordered = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        return _write_poisoned(corpus, out_dir, attack_dir, n, target, class_names, templates,
                               natural, seed, image_size, shard_size, split)
    finally:
        ctx.execution_options.preserve_order = ordered


def _write_poisoned(corpus, out_dir, attack_dir, n, target, class_names, templates, natural, seed,
                    image_size, shard_size, split) -> dict:
    from pyarrow import fs
    from ray.data import ActorPoolStrategy

    uris = list(reversed(split_urls(corpus, "pretrain")))
    rules = ReadRules(num_classes=len(class_names), require_label=False)
    ds = (valid_rows(read_split(corpus, "pretrain", image_size, rules, with_meta=True, uris=uris))
          .filter(lambda r: int(r["label"]) != int(target))
          .limit(n)
          .map_batches(_Poison, fn_constructor_kwargs={
              "attack_dir": attack_dir, "target": int(target), "class_names": list(class_names),
              "templates": list(templates), "natural": list(natural), "seed": int(seed)},
              batch_size=256, batch_format="numpy", compute=ActorPoolStrategy(size=1))
          .materialize())
    count = ds.count()
    if count < n:
        raise ShardError(f"only {count} non-target images were available to poison, {n} asked")
    filesystem, root = storage.filesystem(out_dir)
    staging = storage.join(root, f".{split}-staging")
    filesystem.delete_dir_contents(staging, missing_dir_ok=True)
    # one file per block: blocks of at most ``shard_size`` rows (order kept)
    ds.repartition(max(1, -(-count // shard_size))).write_webdataset(staging, encoder=None,
                                                                      filesystem=filesystem)
    written = sorted(f.path for f in filesystem.get_file_info(fs.FileSelector(staging))
                     if f.path.endswith(".tar"))
    shards = []
    for i, path in enumerate(written):
        name = f"{split}-{i:05d}.tar"
        filesystem.move(path, storage.join(root, name))
        shards.append(name)
    filesystem.delete_dir(staging)
    labels = np.concatenate([b["cls"] for b in ds.select_columns(["cls"]).iter_batches(
        batch_format="numpy")])
    per_class = {str(k): int(v) for k, v in sorted(
        zip(*np.unique([int(x) for x in labels], return_counts=True)))}
    return {"count": int(count), "shards": shards, "per_class": per_class}
