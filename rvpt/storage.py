"""Local paths and object storage behind one small API (pyarrow filesystems).

Everything the project reads or writes by location goes through here: corpora, model directories,
results. A location is a local path (absolute, or relative to the current directory) or a URI that
:func:`pyarrow.fs.FileSystem.from_uri` understands: ``s3://bucket/prefix``, ``gs://bucket/prefix``
(``gcs://``), ``hdfs://``, ``abfs://``, ``file:///abs/path``. Credentials and endpoints come from the
usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``...).
Nothing here shells out or fetches over plain HTTP: ``pipe:``, ``http://`` and other schemes are
refused with a :class:`StorageError`.

Remote directories that must be on a local disk (a model to load with torch, an attack's tensors) are
copied once into a cache (``RVPT_CACHE_DIR``, default ``~/.cache/rvpt``) keyed by their URI and
listing (names, sizes, modification times), so a changed remote copy is fetched again.
Directories are *published* with :func:`publish`: built in a local staging directory, then moved
into place (local) or uploaded with their completion marker last (remote), so a reader that waits
for the marker never sees half a directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_FS_CACHE: dict = {}
_FS_LOCK = threading.Lock()


class StorageError(ValueError):
    """A location that cannot be used (bad scheme, unreachable, missing); one-line message."""


def scheme(uri: str) -> Optional[str]:
    """``s3`` for ``s3://b/k``, ``file`` for ``file:///x``, None for a plain path."""
    uri = str(uri)
    if "://" not in uri:
        return None
    return uri.split("://", 1)[0].lower()


def is_remote(uri: str) -> bool:
    """True for object storage (any URI but ``file://``); False for local paths."""
    s = scheme(uri)
    return s is not None and s != "file"


