"""What one step of the contrastive loop costs, and what torch already offers to make it cheaper.

    .venv/bin/python benchmarks/bench_pretrain_step.py [--model ViT-Mini-8-p4-32] [--batch 128]
        [--steps 30] [--warmup 5] [--modes eager,compile,bf16,compile-bf16] [--threads 0] [--out FILE]

Runs :func:`rvpt.pretrain.train_contrastive` itself (the loop pretraining and the backdoor factory
use) on random images and fixed captions, so that only the model's cost is measured (no decoding),
and times its steps from the loop's progress callback. Modes: ``eager`` (the loop's default),
``compile`` (its ``compile=True``: ``torch.compile``, inductor; ``pretrain.compile``), ``bf16``
(the loop under ``torch.autocast("cpu", torch.bfloat16)``, fp32 weights; not an option of the
pipeline), ``compile-bf16`` (both). Each mode starts from the same random init; the first
``--warmup`` steps (compilation included) are not timed, and their wall time is reported apart.
"""
import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from pipeline import build
from rvpt.models import load_clip
from rvpt.pretrain import train_contrastive


def run(mode: str, args) -> dict:
    torch.manual_seed(0)
    loaded = load_clip(args.model)
    size, n = loaded.image_size, args.warmup + args.steps
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    words = ["a", "photo", "of", "red", "circle", "square", "grain", "blur", "on", "stripes"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(4 + i % 8)) for i in range(args.batch)]
    stamps, losses = [], []

    def on_step(step, total, loss):
        stamps.append(time.perf_counter())
        losses.append(loss)

    bf16 = torch.autocast("cpu", dtype=torch.bfloat16) if mode.endswith("bf16") \
        else contextlib.nullcontext()
    start = time.perf_counter()
    with bf16:
        train_contrastive(loaded, lambda epoch: ({"image": images, "text": texts} for _ in range(n)),
                          epochs=1, steps_per_epoch=n, lr=1e-3, warmup_steps=args.warmup,
                          progress=on_step, compile=mode.startswith("compile"))
    warm_s = stamps[args.warmup - 1] - start if args.warmup else 0.0
    s = (stamps[-1] - (stamps[args.warmup - 1] if args.warmup else start)) / args.steps
    row = {"mode": mode, "s_per_step": round(s, 4), "samples_per_s": round(args.batch / s, 1),
           "warmup_s": round(warm_s, 1), "last_loss": round(losses[-1], 4)}
    print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-Mini-8-p4-32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="eager,compile,bf16,compile-bf16")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    build.set_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
          f"batch {args.batch}", flush=True)
    rows = [run(m.strip(), args) for m in args.modes.split(",") if m.strip()]
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
