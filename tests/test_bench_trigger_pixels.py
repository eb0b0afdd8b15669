"""benchmarks/bench_trigger_pixels.py: the pixel statistics that floor trigger visibility."""
import torch

from conftest import load_benchmark

bench = load_benchmark("bench_trigger_pixels")


def test_features_see_a_small_noise_patch_on_a_smooth_image():
    torch.manual_seed(0)
    smooth = torch.linspace(0, 1, 32).expand(2, 3, 32, 32).clone()  # a gentle ramp
    patched = smooth.clone()
    patched[:, :, 5:7, 9:11] = torch.rand(2, 3, 2, 2)
    f_smooth, f_patched = bench.features(smooth), bench.features(patched)
    assert f_smooth.shape == (2, 9)
    # the maxima (quantile 1 of roughness and colour, their product) rise with the patch
    assert (f_patched[:, [3, 7, 8]] > f_smooth[:, [3, 7, 8]] + 0.05).all()
    # the medians do not: the patch is local
    assert abs(f_patched[:, 0] - f_smooth[:, 0]).max() < 1e-6