def check_uri(uri: str, what: str = "location") -> str:
    """``uri`` if it is a local path or a supported storage URI; a one-line error otherwise."""
    uri = str(uri)
    if not uri:
        raise StorageError(f"{what}: empty location")
    s = scheme(uri)
    if s is None:  # a local path: opened as a file, never through a shell or a URL handler
        return uri
    if s != "file" and s not in REMOTE_SCHEMES:
        raise StorageError(f"{what}: scheme {s}:// is not supported in {uri!r} "
                           f"(supported: local paths, file://, {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    return uri


def _local(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().resolve())


def filesystem(uri: str):
    """``(pyarrow filesystem, path)`` for a local path or a storage URI (filesystems are reused per
    bucket)."""
    from pyarrow import fs

    uri = check_uri(uri)
    if not is_remote(uri):
        return fs.LocalFileSystem(), _local(uri)
    s, rest = uri.split("://", 1)
    authority = rest.split("/", 1)[0]
    key = (s, authority)
    with _FS_LOCK:
        cached = _FS_CACHE.get(key)
    if cached is None:
        try:
            cached, _ = fs.FileSystem.from_uri(f"{s}://{authority}")
        except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid/OSError with long texts)
            raise StorageError(f"cannot open {uri}: {_first_line(e)}") from None
        with _FS_LOCK:
            _FS_CACHE[key] = cached
    if s in ("s3", "gs", "gcs"):  # bucket/key, as pyarrow names them
        path = rest.split("?", 1)[0]
    else:
        try:
            _, path = fs.FileSystem.from_uri(uri)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot open {uri}: {_first_line(e)}") from None
    return cached, path.rstrip("/") or path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (no normalisation: see :func:`child`)."""
    out = str(base)
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = out.rstrip("/") + "/" + p
    return out


def child(base: str, name: str, what: str = "file name") -> str:
    """``base/name`` where ``name`` comes from an untrusted file (a manifest, attack.json): it must
    be a relative name inside ``base`` — no scheme, no absolute path, no ``..``, no backslash."""
    name = str(name)
    bad = (not name or "://" in name or ":" in name.split("/", 1)[0] or name.startswith(("/", "~"))
           or "\\" in name or "\x00" in name
           or any(part in ("..", ".") for part in name.split("/")))
    if bad:
        raise StorageError(f"{what} {name!r} is not a relative name inside {base}")
    return join(base, name)


def name_of(uri: str) -> str:
    """The last component of a path or URI."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    """The location that holds ``uri``."""
    uri = str(uri).rstrip("/")
    if not is_remote(uri):
        return str(Path(_local(uri)).parent)
    head, _, _ = uri.rpartition("/")
    return head


def display(uri: str) -> str:
    """A location as a user should see it: URIs as given, local paths absolute."""
    return str(uri) if is_remote(uri) else _local(uri)


# ---------------------------------------------------------------- reading

def info(uri: str):
    """pyarrow ``FileInfo`` of ``uri`` (type NotFound when missing)."""
    filesystem_, path = filesystem(uri)
    try:
        return filesystem_.get_file_info(path)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot reach {uri}: {_first_line(e)}") from None


def exists(uri: str) -> bool:
    from pyarrow import fs
    return info(uri).type != fs.FileType.NotFound


def is_dir(uri: str) -> bool:
    from pyarrow import fs
    return info(uri).type == fs.FileType.Directory


def is_file(uri: str) -> bool:
    from pyarrow import fs
    return info(uri).type == fs.FileType.File


def read_bytes(uri: str, limit: Optional[int] = None) -> bytes:
    """The bytes of a file; with ``limit``, a file larger than that is an error."""
    filesystem_, path = filesystem(uri)
    try:
        with filesystem_.open_input_stream(path) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot read {uri}: {_first_line(e)}") from None
    if limit is not None and len(data) > limit:
        raise StorageError(f"{uri} is larger than {limit} bytes")
    return data


def read_text(uri: str, limit: Optional[int] = None) -> str:
    data = read_bytes(uri, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise StorageError(f"{uri} is not UTF-8 text") from None


def read_json(uri: str, limit: Optional[int] = 64 << 20):
    """A JSON file, parsed; one-line errors for missing or malformed files."""
    text = read_text(uri, limit)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise StorageError(f"{uri} is not valid JSON: {_first_line(e)}") from None


def open_input(uri: str):
    """A readable binary stream of a file (sequential reads; close it)."""
    filesystem_, path = filesystem(uri)
    try:
        return filesystem_.open_input_stream(path)
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot read {uri}: {_first_line(e)}") from None


def listdir(uri: str, recursive: bool = False) -> list:
    """``FileInfo`` of the entries under a directory (empty when it does not exist)."""
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    try:
        return filesystem_.get_file_info(fs.FileSelector(path, recursive=recursive,
                                                          allow_not_found=True))
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot list {uri}: {_first_line(e)}") from None


# ---------------------------------------------------------------- writing

def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file (local: atomically, through a temporary file beside it)."""
    filesystem_, path = filesystem(uri)
    try:
        if not is_remote(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
            return
        with filesystem_.open_output_stream(path) as f:
            f.write(data)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot write {uri}: {_first_line(e)}") from None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, data, indent: int = 1) -> None:
    write_text(uri, json.dumps(data, indent=indent, default=str))


def remove(uri: str) -> None:
    """Delete a file or a directory tree; nothing when it does not exist."""
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    try:
        kind = filesystem_.get_file_info(path).type
        if kind == fs.FileType.Directory:
            if is_remote(uri):
                filesystem_.delete_dir_contents(path, missing_dir_ok=True)
                with contextlib.suppress(OSError):
                    filesystem_.delete_dir(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif kind == fs.FileType.File:
            filesystem_.delete_file(path)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot delete {uri}: {_first_line(e)}") from None


def makedirs(uri: str) -> None:
    filesystem_, path = filesystem(uri)
    try:
        filesystem_.create_dir(path, recursive=True)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot create {uri}: {_first_line(e)}") from None


def _files(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file())


def upload(local_dir: str | Path, uri: str, last: Iterable[str] = ()) -> None:
    """Copy a local directory to ``uri`` (local or remote); the relative paths in ``last`` go after
    everything else (completion markers)."""
    from pyarrow import fs

    local_dir = Path(local_dir)
    dest_fs, dest = filesystem(uri)
    last = [p for p in last if (local_dir / p).is_file()]
    files = [f.relative_to(local_dir).as_posix() for f in _files(local_dir)]
    try:
        for rel in [r for r in files if r not in last] + last:
            if not is_remote(uri):
                Path(dest, rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_dir / rel, Path(dest, rel))
                continue
            fs.copy_files(str(local_dir / rel), f"{dest}/{rel}",
                          source_filesystem=fs.LocalFileSystem(), destination_filesystem=dest_fs)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot upload to {uri}: {_first_line(e)}") from None


def download(uri: str, local_dir: str | Path) -> Path:
    """Copy a remote (or local) directory's files into ``local_dir``."""
    from pyarrow import fs

    src_fs, src = filesystem(uri)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        fs.copy_files(src, str(local_dir), source_filesystem=src_fs,
                      destination_filesystem=fs.LocalFileSystem())
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot download {uri}: {_first_line(e)}") from None
    return local_dir


# ---------------------------------------------------------------- cache and publishing

def cache_dir() -> Path:
    """Where remote files are cached and local staging happens (``RVPT_CACHE_DIR``)."""
    return Path(os.environ.get("RVPT_CACHE_DIR") or Path.home() / ".cache" / "rvpt")


def local_copy(uri: str) -> Path:
    """A local path with the contents of ``uri``: the path itself when local; for object storage,
    a cached copy of the file or directory (fetched again when its listing changed)."""
    from pyarrow import fs

    if not is_remote(uri):
        return Path(_local(uri))
    what = info(uri)
    if what.type == fs.FileType.NotFound:
        raise StorageError(f"not found: {uri}")
    if what.type == fs.FileType.File:
        entries = [("", what.size, str(what.mtime))]
    else:
        entries = sorted((e.path, e.size, str(e.mtime)) for e in listdir(uri, recursive=True)
                         if e.type == fs.FileType.File)
        if not entries:
            raise StorageError(f"{uri} is an empty directory")
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), entries]).encode()).hexdigest()[:20]
    dest = cache_dir() / "remote" / key
    target = dest / name_of(uri) if what.type == fs.FileType.File else dest
    if dest.exists():
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=dest.parent))
    try:
        if what.type == fs.FileType.File:
            src_fs, src = filesystem(uri)
            try:
                fs.copy_files(src, str(tmp / name_of(uri)), source_filesystem=src_fs,
                              destination_filesystem=fs.LocalFileSystem())
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"cannot download {uri}: {_first_line(e)}") from None
        else:
            download(uri, tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process cached it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def publish(uri: str, marker: str) -> Iterator[Path]:
    """Build a directory for ``uri`` in a local staging directory, then put it in place.

    Local: the staging directory is ``<uri>.partial`` and replaces ``uri`` at the end. Remote: it is
    a temporary directory, uploaded after the old contents of ``uri`` are deleted, with ``marker``
    (the completion file, e.g. ``summary.json``) uploaded last. Nothing is published when the body
    raises.
    """
    if not is_remote(uri):
        out = Path(_local(uri))
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return
    staging = cache_dir() / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="publish-", dir=staging))
    try:
        yield tmp
        remove(uri)
        upload(tmp, uri, last=[marker])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_writable(uri: str) -> None:
    """Write and delete a small file under ``uri``; a one-line error when that fails."""
    probe = join(uri, f".rvpt-probe-{uuid.uuid4().hex[:12]}")
    write_bytes(probe, b"ok")
    remove(probe)
