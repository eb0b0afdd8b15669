"""Write a Markdown report (tables and plots) of a sweep recorded in MLflow.

    python jobs/report.py [--config FILE] [--tracking-uri URI] [--experiment NAME]
                          [--rule ca|asr|combo] [--weight W] [--dir OUTDIR] [--out FILE.json]

OUTDIR (default ``<paths.root>/reports/<experiment>/``) gets ``report.md``: the best hyperparameters
per attack x dataset under the rule, a table per attack of every defense at its best setting (means
over seeds), ``asr_vs_ca.png`` and ``pr_per_layer.png``.
"""
import sys

from pipeline.cli import main
from pipeline.report import add_args, report

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], report, extra_args=add_args))
