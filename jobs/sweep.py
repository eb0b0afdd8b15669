"""The main job: sweep defenses over attacks x datasets with Ray Tune, tracked in MLflow.

    python jobs/sweep.py                                    # the embedded default, end to end
    python jobs/sweep.py --config configs/smoke.yaml        # CI size
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/paper.yaml
    python jobs/sweep.py --config configs/paper.yaml --check    # what is there, in seconds

Builds whatever is missing (corpus, clean CLIP, one backdoored model per attack), runs one trial
per setting (Ray Data few-shot set -> Ray Train defense -> Ray Data evaluation -> one MLflow run),
resumes an interrupted sweep without repeating finished trials, prints the best hyperparameters per
attack x dataset under ``sweep.select.rule`` and writes a markdown report with plots.
"""
import sys

from pipeline.cli import main
from pipeline.jobs import sweep


def _args(p):
    p.add_argument("--check", action="store_true",
                   help="only check the config against what is there (storage, tracking server, "
                        "corpora and their splits, models and their targets), in seconds; exit 2 "
                        "when a check fails")
    p.add_argument("--sync", action="store_true",
                   help="only send the sweep's kept trial results that have not reached MLflow "
                        "(the server was down when they finished) and exit")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], sweep, extra_args=_args))
