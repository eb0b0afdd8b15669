"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set unless a test unsets it."""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Keep Ray on loopback and out of the user's /tmp/ray (see shared/reference/stack.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def rvpt_cache(tmp_path_factory):
    """Remote copies and staging (rvpt.storage) under the session's tmp dir, never in ~/.cache."""
    path = tmp_path_factory.mktemp("rvpt-cache")
    old = os.environ.get("RVPT_CACHE_DIR")
    os.environ["RVPT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RVPT_CACHE_DIR", None)
    else:
        os.environ["RVPT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One in-process local Ray instance for the whole session, on 127.0.0.1."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=str(Path("/tmp") / f"rvpt-ray-{os.getpid()}"), log_to_driver=False,
                 configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def run_job(script: str, *args: str, cwd: Path = REPO, timeout: int = 600):
    """Run ``python jobs/<script>`` as a user would; returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = ["--config", "configs/smoke.yaml"]


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    """One artifacts root for every job test at the smoke size (corpus and models are reused)."""
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="session")
def corpus(smoke_root):
    import json

    out = smoke_root / "corpus.json"
    r = run_job("make_corpus.py", *SMOKE, f"paths.root={smoke_root}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


# ---------------------------------------------------------------- real local services
# One of each per session (tests/services.py): an S3-compatible server, an MLflow server whose
# artifacts go to it, and (for the module that needs it) a two-node Ray cluster.

@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1; its endpoint and keys are in this process's environment
    (and so in every job a test starts) while the session lasts."""
    from services import S3Server

    from rvpt import storage

    server = S3Server(tmp_path_factory.mktemp("s3"))
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    storage._FS_CACHE.clear()
    yield server
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._FS_CACHE.clear()
    server.close()


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 whose artifact store is ``s3://<bucket>/mlflow``."""
    from services import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3.uri("mlflow"), s3.env)
    yield server
    server.close()


def img2dataset_dir(path: Path, n_per_shard: int, corrupt: int = -1) -> None:
    """Image-caption pair shards as img2dataset writes them (CC3M's usual form): ``00000.tar`` with
    ``<key>.jpg``, ``.txt`` and ``.json`` members and ``00000_stats.json``; image number ``corrupt`` corrupt."""
    import io
    import tarfile

    from PIL import Image

    from rvpt import synthetic

    path.mkdir(parents=True)
    i = 0
    for shard in range(2):
        with tarfile.open(path / f"{shard:05d}.tar", "w") as tf:
            for _ in range(n_per_shard):
                s = synthetic.render(0, "base", "pretrain", 10_000 + i, image_size=32)
                buf = io.BytesIO()
                Image.open(io.BytesIO(s.png)).convert("RGB").save(buf, "JPEG")
                jpg = buf.getvalue() if i != corrupt else b"\xff\xd8 not a jpeg"
                for ext, data in (("jpg", jpg), ("txt", s.caption.encode()),
                                  ("json", b'{"url": "http://example.invalid/x.jpg"}')):
                    m = tarfile.TarInfo(f"{shard:05d}{i:04d}.{ext}")
                    m.size = len(data)
                    tf.addfile(m, io.BytesIO(data))
                i += 1
        (path / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": n_per_shard}))
    (path / "00000.parquet").write_bytes(b"PAR1")  # img2dataset's index: not a shard, ignored
