"""benchmarks/bench_crop_source.py at the smoke size: the few-shot split rendered again at twice
the model's size, and VPT trained on it cropped after resizing and cropped from the source."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, load_benchmark
from pipeline import backdoor, build
from pipeline.config import load_config
from rvpt.shards import decode_image, iter_samples, split_urls


def test_crop_source_smoke(smoke_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bench = load_benchmark("bench_crop_source")
    threads = torch.get_num_threads()
    out = tmp_path / "crops.json"
    over = [f"paths.root={smoke_root}"]
    smoke = ["--config", "configs/smoke.yaml"]
    try:
        res = bench.main([*smoke, "--threads", "1", "--out", str(out), *over])
        with pytest.raises(SystemExit, match="must exceed the model's 32 px"):
            bench.main([*smoke, "--source-size", "32", *over])
    finally:
        torch.set_num_threads(threads)

    assert json.loads(out.read_text()) == res
    assert res["source_size"] == 64
    assert [(r["defense"], r["seed"], r["arm"]) for r in res["runs"]] == [
        ("vpt", 0, "resized first"), ("vpt", 0, "cropped from source")]
    assert all(0.0 <= r["ca"] <= 1.0 and r["seconds"] >= 0 for r in res["runs"])

    cfg = load_config("configs/smoke.yaml", over)
    corpus = build.resolve_corpus(cfg)
    loaded = build.load_model(cfg, build.clean_model(cfg, corpus))
    zs = backdoor.evaluate_backdoor(cfg, loaded, corpus["corpus_dir"], None, None)
    assert res["zero_shot"]["ca"] == zs["ca"]

    # The source pool is the corpus's own few-shot split, finer: same keys and labels, and
    # resized to the model's size it looks like the stored 32 px image.
    rows = bench.render_pool(cfg, 64)
    stored = list(iter_samples(split_urls(corpus["corpus_dir"], "fewshot")))
    assert [(k, lab) for k, _, lab in rows] == [(s.key, s.label) for s in stored]
    big = decode_image(rows[0][1], None)
    assert tuple(big.shape[-2:]) == (64, 64)
    diffs = [float((decode_image(png, 32).float() - s.image.float()).abs().mean()) / 255 for (_, png, _), s in
             zip(rows, stored)]
    assert np.mean(diffs) < 0.1, diffs
