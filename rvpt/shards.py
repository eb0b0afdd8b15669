"""WebDataset shards: writing corpora, and reading them as untrusted input.

A corpus directory holds ``classes.json`` (class names and prompt templates), ``manifest.json``
(splits, shard files, counts) and tar shards ``<split>-NNNNN.tar`` whose samples have ``__key__``,
an image (``png`` or ``jpg``), ``txt`` caption, ``cls`` label and ``json`` metadata.

Reading never decodes anything but those members: raw bytes in, images through PIL, text as UTF-8,
labels as integers and metadata through ``json.loads``. Any other member (``.pkl``, ``.pth``, ...) is
ignored and counted; a sample whose members are corrupt is skipped and counted.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from . import storage

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
KNOWN_KEYS = set(IMAGE_KEYS) | {"txt", "cls", "json"}
MANIFEST = "manifest.json"
CLASSES_FILE = "classes.json"
# Decompression-bomb guard: refuse absurd images rather than allocating gigabytes.
Image.MAX_IMAGE_PIXELS = 64_000_000


class ShardError(ValueError):
    """A user-caused data error (missing corpus, unreadable manifest); one-line message."""


class CorruptSample(ValueError):
    """Raised by :func:`decode_sample` for a sample that cannot be decoded."""


@dataclass
class Sample:
    key: str
    image: torch.Tensor  # uint8 [3, H, W]
    label: int
    text: str
    meta: dict


@dataclass
class ReadStats:
    """What a read saw: decoded samples, skipped ones (with reasons), ignored members."""

    samples: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    ignored_members: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "skipped": self.skipped,
                "skip_reasons": dict(self.reasons), "ignored_members": dict(self.ignored_members)}

    def merge(self, other: "ReadStats") -> "ReadStats":
        self.samples += other.samples
        self.skipped += other.skipped
        self.reasons.update(other.reasons)
        self.ignored_members.update(other.ignored_members)
        return self


def encode_png(image: np.ndarray | torch.Tensor | Image.Image) -> bytes:
    """PNG bytes of an HWC uint8 array, a CHW uint8 tensor or a PIL image (lossless)."""
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, image_size: Optional[int] = None) -> torch.Tensor:
    """Decode image bytes to uint8 [3, H, W]; with ``image_size``, resize the short side and
    centre-crop to a square (fixed shapes for batching)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                w, h = im.size
                scale = image_size / min(w, h)
                im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                               Image.BICUBIC)
                w, h = im.size
                left, top = (w - image_size) // 2, (h - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptSample(f"image: {type(e).__name__}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_sample(raw: dict, image_size: Optional[int] = None,
                  stats: Optional[ReadStats] = None) -> Sample:
    """Decode one raw WebDataset sample (member name -> bytes). Only image/txt/cls/json members are
    touched; anything else is ignored (and counted in ``stats``)."""
    if stats is not None:
        for k in raw:
            if not k.startswith("__") and k.lower() not in KNOWN_KEYS:
                stats.ignored_members[k] += 1
    key = str(raw.get("__key__", "?"))
    img_key = next((k for k in IMAGE_KEYS if raw.get(k) is not None), None)
    if img_key is None:
        raise CorruptSample("no image member")
    image = decode_image(_as_bytes(raw[img_key]), image_size)
    meta: dict = {}
    if raw.get("json") is not None:
        try:
            meta = json.loads(_as_bytes(raw["json"]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptSample("json: not valid JSON") from None
        if not isinstance(meta, dict):
            raise CorruptSample("json: not an object")
    label = -1
    if raw.get("cls") is not None:
        try:
            label = int(_as_bytes(raw["cls"]).decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample("cls: not an integer") from None
    text = ""
    if raw.get("txt") is not None:
        try:
            text = _as_bytes(raw["txt"]).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorruptSample("txt: not UTF-8") from None
    return Sample(key=key, image=image, label=label, text=text, meta=meta)


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise CorruptSample(f"member is {type(value).__name__}, expected raw bytes")


def _tar_handler(stats: ReadStats) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:
        stats.skipped += 1
        stats.reasons[f"tar: {type(exn).__name__}"] += 1
        return True  # keep going
    return handler


def _open_shards(urls: Iterable[str], stats: ReadStats) -> Iterator[dict]:
    """``{"url", "stream"}`` per shard, opened through :mod:`rvpt.storage` (local files or object
    storage; never a shell or a URL handler). A shard that cannot be opened is skipped and counted."""
    for url in urls:
        try:
            stream = storage.open_input(url)
        except storage.StorageError:
            stats.skipped += 1
            stats.reasons["shard: cannot open"] += 1
            continue
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


def iter_samples(urls: Sequence[str], image_size: Optional[int] = None,
                 stats: Optional[ReadStats] = None, shuffle_shards: bool = False,
                 seed: int = 0) -> Iterator[Sample]:
    """Stream decoded samples from shards (local paths or storage URIs), skipping and counting
    corrupt ones. No member ever reaches pickle or torch.load."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stats = stats if stats is not None else ReadStats()
    urls = list(urls)
    if shuffle_shards:
        urls = [urls[i] for i in np.random.default_rng(seed).permutation(len(urls))]
    handler = _tar_handler(stats)
    files = tar_file_expander(_open_shards(urls, stats), handler=handler)
    for raw in group_by_keys(files, handler=handler):  # raw bytes: nothing is decoded but below
        try:
            sample = decode_sample(raw, image_size, stats)
        except CorruptSample as e:
            stats.skipped += 1
            stats.reasons[str(e)] += 1
            continue
        stats.samples += 1
        yield sample


def collate(samples: Sequence[Sample]) -> dict:
    """Stack samples into a batch dict: ``image`` uint8 [B,3,H,W], ``label``, ``text``, ``key``,
    ``meta``."""
    return {"image": torch.stack([s.image for s in samples]),
            "label": torch.tensor([s.label for s in samples], dtype=torch.long),
            "text": [s.text for s in samples], "key": [s.key for s in samples],
            "meta": [s.meta for s in samples]}


def iter_batches(samples: Iterable[Sample], batch_size: int, shuffle_buffer: int = 0,
                 seed: int = 0, drop_last: bool = False) -> Iterator[dict]:
    """Batch a sample stream, optionally through a seeded shuffle buffer."""
    rng = np.random.default_rng(seed)
    buffer: list[Sample] = []
    batch: list[Sample] = []

    def emit(s: Sample):
        batch.append(s)
        if len(batch) == batch_size:
            out = collate(batch)
            batch.clear()
            return out
        return None

    for s in samples:
        if shuffle_buffer > 1:
            buffer.append(s)
            if len(buffer) < shuffle_buffer:
                continue
            s = buffer.pop(int(rng.integers(len(buffer))))
        out = emit(s)
        if out is not None:
            yield out
    rng.shuffle(buffer)
    for s in buffer:
        out = emit(s)
        if out is not None:
            yield out
    if batch and not drop_last:
        yield collate(batch)


# ---------------------------------------------------------------- corpus directories

CLIP_BENCHMARK_CLASSES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"
_META_LIMIT = 64 << 20  # classes / manifest files larger than this are refused


@dataclass
class ClassInfo:
    names: list[str]
    templates: list[str]

    def prompts(self, template: Optional[str] = None) -> list[str]:
        t = template or self.templates[0]
        return [t.format(n) for n in self.names]


@dataclass
class SplitInfo:
    """One split of a corpus: its shard locations, and its sample count when the corpus says."""

    shards: list[str]
    count: Optional[int] = None
    per_class: Optional[dict] = None


@dataclass
class Corpus:
    """A corpus opened for reading (local directory or object storage): this project's format
    (``classes.json`` + ``manifest.json``) or a CLIP_benchmark-style WebDataset directory
    (``classnames.txt``, ``zeroshot_classification_templates.txt``, ``<split>/nshards.txt`` and
    ``<split>/0.tar ...``), read in place."""

    uri: str
    format: str
    classes: ClassInfo
    splits: dict[str, SplitInfo]
    manifest: dict

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardError(f"corpus {self.uri} has no split {name!r}; it has: "
                             f"{', '.join(self.splits) or 'none'}")
        return self.splits[name]


def normalize_templates(templates: Sequence[str], where: str) -> list[str]:
    """Prompt templates with one ``{}`` slot for the class name (CLIP_benchmark's ``{c}`` accepted)."""
    out = []
    for t in templates:
        t = str(t).strip().replace("{c}", "{}")
        if not t:
            continue
        try:
            ok = t.format("x") != t and t.count("{}") == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ShardError(f"{where}: template {t!r} needs exactly one {{}} (or {{c}}) for the "
                             f"class name")
        out.append(t)
    return out or ["a photo of a {}."]


def _class_info(names, templates, where: str) -> ClassInfo:
    if not isinstance(names, list) or not names:
        raise ShardError(f"{where} lists no classes")
    if templates is not None and not isinstance(templates, list):
        raise ShardError(f"{where}: templates must be a list of strings")
    return ClassInfo(names=[str(n) for n in names],
                     templates=normalize_templates(templates or [], where))


def write_classes(corpus_dir: str | Path, names: Sequence[str], templates: Sequence[str]) -> None:
    storage.write_json(storage.join(str(corpus_dir), CLASSES_FILE),
                       {"classes": list(names), "templates": list(templates)})


def _lines(uri: str) -> list[str]:
    return [ln.strip() for ln in storage.read_text(uri, _META_LIMIT).splitlines() if ln.strip()]


def _open_clip_benchmark(uri: str) -> Corpus:
    where = storage.join(uri, CLIP_BENCHMARK_CLASSES)
    names = _lines(where)
    tfile = storage.join(uri, CLIP_BENCHMARK_TEMPLATES)
    templates = _lines(tfile) if storage.exists(tfile) else None
    from pyarrow import fs

    splits = {}
    for entry in storage.listdir(uri):
        if entry.type != fs.FileType.Directory:
            continue
        name = entry.base_name
        sdir = storage.join(uri, name)
        nfile = storage.join(sdir, "nshards.txt")
        if storage.exists(nfile):
            try:
                n = int(storage.read_text(nfile, 1024).strip())
            except ValueError:
                raise ShardError(f"{nfile} does not hold a number of shards") from None
            shards = [storage.join(sdir, f"{i}.tar") for i in range(n)]
        else:
            tars = [e.base_name for e in storage.listdir(sdir) if e.base_name.endswith(".tar")]
            shards = [storage.join(sdir, t) for t in sorted(tars, key=_natural)]
        if shards:
            splits[name] = SplitInfo(shards=shards)
    return Corpus(uri=uri, format="clip_benchmark", classes=_class_info(names, templates, where),
                  splits=splits, manifest={"format": "clip_benchmark", "splits": {
                      k: {"count": None, "shards": [storage.name_of(u) for u in v.shards]}
                      for k, v in splits.items()}})


def _natural(name: str):
    import re
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def open_corpus(corpus: str | Path) -> Corpus:
    """Open a corpus (a local directory or a storage URI); one-line :class:`ShardError` when it is
    not one. Shard names from a manifest must be relative names inside the corpus."""
    uri = str(corpus)
    try:
        storage.check_uri(uri, "corpus")
        cfile = storage.join(uri, CLASSES_FILE)
        if not storage.exists(cfile):
            if storage.exists(storage.join(uri, CLIP_BENCHMARK_CLASSES)):
                return _open_clip_benchmark(uri)
            if not storage.exists(uri):
                raise ShardError(f"corpus not found: {storage.display(uri)}")
            raise ShardError(f"not a corpus directory (no {CLASSES_FILE}, no "
                             f"{CLIP_BENCHMARK_CLASSES}): {storage.display(uri)}")
        data = storage.read_json(cfile, _META_LIMIT)
        if not isinstance(data, dict):
            raise ShardError(f"{cfile} is not a valid classes file: not an object")
        classes = _class_info(data.get("classes"), data.get("templates"), cfile)
        mfile = storage.join(uri, MANIFEST)
        if not storage.exists(mfile):
            raise ShardError(f"corpus is incomplete or missing (no {MANIFEST}): "
                             f"{storage.display(uri)}")
        manifest = storage.read_json(mfile, _META_LIMIT)
        raw = manifest.get("splits") if isinstance(manifest, dict) else None
        if not isinstance(raw, dict):
            raise ShardError(f"{mfile} has no 'splits' mapping")
        splits = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
                raise ShardError(f"{mfile}: split {name!r} has no list of shards")
            shards = [storage.child(uri, s, f"{mfile}: split {name!r}: shard") for s in entry["shards"]]
            count = entry.get("count")
            splits[str(name)] = SplitInfo(shards=shards,
                                          count=count if isinstance(count, int) else None,
                                          per_class=entry.get("per_class"))
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    return Corpus(uri=uri, format="rvpt", classes=classes, splits=splits, manifest=manifest)


def read_classes(corpus_dir: str | Path) -> ClassInfo:
    """The class names and prompt templates of a corpus."""
    return open_corpus(corpus_dir).classes


def read_manifest(corpus_dir: str | Path) -> dict:
    """The corpus manifest (for a CLIP_benchmark directory: one made from its layout)."""
    return open_corpus(corpus_dir).manifest


def split_urls(corpus_dir: str | Path, split: str) -> list[str]:
    """Shard locations of a split (paths or URIs), from the manifest."""
    return open_corpus(corpus_dir).split(split).shards


class SplitWriter:
    """Writes one split as ``<split>-NNNNN.tar`` shards (local directory) through webdataset's
    ShardWriter; :meth:`close` lists exactly the shards this writer wrote."""

    def __init__(self, corpus_dir: str | Path, split: str, shard_size: int):
        self.dir = Path(corpus_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.count = 0
        self.labels: Counter = Counter()
        self._names: list[str] = []
        self._files: dict = {}

        def opener(name: str):  # files opened here, never through webdataset's URL handler
            self._names.append(name)
            self._files[name] = open(self.dir / name, "wb")
            return self._files[name]

        def closer(name: str):
            self._files.pop(name).close()

        self._writer = wds.ShardWriter(split.replace("%", "%%") + "-%05d.tar", maxcount=shard_size,
                                       verbose=0, opener=opener, post=closer)

    def write(self, key: str, image: bytes, text: str, label: int, meta: dict,
              image_ext: str = "png") -> None:
        self._writer.write({"__key__": key, image_ext: image, "txt": text.encode("utf-8"),
                            "cls": str(int(label)).encode("ascii"),
                            "json": json.dumps(meta).encode("utf-8")})
        self.count += 1
        self.labels[int(label)] += 1

    def close(self) -> dict:
        self._writer.close()
        return {"count": self.count, "shards": list(self._names),
                "per_class": {str(k): v for k, v in sorted(self.labels.items())}}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.info = self.close()
        else:
            self._writer.close()


def write_manifest(corpus_dir: str | Path, splits: dict, **extra) -> dict:
    """Write ``manifest.json`` (the corpus's completion marker: write it last)."""
    manifest = {"format": "rvpt-webdataset-v1", "splits": splits, **extra}
    storage.write_json(storage.join(str(corpus_dir), MANIFEST), manifest)
    return manifest
