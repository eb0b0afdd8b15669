"""Every job with its corpus and model on s3:// (the session's local S3 server): poison (corpus read
from the bucket, results root in the bucket), evaluate, defend, and the sweep with the in-trial
evaluation loop (the Ray Data actors on the bucket run in tests/test_users_path.py). Local and remote
locations go through the same code (rvpt.storage), so the same model on the same data must give
the same numbers either way."""
import json

import pytest

from conftest import SMOKE, run_job


@pytest.fixture(scope="module")
def remote(s3, corpus, tmp_path_factory):
    """The smoke corpus uploaded to the bucket, then a backdoored model built by jobs/poison.py
    from that corpus with its results root in the bucket."""
    from rvpt import storage

    corpus_uri = s3.uri("os", "corpus", "smoke")
    storage.upload(corpus["corpus_dir"], corpus_uri, last=["manifest.json"])
    tmp = tmp_path_factory.mktemp("os")
    out = tmp / "poison.json"
    r = run_job("poison.py", *SMOKE, "corpus.kind=shards", f"corpus.path={corpus_uri}",
                f"paths.root={s3.uri('os', 'root')}", "--attack", "badnet", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["attacks"]["badnet"]
    return corpus_uri, res, tmp


def test_poison_builds_from_a_corpus_in_the_bucket_into_the_bucket(remote, s3):
    corpus_uri, res, _ = remote
    model = res["model"]["model_dir"]
    assert model.startswith(s3.uri("os", "root", "models", "backdoor-badnet-"))
    assert res["model"]["poisoned_shards"].startswith(s3.uri("os", "root", "corpus", "poisoned-"))
    keys = s3.keys("os/root/")
    assert any(k.endswith("summary.json") and "/models/clean-" in k for k in keys)
    assert res["backdoored"]["counts"]["n"] == 48


def test_evaluate_reads_model_and_corpus_from_the_bucket(remote, tmp_path):
    corpus_uri, res, _ = remote
    out = tmp_path / "eval.json"
    r = run_job("evaluate.py", *SMOKE, f"paths.root={tmp_path}", "--model",
                res["model"]["model_dir"], "--corpus", corpus_uri, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(out.read_text())
    for k in ("ca", "asr", "asr_all", "pa"):
        assert ev[k] == res["backdoored"][k], k  # as the poison job measured it
    assert ev["attack"]["attack"] == "badnet" and ev["counts"]["n"] == 48


def test_defend_reads_from_and_writes_to_the_bucket(remote, s3, tmp_path):
    corpus_uri, res, _ = remote
    out = tmp_path / "defend.json"
    root = s3.uri("os", "defend-root")
    r = run_job("defend.py", *SMOKE, f"paths.root={root}", "--model", res["model"]["model_dir"],
                "--corpus", corpus_uri, "--defense", "rvpt", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["out_dir"].startswith(root + "/defenses/rvpt-")
    assert d["before"]["ca"] == res["backdoored"]["ca"]
    keys = s3.keys("os/defend-root/defenses/")
    assert any(k.endswith("prompts.safetensors") for k in keys)
    assert any(k.endswith("summary.json") for k in keys)


def test_sweep_with_model_and_corpus_in_the_bucket(remote, tmp_path):
    """ray.eval_actors=0: the trial evaluates in its own process, reading the bucket's shards."""
    corpus_uri, res, _ = remote
    out = tmp_path / "sweep.json"
    r = run_job("sweep.py", *SMOKE, f"paths.root={tmp_path}", "sweep.name=remote",
                f"sweep.models={{badnet: {res['model']['model_dir']}}}",
                f"sweep.datasets={{bucket: {{corpus: {corpus_uri}}}}}", "sweep.space.vpt.length=[2]",
                "sweep.defenses=[vpt]", "ray.eval_actors=0", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["trials"] == 1 and not s["errors"]
    [best] = s["best"]
    assert best["dataset"] == "bucket" and best["defense"] == "vpt"
    assert 0 <= best["ca"] <= 1
