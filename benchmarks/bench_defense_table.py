"""The defense table over every backdoored model, several seeds (mean ± std), and a cost table.

    .venv/bin/python benchmarks/bench_defense_table.py [--attacks all] [--seeds 0,1,2]
        [--defenses none,vpt,rvpt,cleanclip,linear_probe,cbpt,eftclip] [--cost ATTACK]
        [--trigger-grid FILE.png] [key.sub=value ...] [--out FILE]

Builds (or reuses) the corpus, the clean model and one backdoored model per attack with the config,
then runs each defense with each seed (data sample and initialisation follow the seed) through
``pipeline.defend`` (cached per setting, each defense with its own recipe) and prints CA, ASR,
ASR_all, PA and mean PR as mean ± std over the seeds; a defense that cannot be measured against an
attack is "n/a" with the reason. With ``--cost ATTACK`` it then runs ``jobs/defend.py`` once per
defense on that attack's model, each in a fresh process with nothing cached, and prints the cost
table (the paper's Table 9): trainable parameters, training samples, samples seen, training wall
time, and the peak resident memory of the whole process (PSS of its tree, memwatch). A defense
that reports on itself (CBPT's inverted trigger, EftCLIP's detection) has those figures averaged in
a second table; ``--trigger-grid`` draws CBPT's inverted triggers (seed 0) beside the true ones.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memwatch

from pipeline import backdoor, build
from pipeline.config import load_config
from pipeline.defend import defend
from pipeline.jobs import attack_names
from pipeline.tables import table

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
    ap.add_argument("--defenses", default="none,vpt,rvpt,cleanclip,linear_probe,cbpt,eftclip")
    ap.add_argument("--trigger-grid", metavar="FILE.png")
    ap.add_argument("--cost", metavar="ATTACK", help="also the cost table, on this attack's model")
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    corpus = build.resolve_corpus(cfg)
    clean = build.clean_model(cfg, corpus)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, out, reports, triggers = [], {}, [], []
    for attack in attack_names(args.attacks):
        model = backdoor.build_backdoored(cfg, attack, corpus, clean)
        for name in args.defenses.split(","):
            runs = []
            for seed in seeds:
                c = cfg.model_copy(deep=True)
                c.seed = seed
                c.defense.name = name
                c.defense.params = dict(cfg.defense.params) if name == cfg.defense.name else {}
                r = defend(c, model["model_dir"], corpus["corpus_dir"])
                if r.get("not_applicable"):
                    runs = None
                    print(f"{attack} {name}: not applicable: {r['not_applicable']}",
                          file=sys.stderr, flush=True)
                    break
                runs.append(r)
                print(f"{attack} {name} seed {seed}: CA {r['after']['ca']:.4f} "
                      f"ASR {r['after']['asr']:.4f} ({'reused' if r.get('cached') else str(r['train_s']) + ' s'})",
                      file=sys.stderr, flush=True)
            if runs is None:
                rows.append((attack, name, "n/a", "n/a", "n/a", "n/a", "n/a", "-"))
                out[f"{attack}/{name}"] = "not applicable"
                continue
            key = "before" if name == "none" else "after"
            out[f"{attack}/{name}"] = [r[key] | {"train_s": r["train_s"], "report": r.get("report")}
                                       for r in runs]
            if runs[0].get("report"):
                reports.append((attack, name, runs))
            if name == "cbpt" and args.trigger_grid:
                triggers.append((attack, model["model_dir"], runs[0]["out_dir"]))
            rows.append((attack, name, *(fmt([r[key].get(m) for r in runs], m != "pr_mean")
                                         for m in METRICS),
                         f"{statistics.mean(r['train_s'] for r in runs):.0f}"))
    print(table(rows, ("attack", "defense", "CA %", "ASR %", "ASR_all %", "PA %", "mean PR",
                       "train s")))
    for name in sorted({n for _, n, _ in reports}):
        keys = [k for k, v in next(r for _, n, r in reports if n == name)[0]["report"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        print(f"\nwhat {name} reports (mean ± std over seeds):")
        print(table([(a, *(fmt([r["report"].get(k) for r in runs], False) for k in keys))
                     for a, n, runs in reports if n == name], ("attack", *keys)))
    if triggers:
        trigger_grid(triggers, args.trigger_grid)
        print(f"inverted triggers: {args.trigger_grid}")
    if args.cost:
        model = backdoor.build_backdoored(cfg, args.cost, corpus, clean)
        out["cost"] = cost_table(args, model["model_dir"], corpus["corpus_dir"])
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))


def trigger_grid(triggers: list, path: str) -> None:
    """One row per attack: the true trigger on a grey image, then CBPT's trigger.png (mask,
    pattern, stamp on grey)."""
    import torch
    from PIL import Image, ImageDraw

    from rvpt.attacks import load_attack

    rows = []
    for attack, model_dir, out_dir in triggers:
        inv = Image.open(Path(out_dir) / "trigger.png").convert("RGB")
        atk, _ = load_attack(model_dir)
        size = atk.image_size
        grey = torch.full((1, 3, size, size), 0.5)
        true = (atk.apply(grey, seed=0)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
        true = Image.fromarray(true.numpy()).resize((inv.height, inv.height), Image.NEAREST)
        row = Image.new("RGB", (inv.height + 8 + inv.width + 120, inv.height + 4), "white")
        ImageDraw.Draw(row).text((2, 2), attack, fill="black")
        row.paste(true, (120, 2))
        row.paste(inv, (120 + inv.height + 8, 2))
        rows.append(row)
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(path)


def cost_table(args, model: str, corpus: str) -> list:
    """Each defense once, in a fresh jobs/defend.py process with an empty results root: what it
    trains, on how much, how long, and the process tree's peak memory."""
    import subprocess
    import tempfile

    from memwatch import PeakRSS

    repo = Path(__file__).resolve().parent.parent
    rows, res = [], []
    for name in args.defenses.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(repo / "jobs" / "defend.py"), "--model", model, "--corpus",
                   corpus, "--defense", name, "--out", f"{tmp}/d.json", f"paths.root={tmp}",
                   "defense.pr_images=0", *([f"--config={args.config}"] if args.config else []),
                   *args.overrides]
            p = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
            with PeakRSS(p.pid) as mem:
                _, err = p.communicate()
            if p.returncode != 0:
                print(f"cost {name}: failed: {err.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            r = json.loads(Path(tmp, "d.json").read_text())
        if r.get("not_applicable"):
            continue
        res.append({"defense": name, "trained": r["trained"], "params": r["trainable_params"],
                    "train_samples": r["train_samples"], "samples_seen": r["samples_seen"],
                    "train_s": r["train_s"], "peak_pss_mib": mem.peak_pss_mib,
                    "peak_rss_mib": r["peak_rss_mib"]})
        rows.append((name, r["trained"], f"{r['trainable_params']:,}", r["train_samples"],
                     r["samples_seen"], f"{r['train_s']:.1f}", f"{mem.peak_pss_mib:.0f}"))
    print(f"cost on {args.cost}'s model (one run each, seed 0, this machine):")
    print(table(rows, ("defense", "trains", "trainable params", "train samples", "samples seen",
                       "train s", "peak MiB (PSS)")))
    return res


if __name__ == "__main__":
    main()
