"""Evaluation throughput: Ray Data actors (1 and 2) against a single-process loop, same shards.

    .venv/bin/python benchmarks/bench_eval_throughput.py --model DIR [--split test]
        [--actors 1,2] [key.sub=value ...] [--out FILE]

Counts CA / ASR / ASR_all / PA over the whole split (the model's trigger applied per sample) and
prints images/s for each way; the counts must agree exactly.
"""
import argparse
import json
import os
import time
from pathlib import Path

from pipeline import build
from pipeline.backdoor import evaluate_backdoor, load_backdoored
from pipeline.config import load_config
from pipeline.evaluation import evaluate_distributed
from pipeline.sweep import ray_init
from rvpt.shards import read_classes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    corpus = build.resolve_corpus(cfg)["corpus_dir"]
    info = read_classes(corpus)
    loaded, attack, target, _ = load_backdoored(args.model, None, info.names)
    build.set_threads(1)
    res = {}
    t = time.perf_counter()
    local = evaluate_backdoor(cfg, loaded, corpus, attack, target, args.split)
    dt = time.perf_counter() - t
    n = local["counts"]["n"]
    res["single_process"] = {"seconds": round(dt, 2), "images_per_s": round(n / dt, 1)}
    ray_init(cfg)
    for a in [int(x) for x in args.actors.split(",")]:
        t = time.perf_counter()
        dist = evaluate_distributed(corpus, args.split, args.model, loaded.image_size, info.names,
                                    info.templates, concurrency=a, num_cpus=1.0)
        dt = time.perf_counter() - t
        assert dist["counts"] == local["counts"], (dist["counts"], local["counts"])
        res[f"ray_data_{a}_actors"] = {"seconds": round(dt, 2), "images_per_s": round(n / dt, 1)}
    res["images"] = n
    res["cores"] = os.cpu_count()
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
