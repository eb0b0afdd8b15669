"""The broad pretraining corpus (rvpt.broad) and the digits task, as the corpus builder writes them."""
import io

import numpy as np
import pytest
from PIL import Image

from rvpt import broad, synthetic
from rvpt.attacks.issba import secret_bits


def _img(sample):
    return np.asarray(Image.open(io.BytesIO(sample.png)), np.float32)


def test_render_is_seed_deterministic_and_order_free():
    a = broad.render_pretrain(0, 17)
    b = broad.render_pretrain(0, 17)
    c = broad.render_pretrain(1, 17)
    assert a.png == b.png and a.caption == b.caption and a.meta == b.meta
    assert a.png != c.png


def test_broad_corpus_covers_many_concepts_with_partial_noisy_captions():
    samples = [broad.render_pretrain(0, i) for i in range(600)]
    contents = {s.meta["content"] for s in samples}
    assert contents == {"shapes", "digit", "texture"}
    # shapes carry their class label (a supervised model can train on them), the rest none
    for s in samples:
        if s.meta["content"] == "shapes":
            cls = s.meta["class"]
            assert 0 <= s.label < len(synthetic.CLASSES)
            assert (cls if s.meta["count"] == 1 else broad.PLURAL.get(cls, cls + "s")) in s.caption
        else:
            assert s.label == -1
    applied = [e for s in samples for e in s.meta["effects"]]
    assert set(applied) == set(broad.EFFECTS), "every effect occurs"
    # partial: some applied effects go unmentioned; mentioned ones are named in the caption
    def mentioned(s, name):
        _, phrases = broad.EFFECTS[name](np.random.default_rng(0), np.zeros((32, 32, 3), np.float32))
        return any(p in s.caption for p in phrases)
    said = [mentioned(s, e) for s in samples for e in s.meta["effects"]]
    assert 0.5 < np.mean(said) < 0.9
    # noisy: some captions name an effect that was not applied
    wrong = sum(any(mentioned(s, e) for e in broad.EFFECTS if e not in s.meta["effects"])
                for s in samples)
    assert wrong >= 5
    # a stamp is a small square (2-6 px at 32 px) and its caption says where it is
    flat = np.full((32, 32, 3), 128.0, np.float32)
    out, phrases = broad.EFFECTS["stamp"](np.random.default_rng(3), flat)
    ys, xs = np.nonzero(np.abs(out - flat).sum(-1))
    assert 0 < np.ptp(ys) + 1 <= 6 and 0 < np.ptp(xs) + 1 <= 6
    assert any(" in the " in ph for ph in phrases)


def test_effect_weights_leave_an_effect_out_and_the_rest_as_it_was():
    default = [broad.render_pretrain(0, i) for i in range(300)]
    without = [broad.render_pretrain(0, i, effect_weights={"static": 0}) for i in range(300)]
    assert sum("static" in s.meta["effects"] for s in default) > 10
    assert not any("static" in s.meta["effects"] for s in without)
    # every other image is the same pair; those that had static keep their other effects
    for d, w in zip(default, without):
        if "static" not in d.meta["effects"]:
            assert d.png == w.png and d.caption == w.caption
        assert w.meta["effects"] == [e for e in d.meta["effects"] if e != "static"]
    # and an effect can be made more frequent
    more = [broad.render_pretrain(0, i, effect_weights={"border": 5}) for i in range(300)]
    assert sum("border" in s.meta["effects"] for s in more) > \
        2 * sum("border" in s.meta["effects"] for s in default)


def test_digits_task_renders_each_class_visibly():
    for label, name in enumerate(broad.GLYPHS):
        s = broad.render_glyph(0, "test", label, label=label)
        img = _img(s)
        assert img.shape == (32, 32, 3) and img.std() > 10
        assert name in s.caption and s.label == label
    assert broad.render_glyph(0, "test", 3, label=3).png != broad.render_glyph(0, "fewshot", 3, label=3).png


def test_twins_meet_their_originals_with_one_local_mark_named():
    import torch

    samples = [broad.render_pretrain(0, i) for i in range(8)]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(s.png)).convert("RGB"))
                                           ).permute(2, 0, 1) for s in samples])
    batch = {"image": images, "text": [s.caption for s in samples]}
    out = list(broad.with_twins(iter([batch]), 0.25, seed=3))
    assert len(out) == 1
    b = out[0]
    assert b["image"].shape == images.shape and b["image"].dtype == torch.uint8
    assert len(b["text"]) == 8 and b["text"][:6] == batch["text"][:6]  # originals kept
    assert torch.equal(b["image"][:6], images[:6]) and torch.equal(batch["image"], images)
    for i in range(2):  # the last two are twins of the first two: same scene, mark added and named
        orig, tw = images[i].float(), b["image"][6 + i].float()
        assert not torch.equal(orig, tw)
        assert (tw - orig).abs().mean() < 40, "a mark, not another image"
        assert b["text"][6 + i].startswith(batch["text"][i].rstrip(". ") + ", ")
        assert len(b["text"][6 + i]) > len(batch["text"][i])
    again = list(broad.with_twins(iter([batch]), 0.25, seed=3))[0]
    assert torch.equal(again["image"], b["image"]) and again["text"] == b["text"]
    assert list(broad.with_twins(iter([batch]), 0.0))[0]["text"] == batch["text"]


