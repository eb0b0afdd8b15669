"""MLflow tracking: write one run per sweep trial, read a sweep back as a DataFrame, pick the best.

The run schema (one experiment per sweep, one run per trial, run name = trial name):

- tags: ``attack``, ``dataset``, ``defense``, ``model``, ``trial_key`` (a stable hash of the trial's
  settings; it makes :func:`log_trial` idempotent), ``sweep``;
- params: ``defense``, ``depth``, ``length``, ``alpha``, ``shots``, ``seed``, ``epochs``, ``lr``, ...;
- metrics: ``ca``, ``asr``, ``asr_all``, ``pa``, ``pr_mean``, ``val_ca``, ``score`` and per-layer
  ``pr/<perturbation>/<layer>``;
- artifacts: ``config.yaml`` and ``prompts/``.

Everything goes through an :class:`mlflow.MlflowClient` built for the given tracking URI: nothing here
sets MLflow's global tracking URI (``mlflow.set_tracking_uri`` also sets an environment variable that
subprocesses inherit). The default store is sqlite (the file store is refused by MLflow 3.17 unless
``MLFLOW_ALLOW_FILE_STORE`` is set). Experiments are created with an explicit artifact location: with
none, MLflow would put artifacts under ``./mlruns`` of whatever directory the process runs in.
"""
from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from .select import score

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

INFO_COLUMNS = ("run_id", "experiment_id", "status", "artifact_uri", "start_time", "end_time")
BEST_COLUMNS = ("attack", "dataset", "defense", "setting", "shots", "ca", "asr", "asr_all", "pa",
                "pr_mean", "score", "run_id", "run_name")
_METRIC_COLUMNS = ("ca", "asr", "asr_all", "pa", "pr_mean")
# MLflow's per-request limits for log_batch.
_BATCH_METRICS, _BATCH_PARAMS, _BATCH_TAGS = 1000, 100, 100
# The tag of a run recorded for a trial the scheduler stopped early (ASHA): it has the defender's
# last val_ca and how many epochs ran, but no test-set CA / ASR, so no table or rule picks it.
STOPPED_TAG = "stopped_early"
# The tag of a run recorded for a defense that cannot be measured against an attack (the reason).
NOT_APPLICABLE_TAG = "not_applicable"
# The tag naming a run's searched parameters (comma-separated; each is a param of the run).
SPACE_TAG = "space"


class TrackingError(ValueError):
    """A user-caused tracking problem (no such store or experiment); ``str(err)`` is one line."""


# ---------------------------------------------------------------------------------------- stores

def default_uri(root: str | Path) -> str:
    """The default tracking store: ``sqlite:////abs/<root>/mlflow.db`` (a local results root only:
    a sqlite file cannot live on object storage)."""
    from rvpt import storage

    if storage.is_remote(str(root)):
        raise TrackingError(f"paths.root is object storage ({root}), where a sqlite MLflow store "
                            f"cannot live; set tracking.uri (--tracking-uri) to an MLflow server, "
                            f"e.g. http://HEAD:5000")
    return f"sqlite:///{Path(storage.display(str(root))) / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    """True for a sqlite store (its artifacts go beside the database), False for a server."""
    return _sqlite_path(uri) is not None


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


# A server that does not answer fails a call in seconds (MLflow's defaults retry for ~4 min); a
# result that could not be sent is kept in the sweep's Ledger and sent later.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_TIMEOUT_S = 5.0


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One request to a tracking server (``<uri>/health``) within ``timeout`` seconds; a one-line
    TrackingError when it does not answer as an MLflow server. sqlite stores need no probe."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            body = r.read(100).decode("utf-8", "replace").strip()
    except Exception as e:  # noqa: BLE001 (URLError, timeouts, HTTP errors: all one line)
        reason = getattr(e, "reason", None) or e
        raise TrackingError(f"the MLflow server {uri} does not answer ({reason}); start it or fix "
                            f"tracking.uri") from None
    if body != "OK":
        raise TrackingError(f"{uri} does not answer as an MLflow server (/health: {body[:40]!r})")


def _client(uri: str, create: bool = False) -> "MlflowClient":
    """A client for ``uri``. Reading never creates a sqlite store: a missing file is an error."""
    import os

    from mlflow import MlflowClient

    for k, v in FAIL_FAST.items():
        os.environ.setdefault(k, v)
    db = _sqlite_path(uri)
    if db is not None:
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
        elif not db.exists():
            raise TrackingError(f"no MLflow store at {db} (tracking uri {uri}); nothing was "
                                f"tracked there yet, or pass --tracking-uri")
    return MlflowClient(tracking_uri=uri)


def safe_name(name: str) -> str:
    """``name`` made safe as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _experiment_names(client: "MlflowClient") -> list[str]:
    return sorted(e.name for e in client.search_experiments())


