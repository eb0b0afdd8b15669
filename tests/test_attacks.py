import json
import numpy as np
import pytest
import torch
from PIL import Image

from rvpt.attacks import AttackError, load_attack, make_attack

SIMPLE = ["badnet", "blended", "wanet", "sig"]


def _images(n=4, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", SIMPLE)
def test_trigger_is_deterministic_and_changes_images(name, tmp_path):
    x = _images()
    a = make_attack(name, 32, seed=3)
    y1, y2 = a.apply(x, seed=5), a.apply(x, seed=5)
    assert torch.equal(y1, y2) and not torch.equal(y1, x)
    assert y1.shape == x.shape and y1.min() >= 0 and y1.max() <= 1
    a.save(tmp_path)
    b, data = load_attack(tmp_path)
    assert data["attack"] == name and torch.equal(b.apply(x, seed=5), y1)


def test_unknown_attack_lists_known():
    with pytest.raises(AttackError) as e:
        make_attack("nosuch", 32)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in SIMPLE)


@pytest.mark.parametrize("name, params, needle", [
    ("badnet", {"patch_size": 64}, "larger than the image"),
    ("blended", {"ratio": 1.5}, "within [0, 1]"),
    ("blended", {"ratio": -0.1}, "within [0, 1]"),
    ("badnet", {"colour": 1}, "colour"),
    ("wanet", {"grid_size": 99}, "larger than the image"),
])
def test_nonsensical_params_fail_with_one_line(name, params, needle):
    with pytest.raises(AttackError) as e:
        make_attack(name, 32, **params)
    assert "\n" not in str(e.value) and needle in str(e.value)


def test_badnet_patch_from_image_file(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "patch.png")
    a = make_attack("badnet", 32, patch_image=str(tmp_path / "patch.png"), patch_size=4,
                    position="bottom_right")
    y = a.apply(torch.zeros(2, 3, 32, 32))
    assert torch.all(y[:, :, -4:, -4:] == 1) and y[:, :, :-4].sum() == 0


def test_default_sizes_scale_from_224():
    assert make_attack("badnet", 224).size == 16 and make_attack("badnet", 32).size == 2


def test_saved_attack_with_a_patch_image_loads_back_and_resaves(tmp_path):
    """The backdoor factory saves the attack beside the poisoned shards and the model: a patch image
    named by an absolute path travels with it (copied in, named relatively), as load_attack requires."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)).save(tmp_path / "my patch.PNG")
    a = make_attack("badnet", 32, patch_image=str(tmp_path / "my patch.PNG"))
    x = torch.rand(3, 3, 32, 32)
    a.save(tmp_path / "first", target=1)
    saved = json.loads((tmp_path / "first" / "attack.json").read_text())
    assert saved["params"]["patch_image"] == "patch_image.png"
    assert (tmp_path / "first" / "patch_image.png").is_file()
    b, data = load_attack(tmp_path / "first")
    assert data["target"] == 1 and torch.equal(a.apply(x, seed=5), b.apply(x, seed=5))
    b.save(tmp_path / "second")  # a loaded attack saved again (the model directory after the shards)
    c, _ = load_attack(tmp_path / "second")
    assert torch.equal(a.apply(x, seed=5), c.apply(x, seed=5))
    b.save(tmp_path / "first")  # saving onto its own directory keeps the file
    assert torch.equal(a.apply(x, seed=5), load_attack(tmp_path / "first")[0].apply(x, seed=5))
