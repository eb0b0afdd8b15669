"""The entry points, run as a user runs them, at the smoke size."""
import json
import tarfile

import pytest
import webdataset as wds

from conftest import SMOKE, run_job


def test_make_corpus_summary_and_cache(corpus, smoke_root):
    assert corpus["cached"] is False and corpus["images_per_s"] > 0
    assert corpus["splits"]["pretrain"]["count"] == 512
    assert corpus["splits"]["test"]["count"] == 6 * 8
    assert set(corpus["splits"]) == {"pretrain", "fewshot", "test", "shift_fewshot", "shift_test"}
    out = smoke_root / "again.json"
    r = run_job("make_corpus.py", *SMOKE, f"paths.root={smoke_root}", "--out", str(out))
    assert r.returncode == 0 and json.loads(out.read_text())["cached"] is True
    assert "reused" in r.stdout


def _shards(corpus):
    from rvpt.shards import split_urls
    return split_urls(corpus["corpus_dir"], "test")


def test_corpus_readable_by_tar_webdataset_and_ray(corpus, ray_local):
    shards = _shards(corpus)
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    assert len(names) == 4 * 48
    n_wds = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False))
    assert n_wds == 48
    ds = ray_local.data.read_webdataset(shards, decoder=None)
    rows = ds.take_all()
    assert len(rows) == 48
    assert isinstance(rows[0]["png"], bytes) and isinstance(rows[0]["cls"], bytes)
    from rvpt.shards import decode_sample
    s = decode_sample(rows[0])
    assert s.image.shape == (3, 32, 32) and 0 <= s.label < 6


def test_pretrain_job_writes_model_and_metrics(corpus, smoke_root):
    out = smoke_root / "pretrain.json"
    r = run_job("pretrain.py", *SMOKE, f"paths.root={smoke_root}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert 0.0 <= m["ca"] <= 1.0 and m["ca_n"] == 48 and m["ca_read"]["skipped"] == 0
    assert "read test: 48 valid, 0 skipped" in r.stdout
    assert 0.0 <= m["ca_shift"] <= 1.0
    model = res["model"]
    assert model["trained"] and model["samples_per_s"] > 0 and model["steps"] == 8
    from pathlib import Path
    mdir = Path(model["model_dir"])
    assert (mdir / "open_clip_model.safetensors").exists() and (mdir / "config.yaml").exists()
    # second run reuses the model
    r = run_job("pretrain.py", *SMOKE, f"paths.root={smoke_root}", "--out", str(out))
    assert r.returncode == 0 and json.loads(out.read_text())["model"]["cached"] is True


@pytest.mark.parametrize("args, needle", [
    (["pretrain.lr=abc"], "pretrain.lr"),
    (["model.name=ViT-Nope"], "ViT-Tiny-12-p8-32"),
    (["model.checkpoint=/nonexistent/clip.pt"], "/nonexistent/clip.pt"),
    (["corpus.kind=shards", "corpus.path=/nonexistent/corpus"], "/nonexistent/corpus"),
])
def test_user_errors_are_one_line(smoke_root, corpus, args, needle):
    r = run_job("pretrain.py", *SMOKE, f"paths.root={smoke_root}", *args)
    assert r.returncode == 2
    err = [l for l in r.stderr.strip().splitlines() if not l.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
