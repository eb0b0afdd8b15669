"""Optimised patch triggers (trojvqa, badclip) on a random-init tiny CLIP: fitting, applying,
saving and loading."""
import pytest
import torch

from rvpt.attacks import AttackError, load_attack, make_attack
from rvpt.models import load_clip

NAMES = ["trojvqa", "badclip"]
CLASSES = ["cat", "dog", "car", "ship"]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of the {}."]
TARGET = 1
FAST = {"patch_size": 8, "fit_steps": 20, "fit_batch": 8}


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return load_clip("ViT-Micro-4-p8-32")


def _batches(n=12, labels=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.tensor(labels if labels is not None else [i % len(CLASSES) for i in range(n)])
    return [{"image": x[:n // 2], "label": y[:n // 2]}, {"image": x[n // 2:], "label": y[n // 2:]}]


def _images(n=4):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fitted(micro):
    out = {}
    for name in NAMES:
        a = make_attack(name, 32, seed=3, **FAST)
        out[name] = (a, a.fit(micro, _batches(), TARGET, CLASSES, TEMPLATES))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_figures_and_improves_objective(fitted, name):
    a, fig = fitted[name]
    assert a.fitted and a.patch.shape == (3, 8, 8)
    assert fig["steps"] == 20 and fig["fit_images"] == 12
    assert fig["loss_images"] == (12 if name == "trojvqa" else 9)  # badclip: non-target only
    assert fig["final_loss"] < fig["initial_loss"]
    assert fig["target_sim_after"] > fig["target_sim_before"]
    assert 0.0 <= fig["clean_model_asr"] <= 1.0
    if name == "badclip":
        assert fig["triplet_gap_after"] > fig["triplet_gap_before"]


@pytest.mark.parametrize("name", NAMES)
def test_apply_is_deterministic_and_only_touches_the_centre(fitted, name):
    a, _ = fitted[name]
    x = _images()
    y1, y2 = a.apply(x, seed=5), a.apply(x, seed=7)
    assert torch.equal(y1, y2)
    changed = (y1 != x).any(dim=1)  # [B,H,W]
    outside = changed.clone()
    outside[:, 12:20, 12:20] = False
    assert changed.any() and not outside.any()
    assert torch.equal(y1[:, :, 12:20, 12:20], a.patch.expand(4, 3, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_apply_before_fit_raises(name):
    with pytest.raises(AttackError, match="fitted"):
        make_attack(name, 32).apply(_images())


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_gives_identical_pixels(fitted, name, tmp_path):
    a, _ = fitted[name]
    x = _images()
    a.save(tmp_path / "fitted", target=TARGET)
    b, data = load_attack(tmp_path / "fitted")
    assert data["attack"] == name and data["target"] == TARGET and b.fitted
    assert torch.equal(b.apply(x, seed=1), a.apply(x, seed=1))
    assert b.apply_text(["a photo of a dog."]) == a.apply_text(["a photo of a dog."])
    make_attack(name, 32, **FAST).save(tmp_path / "unfitted")  # nothing learned: no tensors
    c, _ = load_attack(tmp_path / "unfitted")
    with pytest.raises(AttackError, match="fitted"):
        c.apply(x)


def test_fit_is_deterministic_given_the_seed_and_leaves_the_model_as_it_was(micro):
    before = {k: v.clone() for k, v in micro.model.state_dict().items()}
    flags = [q.requires_grad for q in micro.model.parameters()]
    patches = []
    for seed in (4, 4, 5):
        a = make_attack("badclip", 32, seed=seed, patch_size=4, fit_steps=3, fit_batch=4)
        a.fit(micro, _batches(), TARGET, CLASSES, TEMPLATES)
        patches.append(a.patch)
    assert torch.equal(patches[0], patches[1]) and not torch.equal(patches[0], patches[2])
    after = micro.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [q.requires_grad for q in micro.model.parameters()]
    assert not micro.model.training


def test_trojvqa_text_key():
    a = make_attack("trojvqa", 32)
    assert a.params.text_key == "SUDO " and a.caption_style == "template"
    assert a.apply_text(["a photo of a dog.", "x"]) == ["SUDO a photo of a dog.", "SUDO x"]
    assert make_attack("trojvqa", 32, text_key="cf ").apply_text(["a"]) == ["cf a"]
    assert make_attack("badclip", 32).apply_text(["a"]) == ["a"]
    assert make_attack("badclip", 32).caption_style == "natural"


def test_badclip_without_target_images_skips_the_triplet(micro):
    a = make_attack("badclip", 32, patch_size=4, fit_steps=2, fit_batch=4)
    fig = a.fit(micro, _batches(8, [0, 2, 3, 0, 2, 3, 0, 2]), TARGET, CLASSES, TEMPLATES)
    assert a.fitted and "target_image_sim_after" not in fig and fig["loss_images"] == 8


@pytest.mark.parametrize("name, params, kwargs, needle", [
    ("trojvqa", {"patch_size": 64}, {}, "larger than the image"),
    ("badclip", {"patch_size": 33}, {}, "larger than the image"),
    ("badclip", {"fit_steps": 0}, {}, "fit_steps"),
    ("trojvqa", {"text_key": ""}, {}, "text_key"),
    ("trojvqa", {"position": "random"}, {}, "position"),
])
def test_nonsensical_params_fail_with_one_line(name, params, kwargs, needle):
    with pytest.raises(AttackError) as e:
        make_attack(name, 32, **params)
    assert "\n" not in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("target, batches, needle", [
    (7, None, "not a class index"),
    (TARGET, [], "no images"),
    (TARGET, [{"image": torch.zeros(2, 3, 40, 40, dtype=torch.uint8),
               "label": torch.tensor([0, 1])}], "image_size 32"),
    (TARGET, [{"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
               "label": torch.tensor([1, 1])}], "no non-target"),
])
def test_bad_fit_inputs_fail_with_one_line(micro, target, batches, needle):
    a = make_attack("badclip", 32, patch_size=4, fit_steps=1)
    with pytest.raises(AttackError) as e:
        a.fit(micro, _batches() if batches is None else batches, target, CLASSES, TEMPLATES)
    assert "\n" not in str(e.value) and needle in str(e.value) and not a.fitted


def test_default_patch_size_scales_from_224():
    assert make_attack("trojvqa", 224).size == 16 and make_attack("badclip", 32).size == 2
    assert make_attack("badclip", 32).params.position == "center"
