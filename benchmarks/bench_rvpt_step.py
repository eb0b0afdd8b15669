"""RVPT step time ÷ VPT step time on the same batch, and the same with the frozen model's features
cached (augmentation off).

    .venv/bin/python benchmarks/bench_rvpt_step.py [--model ViT-Tiny-12-p8-32] [--batch 32]
        [--steps 30] [--threads 2] [--out FILE]

A step is forward + backward + SGD update of the prompts at the paper's defaults (depth 3, length
50). Random weights (the cost does not depend on them). Timings are medians over ``--steps`` after
warm-up; each variant runs on the same batch.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rvpt.defenses import make_defense
from rvpt.models import load_clip


def time_steps(defense, x, y, keys, steps: int) -> float:
    opt = torch.optim.SGD(defense.trainable_parameters(), lr=0.002, momentum=0.9)
    defense.module.train()
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        loss, _ = defense.module({"image": x, "label": y, "key": keys})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-Tiny-12-p8-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_clip(args.model)
    names = [f"class {i}" for i in range(10)]
    size = loaded.image_size
    x = torch.rand(args.batch, 3, size, size)
    y = torch.randint(0, len(names), (args.batch,))
    keys = [f"k{i}" for i in range(args.batch)]
    res = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads()}
    vpt = make_defense("vpt", loaded, names)
    rvpt = make_defense("rvpt", loaded, names)
    cached = make_defense("rvpt", loaded, names, cache_frozen=True)
    res["trainable_params"] = rvpt.num_trainable()
    res["vpt_step_s"] = time_steps(vpt, x, y, None, args.steps)
    res["rvpt_step_s"] = time_steps(rvpt, x, y, None, args.steps)
    res["rvpt_cached_step_s"] = time_steps(cached, x, y, keys, args.steps)
    res["rvpt_over_vpt"] = res["rvpt_step_s"] / res["vpt_step_s"]
    res["rvpt_cached_over_vpt"] = res["rvpt_cached_step_s"] / res["vpt_step_s"]
    for k, v in res.items():
        print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