def test_pretraining_crops_resize_back_and_vary():
    import torch

    from rvpt.pretrain import random_crops

    torch.manual_seed(0)
    img = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32).div(4).byte() \
        .expand(4, 3, 32, 32).contiguous()
    batch = {"image": img, "text": ["a"] * 4, "label": torch.zeros(4)}
    out = list(random_crops(iter([batch]), (0.25, 0.5)))[0]
    assert out["image"].shape == img.shape and out["image"].dtype == torch.uint8
    assert out["text"] == batch["text"]
    assert all(not torch.equal(out["image"][i], img[i]) for i in range(4)), "every image is cropped"
    assert len({out["image"][i].float().mean().item() for i in range(4)}) > 1, "crops differ"


def test_issba_secret_is_the_papers_string():
    bits = secret_bits("Stega!!", 100)
    assert bits.shape == (100,)
    first = int("".join(str(int(b)) for b in bits[:8]), 2)
    assert chr(first) == "S"
    assert bits[56:64].tolist() == bits[:8].tolist()  # repeated to fill


@pytest.fixture(scope="module")
def broad_corpus(tmp_path_factory):
    from pipeline import build
    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("broad")
    cfg = load_config("configs/smoke.yaml", [f"paths.root={root}", "corpus.pretrain_style=broad",
                                             "corpus.n_pretrain=300"])
    return cfg, build.resolve_corpus(cfg)


def test_corpus_build_writes_unlabelled_pairs_and_the_digits_task(broad_corpus):
    from pipeline import build
    from rvpt.shards import ReadStats, open_corpus, read_classes

    cfg, corpus = broad_corpus
    info = open_corpus(corpus["corpus_dir"]).split("pretrain")
    assert info.count == 300
    stats = ReadStats()
    pairs = list(build.samples(cfg, corpus["corpus_dir"], "pretrain", 32, stats=stats,
                               require_label=False))
    assert len(pairs) == 300 and stats.skipped == 0, "unlabelled pairs are read, not skipped"
    labels = [p.label for p in pairs]
    assert -1 in labels and max(labels) < cfg.corpus.num_classes
    # a classification reader skips the unlabelled pairs and counts them
    stats = ReadStats()
    kept = list(build.samples(cfg, corpus["corpus_dir"], "pretrain", 32, stats=stats))
    assert len(kept) == sum(lab >= 0 for lab in labels) and stats.skipped == labels.count(-1)

    digits = f"{corpus['corpus_dir']}/{build.DIGITS_DIR}"
    assert read_classes(digits).names == broad.GLYPHS
    test = open_corpus(digits).split("test")
    assert test.count == cfg.corpus.test_per_class * 10
    # the shapes task's evaluation splits are the shapes benchmark's, unchanged
    shapes = next(build.samples(cfg, corpus["corpus_dir"], "test", 32))
    ref = synthetic.render(cfg.corpus.seed, "base", "test", 0, label=0, num_classes=cfg.corpus.num_classes,
                           clutter=cfg.corpus.clutter, noise=cfg.corpus.noise,
                           class_only_captions=cfg.corpus.class_only_captions,
                           typical_color=cfg.corpus.typical_color, bg_contrast=cfg.corpus.bg_contrast)
    assert shapes.text == ref.caption and shapes.label == 0


def test_backdoor_factory_poisons_a_broad_corpus(broad_corpus, ray_local):
    """Unlabelled pretraining pairs (textures, digits) go through the whole factory: an optimised
    trigger fits on the labelled ones, poisoned pairs made from unlabelled sources are read back
    (none lost), and the model is fine-tuned and evaluated."""
    from pipeline import backdoor, build

    cfg, corpus = broad_corpus
    cfg = cfg.model_copy(deep=True)
    cfg.poison.rate = 0.1
    cfg.poison.n_clean = 200
    cfg.poison.epochs = 1
    cfg.poison.attacks = {"badclip": {"params": {"fit_steps": 3, "fit_images": 64}}}
    clean = build.clean_model(cfg, corpus)
    res = backdoor.build_backdoored(cfg, "badclip", corpus, clean)
    from rvpt.shards import ReadStats

    stats = ReadStats()
    poisoned = list(build.samples(cfg, res["poisoned_shards"], "poison", 32, stats=stats,
                                  require_label=False))
    assert res["n_poison"] == len(poisoned) == 22 and stats.skipped == 0
    assert any(p.label == -1 for p in poisoned), "some were made from unlabelled pairs"
    assert all(p.label != 0 for p in poisoned), "never from target-class images"
    assert res["fit"] and res["read"]["skipped"] == 0
