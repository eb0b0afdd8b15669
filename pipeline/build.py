"""Build what a run needs, reusing what an earlier run built.

Artifacts live under ``paths.root`` (a local path or object storage) keyed by a hash of the config
that made them: ``corpus/synthetic-<hash>/`` and ``models/clean-<hash>/``. A directory is complete
only once its ``manifest.json`` / ``summary.json`` exists (published last, see
:func:`rvpt.storage.publish`), so an interrupted build is redone.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from rvpt import broad, storage, synthetic
from rvpt.models import LoadedClip, load_clip, save_model_dir
from rvpt.pretrain import random_crops, train_contrastive
from rvpt.shards import (MANIFEST, Corpus, ReadStats, Sample, ShardError, SplitWriter, labelled,
                         iter_batches, iter_samples, open_corpus, read_classes, write_classes,
                         write_manifest)
from rvpt.metrics import evaluate_accuracy
from rvpt.zeroshot import class_embeddings

from .config import Config, ConfigError, config_hash

_IS_TTY = sys.stderr.isatty()


def progress_bar(**kw) -> tqdm:
    """tqdm that stays readable in logs (fewer refreshes outside a terminal)."""
    return tqdm(mininterval=0.5 if _IS_TTY else 15.0, dynamic_ncols=True, file=sys.stderr, **kw)


def set_threads(n: int = 0) -> None:
    torch.set_num_threads(n or os.cpu_count() or 1)


# ---------------------------------------------------------------- corpus

def corpus_key(cfg: Config) -> str:
    c = cfg.corpus.model_dump(exclude={"workers", "path", "kind", "max_image_pixels",
                                       "max_member_mb"})
    if c["pretrain_style"] == "shapes":  # the shapes benchmark keeps the key it always had
        for name in ("pretrain_style", "effect_rate", "digits", "effect_weights"):
            c.pop(name)
        return config_hash({"generator": 1, **c})
    if not c["effect_weights"]:  # the default corpus keeps the key it had before the option
        c.pop("effect_weights")
    return config_hash({"generator": broad.VERSION, **c})  # bump VERSION when rendering changes


DIGITS_DIR = "digits"  # the second downstream task, a corpus of its own inside the main one


def _render_chunk(args) -> list:
    seed, domain, split, indices, labels, kw = args
    out = []
    for i, lab in zip(indices, labels):
        if domain == "broad":
            s = broad.render_pretrain(seed, i, image_size=kw["image_size"],
                                      num_classes=kw["num_classes"], effect_rate=kw["effect_rate"],
                                      effect_weights=kw["effect_weights"])
        elif domain == "digits":
            s = broad.render_glyph(seed, split, i, image_size=kw["image_size"], label=lab,
                                   noise=kw["noise"])
        else:
            s = synthetic.render(seed, domain, split, i, label=lab,
                                 **{k: v for k, v in kw.items()
                                    if k not in ("effect_rate", "effect_weights")})
        out.append((s.key, s.png, s.caption, s.label, s.meta))
    return out


def _plan(cfg: Config) -> list[tuple[str, str, int]]:
    """(domain, split, count): ``broad`` is the web-like pretraining set, ``digits`` the second
    task, ``base``/``shift`` the shapes task's two domains."""
    c = cfg.corpus
    C = c.num_classes
    broad_style = c.pretrain_style == "broad"
    plan = [("broad" if broad_style else "base", "pretrain", c.n_pretrain),
            ("base", "fewshot", c.fewshot_per_class * C), ("base", "test", c.test_per_class * C)]
    if c.shifted:
        plan += [("shift", "fewshot", c.fewshot_per_class * C), ("shift", "test", c.test_per_class * C)]
    if broad_style and c.digits:
        G = len(broad.GLYPHS)
        plan += [("digits", "fewshot", c.fewshot_per_class * G), ("digits", "test", c.test_per_class * G)]
    return [p for p in plan if p[2] > 0]


