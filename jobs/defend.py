"""Defend one backdoored model locally and report CA, ASR, ASR_all, PA and mean PR before/after.

    python jobs/defend.py --model artifacts/models/backdoor-badnet-<hash> --defense rvpt
    python jobs/defend.py --model DIR --defense vpt defense.train.shots=8 --out defend.json
    python jobs/defend.py --model DIR --defense rvpt defense.params="{depth: 6, length: 25, alpha: 1}"
    python jobs/defend.py --model DIR --defense cleanclip defense.pairs.count=2000
    python jobs/defend.py --model DIR --defense linear_probe

Defenses (rvpt.defenses): rvpt, vpt, none, cleanclip (all of CLIP on clean pairs), linear_probe (a
head on frozen features), and any other registered one; each trains with its own recipe
(``defense.train.*`` set in a config overrides it for every defense).
"""
import sys

from pipeline.cli import main
from pipeline.jobs import defend


def _args(p):
    p.add_argument("--model", required=True, help="backdoored model directory (or checkpoint)")
    p.add_argument("--defense", help="defense name (default: defense.name of the config; the "
                   "config's defense.params that this defense also has are kept)")
    p.add_argument("--attack", metavar="ATTACK_JSON",
                   help="attack description (default: attack.json beside the model)")
    p.add_argument("--corpus", metavar="DIR", help="corpus directory (default: the config's corpus)")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], defend, extra_args=_args))
