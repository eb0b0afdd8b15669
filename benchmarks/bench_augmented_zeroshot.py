"""Zero-shot clean accuracy on whole test images and on the views prompt tuning trains on.

    .venv/bin/python benchmarks/bench_augmented_zeroshot.py [--models clean,MODEL_DIR,...]
        [--threads 0] [--config FILE] [--out FILE] [key.sub=value ...]

Prompt tuning (VPT, RVPT) trains on random-resized crops and flips of the few-shot images (the
CoOp recipe, ``rvpt.defenses.base.TrainParams``). When a model classifies such views much worse
than whole images, the prompts learn the views at the expense of whole images and clean accuracy
falls. For each model this prints the zero-shot accuracy (one prompt per class, as the defenses
evaluate) on the test split: whole, cropped at the recipe's scale, cropped at (0.5, 1), flipped,
and the recipe's augmentation (crop + random flip). ``clean`` is the config's clean model (built
or reused), anything else a model directory.
"""
import argparse
import json
from pathlib import Path

import torch
from torchvision.transforms import v2

from pipeline import build
from pipeline.config import load_config
from rvpt.defenses.base import TrainParams, augmenter
from rvpt.models import load_clip
from rvpt.shards import iter_batches, read_classes
from rvpt.zeroshot import class_embeddings


def views(image_size: int) -> dict:
    tp = TrainParams()
    per_image = {
        "whole": None,
        f"crop {tuple(tp.crop_scale)}": v2.RandomResizedCrop(image_size, scale=tuple(tp.crop_scale),
                                                            antialias=True),
        "crop (0.5, 1.0)": v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
        "flip": v2.RandomHorizontalFlip(1.0),
    }
    out = {k: (None if tf is None else (lambda x, tf=tf: torch.stack([tf(i) for i in x])))
           for k, tf in per_image.items()}
    out["recipe (crop + flip)"] = augmenter(tp, image_size)
    return out


@torch.no_grad()
def accuracy(loaded, batches, classifier, view) -> float:
    correct = n = 0
    for b in batches:
        x = b["image"].float().div(255)
        if view is not None:
            x = view(x)
        pred = (loaded.encode_images(x) @ classifier.T).argmax(-1)
        correct += int((pred == b["label"]).sum())
        n += len(pred)
    return correct / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="clean")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    build.set_threads(args.threads)
    corpus = build.resolve_corpus(cfg)
    corpus_dir = corpus["corpus_dir"]
    info = read_classes(corpus_dir)
    results = {}
    for name in args.models.split(","):
        loaded = (build.load_model(cfg, build.clean_model(cfg, corpus)) if name == "clean"
                  else load_clip(checkpoint=name, device=cfg.torch_device()))
        clf = class_embeddings(loaded, info.names, info.templates, ensemble=cfg.eval.prompt_ensemble)
        batches = list(iter_batches(build.samples(cfg, corpus_dir, "test", loaded.image_size),
                                    cfg.eval.batch_size))
        results[name] = {}
        for view_name, view in views(loaded.image_size).items():
            torch.manual_seed(cfg.seed)
            results[name][view_name] = acc = accuracy(loaded, batches, clf, view)
            print(f"{name}  {view_name:22s} {100 * acc:6.2f} %", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
