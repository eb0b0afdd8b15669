"""Foundation figures: corpus generation rate, pretraining throughput, peak memory.

    .venv/bin/python benchmarks/bench_foundation.py [key.sub=value ...] [--out FILE]

Builds into a fresh temporary root (nothing cached), with the default config unless overridden,
and prints images/s for rendering+writing shards, samples/s for pretraining, the zero-shot CA and the
peak RSS of the whole process tree for each stage.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memwatch import PeakRSS  # noqa: E402

from pipeline import build  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--root", help="build here instead of a fresh temporary directory")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="rvpt-bench-")
    cfg = load_config(None, [*args.overrides, f"paths.root={root}"])
    res = {"config": cfg.model_dump(mode="json")}
    with PeakRSS() as m:
        t = time.perf_counter()
        corpus = build.resolve_corpus(cfg)
        res["corpus_wall_s"] = round(time.perf_counter() - t, 1)
    res["corpus_images"] = corpus["total"]
    if corpus["cached"]:  # reused from --root: report the figures of the run that built it
        from rvpt.shards import read_manifest
        man = read_manifest(corpus["corpus_dir"])
        res["corpus_wall_s"], res["corpus_images_per_s"] = man["render_seconds"], man["images_per_s"]
        res["corpus_cached"] = True
    else:
        res["corpus_images_per_s"] = round(corpus["total"] / res["corpus_wall_s"], 1)
    res["corpus_peak_rss_mib"] = round(m.peak_mib)
    with PeakRSS() as m:
        model = build.clean_model(cfg, corpus)
    res["pretrain_wall_s"] = model["pretrain_wall_s"]
    res["pretrain_samples_per_s"] = model["samples_per_s"]
    res["pretrain_samples_seen"] = model["samples_seen"]
    res["pretrain_peak_rss_mib"] = round(m.peak_mib)
    with PeakRSS() as m:
        loaded = build.load_model(cfg, model)
        t = time.perf_counter()
        for split, name in (("test", "ca"), ("shift_test", "ca_shift")):
            res[name] = round(build.zero_shot(cfg, loaded, corpus["corpus_dir"], split)["ca"], 4)
        res["eval_wall_s"] = round(time.perf_counter() - t, 1)
    res["eval_peak_rss_mib"] = round(m.peak_mib)
    for k, v in res.items():
        if k != "config":
            print(f"{k:>28}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
