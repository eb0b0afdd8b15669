"""Best hyperparameters per attack x dataset of a sweep recorded in MLflow, by a selection rule.

    python jobs/best.py [--config FILE] [--tracking-uri URI] [--experiment NAME]
                        [--rule ca|asr|combo] [--weight W] [--per-defense] [--out FILE.json|FILE.csv] [key.sub=value ...]

Rules (higher score is better): ``ca`` = clean accuracy, the only one a defender can measure;
``asr`` = -ASR and ``combo`` = CA - W * ASR are oracles that need the attack (for research).
``--per-defense`` gives each defense's best run per attack x dataset (defenses side by side).
``--out`` writes the chosen runs as a JSON list of records, or as CSV when the name ends in .csv.
"""
import sys

from pipeline.best import add_best_args, best
from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], best, extra_args=add_best_args, writes_results=False))