def build_synthetic_corpus(cfg: Config, force: bool = False) -> dict:
    """Render the embedded benchmark into shards (cached). Returns a summary dict."""
    c = cfg.corpus
    out = storage.join(cfg.root(), "corpus", f"synthetic-{corpus_key(cfg)}")
    if storage.exists(storage.join(out, MANIFEST)) and not force:
        return {"corpus_dir": out, "cached": True, **_corpus_counts(open_corpus(out))}
    kw = dict(image_size=c.image_size, num_classes=c.num_classes, clutter=c.clutter, noise=c.noise,
              class_only_captions=c.class_only_captions, typical_color=c.typical_color,
              bg_contrast=c.bg_contrast, effect_rate=c.effect_rate,
              effect_weights=dict(c.effect_weights))
    splits: dict = {}
    digit_splits: dict = {}
    total = sum(n for _, _, n in _plan(cfg))
    start = time.perf_counter()
    chunk = 256
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with storage.publish(out, MANIFEST) as tmp:
        write_classes(tmp, synthetic.CLASSES[: c.num_classes], synthetic.PROMPT_TEMPLATES)
        pool = ctx.Pool(c.workers) if c.workers > 1 else None
        try:
            with progress_bar(total=total, desc="rendering corpus", unit="img") as bar:
                for domain, split, n in _plan(cfg):
                    name = split if domain in ("base", "broad", "digits") else f"{domain}_{split}"
                    where = tmp / DIGITS_DIR if domain == "digits" else tmp
                    n_classes = len(broad.GLYPHS) if domain == "digits" else c.num_classes
                    labels = list(synthetic.split_labels(split, n, n_classes))
                    jobs = [(c.seed, domain, split, list(range(i, min(i + chunk, n))),
                             labels[i:i + chunk], kw) for i in range(0, n, chunk)]
                    results = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
                    where.mkdir(exist_ok=True)
                    with SplitWriter(where, name, c.shard_size) as w:
                        for rows in results:
                            for key, png, caption, label, meta in rows:
                                w.write(key, png, caption, label, meta)
                            bar.update(len(rows))
                    (digit_splits if domain == "digits" else splits)[name] = {**w.info, "domain": domain}
        finally:
            if pool:
                pool.close()
                pool.join()
        wall = time.perf_counter() - start
        if digit_splits:
            write_classes(tmp / DIGITS_DIR, broad.GLYPHS, broad.GLYPH_TEMPLATES)
            write_manifest(tmp / DIGITS_DIR, digit_splits, source="synthetic-digits",
                           num_classes=len(broad.GLYPHS), image_size=c.image_size)
        write_manifest(tmp, splits, source="synthetic", config=c.model_dump(mode="json"),
                       num_classes=c.num_classes, image_size=c.image_size,
                       render_seconds=round(wall, 2), images_per_s=round(total / wall, 1),
                       **({"datasets": {"digits": DIGITS_DIR}} if digit_splits else {}))
    return {"corpus_dir": out, "cached": False, "wall_s": round(wall, 2),
            "images_per_s": round(total / wall, 1), **_corpus_counts(open_corpus(out))}


def _corpus_counts(corpus: Corpus) -> dict:
    splits = {k: {"count": v.count, "shards": len(v.shards)} for k, v in corpus.splits.items()}
    counts = [v["count"] for v in splits.values()]
    return {"splits": splits, "total": None if None in counts else sum(counts)}


def resolve_corpus(cfg: Config) -> dict:
    """The corpus a config names: build the synthetic one, or open an existing one (a directory or
    URI, this project's format or CLIP_benchmark's)."""
    if cfg.corpus.kind == "synthetic":
        return build_synthetic_corpus(cfg)
    uri = cfg.locate(cfg.corpus.path)
    return {"corpus_dir": uri, "cached": True, **_corpus_counts(open_corpus(uri))}


def samples(cfg: Config, corpus_dir: str, split: str, image_size: Optional[int],
            stats: Optional[ReadStats] = None, require_label: bool = True,
            **kw) -> Iterator[Sample]:
    """The plain reader over a corpus split under the config's read rules, labels in range of the
    corpus's classes (``require_label=False`` for image-caption pairs). Read to the end, the
    counts in ``stats`` are checked against the manifest's (see :meth:`ReadStats.check_count`)."""
    corpus = open_corpus(corpus_dir)
    info = corpus.split(split)
    stats = stats if stats is not None else ReadStats()
    n_classes = len(labelled(corpus).names) if require_label else corpus.num_classes
    rules = cfg.read_rules(n_classes, require_label)
    yield from iter_samples(info.shards, image_size, stats=stats, rules=rules, **kw)
    stats.check_count(info.count)


def pairs_count(cfg: Config, location: str) -> int:
    """How many clean pairs the pair defenses train on: ``defense.pairs.count`` (None: the whole
    split). One-line error when the split holds fewer than that or nobody knows how many."""
    p = cfg.defense.pairs
    available = open_corpus(location).split(p.split).count
    if p.count is None and available is None:
        raise ConfigError(f"config error: defense.pairs.count: split {p.split!r} of "
                          f"{storage.display(location)} states no count; set defense.pairs.count")
    if p.count is not None and available is not None and available < p.count:
        raise ConfigError(f"config error: defense.pairs.count: split {p.split!r} of "
                          f"{storage.display(location)} has {available} pairs, fewer than "
                          f"defense.pairs.count={p.count}")
    return p.count if p.count is not None else available


def split_count(corpus_dir: str, split: str) -> int:
    """The number of samples of a split as the corpus manifest states it (needed to plan epochs)."""
    n = open_corpus(corpus_dir).split(split).count
    if n is None:
        raise ShardError(f"corpus {corpus_dir} does not state how many samples split {split!r} has "
                         f"(a manifest.json with counts is needed for training on it)")
    return n


def corpus_line(c: dict) -> str:
    """One line saying which corpus is used and whether it was built now."""
    state = "reused" if c["cached"] else f"built in {c['wall_s']} s ({c['images_per_s']} img/s)"
    return f"corpus: {c['corpus_dir']} ({state})"


# ---------------------------------------------------------------- clean model

