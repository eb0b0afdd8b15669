"""EftCLIP's trigger detection: precision and recall per attack, against θ and oracle noise.

    .venv/bin/python benchmarks/bench_eftclip_detection.py [--attacks all] [--thetas 0.3,0.5,0.66,0.8,0.9]
        [--noises 0,0.1,0.3,0.5] [--tau 5] [key.sub=value ...] [--out FILE]

For each backdoored model the config builds (or reuses), screens the pair set a defender holds —
``defense.pairs`` plus the poisoned pairs the model was fine-tuned with (``suspect_batches``) —
with the ground-truth oracle, and prints per attack the share flagged, precision and recall of the
flags against the pairs that are poisoned, first over θ (oracle noise 0), then over oracle noise
(θ = 0.66): the analogue of the paper's Figures 3 and 4. No fine-tuning.
"""
import argparse
import json
import sys
from pathlib import Path

from pipeline import backdoor, build
from pipeline.config import load_config
from pipeline.defend import suspect_batches
from pipeline.jobs import attack_names
from pipeline.tables import table
from rvpt.defenses import make_defense
from rvpt.shards import read_classes


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--thetas", default="0.3,0.5,0.66,0.8,0.9")
    ap.add_argument("--noises", default="0,0.1,0.3,0.5")
    ap.add_argument("--tau", type=int, default=5)
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    corpus = build.resolve_corpus(cfg)
    clean = build.clean_model(cfg, corpus)
    info = read_classes(corpus["corpus_dir"])
    grid = [(float(t), 0.0) for t in args.thetas.split(",")]
    grid += [(0.66, float(n)) for n in args.noises.split(",") if float(n) != 0.0]
    rows, out = [], []
    for attack in attack_names(args.attacks):
        model = backdoor.build_backdoored(cfg, attack, corpus, clean)["model_dir"]
        loaded, _, _, attack_json = backdoor.load_backdoored(model, None, info.names)
        make, sources = suspect_batches(cfg, corpus["corpus_dir"], loaded.image_size, attack_json)
        for theta, noise in grid:
            eft = make_defense("eftclip", loaded, info.names, info.templates, seed=cfg.seed,
                               theta=theta, tau=args.tau, oracle_noise=noise, clean_ratio=0,
                               occlusion_cells=0)
            _, s = eft.curate(make)
            r = {"attack": attack, "theta": theta, "noise": noise, **s}
            out.append(r)
            rows.append((attack, theta, noise, s["screened"], pct(s["flagged"] / s["screened"]),
                         pct(s["precision"]), pct(s["recall"]), s["affected"] or "-",
                         s["victims"], s["victims_poisoned"]))
            print(f"{attack} θ {theta} noise {noise}: {s['flagged']}/{s['screened']} flagged, "
                  f"P {pct(s['precision'])} R {pct(s['recall'])} ({s['curate_s']} s)",
                  file=sys.stderr, flush=True)
    print(f"EftCLIP detection (tau {args.tau}, ground-truth oracle; noise: its miss/invent rate)")
    print(table(rows, ("attack", "θ", "oracle noise", "pairs", "flagged %", "precision %",
                       "recall %", "affected", "victims", "victims poisoned")))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
