"""Deep visual prompts, the RVPT loss and the defense registry (random weights, CPU)."""
import pytest
import torch

from rvpt.defenses import DefenseError, TrainParams, lr_at, make_defense, train_defense
from rvpt.fewshot import epoch_batches, sample_few_shot
from rvpt.models import load_clip
from rvpt.prompts import VisualPrompts, visual_forward
from rvpt.resistivity import perturbation_resistivity
from rvpt.shards import Sample

NAMES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return load_clip("ViT-Micro-4-p8-32")


def _images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vit_b32_paper_defaults_have_345600_trainable_parameters():
    loaded = load_clip("ViT-B-32")
    d = make_defense("rvpt", loaded, NAMES)
    assert d.num_trainable() == 9 * 50 * 768 == 345_600
    assert d.prompts.prompts.shape == (9, 50, 768)


def test_zero_length_prompts_equal_the_unprompted_model(micro):
    x = _images()
    d = make_defense("rvpt", micro, NAMES, length=0, depth=1)
    ref = micro.encode_images(x)
    assert torch.allclose(d.encode(x), ref, atol=1e-6)
    emb, _ = visual_forward(micro.model.visual, micro.normalize(x), None)
    assert torch.allclose(torch.nn.functional.normalize(emb, dim=-1), ref, atol=1e-6)


def test_prompts_change_the_embedding_and_are_dropped_before_pooling(micro):
    x = _images()
    d = make_defense("vpt", micro, NAMES, length=5, depth=1)
    with torch.no_grad():
        d.prompts.prompts.normal_(0, 1.0)
    assert not torch.allclose(d.encode(x), micro.encode_images(x), atol=1e-3)
    assert d.encode(x).shape == micro.encode_images(x).shape


@pytest.mark.parametrize("name", ["rvpt", "vpt"])
def test_gradients_reach_the_prompts_and_nothing_else(micro, name):
    d = make_defense(name, micro, NAMES, length=4, depth=1)
    loss, stats = d.module({"image": _images(), "label": torch.tensor([0, 1, 2, 0, 1, 2])})
    loss.backward()
    grads = {n: p.grad for n, p in d.module.named_parameters() if p.grad is not None}
    assert list(grads) == ["encoder.prompts.prompts"] and grads["encoder.prompts.prompts"].abs().sum() > 0
    assert all(p.grad is None for p in micro.model.parameters())
    assert ("fr" in stats) == (name == "rvpt")
    d.prompts.prompts.grad = None


def test_repelling_loss_is_cosine_to_the_frozen_model(micro):
    """With zero prompts of length 0 the prompted CLS equals the frozen one: L_FR = 1."""
    d = make_defense("rvpt", micro, NAMES, length=0, depth=1)
    loss, stats = d.module({"image": _images(), "label": torch.tensor([0, 1, 2, 0, 1, 2])})
    assert float(stats["fr"]) == pytest.approx(1.0, abs=1e-5)
    assert float(loss) == pytest.approx(float(stats["ce"]) + 2.0, abs=1e-4)
    m = make_defense("rvpt", micro, NAMES, length=3, depth=1, margin=1.0)
    loss, stats = m.module({"image": _images(), "label": torch.tensor([0, 1, 2, 0, 1, 2])})
    assert float(loss) == pytest.approx(float(stats["ce"]) + 2.0, abs=1e-4)  # m = 1: constant


def test_feature_site_embedding_uses_the_projected_output(micro):
    x = micro.normalize(_images())
    p = VisualPrompts.for_model(micro.model, depth=1, length=2, seed=0)
    emb, feats = visual_forward(micro.model.visual, x, p, collect_from=1, feature_site="embedding")
    assert len(feats) == 3 and torch.equal(feats[-1], emb)
    _, blocks = visual_forward(micro.model.visual, x, p, collect_from=1)
    assert blocks[-1].shape[-1] == micro.model.visual.class_embedding.shape[-1]


def test_prompts_save_and_load(micro, tmp_path):
    d = make_defense("rvpt", micro, NAMES, length=3, depth=2, seed=1)
    d.save(tmp_path)
    e = make_defense("rvpt", micro, NAMES, length=3, depth=2, seed=2)
    assert not torch.equal(d.prompts.prompts, e.prompts.prompts)
    e.load(tmp_path)
    assert torch.equal(d.prompts.prompts, e.prompts.prompts)
    x = _images()
    assert torch.equal(d.encode(x), e.encode(x))
    wrong = make_defense("rvpt", micro, NAMES, length=4, depth=2)
    with pytest.raises(DefenseError):
        wrong.load(tmp_path)


