"""How fine a trigger can the embedded CLIP learn? Poison it with fixed blend triggers of
increasing spatial frequency and compare how far each is planted after the same fine-tune.

    .venv/bin/python benchmarks/bench_trigger_frequency.py [--cells 2,4,8,16,32] [--ratio 0.2]
        [--steps 300] [--per-batch 13] [--lr 5e-4] [--jobs 2] [--reference sig,blended]
        [--out FILE] [key.sub=value ...]

Each trigger is uniform noise drawn on a ``cells`` × ``cells`` grid (seeded) and upsampled
bilinearly to the image size, blended at ``--ratio`` as the ``blended`` attack's ``trigger_image``:
``cells`` = image size is per-pixel noise (the frequency of the papers' BadNet/Blended noise, but
fixed), 4 is blobs of about 8 px. Every run is :mod:`bench_backdoor_learning` with the factory's
objective (open_clip's ClipLoss, ``--per-batch`` poisoned pairs in every batch of 128) from the
config's clean model; ``--reference`` adds the named attacks at their defaults (SIG, per-image
noise Blended) on the same footing. Prints, per trigger, the share of poisoned training images the
model sends to the target and test ASR / CA at the last step.

First it measures what the model sees (``--probe``, a few seconds): the mean cosine distance
between the embeddings of test images and of the same images plus a random perturbation of RMS
``--eps`` per pixel, once for a perturbation that is constant inside each ViT patch (it changes
only the patches' mean colours) and once for one with zero mean inside each patch (the same
energy, all of it within-patch structure), for the clean model and for a randomly initialised one.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent


def noise_image(cells: int, size: int, seed: int, path: Path) -> None:
    rng = np.random.default_rng([seed, cells])
    small = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
    small.resize((size, size), Image.BILINEAR).save(path)


def split_by_patch(d: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d`` = (the patches' means, spread over each patch) + (the rest, zero mean per patch)."""
    mean = F.interpolate(F.avg_pool2d(d, patch), scale_factor=patch, mode="nearest")
    return mean, d - mean


def patch_sensitivity(overrides: list[str], eps: float, n: int = 256, seed: int = 0) -> dict:
    """Embedding change under per-patch-mean vs within-patch perturbations of equal energy."""
    from pipeline import build
    from pipeline.config import load_config
    from rvpt.models import load_clip

    torch.manual_seed(seed)
    cfg = load_config(None, overrides)
    corpus = build.resolve_corpus(cfg)
    models = {"clean": build.load_model(cfg, build.clean_model(cfg, corpus)),
              "random init": load_clip(cfg.model.name)}
    out = {}
    with torch.no_grad():  # not around the build: it may have to pretrain the clean model
        for name, loaded in models.items():
            out[name] = _sensitivity(loaded, corpus["corpus_dir"], eps, n)
    return out


def _sensitivity(loaded, corpus_dir: str, eps: float, n: int) -> dict:
    from rvpt.shards import iter_samples, split_urls

    size = loaded.image_size
    patch = loaded.model.visual.conv1.kernel_size[0]
    test = list(itertools.islice(iter_samples(split_urls(corpus_dir, "test"), size), n))
    x = torch.stack([s.image for s in test]).float().div(255)
    e0 = loaded.encode_images(x)
    row = {}
    for kind, part in (("patch_mean", 0), ("within_patch", 1)):
        d = split_by_patch(torch.randn_like(x), patch)[part]
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * x[0].numel() ** 0.5
        row[kind] = (1 - (e0 * loaded.encode_images(x + d)).sum(1)).mean().item()
    row["ratio"] = row["patch_mean"] / row["within_patch"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="2,4,8,16,32")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--size", type=int, default=32, help="the model's image size")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--per-batch", type=int, default=13)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--reference", default="", help="attacks run at their defaults, e.g. sig,blended")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=0.03, help="perturbation RMS per pixel (probe)")
    ap.add_argument("--no-probe", dest="probe", action="store_false")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sensitivity = {}
    if args.probe:
        sensitivity = patch_sensitivity(args.overrides, args.eps, seed=args.seed)
        print(f"embedding cosine distance under a perturbation of RMS {args.eps} per pixel:")
        print("| model | patch means only | within-patch only | ratio |\n|---|---|---|---|")
        for name, r in sensitivity.items():
            print(f"| {name} | {r['patch_mean']:.2e} | {r['within_patch']:.2e} | {r['ratio']:.1f} |")
    tmp = Path(tempfile.mkdtemp(prefix="trigger-frequency-"))
    runs = []
    for cells in [int(c) for c in args.cells.split(",") if c]:
        if not 1 <= cells <= args.size:
            sys.exit(f"--cells values must be within [1, {args.size}], got {cells}")
        png = tmp / f"noise{cells}.png"
        noise_image(cells, args.size, args.seed, png)
        params = {"trigger_image": str(png), "ratio": args.ratio}
        runs.append((f"fixed noise {cells}x{cells}", "blended", params))
    for name in [a for a in args.reference.split(",") if a]:
        runs.append((f"{name} (defaults)", name, {}))

    def run(item):
        label, attack, params = item
        out = tmp / f"{len(label)}-{abs(hash(label))}.json"
        cmd = [sys.executable, "-u", str(HERE / "bench_backdoor_learning.py"), "--attack", attack,
               "--params", json.dumps(params), "--per-batch", str(args.per_batch),
               "--lr", str(args.lr), "--steps", str(args.steps), "--every", str(args.steps),
               "--threads", "1", "--out", str(out), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return label, {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        rows = json.loads(out.read_text())["rows"]
        print(f"done: {label}: {rows[-1]}", flush=True)
        return label, rows[-1]

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, runs))
    print(f"\n{args.steps} steps, {args.per_batch} poisoned per batch of 128, lr {args.lr}, "
          f"blend ratio {args.ratio}")
    print("| trigger | poisoned train → target | ASR | CA |")
    print("|---|---|---|---|")
    for label, row in results:
        if "error" in row:
            print(f"| {label} | failed: {row['error'][0]} | | |")
            continue
        print(f"| {label} | {100 * row['train_poison_to_target']:.1f} % | "
              f"{100 * row['asr']:.2f} % | {100 * row['ca']:.2f} % |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "sensitivity": sensitivity,
                                              "results": dict(results)},
                                             indent=1))


if __name__ == "__main__":
    main()