def _ensure(client: "MlflowClient", uri: str, name: str, artifact_location: Optional[str]) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        if artifact_location is None and (db := _sqlite_path(uri)) is not None:
            artifact_location = str(db.resolve().parent / "mlartifacts" / safe_name(name))
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created concurrently by another trial
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore it "
                            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
                            f"or use another name")
    return exp.experiment_id


def ensure_experiment(uri: str, name: str, artifact_location: Optional[str] = None) -> str:
    """The id of experiment ``name``, created if missing.

    A new experiment gets ``artifact_location``; with none and a sqlite store, artifacts go to
    ``mlartifacts/<name>`` beside the database (never the current directory). An existing experiment
    is reused as it is, whatever its artifact location.
    """
    return _ensure(_client(uri, create=True), uri, name, artifact_location)


# ---------------------------------------------------------------------------------------- provenance

CODE_FILES = ("rvpt", "pipeline", "jobs", "configs", "pyproject.toml")


def _git_commit(repo: Path) -> Optional[str]:
    """HEAD's commit, read from ``.git`` without a git binary (``ray job submit --working-dir``
    uploads ``.git`` with the checkout); None outside a git checkout."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip() or None
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def code_version(repo: Optional[Path] = None) -> dict:
    """Tags that say which code ran: ``code_hash``, a hash of the project's code and configs as they
    are (uncommitted edits included), and ``mlflow.source.git.commit`` (shown by the MLflow UI):
    read from the checkout's ``.git``, or from ``RVPT_GIT_COMMIT`` — ``ray job submit`` leaves
    ``.git`` out of the uploaded working directory, so the submit command passes the commit in
    its runtime environment (README, "Clusters")."""
    import hashlib
    import os

    from .config import REPO_ROOT

    repo = repo or REPO_ROOT
    h = hashlib.sha256()
    for top in CODE_FILES:
        base = repo / top
        files = [base] if base.is_file() else sorted(
            p for p in base.rglob("*") if p.is_file() and p.suffix in (".py", ".json", ".yaml"))
        for f in files:
            h.update(f.relative_to(repo).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    tags = {"code_hash": h.hexdigest()[:16]}
    commit = os.environ.get("RVPT_GIT_COMMIT") or _git_commit(repo)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


# ---------------------------------------------------------------------------------------- writing

def _check_key(trial_key: str) -> str:
    if not trial_key or not isinstance(trial_key, str) or "'" in trial_key or "\\" in trial_key:
        raise ValueError(f"trial_key must be a non-empty string without quotes (got {trial_key!r})")
    return trial_key


def _find(client: "MlflowClient", experiment_id: str, trial_key: str) -> Optional["Run"]:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.trial_key = '{_check_key(trial_key)}' and attributes.status = 'FINISHED'",
        max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def find_run(uri: str, experiment: str, trial_key: str) -> Optional["Run"]:
    """The (earliest) FINISHED run of ``experiment`` tagged ``trial_key``, or None.

    None too when the store or the experiment does not exist yet.
    """
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        return None
    return _find(client, exp.experiment_id, trial_key)


def _finite(v: Any) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _log_artifact(client: "MlflowClient", run_id: str, key: str, path: Path) -> None:
    """``path`` (a file or a directory) stored at ``key`` in the run's artifacts."""
    key = key.strip("/")
    parent = str(Path(key).parent) if Path(key).parent != Path(".") else None
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=key)
    elif Path(key).name == path.name:
        client.log_artifact(run_id, str(path), artifact_path=parent)
    else:  # renamed: log a copy under the key's name
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / Path(key).name
            shutil.copyfile(path, copy)
            client.log_artifact(run_id, str(copy), artifact_path=parent)


