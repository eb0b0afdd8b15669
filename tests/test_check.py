"""`jobs/sweep.py --check`: configs/paper.yaml checked against a miniature of its layout on the
session's S3 server (three corpora in the three formats the config names, a backdoored model per
attack and dataset, the MLflow server), then the same with things missing or wrong."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, img2dataset_dir, run_job

PAPER = ["--config", "configs/paper.yaml"]
ATTACKS = ["badnet", "blended", "wanet", "issba", "trojvqa", "badclip"]
DATASETS = {"imagenet": ["tench", "banana", "goldfish"], "caltech101": ["accordion", "anchor"],
            "oxford_pets": ["samoyed", "pug", "beagle"]}
TARGETS = {"imagenet": "banana", "caltech101": "accordion", "oxford_pets": "samoyed"}


def _rvpt_corpus(path: Path, names: list[str], splits: dict) -> None:
    from rvpt import synthetic
    from rvpt.shards import SplitWriter, write_classes, write_manifest

    write_classes(path, names, ["a photo of a {}."])
    info = {}
    for split, per_class in splits.items():
        with SplitWriter(path, split, shard_size=20) as w:
            for i in range(per_class * len(names)):
                s = synthetic.render(0, "base", split, i, label=i % len(names), image_size=16,
                                     num_classes=len(names))
                w.write(f"{split}-{i:04d}", s.png, s.caption, s.label, {})
        info[split] = w.info
    write_manifest(path, info)


def _clip_benchmark(path: Path, names: list[str]) -> None:
    import io
    import tarfile

    from rvpt import synthetic

    (path).mkdir(parents=True)
    (path / "classnames.txt").write_text("\n".join(names) + "\n")
    (path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    for split, n in (("train", 16 * len(names)), ("test", 4)):
        (path / split).mkdir()
        (path / split / "nshards.txt").write_text("1\n")
        with tarfile.open(path / split / "0.tar", "w") as tf:
            for i in range(n):
                s = synthetic.render(0, "base", "test", i, label=i % len(names), image_size=16,
                                     num_classes=len(names))
                for ext, data in (("png", s.png), ("cls", str(i % len(names)).encode())):
                    member = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    member.size = len(data)
                    tf.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def miniature(s3, tmp_path_factory):
    """paper.yaml's layout under s3://<bucket>/paper, at a toy size."""
    import torch

    from rvpt import storage
    from rvpt.models import load_clip, save_model_dir

    tmp = tmp_path_factory.mktemp("paper")
    root = s3.uri("paper")
    _rvpt_corpus(tmp / "imagenet", DATASETS["imagenet"], {"fewshot": 16, "test": 2})
    _clip_benchmark(tmp / "caltech101", DATASETS["caltech101"])
    _rvpt_corpus(tmp / "oxford_pets", DATASETS["oxford_pets"], {"fewshot": 16, "test": 2})
    img2dataset_dir(tmp / "cc3m-clean", 15)  # CleanCLIP's clean pairs, as img2dataset writes them
    for name in [*DATASETS, "cc3m-clean"]:
        marker = ["manifest.json"] if name not in ("caltech101", "cc3m-clean") else []
        storage.upload(tmp / name, storage.join(root, "corpora", name), last=marker)
    torch.manual_seed(0)
    model = tmp / "model"
    save_model_dir(load_clip("ViT-Micro-4-p8-32"), None, model)
    for attack in ATTACKS:
        for dataset, target in TARGETS.items():
            (model / "attack.json").write_text(json.dumps(
                {"attack": attack, "target": target, "image_size": 224, "params": {}}))
            storage.upload(model, storage.join(root, "models", f"vitb32-{attack}-{dataset}"))
    return root


def _check(*overrides: str):
    start = time.perf_counter()
    r = run_job("sweep.py", *PAPER, "--check", "defense.pairs.count=30", *overrides)
    return r, time.perf_counter() - start


def test_paper_config_passes_the_check_on_its_layout(miniature, mlflow_server):
    r, wall = _check(f"paths.root={miniature}", f"tracking.uri={mlflow_server.uri}")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("paths.root", "tracking",
                                                                  "dataset", "pairs", "model", "GPUs"))]
    assert len(rows) == 1 + 1 + 3 + 1 + 18 + 1, r.stdout
    assert all(" ok " in ln for ln in rows if not ln.startswith("GPUs")), r.stdout
    assert "26 of 26 checks passed" in r.stdout and "FAIL" not in r.stdout
    assert "clip_benchmark corpus, 2 classes" in r.stdout and "target 'samoyed'" in r.stdout
    assert "pair shards, train: 2 shards, 30 pairs used" in r.stdout, r.stdout
    # every defense x attack x dataset, the linear probe not on TrojVQA (no text side)
    assert re.search(r"\b\d+ trials \(3 defense x attack x dataset not applicable\)", r.stdout), r.stdout
    assert wall < 60, wall  # seconds, not minutes (most of it is the interpreter's imports)


def test_check_names_what_is_missing_or_wrong(miniature, mlflow_server, s3):
    from rvpt import storage

    # a missing shard, a model poisoned towards a class its dataset lacks, no MLflow server
    shard = storage.join(miniature, "corpora", "oxford_pets", "test-00000.tar")
    data = storage.read_bytes(shard)
    storage.remove(shard)
    bad_model = storage.join(miniature, "models", "vitb32-wanet-caltech101", "attack.json")
    good = storage.read_bytes(bad_model)
    storage.write_text(bad_model, json.dumps({"attack": "wanet", "target": "banana"}))
    try:
        r, _ = _check(f"paths.root={miniature}", "tracking.uri=http://127.0.0.1:9",
                      "sweep.datasets.imagenet.test_split=val", "defense.pairs.count=1000")
    finally:
        storage.write_bytes(shard, data)
        storage.write_bytes(bad_model, good)
    assert r.returncode == 2
    out = r.stdout
    assert "5 of 26 checks FAILED" in out, out
    fails = {ln.split("  ")[0]: ln for ln in out.splitlines() if "FAIL" in ln}
    assert "cannot be reached" in fails["tracking"]
    assert "no split 'val'" in fails["dataset imagenet"]
    assert "1 of 1 shards are missing" in fails["dataset oxford_pets"]
    assert "unknown target class 'banana'" in fails["model wanet / caltech101"]
    assert "has 30 pairs, fewer than defense.pairs.count=1000" in fails["pairs (cleanclip)"]
    assert r.stderr.strip().splitlines() == ["error: --check: 5 check(s) failed (table above); "
                                             "nothing was run"]


def test_check_refuses_a_relative_root_in_a_ray_job_upload(tmp_path):
    """Run from a copy of the checkout placed as `ray job submit` unpacks it: a relative
    paths.root would land in that temporary copy, so it is refused with one line."""
    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    shutil.copytree(REPO, pkg, ignore=shutil.ignore_patterns(".venv", ".git", "artifacts",
                                                             "__pycache__", ".pytest_cache"))
    env = {**os.environ, "PYTHONPATH": str(pkg)}  # Ray puts the unpacked copy first on the path
    r = subprocess.run([sys.executable, str(pkg / "jobs" / "sweep.py"), "--check",
                        "--config", "configs/smoke.yaml"], cwd=pkg, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert "paths.root: 'artifacts' is relative" in line and "s3://" in line
    assert not (pkg / "artifacts").exists()
