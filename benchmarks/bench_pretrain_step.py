"""What one contrastive training step costs, and what torch already offers to make it cheaper.

    .venv/bin/python benchmarks/bench_pretrain_step.py [--model ViT-Mini-8-p4-32] [--batch 128]
        [--steps 30] [--warmup 5] [--modes eager,compile,bf16,compile-bf16] [--threads 0] [--out FILE]

Times the step of :func:`rvpt.pretrain.train_contrastive` (normalise, tokenise, forward, open_clip's
ClipLoss, backward, AdamW) on random images and fixed captions, so that only the model's cost is
measured (no decoding). Modes: ``eager`` (the loop as it is), ``compile`` (``torch.compile`` of the
model, inductor), ``bf16`` (``torch.autocast("cpu", torch.bfloat16)`` around forward and loss, fp32
weights), ``compile-bf16`` (both). Each mode starts from the same random init; the first ``--warmup``
steps (compilation included) are not timed, and their wall time is reported apart.
"""
import argparse
import json
import math
import time
from pathlib import Path

import open_clip
import torch

from pipeline import build
from rvpt.models import load_clip
from rvpt.pretrain import param_groups


def run(mode: str, args) -> dict:
    torch.manual_seed(0)
    loaded = load_clip(args.model)
    model = loaded.model
    model.train()
    fwd = torch.compile(model) if mode.startswith("compile") else model
    bf16 = mode.endswith("bf16")
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    size = loaded.image_size
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    words = ["a", "photo", "of", "red", "circle", "square", "grain", "blur", "on", "stripes"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(4 + i % 8)) for i in range(args.batch)]

    def step() -> float:
        x = loaded.normalize(images.float().div(255))
        t = loaded.tokenizer(texts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img_f, txt_f, scale = fwd(x, t)[:3]
            loss = loss_fn(img_f.float(), txt_f.float(), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    s = (time.perf_counter() - t0) / args.steps
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
