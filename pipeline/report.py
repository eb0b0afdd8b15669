"""The verb behind ``jobs/report.py``: a Markdown report of a sweep recorded in MLflow.

``<dir>/report.md`` holds the best hyperparameters per attack x dataset under the selection rule, a
table per attack comparing every defense at its best setting (metrics averaged over the seeds that
share all other params), and two plots: ``asr_vs_ca.png`` (every trial) and ``pr_per_layer.png``
(perturbation resistivity per layer of each defense's best trial).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from . import tracking
from .best import BEST_HEADER, add_args as _best_args, best_rows, load_runs, resolve
from .tables import num, pct
from .config import Config
from .select import describe

_METRICS = ("ca", "asr", "asr_all", "pa", "pr_mean")
_PR_LAYER = re.compile(r"^metrics\.pr/([^/]+)/(\d+)$")
_MARKERS = "osD^vP*Xh<>"


def add_args(p: argparse.ArgumentParser) -> None:
    _best_args(p)
    p.add_argument("--dir", metavar="OUTDIR",
                   help="where report.md and its plots go (default: <paths.root>/reports/<experiment>)")


def _md(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _trials(df):
    """One row per run: attack, dataset, defense, params as numbers, metrics, run_id, start."""
    import pandas as pd

    t = pd.DataFrame(index=df.index)
    for g in ("attack", "dataset"):
        t[g] = tracking.column(df, g).map(lambda v: "-" if v is None else str(v))
    t["defense"] = tracking.column(df, "defense").map(lambda v: "-" if v is None else str(v))
    for c in df.columns:
        if c.startswith("params.") and c not in ("params.defense", "params.seed"):
            t[c] = df[c].map(lambda v: "-" if v is None or v != v else str(v))
    for m in _METRICS:
        t[m] = tracking.metric(df, m)
    t["run_id"] = df["run_id"]
    t["_start"] = df["start_time"]
    t["setting"] = tracking.setting_text(df)
    return t


def seed_means(df, rule: str, weight: float = 1.0):
    """Runs that differ only in ``params.seed`` merged: metrics averaged (``seeds`` = how many), the
    score recomputed on the means, and per attack x dataset x defense the best setting first."""

    t = _trials(df)
    keys = ["attack", "dataset", "defense"] + [c for c in t.columns if c.startswith("params.")]
    agg = t.groupby(keys, dropna=False, sort=False).agg(
        **{m: (m, "mean") for m in _METRICS}, seeds=("run_id", "size"), _start=("_start", "min"),
        run_id=("run_id", "min"), setting=("setting", "first")).reset_index()
    agg["score"] = tracking.scored(
        agg.rename(columns={m: f"metrics.{m}" for m in _METRICS}), rule, weight)
    agg = agg.sort_values(["score", "_start", "run_id"], ascending=[False, True, True],
                          kind="mergesort")
    best = agg.groupby(["attack", "dataset", "defense"], sort=False, dropna=False).head(1)
    return best.sort_values(["attack", "dataset", "defense"], kind="mergesort").reset_index(drop=True)


def _param(row, name: str) -> str:
    v = row.get(f"params.{name}")
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _style(defenses: Sequence[str]) -> dict:
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {d: (colors[i % len(colors)], _MARKERS[i % len(_MARKERS)]) for i, d in enumerate(defenses)}


def _legend(fig, axes) -> None:
    """One legend for the figure, below the panels (labels de-duplicated across panels)."""
    seen: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(6, len(seen)),
                   fontsize=8, frameon=False)


def plot_asr_vs_ca(df, best, path: Path) -> Path:
    """One panel per attack: every trial at (CA, ASR), a colour and marker per defense; the chosen
    run of each attack x dataset ringed."""
    import matplotlib.pyplot as plt

    t = _trials(df)
    attacks = sorted(t["attack"].unique())
    style = _style(sorted(t["defense"].unique()))
    ncols = min(3, len(attacks))
    nrows = -(-len(attacks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks):
        sub = t[t["attack"] == attack]
        for d, (color, marker) in style.items():
            pts = sub[sub["defense"] == d]
            if len(pts):
                ax.scatter(100 * pts["ca"], 100 * pts["asr"], color=color, marker=marker, s=28,
                           alpha=0.8, label=d)
        chosen = best[best["attack"] == attack]
        ax.scatter(100 * chosen["ca"].astype(float), 100 * chosen["asr"].astype(float), s=160,
                   facecolors="none", edgecolors="black", linewidths=1.2, label="chosen")
        ax.set_title(attack)
        ax.set_xlabel("CA %")
        ax.set_ylabel("ASR %")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attacks):]:
        ax.set_visible(False)
    fig.suptitle("ASR vs CA, every trial")
    _legend(fig, axes.flat)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pr_columns(df) -> dict[str, list[tuple[int, str]]]:
    """``{perturbation: [(layer, column), ...]}`` from the ``metrics.pr/<perturbation>/<layer>``
    columns, layers in order, the trigger last."""
    out: dict[str, list[tuple[int, str]]] = {}
    for c in df.columns:
        if m := _PR_LAYER.match(c):
            out.setdefault(m.group(1), []).append((int(m.group(2)), c))
    order = sorted(out, key=lambda k: (k == "trigger", k))
    return {k: sorted(out[k]) for k in order}


def plot_pr_per_layer(df, rule: str, weight: float, path: Path) -> Optional[Path]:
    """Rows = attacks, columns = perturbations; one curve per defense (its best run by ``rule``),
    PR against layer. None (no file) when no run logged per-layer PR."""
    import matplotlib.pyplot as plt

    cols = pr_columns(df)
    if not cols:
        return None
    top = tracking.best_per_group(df, rule, weight, group=("attack", "dataset", "defense"))
    attacks = sorted(top["attack"].unique())
    several = top["dataset"].nunique() > 1
    style = _style(sorted(top["defense"].map(str).unique()))
    by_id = df.set_index("run_id")
    fig, axes = plt.subplots(len(attacks), len(cols), figsize=(3.4 * len(cols), 2.9 * len(attacks)),
                             squeeze=False, sharey=True)
    for i, attack in enumerate(attacks):
        for j, (pert, layers) in enumerate(cols.items()):
            ax = axes[i, j]
            for _, r in top[top["attack"] == attack].iterrows():
                ys = [by_id.at[r["run_id"], c] for _, c in layers]
                if all(y != y for y in ys):  # NaN: this run has no PR for this perturbation
                    continue
                color, marker = style[str(r["defense"])]
                label = f"{r['defense']} ({r['dataset']})" if several else str(r["defense"])
                ax.plot([l for l, _ in layers], ys, color=color, marker=marker, ms=3, label=label)
            ax.set_title(f"{attack}: {pert}", fontsize=9)
            ax.set_xlabel("layer")
            if j == 0:
                ax.set_ylabel("PR (cosine)")
            ax.grid(alpha=0.3)
    fig.suptitle(f"Perturbation resistivity per layer, best run of each defense (rule {rule})")
    _legend(fig, axes.flat)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(df, out_dir: str | Path, experiment: str, rule: str, weight: float = 1.0,
                 uri: str = "") -> dict:
    """Write ``report.md`` and its plots for a :func:`tracking.runs_frame` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = len(df)
    na = tracking.not_applicable(df)
    df = tracking.evaluated(df)
    best = tracking.best_per_group(df, rule, weight)
    recs = tracking.records(best)
    lines = [f"# Sweep report: {experiment}", "",
             f"- tracking store: `{uri}`" if uri else "- tracking store: -",
             f"- finished runs: {runs}: {len(df)} evaluated, {runs - len(df) - len(na)} stopped "
             "early by the scheduler (their last `val_ca` is in MLflow; they have no test metrics)"
             + (f", {len(na)} not applicable" if na else ""),
             f"- selection rule: `{rule}`: {describe(rule, weight)}"]
    if na:
        lines += ["- not applicable: " + "; ".join(
            f"{n['defense']} on {n['attack']} ({n['dataset']}): {n['reason']}" for n in na)]
    res = {"report": None, "asr_vs_ca": None, "pr_per_layer": None, "runs": runs,
           "evaluated": len(df), "not_applicable": na}
    if df.empty:
        lines += ["", "No evaluated runs yet."]
    else:
        t = _trials(df)
        attacks = sorted(t["attack"].unique())
        lines += [f"- attacks: {', '.join(attacks)}",
                  f"- defenses: {', '.join(sorted(t['defense'].unique()))}", "",
                  "## Best hyperparameters per attack x dataset", "",
                  "The single run with the highest score in each attack x dataset.", "",
                  _md([best_rows(r) for r in recs], BEST_HEADER), ""]
        means = seed_means(df, rule, weight)
        lines += ["## Defenses per attack", "",
                  "Each defense at its best setting by the rule; metrics are means over the seeds "
                  "that share all other params (`seeds` = how many).", ""]
        header = ("dataset", "defense", "setting", "shots", "seeds", "CA %", "ASR %", "ASR_all %",
                  "PA %", "mean PR", "score")
        for attack in attacks:
            rows = [(r["dataset"], r["defense"], r["setting"], _param(r, "shots"), r["seeds"],
                     *(pct(r[m]) for m in ("ca", "asr", "asr_all", "pa")), num(r["pr_mean"]),
                     num(r["score"]))
                    for _, r in means[means["attack"] == attack].iterrows()]
            lines += [f"### {attack}", "", _md(rows, header), ""]
        lines += ["## Plots", ""]
        res["asr_vs_ca"] = str(plot_asr_vs_ca(df, best, out_dir / "asr_vs_ca.png"))
        lines += ["Every trial; the run chosen per attack x dataset is ringed.", "",
                  "![ASR vs CA](asr_vs_ca.png)", ""]
        pr = plot_pr_per_layer(df, rule, weight, out_dir / "pr_per_layer.png")
        if pr is not None:
            res["pr_per_layer"] = str(pr)
            lines += ["Perturbation resistivity (cosine of the CLS token, clean vs perturbed) per "
                      "layer, for the best run of each defense.", "",
                      "![PR per layer](pr_per_layer.png)", ""]
        else:
            lines += ["No run logged per-layer PR (`pr/<perturbation>/<layer>`).", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    res["report"] = str(report)
    return res


def publish_report(df, dest: str, experiment: str, rule: str, weight: float = 1.0,
                   uri: str = "") -> dict:
    """:func:`write_report` into ``dest``, a local directory or object storage (written in a local
    staging directory, then published; the returned paths name ``dest``)."""
    from rvpt import storage

    with storage.publish(dest, "report.md") as tmp:
        res = write_report(df, tmp, experiment, rule, weight, uri)
    return {k: storage.join(dest, Path(v).name) if k in ("report", "asr_vs_ca", "pr_per_layer")
            and v else v for k, v in res.items()}


def default_dir(cfg: Config, experiment: str) -> str:
    """``<paths.root>/reports/<experiment>``."""
    from rvpt import storage

    return storage.join(cfg.root(), "reports", tracking.safe_name(experiment))


def report(cfg: Config, args: argparse.Namespace) -> dict:
    """Write the report of the sweep's experiment; print its path; return the paths written."""
    s = resolve(cfg, args)
    df = load_runs(s)
    dest = getattr(args, "dir", None) or default_dir(cfg, s["experiment"])
    res = publish_report(df, dest, s["experiment"], s["rule"], s["weight"], s["uri"])
    print(f"report: {res['report']} ({len(df)} finished runs, rule {s['rule']!r})")
    return {"experiment": s["experiment"], "tracking_uri": s["uri"], "rule": s["rule"],
            "weight": s["weight"], **res}
