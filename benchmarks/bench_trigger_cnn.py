"""Can a small learned local detector find an attack's trigger, and does it matter how it pools?
A two-layer 3 x 3 CNN trained to tell triggered from clean images, with a global max pool or a
global mean pool over its feature map: the max pool is what a trigger at a random place needs, the
mean pool is where a ViT's aggregation starts (uniform attention of the CLS token at init).

    .venv/bin/python benchmarks/bench_trigger_cnn.py [--attack badnet] [--params '{}']
        [--pool max,mean] [--steps 300] [--every 100] [--lr 1e-3] [--channels 32]
        [--train 6000] [--threads 0] [--out FILE] [key.sub=value ...]

Training images are the first ``--train`` images of the config corpus's pretrain split; every batch
of 128 holds 64 of them triggered anew (the attack's per-image randomness is drawn for the image
and the step) and 64 clean. The held-out set is 480 clean and 480 triggered test-split images
(different images), as in ``bench_backdoor_learning.py --loss detect``; ``detect_acc`` is its
accuracy (0.5 = chance). Attacks fitted against a model first (BadCLIP, TrojVQA, ISSBA) are refused.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import build
from pipeline.config import load_config
from rvpt.attacks import make_attack
from rvpt.metrics import trigger
from rvpt.shards import iter_samples, split_urls

POOLS = {"max": nn.AdaptiveMaxPool2d, "mean": nn.AdaptiveAvgPool2d}


def detector(pool: str, channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.GELU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                         POOLS[pool](1), nn.Flatten(), nn.Linear(channels, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--params", default="{}", help="attack parameters (JSON)")
    ap.add_argument("--pool", default="max,mean", help="comma-separated: max, mean")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--train", type=int, default=6000, help="pretrain-split images to draw from")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    pools = [p for p in args.pool.split(",") if p]
    if not pools or set(pools) - set(POOLS):
        sys.exit(f"--pool: choose from {sorted(POOLS)}, got {args.pool!r}")
    if args.steps < 1 or args.every < 1 or args.train < 128:
        sys.exit("--steps and --every must be positive, --train at least 128")
    cfg = load_config(None, args.overrides)
    build.set_threads(args.threads)
    cdir = build.resolve_corpus(cfg)["corpus_dir"]
    size = cfg.corpus.image_size
    params = json.loads(args.params)
    attack = make_attack(args.attack, size, seed=cfg.seed, **params)
    if attack.needs_fit:
        sys.exit(f"{args.attack} is fitted against a model first; bench_backdoor_learning.py --loss detect probes it")
    train = list(itertools.islice(iter_samples(split_urls(cdir, "pretrain"), size), args.train))
    test = list(itertools.islice(iter_samples(split_urls(cdir, "test"), size), 960))
    if len(train) < 128 or len(test) < 960:
        sys.exit(f"need >= 128 pretrain and 960 test images, the corpus has {len(train)} and {len(test)}")
    x = torch.stack([s.image for s in train]).float().div(255)
    keys = [s.key for s in train]
    tx = torch.stack([s.image for s in test]).float().div(255)
    det_x = torch.cat([tx[:480], trigger(attack, tx[480:], [s.key for s in test[480:]])])
    det_y = torch.cat([torch.zeros(480), torch.ones(480)]).long()
    rows = []
    for pool in pools:
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        net = detector(pool, args.channels)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = rng.choice(len(x), 128, replace=False)
            images = x[idx].clone()
            images[:64] = trigger(attack, images[:64], [f"{keys[i]}#{step}" for i in idx[:64]])
            labels = torch.cat([torch.ones(64), torch.zeros(64)]).long()
            loss = F.cross_entropy(net(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % args.every == 0 or step == args.steps:
                with torch.no_grad():
                    acc = (net(det_x).argmax(1) == det_y).float().mean().item()
                row = {"attack": args.attack, "pool": pool, "step": step, "loss": round(loss.item(), 3),
                       "detect_acc": round(acc, 3), "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
