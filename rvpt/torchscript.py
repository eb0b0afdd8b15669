"""Tensors out of a TorchScript archive without running anything in it.

``torch.jit.load`` compiles and runs an archive's code while it loads (a scripted ``__setstate__``
can write any file the process may write). OpenAI's original CLIP releases are TorchScript archives,
but all this project needs from them is the state dict: the parameters and buffers stored under
``<archive>/data/`` and named by the pickled module tree in ``<archive>/data.pkl``.

:func:`read_state_dict` unpickles that tree with a closed list of what it may build: every
``__torch__.*`` class becomes an inert stand-in that only keeps its state, tensors are rebuilt from
the archive's storages (size and strides checked against them), a few plain containers are allowed,
and anything else — any other global, any other callable — fails the read. The archive's ``code/``
is never read.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_MAX_DEPTH = 64


class UnsafeArchive(ValueError):
    """The archive holds something the reader will not build (the message says what)."""


class _Module:
    """Stands in for a scripted module or class: keeps the state it is given, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *rest) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise UnsafeArchive("a tensor is rebuilt from something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or int(offset) < 0:
        raise UnsafeArchive("a tensor has an invalid size or stride")
    extent = int(offset) + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > storage.numel():
        raise UnsafeArchive("a tensor reaches beyond its storage")
    return storage.as_strided(size, stride, int(offset)).clone()


def _rebuild_parameter(data, requires_grad, *rest) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafeArchive("a parameter is rebuilt from something that is not a tensor")
    return data


def _identity(value, *rest):
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self.classes:
                self.classes[qual] = type(name, (_Module,), {"__module__": "rvpt.torchscript"})
            return self.classes[qual]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafeArchive(f"it refers to {module}.{name}, which a state dict does not need")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise UnsafeArchive("it holds a persistent reference that is not a tensor storage")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            try:
                raw = bytearray(self.archive.read(name))
            except KeyError:
                raise UnsafeArchive(f"storage {key} is missing") from None
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if len(raw) != int(numel) * itemsize:
                raise UnsafeArchive(f"storage {key} has {len(raw)} bytes, not {numel} elements")
            self.storages[key] = torch.frombuffer(raw, dtype=kind.dtype) if raw else \
                torch.empty(0, dtype=kind.dtype)
        return self.storages[key]


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise UnsafeArchive("its module tree is nested too deeply")
    state = obj.state
    if not isinstance(state, dict):
        raise UnsafeArchive(f"module {prefix.rstrip('.') or '(root)'} has a custom state "
                            f"({type(state).__name__}) that only its own code could restore")
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, _Module):
            _walk(value, f"{prefix}{key}.", out, depth + 1)


def is_torchscript(path: Path) -> bool:
    """A zip archive with a ``constants.pkl`` (TorchScript's layout)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, named as ``module.state_dict()`` names
    them, read without running the archive's code. Raises :class:`UnsafeArchive` when the archive
    needs anything more (the message says what)."""
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeArchive("it has no single <archive>/data.pkl")
        prefix = pickles[0].split("/", 1)[0]
        order = zf.read(f"{prefix}/byteorder").decode().strip() \
            if f"{prefix}/byteorder" in zf.namelist() else "little"
        if order != "little":
            raise UnsafeArchive(f"its tensors are stored {order}-endian")
        try:
            root = _Unpickler(zf.read(pickles[0]), zf, prefix).load()
        except UnsafeArchive:
            raise
        except Exception as e:  # noqa: BLE001 (a malformed pickle: one line)
            raise UnsafeArchive(f"its data.pkl cannot be read ({type(e).__name__})") from None
    if not isinstance(root, _Module):
        raise UnsafeArchive("its data.pkl does not hold a module")
    out: dict[str, torch.Tensor] = {}
    _walk(root, "", out, 0)
    return out
