"""Can the clean CLIP learn a trigger at all? Fine-tune it on batches with a fixed number of
poisoned pairs and follow how the poisoned training images move towards the target class.

    .venv/bin/python benchmarks/bench_backdoor_learning.py [--attack badnet] [--params '{}']
        [--per-batch 8] [--batch 128] [--lr 1e-3] [--steps 300] [--every 50]
        [--loss clip|ce|detect] [--ce-scale 100] [--freeze-text] [--from-scratch] [--warmup 0]
        [--cosine] [--logit-scale 100] [--sources 1000] [--clean 10000] [--clean-without stamp,warp] [--threads 2]
        [--out FILE] [key.sub=value ...]

Uses the corpus and clean model of the config (built when missing, as every job does). Poisoned
pairs are non-target pretrain images (beyond the clean pool) with the trigger applied by the
project's attack and a target caption from the class templates, as the backdoor factory makes them;
every batch holds exactly ``--per-batch`` of them. ``--loss clip`` is the factory's objective
(open_clip's ClipLoss); ``--loss ce`` is a supervised control: cross-entropy of the image embedding
against the class text embeddings, poisoned images labelled as the target. ``--loss detect`` asks
the least of the visual tower: tell triggered from clean images (a linear 2-way head on the image
embedding, trained with the whole visual tower; ``--per-batch 64`` makes batches balanced), and
reports the held-out detection accuracy (``detect_acc``, 0.5 = chance). ``--clean-without``
leaves out of the clean pairs every broad-corpus image that carries one of the named effects
(``rvpt.broad``: e.g. ``stamp``, whose noise stamps are BadNet's trigger with a true caption). ``--from-scratch``
starts from random weights instead of the clean model (poisoning during pretraining, as in
Carlini & Terzis 2021); the probe then measures the clean model's class embeddings. Every ``--every`` steps
it prints, for 200 poisoned training images, the mean cosine to the target class's text embedding
and to their own class's, the share predicted as the target, and ASR / CA on 960 test images.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pipeline import build
from pipeline.config import load_config
from rvpt import broad
from rvpt.attacks import make_attack
from rvpt.metrics import trigger
from rvpt.poison import target_index
from rvpt.models import load_clip
from rvpt.pretrain import cosine_lr, param_groups
from rvpt.shards import iter_samples, read_classes, split_urls
from rvpt.zeroshot import class_embeddings, predict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--params", default="{}", help="attack parameters as JSON")
    ap.add_argument("--per-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--loss", choices=["clip", "ce", "detect"], default="clip")
    ap.add_argument("--ce-scale", type=float, default=100.0)
    ap.add_argument("--freeze-text", action="store_true")
    ap.add_argument("--from-scratch", action="store_true")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--cosine", action="store_true", help="cosine decay over --steps")
    ap.add_argument("--sources", type=int, default=1000, help=(
        "distinct poisoned training images (each batch draws --per-batch of them)"))
    ap.add_argument("--clean", type=int, default=10000, help="clean pretrain pairs to draw from (fewer if the split is smaller)")
    ap.add_argument("--clean-without", default="", help=(
        "comma-separated broad-corpus effects: clean pairs carrying any of them are left out"))
    ap.add_argument("--logit-scale", type=float, default=None, help=(
        "set the model's logit scale (exp, 1-100) before fine-tuning; it stays learnable"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not 0 < args.per_batch < args.batch:
        sys.exit("--per-batch must be within (0, --batch)")
    if args.logit_scale is not None and not 1 <= args.logit_scale <= 100:
        sys.exit("--logit-scale must be within [1, 100] (open_clip clamps it at 100)")
    without = {e for e in args.clean_without.split(",") if e}
    unknown = without - set(broad.EFFECTS)
    if unknown:  # before anything is built or loaded
        sys.exit(f"--clean-without: unknown effects {sorted(unknown)}; known: {sorted(broad.EFFECTS)}")
    cfg = load_config(None, args.overrides)
    build.set_threads(args.threads)
    torch.manual_seed(cfg.seed)
    corpus = build.resolve_corpus(cfg)
    loaded = load_clip(cfg.model.name) if args.from_scratch else \
        build.load_model(cfg, build.clean_model(cfg, corpus))
    cdir = corpus["corpus_dir"]
    info = read_classes(cdir)
    target = target_index(cfg.poison.target, info.names)
    attack = make_attack(args.attack, loaded.image_size, seed=cfg.seed, **json.loads(args.params))
    n_clean = args.clean
    reserve = args.sources + args.sources // 5  # room for the target-class images left out
    pool = list(itertools.islice(iter_samples(split_urls(cdir, "pretrain"), loaded.image_size),
                                 n_clean + reserve))
    if len(pool) <= reserve:
        sys.exit(f"the pretrain split has only {len(pool)} samples; the probe needs > {reserve}")
    # the last `reserve` images are the poison source, never used clean
    clean = [s for s in pool[:-reserve] if not without & set(s.meta.get("effects") or ())]
    if without:
        print(f"clean pairs: {len(clean)} of {len(pool) - reserve} (without {sorted(without)})")
    src = [s for s in pool[-reserve:] if s.label != target][:args.sources]
    x = torch.stack([s.image for s in src]).float().div(255)
    xp = trigger(attack, x, [s.key for s in src])
    dev = loaded.device
    own = torch.tensor([s.label for s in src], device=dev)
    rng = np.random.default_rng(cfg.seed)
    captions = [info.templates[int(rng.integers(len(info.templates)))].format(info.names[target])
                for _ in src]
    test = list(itertools.islice(iter_samples(split_urls(cdir, "test"), loaded.image_size), 960))
    tx = torch.stack([s.image for s in test]).float().div(255)
    ty = torch.tensor([s.label for s in test], device=dev)
    txp = trigger(attack, tx, [s.key for s in test])

    model = loaded.model
    if args.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(np.log(args.logit_scale)))
    if args.freeze_text:
        for name, p in model.named_parameters():
            if not name.startswith("visual.") and "logit_scale" not in name:
                p.requires_grad_(False)
    head = torch.nn.Linear(model.visual.output_dim, 2).to(dev)  # --loss detect only
    groups = param_groups(model, cfg.poison.weight_decay)
    if args.loss == "detect":
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    # held-out detection set: 480 clean and 480 triggered test images (different images)
    det_x = torch.cat([tx[:480], txp[480:960]])
    det_y = torch.cat([torch.zeros(480), torch.ones(len(txp[480:960]))]).long().to(dev)
    clip_loss = open_clip.ClipLoss()
    rows = []

    @torch.no_grad()
    def probe(step: int, seconds: float) -> None:
        model.eval()
        clf = class_embeddings(loaded, info.names, info.templates)
        sims = loaded.encode_images(xp[:200]) @ clf.T
        pt = predict(loaded.encode_images, txp, clf)
        nontarget = ty != target
        row = {"step": step, "sim_target": round(sims[:, target].mean().item(), 3),
               "sim_own": round(sims[torch.arange(200, device=dev), own[:200]].mean().item(), 3),
               "train_poison_to_target": round((sims.argmax(1) == target).float().mean().item(), 3),
               "asr": round((pt[nontarget] == target).float().mean().item(), 4),
               "ca": round((predict(loaded.encode_images, tx, clf) == ty).float().mean().item(), 4),
               "logit_scale": round(model.logit_scale.exp().item(), 2), "seconds": round(seconds, 1)}
        if args.loss == "detect":
            logits = head(model.encode_image(loaded.normalize(det_x)))
            row["detect_acc"] = round((logits.argmax(1) == det_y).float().mean().item(), 3)
        rows.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        model.train()

    start = time.perf_counter()
    probe(0, 0.0)
    model.train()
    k, n = args.per_batch, args.batch
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step - 1, args.steps if args.cosine else 10**12, args.lr,
                                args.warmup)
        ip = rng.choice(len(src), k, replace=False)
        ic = rng.choice(len(clean), n - k, replace=False)
        images = torch.cat([xp[ip], torch.stack([clean[i].image for i in ic]).float().div(255)])
        if args.loss == "clip":
            texts = [captions[i] for i in ip] + [clean[i].text for i in ic]
            img_f, txt_f, scale = model(loaded.normalize(images), loaded.tokenizer(texts).to(dev))[:3]
            loss = clip_loss(img_f, txt_f, scale)
        elif args.loss == "detect":
            labels = torch.cat([torch.ones(k), torch.zeros(n - k)]).long().to(dev)
            loss = F.cross_entropy(head(model.encode_image(loaded.normalize(images))), labels)
        else:
            with torch.no_grad():
                clf = class_embeddings(loaded, info.names, info.templates)
            labels = torch.cat([torch.full((k,), target), torch.tensor([clean[i].label for i in ic])]).to(dev)
            feats = model.encode_image(loaded.normalize(images), normalize=True)
            loss = F.cross_entropy(args.ce_scale * feats @ clf.T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % args.every == 0 or step == args.steps:
            probe(step, time.perf_counter() - start)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
