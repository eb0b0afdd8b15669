"""Shared command-line plumbing for the thin entry points in ``jobs/``.

Every job takes ``--config FILE``, ``key.sub=value`` overrides and ``--out FILE`` (a JSON summary),
and turns user-caused errors into one clear line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from rvpt.attacks import AttackError
from rvpt.models import ModelError
from rvpt.shards import ShardError
from rvpt.storage import StorageError

from .config import Config, ConfigError, load_config
from .tracking import TrackingError

USER_ERRORS = (ConfigError, ModelError, ShardError, AttackError, StorageError, TrackingError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--out", help="write a JSON summary to this file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. pretrain.epochs=2 corpus.n_pretrain=1000")
    return p


def write_json(path: Optional[str], data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def main(description: str, run: Callable[[Config, argparse.Namespace], dict],
         argv: Optional[Sequence[str]] = None,
         extra_args: Optional[Callable[[argparse.ArgumentParser], None]] = None,
         writes_results: bool = True) -> int:
    """Parse arguments, load the config, call ``run(cfg, args)`` and write its summary.

    A job that ``writes_results`` under ``paths.root`` prints that root when it starts and when it
    ends (a user must be able to find what it built, on a cluster too)."""
    p = parser(description)
    if extra_args:
        extra_args(p)
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        root = None
        if writes_results:
            root = cfg.root()
            print(f"results root: {root}", flush=True)
        summary = run(cfg, args)
        if root is not None:
            print(f"results root: {root}", flush=True)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow's own errors (a tracking store that refuses a request): one line
        if not type(e).__module__.startswith("mlflow"):
            raise
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: MLflow: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished artifacts are kept; partial ones are rebuilt next time",
              file=sys.stderr)
        return 130
    write_json(args.out, summary)
    return 0
