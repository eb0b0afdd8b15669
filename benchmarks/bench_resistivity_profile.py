"""Per-layer Perturbation Resistivity of a contrastive CLIP vs a supervised ViT (the RVPT paper's Figure 1).

    .venv/bin/python benchmarks/bench_resistivity_profile.py [--train-split pretrain] [--sup-epochs 4]
        [--sup-batch-size 128] [--sup-lr 1e-3] [--sup-weight-decay 0.05] [--sup-augment none|vit]
        [--pr-images 512] [--threads N] [--plot F.png] [--out F.json] [--config FILE] [key.sub=value ...]

Two image towers of the same open_clip architecture (``model.name``):

- **CLIP**: the config's clean contrastively pretrained model (built or reused as every job does);
  its zero-shot clean accuracy (CA) on the test split is printed;
- **supervised**: the same visual tower from random init, trained with cross-entropy only, through a
  linear head on its output embedding, on the images of ``--train-split`` that carry a class label
  in [0, num_classes) (AdamW, cosine lr; no augmentation, or with ``--sup-augment vit`` the image
  augmentation supervised ViTs are trained with, torchvision's ViT-B/16 recipe without its label
  mixing: a random-resized crop of 8-100 % of the area, a horizontal flip and RandAugment, two ops
  at magnitude 9, drawn per image); its test accuracy (argmax of the head) is printed. It is
  cached under ``<paths.root>/models/supervised-<hash>/`` (safetensors; the hash covers
  the corpus, the model name, the ``--sup-*`` options and ``seed``), so a second run reuses it.

For each of the paper's four perturbations (Gaussian noise σ 0.001, Gaussian blur kernel 3 with
σ² = 5, colour jitter brightness 0.5 / hue 0.3, horizontal flip) it measures, after every visual
block, the cosine between the CLS token of a test image and of its perturbed copy, averaged over
``--pr-images`` test images (:func:`rvpt.resistivity.perturbation_resistivity`; both models see the
same images and the same random draws). The paper's claim is that the contrastive model's PR falls
much lower than the supervised model's in the later blocks.

Prints a table per perturbation (block, CLIP PR, supervised PR, and the mean over blocks);
``--out`` writes every number as JSON, ``--plot`` the Figure-1 style plot (one panel per
perturbation, PR against block index, a line per model; skipped with a message when matplotlib is
missing).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import build  # noqa: E402
from pipeline.config import Config, config_hash, load_config  # noqa: E402
from rvpt import storage  # noqa: E402
from rvpt.models import LoadedClip, load_clip  # noqa: E402
from rvpt.resistivity import PERTURBATIONS, perturbation_resistivity  # noqa: E402
from rvpt.shards import Sample, iter_batches, open_corpus, read_classes  # noqa: E402

WEIGHTS = "supervised_vit.safetensors"  # visual.* (the open_clip image tower) and head.* (linear)
SUMMARY = build.SUMMARY
RECIPE = 1  # bump when the training recipe changes, so cached models are not reused across it


# ---------------------------------------------------------------- the supervised ViT

AUGMENTS = ("none", "vit")


def sup_options(args: argparse.Namespace, cfg: Config) -> dict:
    opts = {"train_split": args.train_split, "epochs": args.sup_epochs,
            "batch_size": args.sup_batch_size, "lr": args.sup_lr,
            "weight_decay": args.sup_weight_decay, "shuffle_buffer": cfg.pretrain.shuffle_buffer}
    if args.sup_augment != "none":  # only then, so models cached before the option keep their key
        opts["augment"] = args.sup_augment
    return opts


def sup_augmenter(kind: str, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image augmentation of uint8 images [B,3,H,W] (torch's global generator): the identity,
    or ``vit``: torchvision's supervised ViT-B/16 recipe's image transforms (random-resized crop,
    scale 0.08-1; horizontal flip; RandAugment, 2 ops, magnitude 9)."""
    if kind == "none":
        return lambda x: x
    if kind != "vit":
        raise ValueError(f"unknown supervised augmentation {kind!r}; known: {', '.join(AUGMENTS)}")
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
                     v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9)])
    return lambda x: torch.stack([tf(img) for img in x])


