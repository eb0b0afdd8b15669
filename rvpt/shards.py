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
import lzma
import re
import struct
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from . import storage

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
KNOWN_KEYS = set(IMAGE_KEYS) | {"txt", "cls", "json"}
#: The image formats a shard may hold (PIL plugin names): what the project writes and users bring.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MANIFEST = "manifest.json"
CLASSES_FILE = "classes.json"
# PIL's own bomb guard stays on as a second line; the readers check ReadRules.max_pixels first.
Image.MAX_IMAGE_PIXELS = 64_000_000
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key up to the first dot
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, lzma.LZMAError)


class ShardError(ValueError):
    """A user-caused data error (missing corpus, unreadable manifest); one-line message."""


class CorruptSample(ValueError):
    """Raised by :func:`decode_sample` for a sample that cannot be decoded; the message is the skip
    reason counted in :class:`ReadStats`."""


@dataclass(frozen=True)
class ReadRules:
    """What both readers (the plain one and Ray Data) accept; anything else is skipped and counted.

    ``num_classes``: labels must lie in ``[0, num_classes)`` (None: any label >= 0);
    ``require_label``: a sample without a ``cls`` member is skipped (classification splits) or kept
    with label -1 (image-caption pairs); ``max_pixels``: larger images are skipped before they are
    decoded; ``max_member_bytes``: larger tar members are skipped without being read into memory.
    """

    num_classes: Optional[int] = None
    require_label: bool = True
    max_pixels: int = 64_000_000
    max_member_bytes: int = 64 << 20

    def with_classes(self, num_classes: Optional[int], require_label: Optional[bool] = None
                     ) -> "ReadRules":
        return replace(self, num_classes=num_classes,
                       require_label=self.require_label if require_label is None else require_label)


DEFAULT_RULES = ReadRules()


@dataclass
class Sample:
    key: str
    image: torch.Tensor  # uint8 [3, H, W]
    label: int
    text: str
    meta: dict


