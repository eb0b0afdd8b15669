"""Real local services for the tests of the users' path: an S3-compatible object store (moto's
server mode), an ``mlflow server`` whose artifacts go to that store, and a two-node Ray cluster
(Ray's own ``ray.cluster_utils.Cluster``). Everything listens on 127.0.0.1; every process started
here is stopped by its id (see ``stop``)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

VENV_BIN = Path(sys.executable).parent
BUCKET = "rvpt-test"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen] = None,
               log: Optional[Path] = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n"
                               f"{log.read_text()[-2000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 (not up yet)
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n"
                       f"{log.read_text()[-2000:] if log else ''}")


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and its group, by id."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


class S3Server:
    """``moto_server`` on 127.0.0.1 with one bucket; ``env`` is what a client needs."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, **S3_KEYS}
        self.log = workdir / "moto.log"
        self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.endpoint}/moto-api/", 60, self.proc, self.log)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{BUCKET}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        out, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = client.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return out

    def close(self) -> None:
        stop(self.proc)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1: runs in sqlite, artifacts proxied to ``artifacts`` (a URI on
    the S3 server). ``restart`` stops and starts it on the same port and store."""

    def __init__(self, workdir: Path, artifacts: str, env: dict):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "mlflow-server.db"
        self.artifacts = artifacts
        self.env = {**os.environ, **env}
        self.log = workdir / "mlflow-server.log"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
             self.artifacts, "--workers", "1"],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True)
        _wait_http(f"{self.uri}/health", 120, self.proc, self.log)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TwoNodeCluster:
    """A head and a second node on 127.0.0.1 through ``ray.cluster_utils.Cluster`` (never several
    ``ray start``: those talk on the machine's network address). The second node alone offers the
    custom resource ``node2``. The job server (dashboard) listens on ``address``.

    Like two machines, the nodes share no local disk the project uses: each has its own Ray temp
    dir (where jobs unpack their working directory) and its own ``RVPT_CACHE_DIR`` under
    ``workdir``. The nodes' processes get ``env``, and the job's ``python`` is the first on their
    PATH: this venv's, as when the cluster is started from an activated venv."""

    def __init__(self, workdir: Path, env: dict, head_cpus: int = 4, node2_cpus: int = 2):
        from ray.cluster_utils import Cluster

        # short paths: Ray's socket paths have a length limit
        self.temp_dir = f"/tmp/rvpt-cl-{os.getpid()}"
        self.temp_dir2 = f"/tmp/rvpt-cl2-{os.getpid()}"
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        ports = lambda: {"dashboard_agent_listen_port": free_port(),  # noqa: E731
                         "metrics_agent_port": free_port(), "runtime_env_agent_port": free_port(),
                         "metrics_export_port": free_port()}
        common = {"node_ip_address": "127.0.0.1", "object_store_memory": 300 << 20}
        self.caches = (workdir / "cache-head", workdir / "cache-node2")
        self.workdir = workdir
        with environ(PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                     RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                     RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S="3600", **env):
            with environ(RVPT_CACHE_DIR=str(self.caches[0])):
                self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
                    **common, **ports(), "num_cpus": head_cpus, "include_dashboard": True,
                    "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
                    "temp_dir": self.temp_dir})
            with environ(RVPT_CACHE_DIR=str(self.caches[1])):
                self.node2 = self.cluster.add_node(**common, **ports(), num_cpus=node2_cpus,
                                                   resources={"node2": 1}, temp_dir=self.temp_dir2)
        self.node2_id = self.node2.node_id
        # A job's supervisor finds its cluster in <its node's temp dir>/ray_current_cluster, which
        # `ray start` writes and Cluster does not (it writes the default /tmp/ray's): without it
        # the job's driver is given any GCS that runs on the machine (another test's Ray).
        for d in (self.temp_dir, self.temp_dir2):
            Path(d, "ray_current_cluster").write_text(self.cluster.address)
        _wait_http(f"{self.address}/api/version", 60)

    def submit(self, entrypoint: list[str], cwd: Path, runtime_env: Optional[dict] = None,
               timeout: int = 1500) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir . -- <entrypoint>`` from ``cwd``, as a user runs it. The
        job server answers "No available agent" until the head's agent registered: retried."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.address,
               "--working-dir", "."]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        cmd += ["--", *entrypoint]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        deadline = time.time() + 90
        while True:
            r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=timeout)
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr \
                    or time.time() > deadline:
                return r
            time.sleep(5)

    def keep_logs(self) -> Path:
        """Copy both nodes' Ray logs under ``workdir`` (they go with the temp dirs at close)."""
        import shutil

        dest = self.workdir / "ray-logs"
        for i, base in enumerate((self.temp_dir, self.temp_dir2)):
            for logs in Path(base).glob("session_2*/logs"):
                shutil.copytree(logs, dest / f"node{i + 1}", dirs_exist_ok=True)
        return dest

    def working_dir_files(self) -> list[Path]:
        """Every file under the jobs' unpacked working directories (``working_dir_files``)."""
        return [p for base in (self.temp_dir, self.temp_dir2)
                for d in Path(base).glob("session_2*/runtime_resources/working_dir_files")
                for p in d.rglob("*") if p.is_file()]

    def close(self) -> None:
        """Shut the cluster down, then kill what outlived it: every process whose command line
        names its temp dir, and their descendants (workers and agents), by id."""
        try:
            self.cluster.shutdown()
        finally:
            def pgrep(*a: str) -> list[int]:
                out = subprocess.run(["pgrep", *a], capture_output=True, text=True).stdout
                return [int(p) for p in out.split()]

            todo, seen = pgrep("-f", self.temp_dir) + pgrep("-f", self.temp_dir2), set()
            while todo:
                pid = todo.pop()
                if pid not in seen and pid != os.getpid():
                    seen.add(pid)
                    todo += pgrep("-P", str(pid))
            for pid in seen:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            import shutil
            for d in (self.temp_dir, self.temp_dir2):
                shutil.rmtree(d, ignore_errors=True)