def supervised_key(cfg: Config, corpus_dir: str, opts: dict) -> str:
    return config_hash({"recipe": RECIPE, "corpus": storage.name_of(corpus_dir),
                        "model": cfg.model.name, "sup": opts, "seed": cfg.seed})


def labelled_samples(cfg: Config, corpus_dir: str, split: str, image_size: int, num_classes: int,
                     **kw) -> Iterator[Sample]:
    """The samples of a split that carry a class label (unlabelled ones are read with label -1)."""
    for s in build.samples(cfg, corpus_dir, split, image_size, require_label=False, **kw):
        if 0 <= s.label < num_classes:
            yield s


def labelled_count(cfg: Config, corpus_dir: str, split: str, image_size: int,
                   num_classes: int) -> int:
    """How many labelled samples a split has: from the manifest's per-class counts, else counted."""
    per_class = open_corpus(corpus_dir).split(split).per_class
    if isinstance(per_class, dict) and per_class:
        return sum(int(v) for k, v in per_class.items()
                   if str(k).lstrip("-").isdigit() and 0 <= int(k) < num_classes)
    return sum(1 for _ in labelled_samples(cfg, corpus_dir, split, image_size, num_classes))


def _new_supervised(cfg: Config, num_classes: int) -> tuple[LoadedClip, nn.Linear]:
    """A randomly initialised model of the config's architecture and a linear head (seeded)."""
    torch.manual_seed(cfg.seed)
    loaded = load_clip(cfg.model.name, device=cfg.torch_device())
    visual = loaded.model.visual
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        with torch.no_grad():
            dim = visual(torch.zeros(1, 3, *loaded._input_hw(), device=loaded.device)).shape[-1]
    head = nn.Linear(int(dim), num_classes).to(loaded.device)
    return loaded, head


def _logits(loaded: LoadedClip, head: nn.Linear, images_u8: torch.Tensor) -> torch.Tensor:
    return head(loaded.model.visual(loaded.normalize(images_u8.float().div(255))))


