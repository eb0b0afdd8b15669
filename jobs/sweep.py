"""The main job: the whole pipeline on the embedded default (or a config).

    python jobs/sweep.py [--config FILE] [key.sub=value ...] [--out FILE]

The Ray Tune sweep over attacks x defenses is not built yet; until it is, this runs every stage that
exists (corpus, clean-model pretraining, zero-shot evaluation) and says so.
"""
import sys

from pipeline.cli import main
from pipeline.jobs import sweep

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], sweep))