def log_trial(uri: str, experiment: str, run_name: str, tags: Mapping[str, Any],
              params: Mapping[str, Any], metrics: Mapping[str, Any],
              artifacts: Optional[Mapping[str, str | Path]] = None,
              artifact_location: Optional[str] = None) -> str:
    """Record one finished trial as one MLflow run; returns its run id.

    Idempotent: when ``experiment`` already holds a FINISHED run with the same ``tags["trial_key"]``,
    its id is returned and nothing is logged. Otherwise one run is created (the experiment too, see
    :func:`ensure_experiment`), tags and params are logged as strings (None values skipped), metrics
    as floats (None, NaN and infinities skipped: MLflow's sqlite store would clamp an infinity to
    +-1.8e308), and each ``artifacts`` item ``key -> path`` is stored at
    ``key``: a directory as the folder ``key/``, a file under the name ``key``. The run ends FINISHED,
    or FAILED (and the error is raised) if logging fails half-way.
    """
    from mlflow.entities import Metric, Param

    trial_key = _check_key(tags.get("trial_key"))
    files = {k: Path(p) for k, p in (artifacts or {}).items()}
    for k, p in files.items():
        if not p.exists():
            raise FileNotFoundError(f"artifact {k!r}: no such file or directory: {p}")
    client = _client(uri, create=True)
    experiment_id = _ensure(client, uri, experiment, artifact_location)
    existing = _find(client, experiment_id, trial_key)
    if existing is not None:
        return existing.info.run_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={k: str(v) for k, v in tags.items() if v is not None})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, 0) for k, v in ((k, _finite(v)) for k, v in metrics.items())
              if v is not None]
        ps = [Param(k, str(v)) for k, v in params.items() if v is not None]
        for chunk in _chunks(ps, _BATCH_PARAMS):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks(ms, _BATCH_METRICS):
            client.log_batch(run_id, metrics=chunk)
        for k, p in files.items():
            _log_artifact(client, run_id, k, p)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------- ledger

