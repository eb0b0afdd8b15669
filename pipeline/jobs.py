"""The verbs behind ``jobs/*.py``: each takes the resolved config and parsed arguments, prints a
human summary and returns a JSON-able dict (written by ``--out``)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rvpt.shards import ReadStats, imagefolder_to_shards, read_manifest

from . import build
from .config import Config


def _table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(*([header] + [tuple(str(c) for c in r) for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _print_corpus(c: dict) -> None:
    state = "reused" if c["cached"] else f"built in {c['wall_s']} s ({c['images_per_s']} img/s)"
    print(f"corpus: {c['corpus_dir']} ({state})")
    print(_table([(k, v["count"], v["shards"]) for k, v in c["splits"].items()],
                 ("split", "samples", "shards")))


def make_corpus(cfg: Config, args: argparse.Namespace) -> dict:
    if getattr(args, "from_imagefolder", None):
        dest = args.dest or str(cfg.root() / "corpus" / Path(args.from_imagefolder).name)
        stats = ReadStats()
        res = imagefolder_to_shards(args.from_imagefolder, dest, split=args.split,
                                    shard_size=cfg.corpus.shard_size, stats=stats)
        print(f"wrote split {args.split!r} of {dest}: {res['count']} samples in "
              f"{len(res['shards'])} shards; skipped {res['skipped']} unreadable images")
        return {"corpus_dir": dest, **res}
    c = build.resolve_corpus(cfg)
    _print_corpus(c)
    return c


def _evaluate(cfg: Config, corpus: dict, model: dict) -> dict:
    loaded = build.load_model(cfg, model)
    splits = read_manifest(corpus["corpus_dir"])["splits"]
    metrics = {}
    for split, name in (("test", "ca"), ("shift_test", "ca_shift")):
        if split in splits:
            res = build.zero_shot(cfg, loaded, corpus["corpus_dir"], split)
            metrics[name] = round(res["ca"], 4)
            metrics[f"{name}_n"] = res["n"]
            metrics[f"{name}_skipped"] = res["skipped"]
    return metrics


def pretrain(cfg: Config, args: argparse.Namespace) -> dict:
    corpus = build.resolve_corpus(cfg)
    _print_corpus(corpus)
    model = build.clean_model(cfg, corpus)
    if model.get("trained"):
        state = "reused" if model.get("cached") else \
            f"trained in {model['pretrain_wall_s']} s ({model['samples_per_s']} samples/s)"
        print(f"clean model: {model['model_dir']} ({state})")
    else:
        print(f"clean model: {cfg.model.name} (pretrained={cfg.model.pretrained}, "
              f"checkpoint={cfg.model.checkpoint}); no pretraining")
    metrics = _evaluate(cfg, corpus, model)
    print(_table([(k, f"{100 * metrics[k]:.2f} %", metrics[f"{k}_n"]) for k in ("ca", "ca_shift")
                  if k in metrics], ("zero-shot", "accuracy", "images")))
    return {"corpus": corpus, "model": model, "metrics": metrics}


def sweep(cfg: Config, args: argparse.Namespace) -> dict:
    print("note: the Ray Tune sweep (attacks x defenses x prompt depth/length/alpha) is not built "
          "yet;\n      running the stages that exist: corpus -> clean CLIP -> zero-shot evaluation.")
    start = time.perf_counter()
    res = pretrain(cfg, args)
    res["wall_s"] = round(time.perf_counter() - start, 1)
    res["stages_run"] = ["corpus", "pretrain", "zero_shot"]
    res["stages_missing"] = ["poison", "defend", "sweep", "mlflow", "best", "report"]
    return res
