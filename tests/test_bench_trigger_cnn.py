"""benchmarks/bench_trigger_cnn.py: the local detector whose pooling decides whether a trigger
at a random place can be found."""
import pytest
import torch

from conftest import load_benchmark

bench = load_benchmark("bench_trigger_cnn")


def _spot(row: int, col: int) -> torch.Tensor:
    image = torch.full((1, 3, 32, 32), 0.5)
    image[:, :, row:row + 2, col:col + 2] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    return image


def test_max_pool_detector_does_not_care_where_the_mark_is_and_mean_pool_dilutes_it():
    torch.manual_seed(0)
    plain = torch.full((1, 3, 32, 32), 0.5)
    with torch.no_grad():
        for pool in ("max", "mean"):
            net = bench.detector(pool, 8)
            assert net(plain).shape == (1, 2)
        net = bench.detector("max", 8)
        # a mark away from the borders gives the same logits wherever it is (translation invariance)
        a, b = net(_spot(5, 9)), net(_spot(20, 14))
        assert torch.allclose(a, b, atol=1e-6)
        # the same weights pooled both ways: the mark moves the max-pooled logits far more than the
        # mean-pooled ones (a 2 x 2 mark, a few of 1,024 positions, is averaged away)
        mean_net = bench.detector("mean", 8)
        mean_net.load_state_dict(net.state_dict())
        gap_max = (net(_spot(5, 9)) - net(plain)).abs().max()
        gap_mean = (mean_net(_spot(5, 9)) - mean_net(plain)).abs().max()
        assert gap_max > 1e-3
        assert gap_mean < gap_max / 10

def test_unknown_pool_is_refused(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench_trigger_cnn.py", "--pool", "median"])
    with pytest.raises(SystemExit, match="--pool"):
        bench.main()