SUMMARY = "summary.json"  # a model directory's completion marker (published last)

def model_key(cfg: Config, corpus_dir: str) -> str:
    return config_hash({"corpus": storage.name_of(corpus_dir),
                        "model": cfg.model.model_dump(exclude={"trust_torchscript"}),
                        "pretrain": cfg.pretrain.model_dump(  # new options keep old keys when off
                            exclude={"threads", "compile"} | {k for k in ("twins", "crop_scale")
                                                   if not getattr(cfg.pretrain, k)}),
                        "seed": cfg.seed})


def clean_model_line(cfg: Config, model: dict) -> str:
    """One line saying which clean model is used and whether it was pretrained now."""
    if not model.get("trained"):
        return (f"clean model: {cfg.model.name} (pretrained={cfg.model.pretrained}, "
                f"checkpoint={cfg.model.checkpoint}); no pretraining")
    state = "reused" if model.get("cached") else \
        f"trained in {model['pretrain_wall_s']} s ({model['samples_per_s']} samples/s)"
    return f"clean model: {model['model_dir']} ({state})"


def clean_model(cfg: Config, corpus: dict, force: bool = False) -> dict:
    """The clean CLIP a config names. Pretrains (cached) when ``pretrain.enabled`` and no weights
    were given; otherwise loads the named weights. Returns a summary with ``model_dir`` or spec."""
    m = cfg.model
    if m.pretrained or m.checkpoint or m.name.startswith("hf-hub:") or not cfg.pretrain.enabled:
        return {"model": m.name, "pretrained": m.pretrained, "checkpoint": m.checkpoint,
                "trained": False}
    out = storage.join(cfg.root(), "models", f"clean-{model_key(cfg, corpus['corpus_dir'])}")
    if storage.exists(storage.join(out, SUMMARY)) and not force:
        return {**storage.read_json(storage.join(out, SUMMARY)), "cached": True}
    set_threads(cfg.pretrain.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_clip(m.name, device=cfg.torch_device())
    corpus_dir = corpus["corpus_dir"]
    n = split_count(corpus_dir, "pretrain")
    p = cfg.pretrain
    steps_per_epoch = max(1, n // p.batch_size)
    stats = ReadStats()

    def epoch_batches(epoch: int):
        pairs = samples(cfg, corpus_dir, "pretrain", loaded.image_size, stats=stats,
                        require_label=False, shuffle_shards=True, seed=cfg.seed * 1000 + epoch)
        batches = iter_batches(pairs, p.batch_size, shuffle_buffer=p.shuffle_buffer,
                               seed=cfg.seed * 1000 + epoch, drop_last=True)
        if p.crop_scale:
            batches = random_crops(batches, p.crop_scale)
        return broad.with_twins(batches, p.twins, seed=cfg.seed * 1000 + epoch) if p.twins \
            else batches

    bar = progress_bar(total=p.epochs * steps_per_epoch, desc="pretraining clean CLIP", unit="step")

    def on_step(step, total, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    hist = train_contrastive(loaded, epoch_batches, p.epochs, steps_per_epoch, p.lr,
                             p.weight_decay, p.warmup_steps, progress=on_step, compile=p.compile)
    bar.close()
    summary = {"model_dir": out, "model": m.name, "trained": True,
               "pretrain_wall_s": round(hist.seconds, 1), "samples_per_s": round(hist.samples_per_s, 1),
               "steps": hist.steps, "samples_seen": hist.samples,
               "epoch_losses": [round(x, 4) for x in hist.losses], "read": stats.as_dict()}
    with storage.publish(out, SUMMARY) as tmp:
        save_model_dir(loaded, m.name, tmp)
        cfg.dump(tmp / "config.yaml")
        storage.write_json(str(tmp / SUMMARY), summary)
    return {**summary, "cached": False}


def load_model(cfg: Config, model: dict) -> LoadedClip:
    device = cfg.torch_device()
    if model.get("model_dir"):
        return load_clip(checkpoint=model["model_dir"], device=device)
    return load_clip(cfg.model.name, pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint,
                     device=device, trust_torchscript=cfg.model.trust_torchscript)


# ---------------------------------------------------------------- zero-shot CA

def zero_shot(cfg: Config, loaded: LoadedClip, corpus_dir: str, split: str = "test") -> dict:
    """Zero-shot clean accuracy on a split; returns ``{"ca", "n", "read"}`` (``read``: what the
    reader kept and skipped, :meth:`ReadStats.as_dict`)."""
    info = read_classes(corpus_dir)
    clf = class_embeddings(loaded, info.names, info.templates, ensemble=cfg.eval.prompt_ensemble)
    stats = ReadStats()
    images = samples(cfg, corpus_dir, split, loaded.image_size, stats=stats)
    with progress_bar(desc=f"zero-shot {split}", unit="img", leave=False) as bar:
        res = evaluate_accuracy(loaded, iter_batches(images, cfg.eval.batch_size), clf, bar)
    return {"ca": res["acc"], "n": res["total"], "read": stats.as_dict()}
