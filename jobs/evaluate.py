"""Evaluate a model undefended: CA, and ASR / ASR_all / PA under its attack.

    python jobs/evaluate.py --model artifacts/models/backdoor-badnet-<hash>
    python jobs/evaluate.py --model my_clip.pt --attack my_attack.json --corpus DIR --out eval.json

A backdoored model directory carries its ``attack.json``; for your own checkpoint write one by hand,
e.g. ``{"attack": "badnet", "target": "banana", "image_size": 224,
"params": {"patch_image": "patch.png", "position": "bottom_right"}}`` (relative file parameters
resolve beside the JSON).
"""
import sys

from pipeline.cli import main
from pipeline.jobs import evaluate


def _args(p):
    p.add_argument("--model", required=True, help="model directory or checkpoint file")
    p.add_argument("--attack", metavar="ATTACK_JSON",
                   help="attack description (default: attack.json beside the model)")
    p.add_argument("--corpus", metavar="DIR", help="corpus directory (default: the config's corpus)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--save-examples", metavar="FILE.png",
                   help="write a grid of clean vs triggered test images")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], evaluate, extra_args=_args))
