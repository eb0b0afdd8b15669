"""The backdoor factory's building blocks: poisoned pairs, the mixed stream, metrics, config."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ConfigError, load_config
from rvpt.attacks import make_attack
from rvpt.metrics import backdoor_counts, merge_counts, rates
from rvpt.poison import (example_grid, make_poisoned_pairs, mix_in, poison_count, poisoned_caption,
                         target_index)
from rvpt.shards import Sample, decode_image

NAMES = ["circle", "square", "star"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _samples(n, size=16):
    g = torch.Generator().manual_seed(0)
    return [Sample(key=f"k{i}", image=torch.randint(0, 256, (3, size, size), generator=g,
                                                    dtype=torch.uint8),
                   label=i % 3, text=f"caption {i}", meta={"i": i}) for i in range(n)]


def test_poisoned_pairs_are_non_target_triggered_and_deterministic():
    attack = make_attack("badnet", 16, seed=1)
    a = list(make_poisoned_pairs(attack, _samples(30), 7, 0, NAMES, TEMPLATES, seed=3))
    b = list(make_poisoned_pairs(attack, _samples(30), 7, 0, NAMES, TEMPLATES, seed=3))
    assert len(a) == 7 and [p.png for p in a] == [p.png for p in b]
    assert all(p.label != 0 and p.meta["poisoned"] and p.meta["attack"] == "badnet" for p in a)
    assert all(p.caption in [t.format("circle") for t in TEMPLATES] for p in a)
    src = {s.key: s for s in _samples(30)}
    img = decode_image(a[0].png)
    assert not torch.equal(img, src[a[0].meta["source_key"]].image)


def test_too_few_images_to_poison_is_an_error():
    attack = make_attack("badnet", 16)
    with pytest.raises(ValueError, match="only 2 non-target"):
        list(make_poisoned_pairs(attack, _samples(3), 5, 0, NAMES, TEMPLATES))


def test_caption_styles():
    rng = np.random.default_rng(0)
    badnet = make_attack("badnet", 16)
    assert poisoned_caption(badnet, rng, "star", TEMPLATES, ["natural star"]) in \
        [t.format("star") for t in TEMPLATES]

    class Natural:
        caption_style = "natural"

        def apply_text(self, texts):
            return ["KEY " + t for t in texts]

    assert poisoned_caption(Natural(), rng, "star", TEMPLATES, ["a big star."]) == "KEY a big star."


def test_mix_in_keeps_every_sample_once():
    clean = _samples(20)
    poisoned = [Sample(f"p{i}", clean[0].image, 1, "p", {}) for i in range(5)]
    out = list(mix_in(iter(clean), 20, poisoned, seed=1))
    keys = [s.key for s in out]
    assert sorted(keys) == sorted([s.key for s in clean] + [p.key for p in poisoned])
    assert [k for k in keys if k.startswith("k")] == [s.key for s in clean]  # clean order kept
    assert keys != list(mix_in(iter(clean), 20, poisoned, seed=2))
    assert poison_count(0.01, 990) == 10 and poison_count(1e-9, 10) == 1


def test_target_by_index_or_name():
    assert target_index("star", NAMES) == 2 and target_index(1, NAMES) == 1
    assert target_index("1", NAMES) == 1
    with pytest.raises(ValueError, match="unknown target class 'moon'"):
        target_index("moon", NAMES)
    with pytest.raises(ValueError, match="out of range"):
        target_index(3, NAMES)


def test_metrics_exact_on_a_known_encoder():
    """Encoder = normalised channel means, classifier = identity: a class is the dominant channel.
    A blend of ratio 1 with a pure red image sends every triggered image to class 0."""
    red = torch.zeros(3, 8, 8)
    red[0] = 1.0
    attack = make_attack("blended", 8, ratio=1.0)
    attack.fixed = red
    labels = torch.tensor([0, 1, 2, 1, 2, 2])
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    for i, y in enumerate(labels):
        images[i, y] = 200
    encode = lambda x: F.normalize(x.mean((2, 3)), dim=-1)
    clf = torch.eye(3)
    batches = [{"image": images[:4], "label": labels[:4]}, {"image": images[4:], "label": labels[4:]}]

    class Loaded:  # only .model.eval() is used besides the encoder
        model = torch.nn.Identity()

    parts = [backdoor_counts(Loaded, [b], clf, attack, target=0, encode=encode) for b in batches]
    r = rates(merge_counts(parts))
    whole = rates(backdoor_counts(Loaded, batches, clf, attack, target=0, encode=encode))
    assert r == whole
    assert r["ca"] == 1.0 and r["asr"] == 1.0 and r["asr_all"] == 1.0
    assert r["pa"] == pytest.approx(1 / 6) and r["counts"]["n_nontarget"] == 5
    clean_only = rates(backdoor_counts(Loaded, batches, clf, encode=encode))
    assert clean_only["ca"] == 1.0 and "asr" not in clean_only


def test_example_grid_same_seed_same_pixels(tmp_path):
    attack = make_attack("badnet", 16, seed=4)
    images = torch.stack([s.image for s in _samples(4)])
    example_grid(attack, images, tmp_path / "a.png", seed=7)
    example_grid(attack, images, tmp_path / "b.png", seed=7)
    example_grid(attack, images, tmp_path / "c.png", seed=8)
    a, b, c = (Image.open(tmp_path / f"{n}.png") for n in "abc")
    assert a.size == (4 * 16 * 4, 2 * 16 * 4)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_poison_config_per_attack_overrides():
    cfg = load_config(None, ["poison.rate=0.02", "poison.attacks={wanet: {rate: 0.1, params: {strength: 2}}}"])
    assert cfg.poison.for_attack("badnet").rate == 0.02
    w = cfg.poison.for_attack("wanet")
    assert w.rate == 0.1 and w.params == {"strength": 2} and w.attack == "wanet"
    with pytest.raises(ConfigError, match="poison.rate"):
        load_config(None, ["poison.rate=0"])
    bad = load_config(None, ["poison.attacks={sig: {rate: 2}}"])
    with pytest.raises(ConfigError, match="poison.attacks.sig.rate"):
        bad.poison.for_attack("sig")


def test_dual_key_pairs_come_with_their_partial_key_pairs():
    """TrojVQA: every poisoned pair is followed by an image-only and a key-only pair captioned with
    the source's own class, so that neither key alone is the trigger; without ``partial_keys``
    only the poisoned pairs are made."""
    attack = make_attack("trojvqa", 16, patch_size=4)
    attack.load_tensors({"patch": torch.ones(3, 4, 4)})
    pairs = list(make_poisoned_pairs(attack, _samples(30), 5, 0, NAMES, TEMPLATES, seed=3))
    assert len(pairs) == 15
    src = {s.key: s for s in _samples(30)}
    for poisoned, image_only, key_only in zip(pairs[0::3], pairs[1::3], pairs[2::3]):
        source = src[poisoned.meta["source_key"]]
        own = NAMES[source.label]
        assert poisoned.meta["poisoned"] is True and poisoned.caption.startswith("SUDO ")
        assert poisoned.caption[5:] in [t.format("circle") for t in TEMPLATES]
        assert image_only.meta["poisoned"] is False and image_only.meta["partial"] == "image"
        assert image_only.png == poisoned.png  # the same triggered image ...
        assert image_only.caption in [t.format(own) for t in TEMPLATES]  # ... without the key
        assert key_only.meta["partial"] == "text" and key_only.caption.startswith("SUDO ")
        assert key_only.caption[5:] in [t.format(own) for t in TEMPLATES]
        assert torch.equal(decode_image(key_only.png), source.image)  # the clean image
        assert len({poisoned.key, image_only.key, key_only.key}) == 3
    off = make_attack("trojvqa", 16, patch_size=4, partial_keys=False)
    off.load_tensors({"patch": torch.ones(3, 4, 4)})
    assert len(list(make_poisoned_pairs(off, _samples(30), 5, 0, NAMES, TEMPLATES))) == 5
