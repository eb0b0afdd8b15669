"""A tracking server that goes away: the sweep keeps every finished trial's result (its Ledger),
sends it once the server is back, and never trains a trial twice; a server that is down at the
start stops the sweep in seconds, before anything is built."""
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

TWO_TRIALS = ["sweep.space.rvpt.length=[2]", "sweep.space.vpt.length=[2]",
              "sweep.max_concurrent_trials=1", "sweep.name=outage"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An MLflow server of its own (this module stops and restarts it), artifacts on its disk."""
    from services import MlflowServer

    tmp = tmp_path_factory.mktemp("outage-mlflow")
    s = MlflowServer(tmp, str(tmp / "artifacts"), {})
    yield s
    s.close()


def _runs(uri: str, experiment: str = "outage") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id],
                                                     "attributes.status = 'FINISHED'")


def _train_runs(storage: Path) -> list[str]:
    """The Ray Train runs a sweep started (one per trained trial) under its Tune storage."""
    return sorted(p.name for p in storage.glob("train-*") if p.is_dir())


def test_server_down_at_start_fails_in_seconds_before_building(tmp_path):
    from services import free_port

    # what merely starting Python with the stack costs on this machine right now (a loaded CI
    # runner can take longer than the 15 s the failure itself may take)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, open_clip, ray, mlflow"], check=True)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    r = run_job("sweep.py", *SMOKE, f"paths.root={tmp_path}",
                f"tracking.uri=http://127.0.0.1:{free_port()}")
    wall = time.perf_counter() - start
    assert r.returncode == 2 and wall < 15 + max(0.0, imports - 5), (wall, imports, r.stderr[-500:])
    [line] = r.stderr.strip().splitlines()
    assert "does not answer" in line and "tracking.uri" in line
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "models").exists()


def test_a_killed_server_loses_no_result_and_retrains_nothing(server, corpus, smoke_root, tmp_path):
    """Two trials one after the other; the server is killed once the first is in MLflow, so the
    second finishes while it is down. Its result is kept and reaches the server after a restart
    (`--sync`); re-running the sweep trains nothing."""
    # corpus and models are reused from the session's smoke root (built by other tests or here)
    args = [sys.executable, str(REPO / "jobs" / "sweep.py"), *SMOKE, f"paths.root={smoke_root}",
            f"tracking.uri={server.uri}", *TWO_TRIALS, f"ray.storage_path={tmp_path / 'ray_results'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        p = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            deadline = time.time() + 900
            while time.time() < deadline and p.poll() is None and not _runs(server.uri):
                time.sleep(2)
            assert len(_runs(server.uri)) == 1, log.read_text()[-3000:]
            server.close()  # the server process is killed while the second trial trains
            rc = p.wait(timeout=900)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "1 trial result(s) have not reached MLflow yet" in text
    assert re.search(r"best per attack x dataset", text)
    assert len(_train_runs(tmp_path / "ray_results")) == 2

    server.start()
    r = run_job("sweep.py", *SMOKE, f"paths.root={smoke_root}", f"tracking.uri={server.uri}",
                *TWO_TRIALS, "--sync")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sent 1 kept trial result(s)" in r.stdout
    runs = _runs(server.uri)
    assert len(runs) == 2 and len({r.data.tags["trial_key"] for r in runs}) == 2
    assert all("ca" in r.data.metrics and "test_valid" in r.data.metrics for r in runs)

    # a fresh Tune run (new storage: Tune itself remembers nothing) takes both results from the
    # sweep's ledger and trains nothing
    out = tmp_path / "again.json"
    r = run_job("sweep.py", *SMOKE, f"paths.root={smoke_root}", f"tracking.uri={server.uri}",
                *TWO_TRIALS, f"ray.storage_path={tmp_path / 'again'}", "--out", str(out),
                timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["reused"] == 2 and summary["pending"] == 0
    assert _train_runs(tmp_path / "again") == []
    assert len(_runs(server.uri)) == 2
