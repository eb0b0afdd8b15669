"""jobs/poison.py and jobs/evaluate.py as a user runs them, at the smoke size."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SMOKE, run_job

NUM_CLASSES = 6  # configs/smoke.yaml


@pytest.fixture(scope="module")
def poisoned(corpus, smoke_root):
    out = smoke_root / "poison.json"
    r = run_job("poison.py", *SMOKE, f"paths.root={smoke_root}", "--attack", "badnet,blended",
                "--save-examples", str(smoke_root / "ex.png"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), r.stdout


def test_poison_job_writes_backdoored_models_and_table(poisoned, smoke_root):
    res, stdout = poisoned
    assert set(res["attacks"]) == {"badnet", "blended"}
    assert "ASR %" in stdout and "blended" in stdout
    for name, entry in res["attacks"].items():
        mdir = Path(entry["model"]["model_dir"])
        attack = json.loads((mdir / "attack.json").read_text())
        assert attack["attack"] == name and attack["target"] == 0
        assert attack["poison"]["rate"] == 0.01 and attack["poison"]["n_poison"] >= 1
        assert (mdir / "open_clip_model.safetensors").exists() and (mdir / "config.yaml").exists()
        m = entry["backdoored"]
        for k in ("ca", "asr", "asr_all", "pa"):
            assert 0.0 <= m[k] <= 1.0
        assert m["counts"]["n"] == NUM_CLASSES * 8
        assert (smoke_root / f"ex-{name}.png").exists()


def test_poisoned_shards_are_marked(poisoned):
    from rvpt.shards import iter_samples, split_urls

    res, _ = poisoned
    pdir = res["attacks"]["badnet"]["model"]["poisoned_shards"]
    samples = list(iter_samples(split_urls(pdir, "poison")))
    assert len(samples) == res["attacks"]["badnet"]["model"]["n_poison"]
    assert all(s.meta["poisoned"] is True and s.meta["attack"] == "badnet" for s in samples)
    assert all(s.label != 0 and "circle" in s.text for s in samples)


def test_clean_model_is_not_fooled_by_the_triggers(poisoned):
    """The clean model's ASR under a trigger stays near the target class's share (1/C)."""
    res, _ = poisoned
    for name in ("badnet", "blended"):
        m = res["attacks"][name]["clean_model"]
        assert m["asr_all"] <= 1 / NUM_CLASSES + 0.15, (name, m)
        assert m["asr"] <= 1 / NUM_CLASSES + 0.15, (name, m)


def test_cached_second_run(poisoned, smoke_root):
    out = smoke_root / "again.json"
    r = run_job("poison.py", *SMOKE, f"paths.root={smoke_root}", "--attack", "badnet", "--out",
                str(out))
    assert r.returncode == 0, r.stderr
    again = json.loads(out.read_text())["attacks"]["badnet"]
    assert again["model"]["cached"] is True
    assert again["backdoored"] == poisoned[0]["attacks"]["badnet"]["backdoored"]


def test_evaluate_job_matches_poison_job(poisoned, smoke_root):
    res, _ = poisoned
    entry = res["attacks"]["blended"]
    out = smoke_root / "eval.json"
    r = run_job("evaluate.py", *SMOKE, f"paths.root={smoke_root}", "--model",
                entry["model"]["model_dir"], "--out", str(out))
    assert r.returncode == 0, r.stderr
    ev = json.loads(out.read_text())
    for k in ("ca", "asr", "asr_all", "pa"):
        assert ev[k] == entry["backdoored"][k]
    assert ev["attack"]["attack"] == "blended"


def test_evaluate_bring_your_own_checkpoint_and_attack(poisoned, smoke_root, tmp_path):
    from rvpt.models import load_clip, save_openai_state_dict

    res, _ = poisoned
    mdir = res["attacks"]["badnet"]["model"]["model_dir"]
    save_openai_state_dict(load_clip(checkpoint=mdir), tmp_path / "clip.pt")
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(tmp_path / "patch.png")
    (tmp_path / "attack.json").write_text(json.dumps({
        "attack": "badnet", "target": "square", "image_size": 32,
        "params": {"patch_image": "patch.png", "patch_size": 4, "position": "bottom_right"}}))
    out = tmp_path / "eval.json"
    r = run_job("evaluate.py", *SMOKE, f"paths.root={smoke_root}", "--model",
                str(tmp_path / "clip.pt"), "--attack", str(tmp_path / "attack.json"),
                "--save-examples", str(tmp_path / "ex.png"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    ev = json.loads(out.read_text())
    assert ev["attack"]["target"] == "square" and ev["counts"]["n_nontarget"] == 5 * 8
    img = np.asarray(Image.open(tmp_path / "ex.png"))
    assert img.shape[0] == 2 * 32 * 4 and (img[-16:, -16:] == 255).all()  # patch, upscaled x4


@pytest.mark.parametrize("args, needle", [
    (["--attack", "nosuch"], "badnet"),
    (["--attack", "badnet", "poison.rate=0"], "poison.rate"),
    (["--attack", "badnet", "poison.params={patch_size: 64}"], "larger than the image"),
    (["--attack", "blended", "poison.params={ratio: 1.5}"], "within [0, 1]"),
    (["--attack", "badnet", "poison.target=moon"], "unknown target class 'moon'"),
])
def test_poison_user_errors_are_one_line(corpus, smoke_root, args, needle):
    r = run_job("poison.py", *SMOKE, f"paths.root={smoke_root}", *args)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.strip().splitlines() if not l.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr


@pytest.mark.parametrize("defense", ["rvpt", "vpt"])
def test_defend_job_reports_before_and_after(poisoned, smoke_root, defense):
    res, _ = poisoned
    mdir = res["attacks"]["badnet"]["model"]["model_dir"]
    out = smoke_root / f"defend-{defense}.json"
    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model", mdir, "--defense",
                defense, "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["defense"] == defense and d["shots"] == 4 and d["trainable_params"] == 5 * 64
    assert d["params"]["alpha"] == (2.0 if defense == "rvpt" else 0.0)
    for when in ("before", "after"):
        for k in ("ca", "asr", "asr_all", "pa", "pr_mean", "pr/trigger", "pr/noise/0"):
            assert d[when][k] is not None, (when, k)
    assert d["before"]["ca"] == res["attacks"]["badnet"]["backdoored"]["ca"]
    assert (Path(d["out_dir"]) / "prompts.safetensors").exists()
    assert len(d["epoch_stats"]) == 2 and ("fr" in d["epoch_stats"][0]) == (defense == "rvpt")
    assert "mean PR" in r.stdout and "after" in r.stdout
    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model", mdir, "--defense",
                defense, "--out", str(out))
    assert r.returncode == 0 and json.loads(out.read_text())["cached"] is True


@pytest.mark.parametrize("args, needle", [
    (["--defense", "nosuch"], "rvpt"),
    (["--defense", "rvpt", "defense.train.shots=99"], "99 shots"),
    (["--defense", "rvpt", "defense.params={depth: 7}"], "depth"),
])
def test_defend_user_errors_are_one_line(poisoned, smoke_root, args, needle):
    mdir = poisoned[0]["attacks"]["badnet"]["model"]["model_dir"]
    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model", mdir, *args)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.strip().splitlines() if not l.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
