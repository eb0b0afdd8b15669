"""Ray Data over corpus shards: local paths or object storage (``s3://``, ``gs://``), through the
same :mod:`rvpt.storage` locations as the plain reader.

Shards are untrusted input: ``read_webdataset(..., decoder=None)`` hands over raw bytes and the
project's decoder (:func:`rvpt.shards.decode_sample`) decodes only image, text, class and JSON
members; any other member (``.pkl``, ``.pth``) stays bytes and is dropped, corrupt samples are
dropped. Rows come out with fixed shapes: ``image`` uint8 [3, H, W], ``label``, ``key``, ``text``.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from rvpt import storage
from rvpt.fewshot import pick_shots
from rvpt.shards import CorruptSample, ShardError, decode_sample, split_urls

ROW_COLUMNS = ("image", "label", "key", "text")


def _paths(uris: list[str]):
    """``(pyarrow filesystem, [paths])`` for shard locations on one filesystem (local or a bucket)."""
    if not uris:
        raise ShardError("no shards to read")
    try:
        located = [storage.filesystem(u) for u in uris]
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    return located[0][0], [p for _, p in located]


def decode_batch(batch: dict, image_size: Optional[int] = None, with_meta: bool = False) -> dict:
    """Raw WebDataset columns (bytes) -> fixed-shape rows; corrupt samples are dropped. With
    ``with_meta`` a ``meta`` column holds each sample's JSON member (as a JSON string)."""
    n = len(batch["__key__"])
    members = [k for k in batch if k != "__url__"]
    rows = []
    for i in range(n):
        raw = {k: batch[k][i] for k in members if batch[k][i] is not None}
        try:
            rows.append(decode_sample(raw, image_size))
        except CorruptSample:
            continue
    if not rows:
        out = {"image": np.zeros((0, 3, image_size or 1, image_size or 1), np.uint8),
               "label": np.zeros(0, np.int64), "key": np.array([], dtype=object),
               "text": np.array([], dtype=object)}
    else:
        out = {"image": np.stack([r.image.numpy() for r in rows]),
               "label": np.array([r.label for r in rows], np.int64),
               "key": np.array([r.key for r in rows], dtype=object),
               "text": np.array([r.text for r in rows], dtype=object)}
    if with_meta:
        out["meta"] = np.array([json.dumps(r.meta) for r in rows], dtype=object)
    return out


def read_split(corpus: str, split: str, image_size: int, batch_size: int = 256,
               with_meta: bool = False, uris: Optional[list] = None):
    """A Ray Dataset of decoded rows for one corpus split (or for the given shard ``uris``)."""
    import ray

    filesystem, paths = _paths(uris or split_urls(corpus, split))
    ds = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None)
    return ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size, "with_meta": with_meta},
                          batch_size=batch_size, batch_format="numpy")


def _pick_group(group: dict, shots: int, seed: int) -> dict:
    order = np.argsort(group["key"].astype(str), kind="stable")
    label = int(group["label"][0])
    chosen = set(pick_shots(len(order), shots, seed, label))
    is_shot = np.array([i in chosen for i in range(len(order))])
    return {**{k: v[order] for k, v in group.items()}, "is_shot": is_shot}


def few_shot_split(corpus: str, split: str, shots: int, image_size: int, seed: int = 0):
    """``(train, val)`` Ray Datasets: ``shots`` images per class drawn as
    :func:`rvpt.fewshot.split_few_shot` draws them, and the rest of the pool (the defender's
    held-out clean images). Both are materialised (a few-shot set is small)."""
    ds = read_split(corpus, split, image_size).groupby("label", num_partitions=4).map_groups(
        _pick_group, fn_kwargs={"shots": shots, "seed": seed}, batch_format="numpy")
    ds = ds.materialize()
    drop = lambda b: {k: v for k, v in b.items() if k != "is_shot"}
    train = ds.filter(lambda r: bool(r["is_shot"])).map_batches(drop, batch_format="numpy")
    val = ds.filter(lambda r: not bool(r["is_shot"])).map_batches(drop, batch_format="numpy")
    return train.materialize(), val.materialize()


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
    ds = (read_split(corpus, "pretrain", image_size, with_meta=True, uris=uris)
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
