"""benchmarks/bench_resistivity_profile.py at the smoke size: per-block PR of the clean CLIP and of a
supervised ViT for the four perturbations, the supervised model trained, cached and reused."""
import json

import torch

from conftest import REPO, load_benchmark

PERTURBATIONS = ("noise", "blur", "jitter", "flip")


def test_resistivity_profile_smoke(smoke_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bench = load_benchmark("bench_resistivity_profile")
    threads = torch.get_num_threads()
    out = tmp_path / "pr.json"
    argv = ["--config", "configs/smoke.yaml", f"paths.root={smoke_root}", "--sup-epochs", "1",
            "--sup-batch-size", "32", "--pr-images", "16", "--threads", "1", "--out", str(out)]
    try:
        first = bench.main(argv)
        second = bench.main(argv[:-2])  # the supervised ViT comes from the cache
    finally:
        torch.set_num_threads(threads)

    res = json.loads(out.read_text())
    layers = res["layers"]
    assert layers == 4  # ViT-Micro-4-p8-32
    assert set(res["perturbations"]) == set(PERTURBATIONS)
    for model in ("clip", "supervised"):
        pr = res["models"][model]["pr"]
        assert pr["images"] == 16
        for p in PERTURBATIONS:
            vals = pr["per_layer"][p]
            assert len(vals) == layers
            assert all(-1 - 1e-5 <= v <= 1 + 1e-5 for v in vals), (model, p, vals)
            assert abs(pr["mean"][p] - sum(vals) / layers) < 1e-9

    sup = res["models"]["supervised"]
    losses = sup["train"]["step_losses"]
    assert sup["train"]["steps"] == len(losses) == 16  # 512 labelled pretrain images / 32
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert 0.0 <= sup["test_acc"] <= 1.0 and sup["test_n"] > 0
    assert 0.0 <= res["models"]["clip"]["zero_shot_ca"] <= 1.0

    assert not first["models"]["supervised"]["cached"]
    assert second["models"]["supervised"]["cached"]
    assert second["models"]["supervised"]["model_dir"] == sup["model_dir"]
    for model in ("clip", "supervised"):  # same weights, images and random draws: same numbers
        assert second["models"][model]["pr"] == first["models"][model]["pr"]
    assert second["models"]["supervised"]["test_acc"] == sup["test_acc"]


def test_supervised_augmentation():
    """``--sup-augment vit`` draws a crop, flip and RandAugment per image (uint8 in, uint8 out, same
    shape), ``none`` is the identity, and the option enters the cache key only when it is set."""
    import argparse

    from pipeline.config import load_config

    bench = load_benchmark("bench_resistivity_profile")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    assert bench.sup_augmenter("none", 32)(x) is x
    torch.manual_seed(0)
    y = bench.sup_augmenter("vit", 32)(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    changed = [not torch.equal(a, b) for a, b in zip(x, y)]
    assert sum(changed) >= 6, changed  # per image, not one draw for the batch
    try:
        bench.sup_augmenter("mixup", 32)
        raise AssertionError("an unknown augmentation was accepted")
    except ValueError as e:
        assert "mixup" in str(e)

    cfg = load_config(str(REPO / "configs/smoke.yaml"), [])
    ns = dict(train_split="pretrain", sup_epochs=1, sup_batch_size=32, sup_lr=1e-3,
              sup_weight_decay=0.05)
    plain = bench.sup_options(argparse.Namespace(**ns, sup_augment="none"), cfg)
    vit = bench.sup_options(argparse.Namespace(**ns, sup_augment="vit"), cfg)
    assert "augment" not in plain and vit["augment"] == "vit"
    assert bench.supervised_key(cfg, "c", plain) != bench.supervised_key(cfg, "c", vit)
