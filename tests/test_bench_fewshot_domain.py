"""benchmarks/bench_fewshot_domain.py at the smoke size: CA before and after VPT on the shapes task
and on its shifted domain, each trained on its own few-shot split."""
import json

import pytest
import torch

from conftest import REPO, load_benchmark
from pipeline import backdoor, build
from pipeline.config import load_config


def test_fewshot_domain_smoke(smoke_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bench = load_benchmark("bench_fewshot_domain")
    threads = torch.get_num_threads()
    out = tmp_path / "domains.json"
    over = [f"paths.root={smoke_root}"]
    try:
        rows = bench.main(["--config", "configs/smoke.yaml", "--threads", "1", "--out", str(out),
                           *over])
        with pytest.raises(SystemExit, match="not fewshot_split:test_split"):
            bench.main(["--config", "configs/smoke.yaml", "--domains", "fewshot", *over])
        with pytest.raises(SystemExit, match="not on few-shot images"):
            bench.main(["--config", "configs/smoke.yaml", "--defense", "none", *over])
    finally:
        torch.set_num_threads(threads)

    assert json.loads(out.read_text()) == rows
    assert [(r["fewshot"], r["test"]) for r in rows] == [("fewshot", "test"),
                                                          ("shift_fewshot", "shift_test")]
    cfg = load_config("configs/smoke.yaml", over)
    corpus = build.resolve_corpus(cfg)
    loaded = build.load_model(cfg, build.clean_model(cfg, corpus))
    for r in rows:  # "before" is the model's own zero-shot CA on that split
        zs = backdoor.evaluate_backdoor(cfg, loaded, corpus["corpus_dir"], None, None,
                                        split=r["test"])
        assert r["ca_before"] == zs["ca"] and r["n_test"] == zs["counts"]["n"] == 6 * 8
        assert r["shots"] == 6 * 4  # defense.train.shots per class
        assert 0.0 <= r["ca_after"] <= 1.0 and r["train_s"] >= 0 and "loss" in r["last_epoch"]
