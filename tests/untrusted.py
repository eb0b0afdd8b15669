"""Hostile and broken inputs the tests build: tar shards member by member, corpora around them, a
TorchScript archive whose code writes a file when it is loaded."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from rvpt.shards import write_classes, write_manifest

CLASSES = ["circle", "star", "heart"]


def image_bytes(seed: int, fmt: str = "PNG", mode: str = "RGB", size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def sample(key: str, label: Optional[int] = 0, image: Optional[bytes] = None, ext: str = "png",
           meta: Optional[dict] = None, **extra: bytes) -> list[tuple[str, bytes]]:
    """The members of one sample (``label=None``: no ``cls`` member)."""
    members = [(f"{key}.{ext}", image if image is not None else image_bytes(hash(key) % 1000))]
    if label is not None:
        members.append((f"{key}.cls", str(label).encode()))
    members.append((f"{key}.txt", f"a photo of {key}".encode()))
    if "json" not in extra:
        members.append((f"{key}.json", json.dumps(meta or {"k": key}).encode()))
    members += [(f"{key}.{k}", v) for k, v in extra.items()]
    return members


def tar_bytes(members: Iterable[tuple[str, bytes]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def corpus(path: Path, splits: dict[str, list[bytes]], counts: Optional[dict] = None,
           names: Optional[list] = None) -> Path:
    """A corpus directory whose splits are the given shard bytes (``<split>-NNNNN.tar``)."""
    path.mkdir(parents=True, exist_ok=True)
    write_classes(path, names or CLASSES, ["a photo of a {}."])
    info = {}
    for split, shards in splits.items():
        files = []
        for i, data in enumerate(shards):
            name = f"{split}-{i:05d}.tar"
            (path / name).write_bytes(data)
            files.append(name)
        info[split] = {"count": (counts or {}).get(split), "shards": files}
    write_manifest(path, info)
    return path


TORCHSCRIPT_SOURCE = '''
import sys, warnings
from typing import Tuple
import torch
warnings.simplefilter("ignore")

class Hostile(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.ones(2, 3))

    def forward(self, x):
        return x @ self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]):
        # runs inside torch.jit.load: creates (or overwrites) any file the process may write
        self.w = state[0] + torch.from_file(MARKER, shared=True, size=6).view(2, 3)
        self.training = state[1]

torch.jit.save(torch.jit.script(Hostile()), sys.argv[1])
'''


def hostile_torchscript(path: Path, marker: Path) -> Path:
    """A TorchScript archive whose scripted ``__setstate__`` creates ``marker`` when loaded with
    ``torch.jit.load`` (built in a subprocess: TorchScript compiles from a source file)."""
    import subprocess
    import sys

    script = path.with_suffix(".build.py")
    script.write_text(TORCHSCRIPT_SOURCE.replace("MARKER", repr(str(marker))))
    subprocess.run([sys.executable, str(script), str(path)], check=True,
                   capture_output=True, timeout=120)
    return path
