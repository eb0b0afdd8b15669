"""Does a clean model's frozen image embedding already tell triggered images from clean ones?

    .venv/bin/python benchmarks/bench_trigger_visibility.py [--attacks all] [--images 1200]
        [--effects stamp,warp,...] [--models clean,OTHER_MODEL_DIR,...] [--threads 2]
        [--out FILE] [key.sub=value ...]

A backdoor plants at a small dose when the trigger moves the image into a direction the encoder
already represents: the poisoned pairs then only have to tie that direction to the target caption.
For each attack (at the config's per-attack settings) this takes ``--images`` test images, applies
the trigger to half of them (each image is used once, clean or triggered), embeds them with the
frozen visual tower (final embedding and the CLS token after every block), and fits a logistic
regression (scikit-learn) on 2/3 to tell triggered from clean, reporting held-out accuracy on the
rest (0.5 = the trigger is invisible to a linear read-out). ``--models`` compares clean models:
``clean`` is the config's (built or reused), anything else a model directory. Optimised triggers
(BadCLIP, TrojVQA, ISSBA) are fitted against the config's clean model first, as the factory does.
``--effects`` probes the broad corpus's own image effects (``rvpt.broad.EFFECTS``) the same way:
which of the concepts the pretraining captions mention did the model learn to see?
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import backdoor, build
from pipeline.config import load_config
from pipeline.jobs import attack_names
from rvpt import broad
from rvpt.models import load_clip
from rvpt.poison import target_index
from rvpt.resistivity import cls_per_layer
from rvpt.shards import iter_batches, read_classes


def _features(loaded, x01):
    with torch.no_grad():
        layers = cls_per_layer(loaded, x01)
        emb = loaded.encode_images(x01)
    return [emb] + list(layers)


def _with_effect(name, x01, seed):
    """Test images with one of the broad corpus's effects applied (its own random draws)."""
    rng = np.random.default_rng(seed)
    out = []
    for img in x01:
        arr = img.permute(1, 2, 0).numpy() * 255
        arr, _ = broad.EFFECTS[name](rng, arr.astype(np.float32))
        out.append(torch.from_numpy(np.clip(arr, 0, 255) / 255).permute(2, 0, 1).float())
    return torch.stack(out)


def _probe(feats_clean, feats_trig, seed):
    X = np.concatenate([feats_clean, feats_trig])
    y = np.concatenate([np.zeros(len(feats_clean)), np.ones(len(feats_trig))])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    cut = len(X) * 2 // 3
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(X[order[:cut]], y[order[:cut]])
    return float(clf.score(X[order[cut:]], y[order[cut:]]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--effects", default="", help="also these rvpt.broad effects ('all': every one)")
    ap.add_argument("--models", default="clean")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    corpus = build.resolve_corpus(cfg)
    clean = build.clean_model(cfg, corpus)
    build.set_threads(args.threads)
    corpus_dir = corpus["corpus_dir"]
    info = read_classes(corpus_dir)
    ref = build.load_model(cfg, clean)
    images = next(iter_batches(build.samples(cfg, corpus_dir, "test", ref.image_size),
                               args.images))["image"].float().div(255)
    half = len(images) // 2
    models = {}
    for name in args.models.split(","):
        models[name] = ref if name == "clean" else load_clip(checkpoint=name, device=ref.device)
    results = {}
    todo = [("attack", a) for a in (attack_names(args.attacks) if args.attacks else [])]
    effects = list(broad.EFFECTS) if args.effects == "all" else [e for e in args.effects.split(",") if e]
    todo += [("effect", e) for e in effects]
    for kind, name in todo:
        start = time.perf_counter()
        if kind == "effect":
            triggered = _with_effect(name, images[half:], cfg.seed)
        else:
            pc = cfg.poison.for_attack(name)
            attack = backdoor._make_attack(cfg, pc, ref.image_size)
            target = target_index(pc.target, info.names)
            if attack.needs_fit:
                fit = iter_batches((s for s in build.samples(cfg, corpus_dir, "pretrain", ref.image_size,
                                                             require_label=False) if s.label >= 0), 128)
                fit = (b for _, b in zip(range(max(1, pc.fit_images // 128)), fit))
                attack.fit(ref, fit, target, info.names, info.templates)
            triggered = attack.apply(images[half:], seed=cfg.seed).clamp(0, 1)
        row = {}
        for mname, loaded in models.items():
            fc = _features(loaded, images[:half])
            ft = _features(loaded, triggered)
            accs = [_probe(a.cpu().numpy(), b.cpu().numpy(), cfg.seed) for a, b in zip(fc, ft)]
            row[mname] = {"embedding": accs[0], "per_block": accs[1:], "best_block": max(accs[1:])}
        results[f"{kind}:{name}"] = row
        line = "  ".join(f"{m}: emb {r['embedding']:.3f}, best block {r['best_block']:.3f}"
                         for m, r in row.items())
        print(f"{kind} {name:9s} {line}  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"images": len(images), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