class Ledger:
    """Every trial result of a sweep, kept under the results root
    (``<root>/sweeps/<experiment>/records/<trial_key>/``: ``record.json`` and the run's artifacts)
    *before* MLflow is told, so that a tracking outage loses nothing and retrains nothing: a trial
    whose key is here is never run again, a record without ``logged.json`` is sent by
    :func:`flush` once the server answers, and a sweep's tables can be made from the records alone
    (:meth:`frame`)."""

    def __init__(self, root: str, experiment: str):
        from rvpt import storage

        self.base = storage.join(root, "sweeps", safe_name(experiment), "records")

    def _dir(self, key: str) -> str:
        from rvpt import storage

        return storage.join(self.base, _check_key(key))

    def put(self, key: str, record: Mapping[str, Any],
            artifacts: Optional[Mapping[str, str | Path]] = None) -> None:
        """Keep one trial's record (tags, params, metrics, run name) and artifact files."""
        from rvpt import storage

        with storage.publish(self._dir(key), "record.json") as tmp:
            for name, path in (artifacts or {}).items():
                dest = tmp / "artifacts" / name
                if Path(path).is_dir():
                    shutil.copytree(path, dest)
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest)
            storage.write_json(str(tmp / "record.json"),
                               {**record, "trial_key": key, "time": time.time(),
                                "artifacts": sorted((artifacts or {}).keys())})

    def get(self, key: str) -> Optional[dict]:
        from rvpt import storage

        path = storage.join(self._dir(key), "record.json")
        return storage.read_json(path) if storage.exists(path) else None

    def mark_logged(self, key: str, run_id: str) -> None:
        from rvpt import storage

        storage.write_json(storage.join(self._dir(key), "logged.json"), {"run_id": run_id})

    def keys(self) -> list[str]:
        from rvpt import storage

        return sorted(e.base_name for e in storage.listdir(self.base)
                      if storage.exists(storage.join(self.base, e.base_name, "record.json")))

    def pending(self) -> list[str]:
        """Keys whose run has not reached MLflow yet."""
        from rvpt import storage

        return [k for k in self.keys()
                if not storage.exists(storage.join(self._dir(k), "logged.json"))]

    def artifacts(self, key: str, record: Mapping[str, Any]) -> dict[str, Path]:
        """A record's artifacts as local paths (fetched when the root is object storage)."""
        from rvpt import storage

        if not record.get("artifacts"):
            return {}
        local = storage.local_copy(storage.join(self._dir(key), "artifacts"))
        return {name: local / name for name in record["artifacts"]}

    def frame(self) -> "pd.DataFrame":
        """Every record as :func:`runs_frame` rows (``run_id`` ``ledger:<trial_key>``)."""
        import pandas as pd

        rows = []
        for key in self.keys():
            rec = self.get(key) or {}
            row = {"run_id": f"ledger:{key}", "experiment_id": None, "status": "FINISHED",
                   "artifact_uri": self._dir(key),
                   "start_time": pd.to_datetime(rec.get("time", 0), unit="s", utc=True),
                   "end_time": pd.to_datetime(rec.get("time", 0), unit="s", utc=True)}
            row.update({f"metrics.{k}": v for k, v in (rec.get("metrics") or {}).items()})
            row.update({f"params.{k}": str(v) for k, v in (rec.get("params") or {}).items()
                        if v is not None})
            tags = {**(rec.get("tags") or {}), "mlflow.runName": rec.get("run_name")}
            row.update({f"tags.{k}": str(v) for k, v in tags.items() if v is not None})
            rows.append(row)
        df = pd.DataFrame(rows, columns=list(INFO_COLUMNS) if not rows else None)
        rest = sorted(c for c in df.columns if c not in INFO_COLUMNS)
        return df[list(INFO_COLUMNS) + rest].reset_index(drop=True)


def record_trial(ledger: Ledger, uri: str, experiment: str, key: str, run_name: str,
                 tags: Mapping[str, Any], params: Mapping[str, Any], metrics: Mapping[str, Any],
                 artifacts: Optional[Mapping[str, str | Path]] = None) -> Optional[str]:
    """Keep a trial's result in ``ledger``, then log it to MLflow; the run id, or None (with one
    warning line) when the tracking store could not be reached — the record stays pending."""
    ledger.put(key, {"run_name": run_name, "tags": dict(tags), "params": dict(params),
                     "metrics": dict(metrics)}, artifacts)
    try:
        run_id = log_trial(uri, experiment, run_name, tags, params, metrics, artifacts)
    except Exception as e:  # noqa: BLE001 (the result is safe in the ledger)
        print(f"warning: could not log trial {key} to MLflow {uri} "
              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
              f"kept in {ledger.base}, sent when the server answers", flush=True)
        return None
    ledger.mark_logged(key, run_id)
    return run_id


def flush(ledger: Ledger, uri: str, experiment: str) -> tuple[int, int]:
    """Send the ledger's pending records to MLflow; ``(sent, still pending)``. Stops at the first
    failure (the server is down: the rest would fail too)."""
    pending = ledger.pending()
    sent = 0
    for key in pending:
        rec = ledger.get(key) or {}
        try:
            run_id = log_trial(uri, experiment, rec.get("run_name") or key, rec.get("tags") or {},
                               rec.get("params") or {}, rec.get("metrics") or {},
                               ledger.artifacts(key, rec))
        except Exception:  # noqa: BLE001
            break
        ledger.mark_logged(key, run_id)
        sent += 1
    return sent, len(pending) - sent


