"""Can hand-made pixel statistics, with nothing learned but a logistic regression, tell an attack's
triggered images from clean ones? A floor for what the encoder could see (bench_trigger_visibility).

    .venv/bin/python benchmarks/bench_trigger_pixels.py [--attack badnet] [--params '{}']
        [--split test] [--images 1200] [key.sub=value ...]

Each of ``--images`` images of the config's corpus split is used once, clean (first half) or
triggered (second half). Features per image: quantiles (0.5, 0.9, 0.99, 1) over every 2 x 2 window
of its mean local roughness (absolute differences to the right and lower neighbour, summed over
channels) and of its mean colour disagreement (std over the channels), and the maximum of their
product; the regression is fitted on the even images and scored on the odd ones (0.5 = invisible).
Attacks fitted against a model first (BadCLIP, TrojVQA, ISSBA) are refused.
"""
import argparse
import itertools
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from pipeline import build
from pipeline.config import load_config
from rvpt.attacks import make_attack
from rvpt.metrics import trigger
from rvpt.shards import iter_samples, split_urls

QUANTILES = torch.tensor([0.5, 0.9, 0.99, 1.0])


def features(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> [B,9] local-roughness and colour-disagreement statistics."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().sum(1)[:, :-1, :]
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().sum(1)[:, :, :-1]
    chan = images.std(1)[:, :-1, :-1]
    rough = F.avg_pool2d((dx + dy)[:, None], 2, 1)[:, 0].flatten(1)
    colour = F.avg_pool2d(chan[:, None], 2, 1)[:, 0].flatten(1)
    return torch.cat([torch.quantile(rough, QUANTILES, dim=1).T,
                      torch.quantile(colour, QUANTILES, dim=1).T,
                      (rough * colour).max(1, keepdim=True).values], 1).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--params", default="{}", help="attack parameters (JSON)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.images < 8 or args.images % 4:
        sys.exit("--images must be a multiple of 4, at least 8")
    cfg = load_config(None, args.overrides)
    cdir = build.resolve_corpus(cfg)["corpus_dir"]
    size = cfg.corpus.image_size
    samples = list(itertools.islice(iter_samples(split_urls(cdir, args.split), size), args.images))
    if len(samples) < args.images:
        sys.exit(f"split {args.split!r} has only {len(samples)} samples")
    params = json.loads(args.params)
    attack = make_attack(args.attack, size, seed=cfg.seed, **params)
    if attack.needs_fit:
        sys.exit(f"{args.attack} is fitted against a model first; bench_trigger_visibility.py probes it")
    x = torch.stack([s.image for s in samples]).float().div(255)
    half = args.images // 2
    xp = trigger(attack, x[half:], [s.key for s in samples[half:]])
    X = np.concatenate([features(x[:half]), features(xp)])
    y = np.r_[np.zeros(half), np.ones(len(xp))]
    even = np.arange(len(y)) % 2 == 0
    clf = LogisticRegression(max_iter=5000).fit(X[even], y[even])
    print(f"{args.attack} {params} on {args.split} ({args.images} images): "
          f"held-out accuracy {clf.score(X[~even], y[~even]):.3f}")


if __name__ == "__main__":
    main()
