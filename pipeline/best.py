"""The verb behind ``jobs/best.py``: the best trial per attack x dataset of a sweep recorded in MLflow,
by a selection rule (see :mod:`pipeline.select`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import tracking
from .config import Config, ConfigError
from .select import RULES, describe
from .tables import cell, num, pct, table

DEFAULT_EXPERIMENT = "rvpt-sweep"
DEFAULT_RULE = "ca"


def add_args(p: argparse.ArgumentParser) -> None:
    """The options shared by ``jobs/best.py`` and ``jobs/report.py``."""
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default: the config's, else sqlite <paths.root>/mlflow.db)")
    p.add_argument("--experiment", metavar="NAME",
                   help=f"MLflow experiment = sweep name (default: the config's sweep.name, "
                        f"else {DEFAULT_EXPERIMENT})")
    p.add_argument("--rule", choices=RULES,
                   help="selection rule: ca (defender-visible), asr or combo (oracles: need the "
                        "attack); default: the config's sweep.select.rule, else ca")
    p.add_argument("--weight", type=float, metavar="W",
                   help="ASR weight of the combo rule: score = CA - W * ASR (default 1)")


def _get(obj: Any, dotted: str) -> Any:
    """``cfg.a.b`` or None when any part is missing (the config may not have that section)."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def resolve(cfg: Config, args: argparse.Namespace) -> dict:
    """Tracking URI, experiment, rule and weight: the command line, else the config, else defaults."""
    weight = getattr(args, "weight", None)
    if weight is None:
        weight = _get(cfg, "sweep.select.weight")
    uri = getattr(args, "tracking_uri", None) or _get(cfg, "tracking.uri")
    if not uri:
        try:
            uri = tracking.default_uri(cfg.root())
        except tracking.TrackingError as e:
            raise ConfigError(f"config error: tracking.uri: {e}") from None
    return {
        "uri": uri,
        "experiment": getattr(args, "experiment", None) or _get(cfg, "sweep.name")
        or DEFAULT_EXPERIMENT,
        "rule": getattr(args, "rule", None) or _get(cfg, "sweep.select.rule") or DEFAULT_RULE,
        "weight": 1.0 if weight is None else float(weight),
    }


def load_runs(settings: dict):
    """The FINISHED runs of the experiment; a missing store or experiment is a user error."""
    try:
        return tracking.runs_frame(settings["uri"], settings["experiment"])
    except tracking.TrackingError as e:
        raise ConfigError(str(e)) from None


def best_rows(rec: dict) -> tuple:
    """One record of :func:`tracking.best_per_group` as the cells of a human table."""
    return (rec["attack"], rec["dataset"], cell(rec["defense"]), cell(rec["setting"]),
            cell(rec["shots"]), *(pct(rec[k]) for k in ("ca", "asr", "asr_all", "pa")),
            num(rec["pr_mean"]), num(rec["score"]), cell(rec["run_name"]))


BEST_HEADER = ("attack", "dataset", "defense", "setting", "shots", "CA %", "ASR %", "ASR_all %",
               "PA %", "mean PR", "score", "run")


def add_best_args(p: argparse.ArgumentParser) -> None:
    """``jobs/best.py``'s options: :func:`add_args` and ``--per-defense``."""
    add_args(p)
    p.add_argument("--per-defense", action="store_true",
                   help="the best run of each defense per attack x dataset (to compare defenses, "
                        "each at its best setting) instead of the best run overall")


def best(cfg: Config, args: argparse.Namespace) -> list[dict]:
    """Print the best run per attack x dataset (x defense with ``--per-defense``) and return them
    as records.

    ``--out FILE.csv`` writes a CSV here (and clears ``args.out`` so that the command-line plumbing
    does not overwrite it with JSON); any other ``--out`` gets the records as a JSON list.
    """
    s = resolve(cfg, args)
    df = load_runs(s)
    per_defense = bool(getattr(args, "per_defense", False))
    group = ("attack", "dataset", "defense") if per_defense else ("attack", "dataset")
    top = tracking.best_per_group(df, s["rule"], s["weight"], group=group)
    recs = tracking.records(top)
    print(f"experiment {s['experiment']!r} ({s['uri']}): {len(df)} finished runs; best per "
          f"{' x '.join(group)} by rule {s['rule']!r}: {describe(s['rule'], s['weight'])}")
    if recs:
        print(table([best_rows(r) for r in recs], BEST_HEADER))
    else:
        print("no finished runs yet")
    out = getattr(args, "out", None)
    if out and Path(out).suffix.lower() == ".csv":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        top.to_csv(out, index=False)
        print(f"wrote {out}")
        args.out = None  # written here as CSV; pipeline.cli writes JSON only for other suffixes
    return recs