# ---------------------------------------------------------------------------------------- reading

def runs_frame(uri: str, experiment: str) -> "pd.DataFrame":
    """The FINISHED runs of ``experiment``, one row each, columns as :func:`mlflow.search_runs`
    makes them: ``run_id``, ``experiment_id``, ``status``, ``artifact_uri``, ``start_time``,
    ``end_time`` (UTC timestamps), then ``metrics.<key>``, ``params.<key>``, ``tags.<key>``.

    Raises :class:`TrackingError` when the store or the experiment does not exist.
    """
    import pandas as pd
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            names = _experiment_names(client)
            raise TrackingError(f"no experiment {experiment!r} in {uri}; existing experiments: "
                                f"{', '.join(names) if names else 'none'}")
        runs, token = [], None
        while True:
            page = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as e:
        raise TrackingError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "experiment_id": r.info.experiment_id,
               "status": r.info.status, "artifact_uri": r.info.artifact_uri,
               "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
               "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True)}
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(INFO_COLUMNS) if not rows else None)
    rest = sorted((c for c in df.columns if c not in INFO_COLUMNS),
                  key=lambda c: (["metrics.", "params.", "tags."].index(c.split(".")[0] + "."), c))
    return df[list(INFO_COLUMNS) + rest].reset_index(drop=True)


def param_value(v: Any) -> Any:
    """A param read back from MLflow (a string) as an int or float where it is one; None for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if not isinstance(v, str):
        return v
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def column(df: "pd.DataFrame", name: str, kinds: Sequence[str] = ("tags", "params")) -> "pd.Series":
    """Column ``name`` looked up as ``tags.name``, then ``params.name`` (by ``kinds``); missing
    values (and a missing column) are None."""
    import pandas as pd

    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    for kind in kinds:
        col = f"{kind}.{name}"
        if col in df.columns:
            vals = df[col].astype(object).where(df[col].notna(), None)
            out = out.where(out.notna(), vals)
    return out


def metric(df: "pd.DataFrame", name: str) -> "pd.Series":
    """``metrics.<name>`` as floats (NaN where missing, all NaN when no run logged it)."""
    import pandas as pd

    col = f"metrics.{name}"
    return df[col].astype(float) if col in df.columns else pd.Series(math.nan, index=df.index)


def scored(df: "pd.DataFrame", rule: str, weight: float = 1.0) -> "pd.Series":
    """``select.score`` of every run (row) of a :func:`runs_frame` under ``rule``."""
    import pandas as pd

    score({}, rule, weight)  # an unknown rule fails even on an empty frame
    ca, asr = metric(df, "ca"), metric(df, "asr")
    return pd.Series([score({"ca": c, "asr": a}, rule, weight) for c, a in zip(ca, asr)],
                     index=df.index, dtype=float)


def evaluated(df: "pd.DataFrame") -> "pd.DataFrame":
    """The runs of a :func:`runs_frame` that were evaluated: those tagged neither
    :data:`STOPPED_TAG` nor :data:`NOT_APPLICABLE_TAG`."""
    for tag in (STOPPED_TAG, NOT_APPLICABLE_TAG):
        col = f"tags.{tag}"
        if not df.empty and col in df.columns:
            df = df[df[col].isna()].reset_index(drop=True)
    return df


def not_applicable(df: "pd.DataFrame") -> list[dict]:
    """``{attack, dataset, defense, reason}`` of the runs tagged :data:`NOT_APPLICABLE_TAG`."""
    col = f"tags.{NOT_APPLICABLE_TAG}"
    if df.empty or col not in df.columns:
        return []
    rows = df[df[col].notna()]
    out = {(column(rows, "attack")[i], column(rows, "dataset")[i], column(rows, "defense")[i]):
           rows[col][i] for i in rows.index}
    return [{"attack": a, "dataset": d, "defense": f, "reason": r}
            for (a, d, f), r in sorted(out.items())]


def searched(df: "pd.DataFrame") -> list[str]:
    """Every parameter some run searched (:data:`SPACE_TAG`), sorted."""
    col = f"tags.{SPACE_TAG}"
    if df.empty or col not in df.columns:
        return []
    return sorted({p for v in df[col].dropna() for p in str(v).split(",") if p})


def setting_text(df: "pd.DataFrame") -> "pd.Series":
    """Each run's searched parameters as ``name=value`` pairs (``-`` when it searched none)."""
    import pandas as pd

    col = f"tags.{SPACE_TAG}"
    out = []
    for i in df.index:
        names = str(df[col][i]).split(",") if col in df.columns and df[col].notna()[i] else []
        pairs = [f"{p}={df[f'params.{p}'][i]}" for p in names
                 if p and f"params.{p}" in df.columns and df[f"params.{p}"].notna()[i]]
        out.append(" ".join(pairs) or "-")
    return pd.Series(out, index=df.index, dtype=object)


