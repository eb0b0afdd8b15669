"""Build a corpus as WebDataset shards.

    python jobs/make_corpus.py                      # the embedded synthetic benchmark (cached)
    python jobs/make_corpus.py corpus.n_pretrain=2000 --out corpus.json
    python jobs/make_corpus.py --from-imagefolder DIR --dest CORPUS --split test
"""
import sys

from pipeline.cli import main
from pipeline.jobs import make_corpus


def _args(p):
    p.add_argument("--from-imagefolder", metavar="DIR",
                   help="convert an ImageFolder-style directory (one folder per class) instead")
    p.add_argument("--dest", metavar="CORPUS", help="corpus directory to write (with --from-imagefolder)")
    p.add_argument("--split", default="test", help="split name to write (with --from-imagefolder)")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], make_corpus, extra_args=_args))
