"""Does prompt tuning teach anything? Clean accuracy before and after a few-shot defense, per domain.

    .venv/bin/python benchmarks/bench_fewshot_domain.py [--model clean|MODEL_DIR] [--defense vpt]
        [--domains fewshot:test,shift_fewshot:shift_test] [--seeds 0] [--config FILE]
        [--out FILE] [key.sub=value ...]

For each ``fewshot_split:test_split`` pair of the corpus, the model's zero-shot CA on the test
split, then the defense trained (its own recipe, ``defense.train`` overrides apply) on k shots per
class of the few-shot split, and its CA on the same test split. On CLIP, prompt tuning *raises*
CA (the few-shot set shows what the class names look like in that domain); a task drawn from the
model's own pretraining leaves it little to teach, so only the augmentation's cost shows. The
shapes task's ``shift`` domain (pale or dark tones, other backgrounds and styles) is the embedded
corpus's task outside the pretraining renderings. Clean images only: no attack is involved.
"""
import argparse
import json
from pathlib import Path

from pipeline import backdoor, build
from pipeline.config import load_config
from rvpt.defenses import get_defense, make_defense, train_defense
from rvpt.fewshot import epoch_batches, sample_few_shot
from rvpt.models import load_clip
from rvpt.shards import read_classes


def parse_domains(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        few, sep, test = item.partition(":")
        if not (sep and few and test):
            raise SystemExit(f"--domains: {item!r} is not fewshot_split:test_split")
        pairs.append((few, test))
    return pairs


def run(cfg, loaded, corpus_dir: str, defense_name: str, fewshot_split: str, test_split: str,
        seed: int, before: dict) -> dict:
    """The defense trained on ``fewshot_split`` with ``seed``; ``before``: zero-shot on
    ``test_split`` (``evaluate_backdoor``'s result, measured once per domain)."""
    info = read_classes(corpus_dir)
    defense = make_defense(defense_name, loaded, info.names, info.templates, seed=seed,
                           **cfg.defense.params)
    tp = defense.train_params(cfg.defense.train)
    pool = build.samples(cfg, corpus_dir, fewshot_split, loaded.image_size)
    shots = sample_few_shot(pool, tp.shots, len(info.names), seed=seed)
    hist = train_defense(defense, tp, epoch_batches(shots, tp.batch_size, seed),
                         -(-len(shots) // tp.batch_size))
    after = backdoor.evaluate_backdoor(cfg, loaded, corpus_dir, None, None, split=test_split,
                                       defense=defense)
    return {"fewshot": fewshot_split, "test": test_split, "seed": seed, "shots": len(shots),
            "ca_before": before["ca"], "ca_after": after["ca"], "n_test": before["counts"]["n"],
            "last_epoch": hist.epochs[-1] if hist.epochs else {}, "train_s": round(hist.seconds, 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="clean")
    ap.add_argument("--defense", default="vpt")
    ap.add_argument("--domains", default="fewshot:test,shift_fewshot:shift_test")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    domains = parse_domains(args.domains)
    data = get_defense(args.defense).data
    if data != "fewshot":
        raise SystemExit(f"--defense {args.defense}: trains on {data!r}, not on few-shot images")
    cfg = load_config(args.config, args.overrides)
    build.set_threads(args.threads)
    corpus = build.resolve_corpus(cfg)
    loaded = (build.load_model(cfg, build.clean_model(cfg, corpus)) if args.model == "clean"
              else load_clip(checkpoint=args.model, device=cfg.torch_device()))
    rows = []
    for few, test in domains:
        before = backdoor.evaluate_backdoor(cfg, loaded, corpus["corpus_dir"], None, None,
                                            split=test)
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(cfg, loaded, corpus["corpus_dir"], args.defense, few, test, seed, before)
            rows.append(r)
            print(f"{few:>14s} -> {test:<11s} seed {seed}: CA {100 * r['ca_before']:6.2f} -> "
                  f"{100 * r['ca_after']:6.2f} % ({100 * (r['ca_after'] - r['ca_before']):+.2f}; "
                  f"{r['shots']} shots, {r['train_s']} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
