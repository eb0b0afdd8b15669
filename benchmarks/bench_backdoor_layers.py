"""Where a backdoor acts inside the image tower, per block: clean vs backdoored vs defended.

    .venv/bin/python benchmarks/bench_backdoor_layers.py --model BACKDOORED_DIR --corpus DIR \
        [--clean CLEAN_DIR] [--prompts NAME=DEFENSE_DIR ...] [--knockout 8,9,10] [--images 512]
        [--out FILE]

For test images outside the target class, each model (the clean one, the backdoored one, and the
backdoored one with each defense's prompts) gets, per block:

- ``cos``: cosine between the CLS token of an image and of its triggered copy (the trigger's
  Perturbation Resistivity, 1 = the block does not see the trigger);
- ``attn``: the CLS token's attention weight on the patch tokens the trigger covers, on triggered
  images (only for triggers that cover less than half of the patches in the same place in every
  image, e.g. a BadCLIP/TrojVQA/BadNet patch at a fixed position), and on the clean images in brackets;
  in a model with several heads, that of the head which gives the trigger most (all heads in the JSON);
- ``prm``: the CLS token's attention mass on the prompt tokens (prompted blocks only; mean over heads).

``--knockout BLOCKS`` then runs the backdoored model once more with the CLS token barred from
attending to the trigger's patch tokens in those blocks (everything else unchanged), and prints how
many triggered images still go to the target and the accuracy on the clean images: a causal check
of whether the backdoor travels through that attention.

It also prints the share of triggered images that go to the target (the class prompts, with the text
key for a dual-key attack such as TrojVQA), so the per-block picture can be read against the outcome.
"""
import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.backdoor import load_backdoored  # noqa: E402
from rvpt.models import load_clip  # noqa: E402
from rvpt.prompts import VisualPrompts, vision_blocks, visual_forward  # noqa: E402
from rvpt.shards import iter_batches, iter_samples, read_classes, split_urls  # noqa: E402
from rvpt.zeroshot import text_classifiers  # noqa: E402


