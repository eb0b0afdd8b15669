"""jobs/sweep.py end to end at the smoke size (each run starts its own local Ray on 127.0.0.1),
re-runs and resumption, jobs/best.py against Tune's own choice (`ray job submit` on a two-node
cluster: tests/test_users_path.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMOKE, run_job

TWO_TRIALS = ["sweep.space.rvpt.length=[2]", "sweep.space.vpt.length=[2]"]  # rvpt + vpt


def _runs(root: Path, experiment: str = "smoke"):
    from pipeline import tracking
    return tracking.runs_frame(f"sqlite:///{root / 'mlflow.db'}", experiment)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = root / "sweep.json"
    r = run_job("sweep.py", *SMOKE, f"paths.root={root}", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, json.loads(out.read_text()), r.stdout


def test_sweep_records_every_trial_in_mlflow(swept):
    root, res, stdout = swept
    assert res["trials"] == 4 and not res["errors"]  # depth [3] x length [2, 4] x {rvpt a=2, vpt}
    df = _runs(root)
    assert len(df) == 4 and df["tags.trial_key"].nunique() == 4
    assert set(df["tags.defense"]) == {"rvpt", "vpt"} and set(df["tags.attack"]) == {"badnet"}
    assert set(df["tags.dataset"]) == {"synthetic"}
    assert set(df["params.length"]) == {"2", "4"}
    assert set(df.loc[df["tags.defense"] == "vpt", "params.alpha"]) == {"0.0"}
    for m in ("ca", "asr", "asr_all", "pa", "pr_mean", "val_ca", "score", "pr/noise/0"):
        assert df[f"metrics.{m}"].notna().all(), m
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(df["run_id"][0])}
    assert {"config.yaml", "state"} <= names
    assert "best per attack x dataset" in stdout
    assert Path(res["report"]["report"]).exists()
    # progress a user can follow: what was built, then the sweep's size before Tune's own output
    assert re.search(r"^corpus: .+ \(built in [\d.]+ s", stdout, re.M), stdout[:2000]
    assert re.search(r"^clean model: .+ \(trained in [\d.]+ s", stdout, re.M), stdout[:2000]
    assert re.search(r"^sweep smoke-[0-9a-f]+: 4 trials, up to \d+ at a time$", stdout, re.M)


def test_best_job_picks_tunes_best_trial(swept):
    root, res, _ = swept
    out = root / "best.json"
    r = run_job("best.py", *SMOKE, f"paths.root={root}", "--rule", "ca", "--out", str(out))
    assert r.returncode == 0, r.stderr
    best = json.loads(out.read_text())
    assert len(best) == 1  # one attack x dataset group
    df = _runs(root)
    key = df.loc[df["run_id"] == best[0]["run_id"], "tags.trial_key"].item()
    assert key == res["tune_best_trial_key"]


def test_rerunning_a_finished_sweep_adds_no_runs(swept):
    root, res, _ = swept
    before = set(_runs(root)["run_id"])
    r = run_job("sweep.py", *SMOKE, f"paths.root={root}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming sweep" in r.stdout
    assert re.search(r"^corpus: .+ \(reused\)$", r.stdout, re.M)
    assert set(_runs(root)["run_id"]) == before


def test_interrupted_sweep_resumes_without_repeating_trials(swept):
    root, _, _ = swept  # corpus and models are built: only trials run here
    args = [sys.executable, str(REPO / "jobs" / "sweep.py"), *SMOKE, f"paths.root={root}",
            "sweep.name=interrupted", *TWO_TRIALS, "sweep.max_concurrent_trials=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    first = None
    try:
        while time.time() < deadline and p.poll() is None:
            time.sleep(3)
            try:
                df = _runs(root, "interrupted")
            except Exception:
                continue
            if len(df):
                first = set(df["run_id"])
                break
        assert first, "no trial finished before the deadline"
        os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C would
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    r = run_job("sweep.py", *SMOKE, f"paths.root={root}", "sweep.name=interrupted", *TWO_TRIALS,
                "sweep.max_concurrent_trials=1", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = _runs(root, "interrupted")
    assert len(df) == 2 and df["tags.trial_key"].nunique() == 2
    assert first <= set(df["run_id"])  # the finished trial was kept, not repeated


def test_in_trial_evaluation_matches_the_ray_data_actors(swept):
    """``ray.eval_actors=0`` (the embedded default: a plain loop in the trial) measures the same
    trials as the Ray Data actors did in the first sweep."""
    root, _, _ = swept
    r = run_job("sweep.py", *SMOKE, f"paths.root={root}", "sweep.name=inline", *TWO_TRIALS,
                "ray.eval_actors=0", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    inline, actors = _runs(root, "inline"), _runs(root)
    assert len(inline) == 2
    for _, row in inline.iterrows():
        same = actors[(actors["tags.defense"] == row["tags.defense"])
                      & (actors["params.length"] == row["params.length"])]
        assert len(same) == 1
        assert row["metrics.n_test"] == same["metrics.n_test"].item() > 0
        for m in ("ca", "asr", "asr_all", "pa", "pr_mean"):
            assert abs(row[f"metrics.{m}"] - same[f"metrics.{m}"].item()) < 1e-6, m


def test_asha_compares_a_trial_only_within_its_group():
    """A trial's val_ca is ranked against trials of the same attack x dataset x defense only: a
    low-CA RVPT trial is not stopped because a VPT trial did better."""
    from ray.tune.schedulers import TrialScheduler

    from pipeline.sweep import GroupedASHA

    class Trial:
        def __init__(self, i, defense):
            self.trial_id = f"t{i}"
            self.config = {"setting": {"attack": "sig", "dataset": "syn", "defense": defense}}

    sched = GroupedASHA(time_attr="training_iteration", metric="val_ca", mode="max", max_t=11,
                        grace_period=2, reduction_factor=2)
    vpt, vpt_worse, rvpt, rvpt_worse = (Trial(0, "vpt"), Trial(1, "vpt"), Trial(2, "rvpt"),
                                        Trial(3, "rvpt"))
    for t in (vpt, vpt_worse, rvpt, rvpt_worse):
        sched.on_trial_add(None, t)

    def at_rung(t, ca):
        return sched.on_trial_result(None, t, {"training_iteration": 2, "val_ca": ca})

    assert at_rung(vpt, 0.9) == TrialScheduler.CONTINUE
    assert at_rung(vpt_worse, 0.5) == TrialScheduler.STOP  # below its group's median
    assert at_rung(rvpt, 0.4) == TrialScheduler.CONTINUE  # below every VPT, first of its group
    assert at_rung(rvpt_worse, 0.3) == TrialScheduler.STOP
