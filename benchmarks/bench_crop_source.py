"""Prompt tuning's random-resized crops taken from the stored image, or from the model-size image.

    .venv/bin/python benchmarks/bench_crop_source.py [--source-size 64] [--defenses vpt]
        [--seeds 0] [--model clean|MODEL_DIR] [--threads 0] [--config FILE] [--out FILE]
        [key.sub=value ...]

CoOp (the recipe VPT and RVPT train with) crops the few-shot image as it is stored and resizes the
crop to the model's input: an 8 % crop of an ImageNet photo (about 400 px) is some 113 px, upsampled
2x to 224. The embedded benchmark stores its images at the model's 32 px, so the same 8 % crop is
9 px, upsampled 3.6x, and the crop loses most of the shape. This renders the shapes task's
few-shot split again at ``--source-size`` (the corpus's seed and parameters; the same images,
finer), then trains each defense twice on the same shots: ``resized first`` (each image resized to
the model's size on read, as the pipeline reads it, then cropped) and ``cropped from source`` (the
crop taken from the stored image, CoOp's order). Both are measured on the corpus's own test split
(CA; with an attacked model, ASR and PA too), next to the model's zero-shot figures.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline import backdoor, build
from pipeline.config import load_config
from rvpt.defenses import make_defense, train_defense
from rvpt.fewshot import epoch_batches, sample_few_shot
from rvpt.shards import Sample, decode_image, read_classes


def render_pool(cfg, source_size: int) -> list:
    """The corpus's few-shot split (domain ``base``) rendered at ``source_size``: (key, png, label)."""
    c = cfg.corpus
    n = c.fewshot_per_class * c.num_classes
    kw = dict(image_size=source_size, num_classes=c.num_classes, clutter=c.clutter, noise=c.noise,
              class_only_captions=c.class_only_captions, typical_color=c.typical_color,
              bg_contrast=c.bg_contrast)
    labels = list(build.synthetic.split_labels("fewshot", n, c.num_classes))
    rows = build._render_chunk((c.seed, "base", "fewshot", list(range(n)), labels, kw))
    return [(key, png, label) for key, png, _caption, label, _meta in rows]


def pool_samples(rows: list, image_size) -> list:
    """Samples decoded as the reader decodes them: resized to ``image_size`` (None: as stored)."""
    return [Sample(key=k, image=decode_image(png, image_size), label=lab, text="", meta={})
            for k, png, lab in rows]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source-size", type=int, default=64)
    ap.add_argument("--defenses", default="vpt")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--model", default="clean")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    build.set_threads(args.threads)
    corpus = build.resolve_corpus(cfg)
    corpus_dir = corpus["corpus_dir"]
    info = read_classes(corpus_dir)
    model = (build.clean_model(cfg, corpus)["model_dir"] if args.model == "clean" else args.model)
    loaded, attack, target, _ = backdoor.load_backdoored(model, None, info.names, cfg.torch_device())
    if args.source_size <= loaded.image_size:
        raise SystemExit(f"--source-size {args.source_size}: must exceed the model's "
                         f"{loaded.image_size} px")
    names = args.defenses.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = render_pool(cfg, args.source_size)
    pools = {"resized first": pool_samples(rows, loaded.image_size),
             "cropped from source": pool_samples(rows, None)}
    zero = backdoor.evaluate_backdoor(cfg, loaded, corpus_dir, attack, target)
    keys = ("ca", "asr", "pa")
    print(f"model {model}: zero-shot " + ", ".join(f"{k} {zero[k]:.4f}" for k in keys if k in zero),
          flush=True)
    results = {"model": str(model), "source_size": args.source_size, "zero_shot": zero, "runs": []}
    for name in names:
        for seed in seeds:
            for arm, pool in pools.items():
                d = make_defense(name, loaded, info.names, info.templates, seed=seed,
                                 **cfg.defense.params)
                tp = d.train_params(cfg.defense.train)
                shots = sample_few_shot(pool, tp.shots, len(info.names), seed=seed)
                start = time.perf_counter()
                train_defense(d, tp, epoch_batches(shots, tp.batch_size, seed),
                              -(-len(shots) // tp.batch_size))
                res = backdoor.evaluate_backdoor(cfg, loaded, corpus_dir, attack, target, defense=d)
                run = {"defense": name, "seed": seed, "arm": arm,
                       "seconds": round(time.perf_counter() - start, 1),
                       **{k: res[k] for k in keys if k in res}}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
    print(f"\n{'defense':8} {'arm':20} " + " ".join(f"{k:>16}" for k in keys if k in zero))
    for name in names:
        for arm in pools:
            rs = [r for r in results["runs"] if r["defense"] == name and r["arm"] == arm]
            cells = []
            for k in keys:
                if k in zero:
                    v = np.array([r[k] for r in rs]) * 100
                    cells.append(f"{v.mean():7.2f} ± {v.std():5.2f}")
            print(f"{name:8} {arm:20} " + " ".join(f"{c:>16}" for c in cells))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
