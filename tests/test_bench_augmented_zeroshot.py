"""benchmarks/bench_augmented_zeroshot.py: the views prompt tuning trains on, and the accuracy
read-out under them."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_augmented_zeroshot as bench  # noqa: E402


class _Loaded:
    """Classifies by which half of the image is brighter: class 0 = left, class 1 = right."""

    def encode_images(self, x):
        left, right = x[..., :16].mean((1, 2, 3)), x[..., 16:].mean((1, 2, 3))
        return torch.stack([left - right, right - left], -1)


def test_views_keep_shape_and_flip_moves_the_evidence():
    torch.manual_seed(0)
    v = bench.views(32)
    assert list(v)[0] == "whole" and v["whole"] is None
    assert {"flip", "crop (0.5, 1.0)", "recipe (crop + flip)"} <= set(v)
    x = torch.rand(4, 3, 32, 32)
    for name, view in v.items():
        if view is not None:
            assert view(x).shape == x.shape, name
    img = torch.zeros(8, 3, 32, 32)
    img[:4, :, :, :16] = 1  # class 0: bright left half
    img[4:, :, :, 16:] = 1
    batches = [{"image": (img * 255).byte(), "label": torch.tensor([0] * 4 + [1] * 4)}]
    clf = torch.eye(2)
    assert bench.accuracy(_Loaded(), batches, clf, None) == 1.0
    assert bench.accuracy(_Loaded(), batches, clf, v["flip"]) == 0.0, "a flip swaps the halves"
