"""Plant a backdoor in the clean CLIP (poisoned pairs -> contrastive fine-tune) and evaluate it.

    python jobs/poison.py --attack badnet                  # one attack (cached per config)
    python jobs/poison.py --attack badnet,blended,wanet    # several, or --attack all
    python jobs/poison.py --attack blended poison.rate=0.02 poison.lr=5e-5 --out poison.json
    python jobs/poison.py --attack badnet --save-examples badnet.png
"""
import sys

from pipeline.cli import main
from pipeline.jobs import poison


def _args(p):
    p.add_argument("--attack", help="attack name(s), comma-separated, or 'all' (default: "
                   "poison.attack of the config)")
    p.add_argument("--save-examples", metavar="FILE.png",
                   help="write a grid of clean vs triggered test images")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], poison, extra_args=_args))
