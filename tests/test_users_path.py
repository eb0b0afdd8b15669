"""The users' path, end to end, on this machine: a two-node Ray cluster on 127.0.0.1, an S3
server, an MLflow server whose artifacts live in the bucket, and `ray job submit --working-dir .`
of the smoke sweep with its results root on s3://. Then, from the client side: jobs/best.py against
the server, a run's artifacts downloaded through the server, what landed in the bucket, where the
work ran, and that nothing was written into the job's unpacked working directory."""
import json
import subprocess

import pytest
import yaml

from conftest import REPO, SMOKE, run_job


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    from services import TwoNodeCluster

    c = TwoNodeCluster(tmp_path_factory.mktemp("cluster"), s3.env)
    yield c
    c.close()


@pytest.fixture(scope="module")
def submitted(cluster, s3, mlflow_server):
    root = s3.uri("users-path")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    # as a user types it (README, "Clusters"): one trial, its Train worker and evaluation actor
    # pinned to the second node by a custom resource
    entry = ["python", "jobs/sweep.py", *SMOKE, f"paths.root={root}",
             f"tracking.uri={mlflow_server.uri}", "sweep.space.rvpt.length=[2]", "sweep.defenses=[rvpt]",
             "ray.eval_actors=1", "ray.worker_resources={node2: 0.01}"]
    r = cluster.submit(entry, cwd=REPO, runtime_env={"env_vars": {"RVPT_GIT_COMMIT": commit}})
    if r.returncode != 0 and "Failed to download runtime_env file package" in r.stdout + r.stderr:
        # Seen once in a full CI-sized run, never alone: a node's runtime-env agent found the
        # job's working-dir package gone from the GCS. Ray's own failure, not the pipeline's: the
        # logs are kept and the job is submitted once more (what a user would do).
        print(f"ray job submit: working-dir package missing (Ray logs: {cluster.keep_logs()}); "
              f"resubmitting once")
        r = cluster.submit(entry, cwd=REPO, runtime_env={"env_vars": {"RVPT_GIT_COMMIT": commit}})
    if r.returncode != 0:
        logs = cluster.keep_logs()
        pytest.fail(f"ray job submit failed (Ray logs kept in {logs}):\n{r.stdout[-4000:]}\n"
                    f"{r.stderr[-3000:]}")
    return root, commit, r.stdout


def test_the_job_names_its_results_root_at_start_and_end(submitted):
    root, _, stdout = submitted
    lines = [ln for ln in stdout.splitlines() if ln.startswith("results root: ")]
    assert lines == [f"results root: {root}"] * 2
    assert "best per attack x dataset" in stdout and "succeeded" in stdout


def test_best_job_on_the_client_reads_the_server(submitted, mlflow_server, tmp_path):
    out = tmp_path / "best.json"
    r = run_job("best.py", *SMOKE, "--tracking-uri", mlflow_server.uri, "--out", str(out))
    assert r.returncode == 0, r.stderr
    [best] = json.loads(out.read_text())
    assert (best["attack"], best["defense"], best["depth"], best["length"]) == ("badnet", "rvpt", 3, 2)
    assert 0 <= best["ca"] <= 1 and "rvpt" in r.stdout


def test_run_artifacts_are_in_the_servers_store(submitted, mlflow_server, s3, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    root, commit, _ = submitted
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("smoke")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's store, not a disk
    [run] = client.search_runs([exp.experiment_id])
    assert run.data.tags["mlflow.source.git.commit"] == commit and run.data.tags["code_hash"]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                               tracking_uri=mlflow_server.uri, dst_path=str(tmp_path))
    assert yaml.safe_load(open(path))["paths"]["root"] == root
    names = {a.path for a in client.list_artifacts(run.info.run_id, "state")}
    assert "state/prompts.safetensors" in names
    keys = s3.keys(f"mlflow/{exp.experiment_id}/{run.info.run_id}/")
    assert any(k.endswith("artifacts/config.yaml") for k in keys)


def test_corpus_models_and_tune_storage_are_in_the_bucket(submitted, s3):
    keys = s3.keys("users-path/")
    for pattern in ("corpus/synthetic-", "corpus/poisoned-badnet-", "models/clean-",
                    "models/backdoor-badnet-"):
        marker = "manifest.json" if pattern.startswith("corpus") else "summary.json"
        assert any(f"/{pattern}" in k and k.endswith(marker) for k in keys), pattern
    assert any("/ray_results/" in k and "checkpoint_" in k for k in keys)
    assert any(k.endswith("/reports/smoke/report.md") for k in keys)


def test_the_second_node_trained_and_evaluated_from_the_bucket(submitted, cluster):
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.address, detail=True, limit=1000)
    workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    evaluators = [a for a in actors if "CountActor" in a.class_name]
    assert workers and evaluators
    assert {a.node_id for a in workers + evaluators} == {cluster.node2_id}
    # the node read the backdoored model from the bucket into its own cache
    assert any((cluster.caches[1] / "remote").iterdir())


def test_nothing_was_written_into_the_jobs_working_dir(submitted, cluster):
    unpacked = [p for p in cluster.working_dir_files() if p.parent.name != "working_dir_files"]
    assert unpacked, "no unpacked working directory found"
    written = []
    for p in unpacked:
        parts = p.parts[p.parts.index("working_dir_files") + 2:]  # below _ray_pkg_<hash>/
        if "__pycache__" in parts:  # Python's own bytecode cache, not results
            continue
        if not (REPO.joinpath(*parts)).is_file():
            written.append("/".join(parts))
    assert not written, written