@dataclass
class ReadStats:
    """What a read saw: valid samples, skipped ones (counted per reason), shards that could not be
    read to the end, ignored members. ``skip_reasons`` names sample-level and shard-level reasons
    alike (``shard: ...`` for the latter)."""

    samples: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    ignored_members: Counter = field(default_factory=Counter)
    bad_shards: int = 0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped += n
        self.reasons[reason] += n

    def bad_shard(self, reason: str) -> None:
        self.bad_shards += 1
        self.reasons[reason] += 1

    def as_dict(self) -> dict:
        return {"samples": self.samples, "skipped": self.skipped, "bad_shards": self.bad_shards,
                "skip_reasons": dict(sorted(self.reasons.items())),
                "ignored_members": dict(sorted(self.ignored_members.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadStats":
        return cls(samples=int(d.get("samples", 0)), skipped=int(d.get("skipped", 0)),
                   reasons=Counter(d.get("skip_reasons") or {}),
                   ignored_members=Counter(d.get("ignored_members") or {}),
                   bad_shards=int(d.get("bad_shards", 0)))

    def merge(self, other: "ReadStats") -> "ReadStats":
        self.samples += other.samples
        self.skipped += other.skipped
        self.bad_shards += other.bad_shards
        self.reasons.update(other.reasons)
        self.ignored_members.update(other.ignored_members)
        return self

    def check_count(self, expected: Optional[int]) -> "ReadStats":
        """Compare with the count a manifest states: samples that neither decoded nor were skipped
        (a shard cut at a member boundary ends without an error) are counted as skipped."""
        if expected is not None and self.samples + self.skipped < expected:
            self.skip("missing: fewer samples than the manifest states",
                      expected - self.samples - self.skipped)
        return self

    def line(self) -> str:
        """``40 valid, 8 skipped (cls: missing 5, image: ... 3)``: one line for a person."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items(), key=lambda x: -x[1]))
        out = f"{self.samples} valid, {self.skipped} skipped"
        if self.bad_shards:
            out += f", {self.bad_shards} unreadable shard(s)"
        return out + (f" ({reasons})" if reasons else "")


def encode_png(image: np.ndarray | torch.Tensor | Image.Image) -> bytes:
    """PNG bytes of an HWC uint8 array, a CHW uint8 tensor or a PIL image (lossless)."""
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, image_size: Optional[int] = None,
                 rules: ReadRules = DEFAULT_RULES,
                 formats: Sequence[str] = IMAGE_FORMATS) -> torch.Tensor:
    """Decode image bytes (JPEG, PNG or WebP: only those PIL plugins see them, unless ``formats``
    says otherwise) to uint8 [3, H, W]; with ``image_size``, resize the short side and centre-crop
    to a square (fixed shapes for batching). The pixel count is checked from the header, before
    anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(formats)) as im:
                w, h = im.size
                if w * h > rules.max_pixels:
                    raise CorruptSample(f"image: more than {rules.max_pixels} pixels")
                im = im.convert("RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    scale = image_size / min(w, h)
                    im = im.resize((max(image_size, round(w * scale)),
                                    max(image_size, round(h * scale))), Image.BICUBIC)
                    w, h = im.size
                    left, top = (w - image_size) // 2, (h - image_size) // 2
                    im = im.crop((left, top, left + image_size, top + image_size))
                arr = np.asarray(im, dtype=np.uint8).copy()
    except CorruptSample:
        raise
    except Image.DecompressionBombError:
        raise CorruptSample(f"image: more than {rules.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise CorruptSample(f"image: not a {', '.join(formats)} image") from None
    except (OSError, ValueError, SyntaxError, struct.error, MemoryError) as e:
        raise CorruptSample(f"image: corrupt ({type(e).__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class _TooLarge:
    """Stands in for a tar member larger than ``ReadRules.max_member_bytes`` (never read)."""

    def __init__(self, size: int):
        self.size = size


def _member(raw: dict, name: str, rules: ReadRules) -> Optional[bytes]:
    value = raw.get(name)
    if isinstance(value, _TooLarge):
        raise CorruptSample(f"{name}: member larger than {rules.max_member_bytes} bytes")
    return value


def decode_sample(raw: dict, image_size: Optional[int] = None,
                  stats: Optional[ReadStats] = None, rules: ReadRules = DEFAULT_RULES) -> Sample:
    """Decode one raw sample (member extension -> bytes, plus ``__key__``) under ``rules``. Only
    image/txt/cls/json members are touched; anything else is ignored (and counted in ``stats``).
    Raises :class:`CorruptSample` with the skip reason."""
    if stats is not None:
        for k in raw:
            if not k.startswith("__") and k not in KNOWN_KEYS:
                stats.ignored_members[k] += 1
    key = str(raw.get("__key__", "?"))
    img_key = next((k for k in IMAGE_KEYS if raw.get(k) is not None), None)
    if img_key is None:
        raise CorruptSample("no image member")
    label = -1
    cls = _member(raw, "cls", rules)
    if cls is not None:
        try:
            text = cls.decode("ascii").strip()
            if len(text) > 12:
                raise ValueError
            label = int(text)
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample("cls: not an integer label") from None
        if label == -1 and not rules.require_label:
            pass  # an unlabelled pair, as Ray Data's writer spells it (a column every row has)
        elif label < 0 or (rules.num_classes is not None and label >= rules.num_classes):
            raise CorruptSample("cls: label out of range")
    elif rules.require_label:
        raise CorruptSample("cls: missing")
    meta: dict = {}
    js = _member(raw, "json", rules)
    if js is not None:
        try:
            meta = json.loads(js.decode("utf-8"))
        except RecursionError:
            raise CorruptSample("json: nested too deeply") from None
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample("json: not valid JSON") from None
        if not isinstance(meta, dict):
            raise CorruptSample("json: not an object")
    text = ""
    txt = _member(raw, "txt", rules)
    if txt is not None:
        try:
            text = txt.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorruptSample("txt: not UTF-8") from None
    image = decode_image(_member(raw, img_key, rules), image_size, rules)
    return Sample(key=key, image=image, label=label, text=text, meta=meta)


class _TarInfo(tarfile.TarInfo):
    """Marks its TarFile when the stream ends without tar's end-of-archive blocks (tarfile itself
    treats a shard cut between two members as its normal end)."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tf.rvpt_truncated = True
            raise


def _tar_samples(stream, url: str, stats: ReadStats, rules: ReadRules) -> Iterator[dict]:
    """Raw samples of one tar stream: members grouped by key (consecutive members sharing the part
    of the name before the first dot). Members of other kinds than image, txt, cls and json are
    counted and never read; members larger than ``rules.max_member_bytes`` are skipped unread; a key met again later in the shard is skipped as a duplicate; a stream that breaks off
    (truncated, corrupt, not a tar) ends the shard and is counted, keeping what came before."""
    seen: set = set()
    current: Optional[dict] = None

    def done(sample):
        if sample is None:
            return None
        if sample["__key__"] in seen:
            stats.skip("key: duplicate in shard")
            return None
        seen.add(sample["__key__"])
        return sample

    try:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)
        for info in tf:
            if not info.isreg():
                continue
            m = _KEY_EXT.match(info.name)
            if m is None or info.name.rsplit("/", 1)[-1].startswith("__"):
                stats.ignored_members["(no key.extension name)"] += 1
                continue
            key, ext = m.group(1), m.group(2).lower()
            if current is not None and key != current["__key__"]:
                out = done(current)
                current = None
                if out is not None:
                    yield out
            if current is None:
                current = {"__key__": key, "__url__": url}
            if ext not in KNOWN_KEYS:  # never kept: a .pkl/.pth payload is not even read
                stats.ignored_members[ext] += 1
                continue
            if ext in current:
                stats.ignored_members["(duplicate member)"] += 1
                continue
            if info.size > rules.max_member_bytes:
                current[ext] = _TooLarge(info.size)
                continue
            f = tf.extractfile(info)
            current[ext] = f.read() if f is not None else b""
            tf.members = []  # a stream of millions of members keeps no list of them
        if getattr(tf, "rvpt_truncated", False):  # tarfile ends quietly at a cut between members
            stats.bad_shard("shard: truncated or not a tar (read up to the break)")
    except _TAR_ERRORS:
        stats.bad_shard("shard: truncated or not a tar (read up to the break)")
    out = done(current)
    if out is not None:
        yield out


def read_shard(url: str, image_size: Optional[int] = None, stats: Optional[ReadStats] = None,
               rules: ReadRules = DEFAULT_RULES) -> Iterator[Sample]:
    """The valid samples of one shard (a local path or a storage URI), in order; everything else is
    counted in ``stats``. Never raises for what a shard holds: the one reader behind
    :func:`iter_samples` and the Ray Data path (:func:`pipeline.data.read_split`)."""
    stats = stats if stats is not None else ReadStats()
    try:
        stream = storage.open_input(url)
    except storage.StorageError:
        stats.bad_shard("shard: cannot open")
        return
    try:
        for raw in _tar_samples(stream, url, stats, rules):
            try:
                sample = decode_sample(raw, image_size, stats, rules)
            except CorruptSample as e:
                stats.skip(str(e))
                continue
            stats.samples += 1
            yield sample
    finally:
        stream.close()


def iter_samples(urls: Sequence[str], image_size: Optional[int] = None,
                 stats: Optional[ReadStats] = None, shuffle_shards: bool = False,
                 seed: int = 0, rules: ReadRules = DEFAULT_RULES) -> Iterator[Sample]:
    """Stream decoded samples from shards (local paths or storage URIs) under ``rules``, skipping and
    counting what is invalid. No member ever reaches pickle or torch.load."""
    stats = stats if stats is not None else ReadStats()
    urls = list(urls)
    if shuffle_shards:
        urls = [urls[i] for i in np.random.default_rng(seed).permutation(len(urls))]
    for url in urls:
        yield from read_shard(url, image_size, stats, rules)


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
    (``classes.json`` + ``manifest.json``), a CLIP_benchmark-style WebDataset directory
    (``classnames.txt``, ``zeroshot_classification_templates.txt``, ``<split>/nshards.txt`` and
    ``<split>/0.tar ...``), or a set of image-caption pair shards without class names (img2dataset's
    output, e.g. CC3M: ``*.tar`` with ``jpg`` + ``txt`` members, split ``train``, or one directory
    of them per split), all read in place. ``classes`` is None for a pair shard set."""

    uri: str
    format: str
    classes: Optional[ClassInfo]
    splits: dict[str, SplitInfo]
    manifest: dict

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.classes.names) if self.classes is not None else None

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


PAIRS_SPLIT = "train"  # the split of a pair shard set's top-level tars


def _img2dataset_count(uri: str, tars: list[str]) -> Optional[int]:
    """The pairs img2dataset wrote (``successes`` in each ``<shard>_stats.json``), when every shard
    has its stats file; else None."""
    total = 0
    for t in tars:
        sfile = storage.join(uri, t[:-len(".tar")] + "_stats.json")
        if not storage.exists(sfile):
            return None
        try:
            n = storage.read_json(sfile, _META_LIMIT).get("successes")
        except (ValueError, AttributeError):
            return None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return None
        total += n
    return total


def _open_pair_shards(uri: str) -> Optional[Corpus]:
    """A directory of image-caption pair shards (no class names), or None when it holds no
    ``.tar``: top-level shards are split ``train``; a subdirectory of shards is a split."""
    from pyarrow import fs

    splits = {}
    entries = storage.listdir(uri)
    top = sorted((e.base_name for e in entries if e.type == fs.FileType.File
                  and e.base_name.endswith(".tar")), key=_natural)
    if top:
        splits[PAIRS_SPLIT] = SplitInfo(shards=[storage.join(uri, t) for t in top],
                                        count=_img2dataset_count(uri, top))
    for e in entries:
        if e.type != fs.FileType.Directory:
            continue
        sdir = storage.join(uri, e.base_name)
        tars = sorted((x.base_name for x in storage.listdir(sdir) if x.type == fs.FileType.File
                       and x.base_name.endswith(".tar")), key=_natural)
        if tars:
            splits[e.base_name] = SplitInfo(shards=[storage.join(sdir, t) for t in tars],
                                            count=_img2dataset_count(sdir, tars))
    if not splits:
        return None
    return Corpus(uri=uri, format="pair shards", classes=None, splits=splits, manifest={
        "format": "pair shards", "splits": {k: {"count": v.count, "shards": [
            storage.name_of(u) for u in v.shards]} for k, v in splits.items()}})


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
            pairs = _open_pair_shards(uri)
            if pairs is not None:
                return pairs
            raise ShardError(f"not a corpus directory (no {CLASSES_FILE}, no "
                             f"{CLIP_BENCHMARK_CLASSES}, no .tar shards): {storage.display(uri)}")
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
    """The class names and prompt templates of a corpus (one-line error for a pair shard set)."""
    corpus = open_corpus(corpus_dir)
    return labelled(corpus)


def labelled(corpus: Corpus) -> ClassInfo:
    """``corpus.classes``, or a one-line :class:`ShardError` when it has no class names."""
    if corpus.classes is None:
        raise ShardError(f"{storage.display(corpus.uri)} is a set of image-caption pair shards "
                         f"without class names: usable as defense.pairs, not as a dataset to "
                         f"classify (add {CLIP_BENCHMARK_CLASSES} or import it with "
                         f"jobs/make_corpus.py)")
    return corpus.classes


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
        """One sample; a negative ``label`` writes no ``cls`` member (an unlabelled pair)."""
        sample = {"__key__": key, image_ext: image, "txt": text.encode("utf-8"),
                  "json": json.dumps(meta).encode("utf-8")}
        if int(label) >= 0:
            sample["cls"] = str(int(label)).encode("ascii")
        self._writer.write(sample)
        self.count += 1
        self.labels[max(-1, int(label))] += 1

    def close(self) -> dict:
        self._writer.close()
        info = {"count": self.count, "shards": list(self._names),
                "per_class": {str(k): v for k, v in sorted(self.labels.items()) if k >= 0}}
        if self.labels.get(-1):
            info["unlabelled"] = self.labels[-1]
        return info

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
