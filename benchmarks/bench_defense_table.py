"""The none / VPT / RVPT table over every backdoored model, several seeds (mean ± std).

    .venv/bin/python benchmarks/bench_defense_table.py [--attacks all] [--seeds 0,1,2]
        [--defenses none,vpt,rvpt] [key.sub=value ...] [--out FILE]

Builds (or reuses) the corpus, the clean model and one backdoored model per attack with the config,
then runs each defense with each seed (few-shot sample and prompt init follow the seed) through
``pipeline.defend`` (cached per setting) and prints CA, ASR, ASR_all, PA and mean PR as
mean ± std over the seeds.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from pipeline import backdoor, build
from pipeline.config import load_config
from pipeline.defend import defend
from pipeline.jobs import _table, attack_names

METRICS = ("ca", "asr", "asr_all", "pa", "pr_mean")


def fmt(values, pct=True):
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}" if pct else f"{m:.3f} ± {s:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--defenses", default="none,vpt,rvpt")
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    corpus = build.resolve_corpus(cfg)
    clean = build.clean_model(cfg, corpus)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, out = [], {}
    for attack in attack_names(args.attacks):
        model = backdoor.build_backdoored(cfg, attack, corpus, clean)
        for name in args.defenses.split(","):
            runs = []
            for seed in seeds:
                c = cfg.model_copy(deep=True)
                c.seed = seed
                c.defense.name = name
                r = defend(c, model["model_dir"], corpus["corpus_dir"])
                runs.append(r)
                print(f"{attack} {name} seed {seed}: CA {r['after']['ca']:.4f} "
                      f"ASR {r['after']['asr']:.4f} ({'reused' if r.get('cached') else str(r['train_s']) + ' s'})",
                      file=sys.stderr, flush=True)
            key = "before" if name == "none" else "after"
            out[f"{attack}/{name}"] = [r[key] | {"train_s": r["train_s"]} for r in runs]
            rows.append((attack, name, *(fmt([r[key].get(m) for r in runs], m != "pr_mean")
                                         for m in METRICS),
                         f"{statistics.mean(r['train_s'] for r in runs):.0f}"))
    print(_table(rows, ("attack", "defense", "CA %", "ASR %", "ASR_all %", "PA %", "mean PR",
                        "train s")))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
