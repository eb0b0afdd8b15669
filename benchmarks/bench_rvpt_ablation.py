"""Prompt-tuning ablation on one backdoored model: a grid of settings x seeds, mean ± std.

    .venv/bin/python benchmarks/bench_rvpt_ablation.py --model DIR --corpus DIR \
        --grid defense.params.alpha=0,1,2,4 --grid "defense.train.crop_scale=[0.5,1],[0.08,1]" \
        [--seeds 0,1,2] [--jobs N] [--out FILE] [key.sub=value ...]

Every grid point (the cartesian product of the ``--grid`` lists, on top of the config and the plain
overrides) is trained with every seed through ``pipeline.defend`` — the same code as
``jobs/defend.py``, cached per setting under ``paths.root`` — and CA, ASR, ASR_all, PA and mean PR
after the defense are printed as mean ± std over the seeds, with the undefended model first.
``--jobs N`` runs N settings at once in separate processes (each with cores / N threads); with
``device=auto`` they share the GPU when there is one.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_defense_table import METRICS, fmt  # noqa: E402


def run_one(job: tuple) -> dict:
    config, overrides, model, corpus = job
    from pipeline.config import load_config
    from pipeline.defend import defend

    cfg = load_config(config, overrides)
    r = defend(cfg, model, corpus)
    return {"overrides": overrides, "before": r["before"], "after": r["after"],
            "train_s": r["train_s"], "cached": r.get("cached", False)}


def split_values(text: str) -> list[str]:
    """``0,1,2`` -> three values; commas inside brackets stay: ``[0.5,1],[0.08,1]`` -> two."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="backdoored model directory (with attack.json)")
    ap.add_argument("--corpus", required=True, help="corpus directory (few-shot pool and test split)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    axes = []
    for g in args.grid:
        key, sep, values = g.partition("=")
        if not sep or not values:
            ap.error(f"--grid {g!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={v}" for v in split_values(values)])
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    points = list(itertools.product(*axes)) or [()]
    jobs = [(args.config, [*args.overrides, *p, f"seed={s}", f"pretrain.threads={threads}"],
             args.model, args.corpus) for p in points for s in seeds]
    print(f"{len(points)} settings x {len(seeds)} seeds = {len(jobs)} runs, {args.jobs} at a time",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for r in pool.map(run_one, jobs):
            a = r["after"]
            print(f"[{time.perf_counter() - start:7.1f} s] {' '.join(r['overrides'][len(args.overrides):-1])}: "
                  f"CA {a['ca']:.4f} ASR {a['asr']:.4f} "
                  f"({'reused' if r['cached'] else str(r['train_s']) + ' s'})", file=sys.stderr, flush=True)
            results.append(r)
    from pipeline.tables import table as _table

    rows = [("none", *(fmt([results[0]["before"].get(m)], m != "pr_mean") for m in METRICS), "0")]
    out = {"none": results[0]["before"], "settings": {}}
    for i, p in enumerate(points):
        runs = results[i * len(seeds):(i + 1) * len(seeds)]
        label = " ".join(k.split(".")[-1] + "=" + v for k, _, v in (x.partition("=") for x in p)) \
            or "(config)"
        out["settings"][label] = [r["after"] | {"train_s": r["train_s"]} for r in runs]
        rows.append((label, *(fmt([r["after"].get(m) for r in runs], m != "pr_mean") for m in METRICS),
                     f"{statistics.mean(r['train_s'] for r in runs):.0f}"))
    print(_table(rows, ("setting", "CA %", "ASR %", "ASR_all %", "PA %", "mean PR", "train s")))
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