def best_per_group(df: "pd.DataFrame", rule: str, weight: float = 1.0,
                   group: Sequence[str] = ("attack", "dataset")) -> "pd.DataFrame":
    """For each ``group`` (tags, e.g. attack x dataset) of a :func:`runs_frame`, the run with the
    highest :func:`pipeline.select.score` under ``rule`` (ties: the lowest run name — the sweep
    names runs after Tune's trials, numbered in creation order, so a tie resolves to the trial
    Tune's ``get_best_result`` picks — then the earliest ``start_time``, then ``run_id``).
    Columns: the group keys, then ``defense``, ``setting`` (its searched parameters as text),
    ``shots``, the metrics ``ca``, ``asr``, ``asr_all``, ``pa``, ``pr_mean``, ``score`` (under
    ``rule``), ``run_id``, ``run_name``, and one column per parameter any run searched (numbers,
    None where a run's defense has no such parameter) — whatever parameters the defenses declare.
    Rows sorted by the group keys; a run missing a group tag falls in the group ``"-"``. Runs
    stopped early or not applicable (:func:`evaluated`) are left out.
    """
    import pandas as pd

    df = evaluated(df)
    group = list(group)
    params = [p for p in searched(df) if p not in group and p not in BEST_COLUMNS]
    columns = group + [c for c in BEST_COLUMNS if c not in group] + params
    s = scored(df, rule, weight)
    if df.empty:
        return pd.DataFrame(columns=columns)
    d = pd.DataFrame(index=df.index)
    for g in group:
        d[g] = column(df, g).map(lambda v: "-" if v is None else str(v))
    d["defense"] = column(df, "defense")
    d["setting"] = setting_text(df)
    for p in ["shots", *params]:
        d[p] = column(df, p, ("params",)).map(param_value)
    for m in _METRIC_COLUMNS:
        d[m] = metric(df, m)
    d["score"] = s
    d["run_id"] = df["run_id"]
    d["run_name"] = column(df, "mlflow.runName", ("tags",))
    d["_start"] = df["start_time"]
    d["_name"] = d["run_name"].map(lambda v: "" if v is None else str(v))
    d = d.sort_values(["score", "_name", "_start", "run_id"], ascending=[False, True, True, True],
                      kind="mergesort")
    best = d.groupby(group, sort=False, dropna=False).head(1)
    return best.sort_values(group, kind="mergesort")[columns].reset_index(drop=True)


def records(df: "pd.DataFrame") -> list[dict]:
    """Rows as JSON-able dicts (NaN and infinities become None, numpy scalars Python ones)."""
    out = []
    for row in df.to_dict(orient="records"):
        rec = {}
        for k, v in row.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            rec[k] = v
        out.append(rec)
    return out
