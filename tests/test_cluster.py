"""The cluster configs in cluster/: valid for the Ray that ships here, consistent with the project.

Launcher configs (aws, gcp) go through what `ray up` does before it talks to a cloud:
``prepare_config`` (merge with the provider's defaults.yaml) then ``validate_config`` (jsonschema
against ray/autoscaler/ray-schema.json, plus Ray's own cross-field checks). No network, no cluster.
"""
import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
LAUNCHER = ["aws", "gcp"]
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"

# GPUs per instance type, to check the declared resources (AWS/GCP public specs).
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
            "p4d.24xlarge": 8, "p5.48xlarge": 8}


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` runs on a config before any cloud call; raises on an invalid config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _pinned_deps() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _gpu_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items()
            if v.get("resources", {}).get("GPU", 0) > 0}


def _kube(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# -- (a) the launcher configs validate the way `ray up` validates them -------------------------

@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates_with_rays_schema(name):
    config = _launcher(name)
    jsonschema.validate(config, _schema())        # the file as written
    prepared = _ray_up_checks(config)             # merged with Ray's defaults, as `ray up` does
    assert prepared["provider"]["type"] == name
    assert prepared["head_node_type"] in prepared["available_node_types"]


# -- (b) a broken config fails, so (a) can fail ------------------------------------------------

def _unknown_top_level_key(c):
    c["max_worker"] = 4                                       # typo of max_workers


def _wrong_type_max_workers(c):
    c["max_workers"] = "8"


def _fractional_gpu_resource(c):
    next(iter(_gpu_types(c).values()))["resources"]["GPU"] = 0.5   # schema: integers only


def _unknown_node_type_key(c):
    next(iter(_gpu_types(c).values()))["min_replicas"] = 1     # KubeRay's name, not the launcher's


def _min_workers_over_global_max(c):
    for t in _gpu_types(c).values():
        t["min_workers"] = c["max_workers"]                   # sum(min_workers) > max_workers


def _head_type_missing(c):
    c["head_node_type"] = "no_such_type"


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("breakage, message", [
    (_unknown_top_level_key, "'max_worker' was unexpected"),
    (_wrong_type_max_workers, "'8' is not of type 'integer'"),
    (_fractional_gpu_resource, "0.5 is not of type 'integer'"),
    (_unknown_node_type_key, "'min_replicas' was unexpected"),
    (_min_workers_over_global_max, "sum of `min_workers`"),
    (_head_type_missing, "must be one of `available_node_types`"),
])
def test_broken_launcher_config_fails(name, breakage, message):
    config = _launcher(name)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        _ray_up_checks(config)


# -- (d) GPU worker types: GPUs declared, autoscaling bounds sane ------------------------------

@pytest.mark.parametrize("name", LAUNCHER)
def test_gpu_worker_types_declare_gpus_and_bounds(name):
    config = _launcher(name)
    gpu_types = _gpu_types(config)
    assert len(gpu_types) >= 2, "expected a small and a multi-GPU worker type"
    assert any(t["resources"]["GPU"] >= 8 for t in gpu_types.values())
    assert config["head_node_type"] not in gpu_types
    assert config["idle_timeout_minutes"] > 0
    total_min = 0
    for type_name, t in gpu_types.items():
        lo, hi = t["min_workers"], t["max_workers"]
        assert 0 <= lo <= hi <= config["max_workers"], type_name
        assert t["resources"]["CPU"] >= 1, type_name
        total_min += lo
        node = t["node_config"]
        if name == "aws":
            assert AWS_GPUS[node["InstanceType"]] == t["resources"]["GPU"], type_name
        else:
            machine = node["machineType"]
            attached = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
            built_in = re.fullmatch(r"a2-(?:high|mega|ultra)gpu-(\d+)g", machine)
            assert attached or built_in, f"{type_name}: {machine} has no GPUs"
            gpus = int(built_in.group(1)) if built_in else attached
            assert gpus == t["resources"]["GPU"], type_name
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", type_name
    assert total_min <= config["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_the_pinned_deps_and_starts_mlflow(name):
    config = _launcher(name)
    assert config["docker"]["image"] == RAY_IMAGE
    [install] = config["setup_commands"]
    words = shlex.split(install)
    assert words[:2] == ["pip", "install"]
    assert [w for w in words[2:] if not w.startswith("-")] == _pinned_deps()

    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert '--host "$HEAD_IP"' in mlflow and "--port 5000" in mlflow
    assert "--backend-store-uri sqlite:////" in mlflow
    bucket = {"aws": "s3://YOUR-BUCKET/mlflow", "gcp": "gs://YOUR-BUCKET/mlflow"}[name]
    assert f"--artifacts-destination {bucket}" in mlflow


# -- (c) KubeRay -------------------------------------------------------------------------------

def test_kuberay_cluster_autoscales_with_a_gpu_worker_group():
    cluster = _one(_kube("kuberay.yaml"), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == RAY_IMAGE
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        container = g["template"]["spec"]["containers"][0]
        assert container["image"] == RAY_IMAGE
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1


def test_kuberay_job_runs_the_sweep_on_the_same_cluster_spec():
    job = _one(_kube("kuberay-job.yaml"), "RayJob")
    cluster = _one(_kube("kuberay.yaml"), "RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:2] == ["python", "jobs/sweep.py"] and (REPO / entry[1]).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == cluster["spec"], "kuberay-job.yaml's cluster spec drifted"

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    expected = [d for d in _pinned_deps() if not d.startswith("ray")]
    assert runtime_env["pip"]["packages"] == expected

    # The sweep records to the MLflow Service that kuberay.yaml deploys.
    [uri] = [w.split("=", 1)[1] for w in entry if w.startswith("tracking.uri=")]
    service = _one(_kube("kuberay.yaml"), "Service")
    port = service["spec"]["ports"][0]["port"]
    assert uri == f"http://{service['metadata']['name']}:{port}"


def test_readme_runtime_env_matches_the_pins():
    readme = (CLUSTER / "README.md").read_text()
    [env] = re.findall(r"--runtime-env-json '([^']+)'", readme)
    expected = [d for d in _pinned_deps() if not d.startswith("ray")]
    assert json.loads(env)["pip"]["packages"] == expected
