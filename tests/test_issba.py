import pytest
import torch

from rvpt.attacks import AttackError, load_attack, make_attack

SIZE = 16
SMALL = dict(secret_bits=16, secret_map=8, fit_steps=30, fit_batch=8, fit_images=64)


def _uint8(n=48, size=SIZE, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _batches(x, bs=16):
    return [{"image": x[i:i + bs]} for i in range(0, len(x), bs)]


def _fitted(seed=0, **params):
    a = make_attack("issba", SIZE, seed=seed, **{**SMALL, **params})
    figures = a.fit(None, _batches(_uint8()), 0, ["a", "b"], ["a photo of a {}."])
    return a, figures


@pytest.fixture(scope="module")
def fitted():
    return _fitted()


def _interior(n=4):
    """Images away from 0 and 1, so the clamp cannot hide the residual."""
    return 0.3 + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_fit_returns_figures(fitted):
    a, figures = fitted
    assert a.fitted and figures["steps"] == 30 and figures["images"] == 48
    assert 0 <= figures["bit_acc"] <= 1 and 0 <= figures["clean_bit_acc"] <= 1
    assert figures["psnr"] > 20 and figures["max_abs_residual"] <= a.params.residual_scale + 1e-6


def test_apply_is_deterministic_small_and_sample_specific(fitted):
    a, _ = fitted
    x = _interior()
    y1, y2 = a.apply(x, seed=5), a.apply(x, seed=6)
    assert torch.equal(y1, y2) and y1.shape == x.shape and not torch.equal(y1, x)
    residual = y1 - x
    assert residual.abs().max() <= a.params.residual_scale + 1e-6
    assert (residual[0] - residual[1]).abs().max() > 1e-4  # differs from image to image
    # one image alone gets the same trigger as in a batch
    assert torch.allclose(a.apply(x[:1]), y1[:1], atol=1e-6)
    assert a.decode_bits(y1).shape == (4, 16) and a.bit_accuracy(y1).shape == (4,)


def test_fit_is_deterministic_given_the_seed(fitted):
    a, _ = fitted
    b, _ = _fitted(seed=0)
    c, _ = _fitted(seed=1)
    x = _interior()
    assert torch.equal(a.apply(x), b.apply(x))
    # the secret is the papers' string whatever the seed; the encoder's init follows the seed
    assert torch.equal(a.secret, c.secret) and not torch.equal(a.apply(x), c.apply(x))
    r0 = make_attack("issba", 32, seed=0, **{**SMALL, "secret": None})
    r1 = make_attack("issba", 32, seed=1, **{**SMALL, "secret": None})
    assert not torch.equal(r0.secret, r1.secret)


def test_save_load_round_trip(fitted, tmp_path):
    a, _ = fitted
    a.save(tmp_path, target=3)
    b, data = load_attack(tmp_path)
    assert data["attack"] == "issba" and data["target"] == 3 and b.fitted
    assert set(a.tensors()) == set(b.tensors())
    assert any(k.startswith("encoder.") for k in a.tensors())
    assert any(k.startswith("decoder.") for k in a.tensors())
    x = _interior()
    assert torch.equal(b.apply(x), a.apply(x))
    assert torch.equal(b.decode_bits(x), a.decode_bits(x)) and torch.equal(b.secret, a.secret)


def test_apply_before_fit_fails():
    a = make_attack("issba", SIZE, **SMALL)
    with pytest.raises(AttackError, match="fitted"):
        a.apply(_interior())


def test_fit_takes_float_images_of_another_size():
    a = make_attack("issba", SIZE, **{**SMALL, "fit_steps": 2})
    x = torch.rand(6, 3, 24, 24)
    figures = a.fit(None, [{"image": x}], 0, [], [])
    assert figures["images"] == 6 and a.apply(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 3, SIZE,
                                                                                        SIZE)


def test_fit_without_images_fails():
    a = make_attack("issba", SIZE, **SMALL)
    with pytest.raises(AttackError, match="no images"):
        a.fit(None, [], 0, [], [])


def test_bad_saved_tensors_fail_with_one_line(fitted):
    a, _ = fitted
    b = make_attack("issba", SIZE, **SMALL)
    tensors = dict(a.tensors())
    tensors.pop("decoder.net.0.weight")
    for bad in ({}, tensors):
        with pytest.raises(AttackError) as e:
            b.load_tensors(bad)
        assert "\n" not in str(e.value) and "issba" in str(e.value)


@pytest.mark.parametrize("params, needle", [
    ({"secret_bits": 0}, "secret_bits must be at least 1"),
    ({"residual_scale": 0}, "within (0, 1]"),
    ({"residual_scale": 1.5}, "within (0, 1]"),
    ({"residual_scale": -0.1}, "within (0, 1]"),
    ({"fit_steps": 0}, "fit_steps must be at least 1"),
    ({"fit_lr": 0}, "fit_lr must be positive"),
    ({"secret_map": 64}, "larger than the image"),
    ({"image_loss_start": 1.0}, "image_loss_start"),
    ({"fit_noise": -1}, "fit_noise must be non-negative"),
    ({"secret": 3}, "secret"),
    ({"secret_bits": "many"}, "secret_bits"),
])
def test_nonsensical_params_fail_with_one_line(params, needle):
    with pytest.raises(AttackError) as e:
        make_attack("issba", 32, **params)
    assert "\n" not in str(e.value) and needle in str(e.value)