def train_supervised(cfg: Config, corpus_dir: str, opts: dict, num_classes: int,
                     ) -> tuple[LoadedClip, nn.Linear, dict]:
    """Train the visual tower + linear head with cross-entropy on the labelled training images."""
    loaded, head = _new_supervised(cfg, num_classes)
    visual = loaded.model.visual
    augment = sup_augmenter(opts.get("augment", "none"), loaded.image_size)
    split, bs, epochs = opts["train_split"], opts["batch_size"], opts["epochs"]
    n = labelled_count(cfg, corpus_dir, split, loaded.image_size, num_classes)
    if n == 0:
        raise SystemExit(f"split {split!r} of {corpus_dir} has no labelled images to train on")
    drop_last = n >= bs
    steps_per_epoch = max(1, n // bs) if drop_last else 1
    total = max(1, epochs * steps_per_epoch)
    params = [p for m in (visual, head) for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opts["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=opts["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    bar = build.progress_bar(total=total, desc="training supervised ViT", unit="step")
    start = time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        visual.train()
        head.train()
        seed = cfg.seed * 1000 + epoch
        stream = labelled_samples(cfg, corpus_dir, split, loaded.image_size, num_classes,
                                  shuffle_shards=True, seed=seed)
        losses = []
        for batch in iter_batches(stream, bs, shuffle_buffer=opts["shuffle_buffer"], seed=seed,
                                  drop_last=drop_last):
            loss = F.cross_entropy(_logits(loaded, head, augment(batch["image"])),
                                   batch["label"].to(loaded.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            seen += len(batch["label"])
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        step_losses += losses
        epoch_losses.append(sum(losses) / max(1, len(losses)))
    bar.close()
    wall = time.perf_counter() - start
    loaded.model.eval()
    head.eval()
    summary = {"model": cfg.model.name, "num_classes": num_classes, "options": opts,
               "seed": cfg.seed, "train_images": n, "steps": len(step_losses),
               "samples_seen": seen, "train_wall_s": round(wall, 1),
               "epoch_losses": [round(x, 4) for x in epoch_losses],
               "step_losses": [round(x, 4) for x in step_losses]}
    return loaded, head, summary


def save_supervised(cfg: Config, out: str, loaded: LoadedClip, head: nn.Linear,
                    summary: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"visual.{k}": v.detach().cpu().contiguous()
               for k, v in loaded.model.visual.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    with storage.publish(out, SUMMARY) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        cfg.dump(tmp / "config.yaml")
        storage.write_json(str(tmp / SUMMARY), summary)


def load_supervised(cfg: Config, out: str, num_classes: int) -> tuple[LoadedClip, nn.Linear]:
    from safetensors.torch import load_file

    loaded, head = _new_supervised(cfg, num_classes)
    sd = load_file(str(storage.local_copy(storage.join(out, WEIGHTS))), device="cpu")
    loaded.model.visual.load_state_dict(
        {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, strict=True)
    head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")},
                         strict=True)
    loaded.model.eval()
    head.eval()
    return loaded, head


def supervised_model(cfg: Config, corpus_dir: str, opts: dict, num_classes: int
                     ) -> tuple[LoadedClip, nn.Linear, dict]:
    """The supervised ViT for these options: reused from the cache, or trained and cached."""
    out = storage.join(cfg.root(), "models", f"supervised-{supervised_key(cfg, corpus_dir, opts)}")
    if storage.exists(storage.join(out, SUMMARY)):
        loaded, head = load_supervised(cfg, out, num_classes)
        return loaded, head, {**storage.read_json(storage.join(out, SUMMARY)), "model_dir": out,
                              "cached": True}
    loaded, head, summary = train_supervised(cfg, corpus_dir, opts, num_classes)
    save_supervised(cfg, out, loaded, head, summary)
    return loaded, head, {**summary, "model_dir": out, "cached": False}


@torch.no_grad()
def head_accuracy(cfg: Config, loaded: LoadedClip, head: nn.Linear, corpus_dir: str,
                  split: str = "test") -> dict:
    loaded.model.eval()
    head.eval()
    correct = total = 0
    for batch in iter_batches(build.samples(cfg, corpus_dir, split, loaded.image_size),
                              cfg.eval.batch_size):
        pred = _logits(loaded, head, batch["image"]).argmax(-1).cpu()
        correct += int((pred == batch["label"]).sum())
        total += len(pred)
    return {"acc": correct / max(1, total), "n": total}


# ---------------------------------------------------------------- PR profile

def pr_profile(cfg: Config, loaded: LoadedClip, corpus_dir: str, n_images: int) -> dict:
    """``{"per_layer": {perturbation: [PR per block]}, "mean": {perturbation: mean}, "images"}``."""
    batches = iter_batches(build.samples(cfg, corpus_dir, "test", loaded.image_size),
                           cfg.eval.batch_size)
    pr = perturbation_resistivity(loaded, batches, seed=cfg.seed, max_images=n_images)
    layers = len([k for k in pr if k.startswith("pr/noise/")])
    return {"per_layer": {p: [pr[f"pr/{p}/{i}"] for i in range(layers)] for p in PERTURBATIONS},
            "mean": {p: pr[f"pr/{p}"] for p in PERTURBATIONS}, "pr_mean": pr["pr_mean"],
            "images": pr["pr_images"]}


def table(res: dict) -> str:
    clip, sup = res["models"]["clip"], res["models"]["supervised"]
    lines = [f"CLIP (contrastive): zero-shot CA {100 * clip['zero_shot_ca']:.2f} % "
             f"(n={clip['zero_shot_n']});  supervised ViT: test accuracy "
             f"{100 * sup['test_acc']:.2f} % (n={sup['test_n']});  "
             f"PR over {clip['pr']['images']} test images"]
    for p in PERTURBATIONS:
        lines += ["", f"{p}:", "| block | CLIP PR | supervised PR |", "|---|---|---|"]
        for i, (a, b) in enumerate(zip(clip["pr"]["per_layer"][p], sup["pr"]["per_layer"][p])):
            lines.append(f"| {i + 1} | {a:.5f} | {b:.5f} |")
        lines.append(f"| mean | {clip['pr']['mean'][p]:.5f} | {sup['pr']['mean'][p]:.5f} |")
    lines += ["", f"mean over the four perturbations and all blocks: CLIP {clip['pr']['pr_mean']:.5f}, "
              f"supervised {sup['pr']['pr_mean']:.5f}"]
    return "\n".join(lines)


def plot(res: dict, path: str) -> Optional[str]:
    """Figure 1 style: a panel per perturbation, PR vs block, a line per model. None when
    matplotlib is missing (then nothing is drawn)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = (("clip", "CLIP (contrastive)", "tab:red"), ("supervised", "supervised ViT", "tab:blue"))
    names = list(PERTURBATIONS)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, p in zip(axes[0], names):
        for key, label, colour in models:
            ys = res["models"][key]["pr"]["per_layer"][p]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=label, color=colour)
        ax.set_title(p)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[0][0].set_ylabel("perturbation resistivity (cos)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{res['model_name']}: per-block PR, {res['models']['clip']['pr']['images']} "
                 f"test images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-split", default="pretrain")
    ap.add_argument("--sup-epochs", type=int, default=4)
    ap.add_argument("--sup-batch-size", type=int, default=128)
    ap.add_argument("--sup-lr", type=float, default=1e-3)
    ap.add_argument("--sup-weight-decay", type=float, default=0.05)
    ap.add_argument("--sup-augment", choices=AUGMENTS, default="none",
                    help="train the supervised ViT without augmentation or with a supervised ViT "
                         "recipe's (crop, flip, RandAugment)")
    ap.add_argument("--pr-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--config")
    ap.add_argument("--plot")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    corpus = build.resolve_corpus(cfg)
    print(build.corpus_line(corpus), flush=True)
    corpus_dir = corpus["corpus_dir"]
    num_classes = len(read_classes(corpus_dir).names)
    clean = build.clean_model(cfg, corpus)
    print(build.clean_model_line(cfg, clean), flush=True)
    build.set_threads(args.threads)  # after clean_model, which sets pretrain.threads
    clip = build.load_model(cfg, clean)
    zs = build.zero_shot(cfg, clip, corpus_dir)
    clip_pr = pr_profile(cfg, clip, corpus_dir, args.pr_images)

    opts = sup_options(args, cfg)
    sup, head, summary = supervised_model(cfg, corpus_dir, opts, num_classes)
    state = "reused" if summary["cached"] else f"trained in {summary['train_wall_s']} s"
    print(f"supervised ViT: {summary['model_dir']} ({state}; {summary['steps']} steps on "
          f"{summary['train_images']} labelled {args.train_split!r} images, epoch losses "
          f"{summary['epoch_losses']})", flush=True)
    acc = head_accuracy(cfg, sup, head, corpus_dir)
    sup_pr = pr_profile(cfg, sup, corpus_dir, args.pr_images)

    res = {"args": vars(args), "model_name": cfg.model.name, "corpus_dir": corpus_dir,
           "num_classes": num_classes, "perturbations": list(PERTURBATIONS),
           "layers": len(clip_pr["per_layer"]["noise"]),
           "models": {
               "clip": {"model": clean.get("model_dir") or cfg.model.name,
                        "zero_shot_ca": zs["ca"], "zero_shot_n": zs["n"], "pr": clip_pr},
               "supervised": {"model_dir": summary["model_dir"], "cached": summary["cached"],
                              "test_acc": acc["acc"], "test_n": acc["n"], "train": summary,
                              "pr": sup_pr}}}
    print()
    print(table(res))
    if args.plot:
        drawn = plot(res, args.plot)
        print(f"plot: {drawn}" if drawn else "plot skipped: matplotlib is not installed")
    res["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"wall time: {res['wall_s']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
