"""Pretrain the clean tiny CLIP on the corpus (cached) and report its zero-shot CA.

    python jobs/pretrain.py                          # embedded defaults
    python jobs/pretrain.py pretrain.epochs=2 --out pretrain.json
"""
import sys

from pipeline.cli import main
from pipeline.jobs import pretrain

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], pretrain))