@pytest.mark.parametrize("params, needle", [
    ({"depth": 9}, "depth"), ({"alpha": -1}, "alpha"), ({"colour": 1}, "colour"),
])
def test_bad_defense_params_are_one_line(micro, params, needle):
    with pytest.raises(DefenseError) as e:
        make_defense("rvpt", micro, NAMES, **params)
    assert "\n" not in str(e.value) and needle in str(e.value)


def test_unknown_defense_lists_known(micro):
    with pytest.raises(DefenseError, match="rvpt.*vpt|vpt.*rvpt"):
        make_defense("nosuch", micro, NAMES)


def test_coop_schedule():
    tp = TrainParams(epochs=10, warmup_epochs=1)
    assert lr_at(0.5, tp) == 1e-5 and lr_at(1, tp) == pytest.approx(0.002)
    assert lr_at(10, tp) == pytest.approx(0.0, abs=1e-12) and lr_at(5.5, tp) == pytest.approx(0.001)


def _pool(n_per_class=5, classes=3):
    g = torch.Generator().manual_seed(0)
    return [Sample(f"c{c}-{i}", torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
                   c, "", {}) for c in range(classes) for i in range(n_per_class)]


def test_few_shot_sampler_is_seeded_and_balanced():
    pool = _pool()
    a = sample_few_shot(pool, 2, 3, seed=1)
    b = sample_few_shot(list(reversed(pool)), 2, 3, seed=1)
    assert [s.key for s in a] == [s.key for s in b] and len(a) == 6
    assert sorted(s.label for s in a) == [0, 0, 1, 1, 2, 2]
    assert [s.key for s in sample_few_shot(pool, 2, 3, seed=2)] != [s.key for s in a]
    with pytest.raises(ValueError, match="6 shots"):
        sample_few_shot(pool, 6, 3)


def test_training_moves_only_the_prompts_and_lowers_the_loss(micro):
    torch.manual_seed(0)
    shots = sample_few_shot(_pool(4), 4, 3)
    d = make_defense("rvpt", micro, NAMES, length=4, depth=2)
    before = {k: v.clone() for k, v in micro.model.state_dict().items()}
    p0 = d.prompts.prompts.detach().clone()
    tp = TrainParams(epochs=6, batch_size=6, lr=0.05, warmup_epochs=1, augment=False)
    ends = []
    hist = train_defense(d, tp, epoch_batches(shots, 6), 2,
                         on_epoch_end=lambda e, s, opt: ends.append(e))
    assert ends == list(range(6)) and hist.steps == 12
    assert hist.epochs[-1]["loss"] < hist.epochs[1]["loss"]
    assert not torch.equal(p0, d.prompts.prompts)
    assert all(torch.equal(before[k], v) for k, v in micro.model.state_dict().items())


def test_cached_frozen_features_give_the_same_loss(micro):
    x, y = (_images(4) * 255).to(torch.uint8), torch.tensor([0, 1, 2, 0])
    keys = ["a", "b", "c", "d"]
    d = make_defense("rvpt", micro, NAMES, length=3, depth=1, cache_frozen=True)
    batch = {"image": x.float() / 255, "label": y, "key": keys}
    l1, _ = d.module(batch)
    l2, _ = d.module(batch)  # served from the cache
    assert len(d.module.cache) == 4 and torch.allclose(l1, l2, atol=1e-6)


def test_perturbation_resistivity_per_layer(micro):
    from rvpt.attacks import make_attack

    batches = [{"image": (_images(4) * 255).to(torch.uint8)}]
    pr = perturbation_resistivity(micro, batches, attack=make_attack("badnet", 32))
    layers = len(micro.model.visual.transformer.resblocks)
    for name in ("noise", "blur", "jitter", "flip", "trigger"):
        vals = [pr[f"pr/{name}/{i}"] for i in range(layers)]
        assert all(-1 - 1e-5 <= v <= 1 + 1e-5 for v in vals)
    assert pr["pr/noise"] > pr["pr/flip"] and pr["pr_images"] == 4
    p = VisualPrompts.for_model(micro.model, depth=1, length=3, seed=0)
    with_prompts = perturbation_resistivity(micro, batches, prompts=p)
    assert with_prompts["pr_mean"] != pr["pr_mean"]