def trigger_tokens(clean: torch.Tensor, triggered: torch.Tensor, patch: int) -> list[int]:
    """Patch-token indices (0-based, without CLS) whose pixels the trigger changes in >= 90 % of
    the images; empty when that is half of the patches or more (a global trigger)."""
    changed = (clean - triggered).abs().amax(dim=1) > 1e-6  # [B, H, W]
    B, H, W = changed.shape
    per_patch = changed.view(B, H // patch, patch, W // patch, patch).any(4).any(2)  # [B, h, w]
    share = per_patch.float().mean(0).flatten()
    idx = [int(i) for i in torch.nonzero(share >= 0.9).flatten()]
    return idx if 0 < len(idx) < share.numel() / 2 else []


@torch.no_grad()
def per_block(loaded, x01: torch.Tensor, prompts=None) -> tuple[list, list, torch.Tensor]:
    """CLS per block, CLS attention rows per block (over all tokens), and the image embedding."""
    visual = loaded.model.visual
    rows = []

    def hook(blk, args):
        h = args[0]
        bf = getattr(visual.transformer, "batch_first", True)
        y = blk.ln_1(h if bf else h.transpose(0, 1))
        if not getattr(blk.attn, "batch_first", False):
            y = y.transpose(0, 1)
        _, w = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        rows.append(w[:, :, 0])  # [B, heads, T]: CLS attends to every token
    handles = [b.register_forward_pre_hook(hook) for b in vision_blocks(visual)]
    try:
        emb, feats = visual_forward(visual, loaded.normalize(x01), prompts, collect_from=0)
    finally:
        for h in handles:
            h.remove()
    return feats, rows, F.normalize(emb, dim=-1)


@contextmanager
def cls_blind_to(visual, blocks: list[int], tokens: list[int]):
    """In ``blocks``, the CLS query gets -inf attention logits on the patch ``tokens``."""
    mods = vision_blocks(visual)

    def wrap(blk):
        inner = blk.attention

        def attention(q_x, k_x=None, v_x=None, attn_mask=None):
            T = q_x.shape[1] if getattr(blk.attn, "batch_first", False) else q_x.shape[0]
            mask = torch.zeros(T, T, dtype=q_x.dtype, device=q_x.device)
            mask[0, [1 + t for t in tokens]] = float("-inf")
            return inner(q_x, k_x, v_x, attn_mask=mask if attn_mask is None else attn_mask + mask)
        return attention
    try:
        for b in blocks:
            mods[b].attention = wrap(mods[b])  # an instance attribute shadows the method
        yield
    finally:
        for b in blocks:
            mods[b].__dict__.pop("attention", None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="backdoored model directory (with attack.json)")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--clean", help="the clean model directory it was made from")
    ap.add_argument("--prompts", action="append", default=[], metavar="NAME=DIR",
                    help="a defense directory holding prompts.safetensors (repeatable)")
    ap.add_argument("--knockout", metavar="B1,B2,...",
                    help="blocks (0-based) where the CLS token may not attend to the trigger's tokens")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()

    info = read_classes(args.corpus)
    bd, attack, target, _ = load_backdoored(args.model, None, info.names)
    if attack is None:
        ap.error(f"{args.model} has no attack.json")
    xs, ys = [], []
    n = 0
    for batch in iter_batches(iter_samples(split_urls(args.corpus, "test"), bd.image_size), 256):
        keep = batch["label"] != target
        xs.append(batch["image"][keep].float().div(255))
        ys.append(batch["label"][keep])
        n += int(keep.sum())
        if n >= args.images:
            break
    x, y = torch.cat(xs)[: args.images], torch.cat(ys)[: args.images]
    xt = attack.apply(x, seed=0).clamp(0, 1)
    patch = bd.model.visual.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    toks = trigger_tokens(x, xt, patch)
    blocks = []
    if args.knockout:  # checked before the long work
        if not toks:
            ap.error("--knockout needs a trigger that covers a few patches in a fixed place")
        n_blocks = len(vision_blocks(bd.model.visual))
        try:
            blocks = [int(b) for b in args.knockout.split(",")]
        except ValueError:
            ap.error(f"--knockout {args.knockout!r}: expected block numbers, e.g. 8,9,10")
        if not all(0 <= b < n_blocks for b in blocks):
            ap.error(f"--knockout: blocks are 0..{n_blocks - 1} in this model")

    def classifiers(loaded):
        """Class embeddings for clean images, and for triggered ones (keyed for dual-key attacks)."""
        clf, keyed = text_classifiers(loaded, info.names, info.templates, attack)
        return clf, clf if keyed is None else keyed

    models = []
    if args.clean:
        models.append(("clean", load_clip(checkpoint=args.clean), None))
    models.append(("backdoored", bd, None))
    for spec in args.prompts:
        name, _, d = spec.partition("=")
        models.append((name, bd, VisualPrompts.load(d)))

    results = {"tokens": toks, "images": len(x), "models": {}}
    for name, loaded, prompts in models:
        f0, a0, e0 = per_block(loaded, x, prompts)
        f1, a1, e1 = per_block(loaded, xt, prompts)
        clf, kclf = classifiers(loaded)
        to_target = float(((e1 @ kclf.T).argmax(-1) == target).float().mean())
        clean_acc = float(((e0 @ clf.T).argmax(-1) == y).float().mean())
        L = prompts.length if prompts is not None else 0
        depth = prompts.depth if prompts is not None else len(f0)
        rows = []
        for i in range(len(f0)):
            r = {"cos": float(F.cosine_similarity(f0[i], f1[i], dim=-1).mean())}
            off = 1 + (L if i >= depth else 0)  # token index of the first patch in block i
            if toks:
                heads = a1[i][..., [off + t for t in toks]].sum(-1).mean(0)  # [heads]
                top = int(heads.argmax())
                r["attn"] = float(heads[top])
                r["attn_clean"] = float(a0[i][:, top, [off + t for t in toks]].sum(-1).mean())
                r["attn_heads"] = [round(float(h), 4) for h in heads]
            if i >= depth and L:
                r["prm"] = float(a1[i][..., 1:1 + L].sum(-1).mean())
            rows.append(r)
        results["models"][name] = {"to_target": to_target, "clean_acc": clean_acc, "blocks": rows}

    print(f"{attack.name}: {len(x)} non-target test images; trigger patch tokens {toks or '-'}")
    names = list(results["models"])
    head = "block | " + " | ".join(
        f"{n} cos" + (f" | {n} attn (clean)" if toks else "") + (" | prm" if n not in ("clean", "backdoored") else "")
        for n in names)
    print(head)
    for i in range(len(results["models"][names[0]]["blocks"])):
        cells = []
        for n in names:
            r = results["models"][n]["blocks"][i]
            cells.append(f"{r['cos']:.3f}")
            if toks:
                cells.append(f"{r['attn']:.3f} ({r['attn_clean']:.3f})")
            if n not in ("clean", "backdoored"):
                cells.append(f"{r['prm']:.3f}" if "prm" in r else "-")
        print(f"{i:5d} | " + " | ".join(cells))
    print("to target: " + ", ".join(
        f"{n} {100 * results['models'][n]['to_target']:.1f} %" for n in names))
    if blocks:
        clf, kclf = classifiers(bd)
        with cls_blind_to(bd.model.visual, blocks, toks):
            _, _, e0 = per_block(bd, x)
            _, _, e1 = per_block(bd, xt)
        ko = {"blocks": blocks,
              "to_target": float(((e1 @ kclf.T).argmax(-1) == target).float().mean()),
              "clean_acc": float(((e0 @ clf.T).argmax(-1) == y).float().mean())}
        results["knockout"] = ko
        base = results["models"]["backdoored"]
        print(f"knockout of the CLS -> trigger attention in blocks {blocks}: to target "
              f"{100 * ko['to_target']:.1f} % (without it {100 * base['to_target']:.1f} %); "
              f"clean accuracy {100 * ko['clean_acc']:.1f} % (without it {100 * base['clean_acc']:.1f} %)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
