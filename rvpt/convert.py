"""Import image-classification data sets into this project's corpus format (see :mod:`rvpt.shards`).

Two sources, one destination split per call (run once per split, e.g. ``train`` -> ``fewshot`` and
``val`` -> ``test``):

* :func:`imagefolder_to_corpus`: an ImageFolder-style directory, one sub-folder per class (sorted).
* :func:`hf_to_corpus`: a Hugging Face data set, as written by ``save_to_disk`` (a ``Dataset`` or a
  ``DatasetDict``) or as parquet (one file, or a directory of ``*.parquet`` such as a hub snapshot).
  Read with pyarrow only, one record batch at a time.

CLIP_benchmark WebDataset directories need no conversion: :func:`rvpt.shards.open_corpus` reads them
in place.

A call adds (or replaces) one split of the corpus at ``dest``, a local path or a storage URI: classes
must agree with those already there. Shards are written in a local staging directory (inside
``dest`` when it is local, under ``storage.cache_dir()/staging`` otherwise) and published with
``manifest.json`` last, so a reader never sees a half-written split, and the shards of the other
splits are kept. Sources may be local or object storage.

Inputs are untrusted: nothing is unpickled or run, no path named inside a data set is followed (an
HF image cell without embedded bytes is skipped and counted), and only JPEG, PNG and WebP images are
kept as their original bytes (after a full decode); BMP, GIF and TIFF are converted to PNG, and
anything else, or anything that does not decode, is skipped and counted per reason.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError

from . import storage
from .shards import (CLASSES_FILE, CLIP_BENCHMARK_CLASSES, MANIFEST, CorruptSample, ReadStats,
                     ShardError, SplitWriter, decode_image, encode_png, normalize_templates,
                     open_corpus, write_classes, write_manifest)

DEFAULT_TEMPLATES = ["a photo of a {}."]
#: Source files considered images in an ImageFolder (by suffix; the content decides the format).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Formats kept as their original bytes (PIL format name -> shard member extension).
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
#: Formats decoded and re-encoded as PNG.
CONVERT_FORMATS = ("BMP", "GIF", "TIFF")
#: The only PIL plugins that ever see source bytes (MPO, a multi-picture JPEG, opens via JPEG).
_OPEN_FORMATS = ["JPEG", "PNG", "WEBP", *CONVERT_FORMATS]
MAX_IMAGE_BYTES = 64 << 20  # a single source image larger than this is skipped
_SPEC_LIMIT = 16 << 20  # class-name / template files larger than this are refused
_BATCH_ROWS = 64  # rows per record batch read from parquet
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PARQUET_SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+(?:-[0-9A-Za-z]+)?\.parquet$")
_PARQUET_PLAIN = re.compile(r"^(?P<split>[A-Za-z_][A-Za-z0-9_.]*?)(?:-\d+)?\.parquet$")

Spec = Union[None, str, os.PathLike, Sequence[str]]


# ---------------------------------------------------------------- class names and templates

def _spec_text(spec, what: str) -> tuple[str, str]:
    """The text of a spec file (local path or URI) and its display name; one-line errors."""
    uri = str(spec)
    try:
        if not storage.is_file(uri):
            raise ShardError(f"{what}: {uri!r} is not a file"
                             + (" nor a known name" if what == "templates" else ""))
        return storage.read_text(uri, _SPEC_LIMIT), storage.display(uri)
    except storage.StorageError as e:
        raise ShardError(f"{what}: {e}") from None


def _names_from_mapping(mapping: dict, folders: Sequence[str], where: str) -> list[str]:
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ShardError(f"{where} maps {len(folders) - len(missing)} of {len(folders)} classes; "
                         f"missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [mapping[f] for f in folders]


def _check_names(names: Sequence, where: str) -> list[str]:
    out = []
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ShardError(f"{where}: class names must be non-empty strings, got {n!r}")
        out.append(" ".join(n.split()))
    if not out:
        raise ShardError(f"{where} lists no classes")
    return out


def class_names(spec: Spec, folders: Optional[Sequence[str]]) -> list[str]:
    """Class names, in the order of ``folders`` (the sorted class folders of an ImageFolder, or the
    ClassLabel names of an HF data set; None when the source has no names, then ``spec`` must give
    them).

    ``spec`` is:

    * None: the folder names, ``_`` turned into spaces;
    * ``"imagenet"``: open_clip's 1000 ImageNet class names (exactly 1000 folders, whose sorted order
      — the synset ids ``n01440764 ...`` — is the standard ImageNet order);
    * a file (local path or URI): a JSON list of names or a JSON object ``{folder: name}``; or text
      lines, either ``folder<whitespace>name`` (e.g. ``n01440764 tench``; extra folders are
      allowed, as in ImageNet's ``LOC_synset_mapping.txt``) or one name per line in sorted-folder
      order (then the count must match). A text file is read as a mapping when the first word of
      every line is a folder name and it covers all folders;
    * a list of names (Python callers).

    Raises:
        ShardError: a missing or malformed file, or a count that does not match the folders.
    """
    n = None if folders is None else len(folders)
    if spec is None:
        if folders is None:
            raise ShardError("the source has no class names: give class names (a file or imagenet)")
        return _check_names([f.replace("_", " ") for f in folders], "class folders")
    if isinstance(spec, (list, tuple)):
        names, where = list(spec), "class names"
    elif str(spec).lower() == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if n is not None and n != len(IMAGENET_CLASSNAMES):
            raise ShardError(f"class names 'imagenet' need exactly {len(IMAGENET_CLASSNAMES)} "
                             f"classes; the source has {n}")
        return list(IMAGENET_CLASSNAMES)
    else:
        text, where = _spec_text(spec, "class names")
        stripped = text.lstrip("\ufeff").strip()
        if stripped.startswith(("{", "[")):
            try:
                data = json.loads(stripped)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ShardError(f"{where} is not valid JSON: {str(e).splitlines()[0]}") from None
            if isinstance(data, dict):
                if folders is None:
                    raise ShardError(f"{where} maps folder names, but the source has no class "
                                     f"names to map: give one name per line")
                names = _names_from_mapping(data, folders, where)
            else:
                names = data
        else:
            lines = [ln.strip() for ln in stripped.splitlines() if ln.strip()]
            pairs = [ln.split(None, 1) for ln in lines]
            mapping = {p[0]: p[1] for p in pairs if len(p) == 2}
            if folders is not None and len(mapping) == len(lines) and set(folders) <= set(mapping):
                names = [mapping[f] for f in folders]
            elif folders is not None and len(lines) != n and set(folders) & set(mapping):
                names = _names_from_mapping(mapping, folders, where)  # raises: some missing
            else:
                names = lines
    names = _check_names(names, where)
    if n is not None and len(names) != n:
        raise ShardError(f"{where} lists {len(names)} class names; the source has {n} classes")
    return names


def templates(spec: Spec) -> list[str]:
    """Prompt templates (each with one ``{}`` slot for the class name; the first also makes the
    captions).

    ``spec`` is None (``["a photo of a {}."]``), ``"openai"`` (alias ``"imagenet"``: the 80 OpenAI
    ImageNet templates), ``"simple"`` (open_clip's 7 simple ImageNet templates), a file (local path
    or URI) with one template per line (``{}`` or CLIP_benchmark's ``{c}``), or a list of templates.
    """
    if spec is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(spec, (list, tuple)):
        return normalize_templates(spec, "templates")
    key = str(spec).lower()
    if key in ("openai", "imagenet", "simple"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        chosen = SIMPLE_IMAGENET_TEMPLATES if key == "simple" else OPENAI_IMAGENET_TEMPLATES
        return [t("{}") for t in chosen]
    text, where = _spec_text(spec, "templates")
    lines = [ln for ln in text.lstrip("\ufeff").splitlines() if ln.strip()]
    if not lines:
        raise ShardError(f"{where} lists no templates")
    return normalize_templates(lines, where)


_class_names, _templates = class_names, templates  # the converters' arguments shadow these names


# ---------------------------------------------------------------- images

def _identify(data: bytes) -> Optional[str]:
    """PIL's format name for image bytes, among the formats this module accepts (no other plugin —
    e.g. EPS, which runs Ghostscript — ever sees the bytes); None when not one of them."""
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as im:
            return im.format
    except Image.DecompressionBombError:
        raise CorruptSample("image: DecompressionBombError") from None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def image_payload(data: bytes, image_size: Optional[int] = None) -> tuple[bytes, str]:
    """``(bytes, extension)`` to store for a source image: JPEG, PNG and WebP as they are (after a
    full decode check), BMP/GIF/TIFF as PNG; with ``image_size``, resized/cropped and stored as PNG.

    Raises:
        CorruptSample: not one of those formats, or it does not decode (the message is the reason).
    """
    fmt = _identify(data)
    if fmt is None:
        raise CorruptSample("image: unsupported or unrecognised format")
    pixels = decode_image(data, image_size, formats=_OPEN_FORMATS)
    if image_size is None and fmt in KEEP_FORMATS:
        return data, KEEP_FORMATS[fmt]
    return encode_png(pixels), "png"


def _skip(stats: ReadStats, reason: str) -> None:
    stats.skipped += 1
    stats.reasons[reason] += 1


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def _key_part(text: str) -> str:
    """A piece of a sample key: no dots (webdataset splits keys at the first one), no slashes."""
    return _KEY_BAD.sub("_", text).strip("_") or "x"


# ---------------------------------------------------------------- destination

def _check_split(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise ShardError(f"split name {split!r} must be letters, digits, '_' or '-' (e.g. test)")
    return split


def _check_shard_size(shard_size) -> None:
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ShardError(f"shard_size must be a positive integer, got {shard_size!r}")


def _existing(dest: str):
    """``(ClassInfo or None, manifest dict or None)`` of the corpus already at ``dest``."""
    try:
        storage.check_uri(dest, "destination")
        if storage.exists(storage.join(dest, CLIP_BENCHMARK_CLASSES)) and not storage.exists(
                storage.join(dest, CLASSES_FILE)):
            raise ShardError(f"{storage.display(dest)} is a CLIP_benchmark directory (read in place, "
                             f"no conversion needed); choose another destination")
        if not storage.exists(storage.join(dest, MANIFEST)):
            return None, None  # no corpus yet (or an incomplete one: it is replaced)
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    corpus = open_corpus(dest)
    return corpus.classes, corpus.manifest


class _Destination:
    """One split being added to the corpus at ``dest``: shards are written in :attr:`staging`,
    then :meth:`publish` moves/uploads them and writes ``classes.json`` and ``manifest.json``."""

    def __init__(self, dest: str, split: str, names: list[str], templates_: Optional[list[str]]):
        self.dest = str(dest)
        self.split = _check_split(split)
        self.names = names
        old_classes, _ = self._read_existing()
        # explicit templates replace the corpus's; otherwise the corpus keeps its own
        self.templates = templates_ or (old_classes.templates if old_classes else list(DEFAULT_TEMPLATES))
        self.remote = storage.is_remote(self.dest)
        if self.remote:
            root = storage.cache_dir() / "staging"
            root.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix="convert-", dir=root))
        else:
            self.local = Path(storage.filesystem(self.dest)[1])
            self.created = not self.local.exists()
            self.staging = self.local / f".staging-{self.split}-{uuid.uuid4().hex[:8]}"
            try:
                self.staging.mkdir(parents=True)
            except OSError as e:
                raise ShardError(f"cannot write to {storage.display(self.dest)}: "
                                 f"{e.strerror or type(e).__name__}") from None

    def _read_existing(self):
        old_classes, self.old_manifest = _existing(self.dest)
        if old_classes is not None and old_classes.names != self.names:
            raise ShardError(f"the {len(self.names)} classes of the source ({_preview(self.names)}) "
                             f"differ from the {len(old_classes.names)} already in "
                             f"{storage.display(self.dest)} ({_preview(old_classes.names)})")
        return old_classes, self.old_manifest

    def publish(self, info: dict, source: str) -> dict:
        self._read_existing()  # again: another import may have added a split meanwhile
        old_splits = dict((self.old_manifest or {}).get("splits") or {})
        taken = {s: k for k, e in old_splits.items() if k != self.split
                 for s in (e.get("shards") or [])}
        clash = [s for s in info["shards"] if s in taken]
        if clash:
            raise ShardError(f"shard {clash[0]} of split {self.split!r} is already used by split "
                             f"{taken[clash[0]]!r} in {storage.display(self.dest)}")
        stale = [s for s in (old_splits.get(self.split) or {}).get("shards") or []
                 if s not in info["shards"] and s not in taken]
        old_splits[self.split] = {**info, "source": source}
        extra = {k: v for k, v in (self.old_manifest or {}).items() if k not in ("format", "splits")}
        try:
            if self.remote:
                write_classes(self.staging, self.names, self.templates)
                write_manifest(self.staging, old_splits, **extra)
                storage.upload(self.staging, self.dest, last=[MANIFEST])
            else:
                for name in info["shards"]:
                    os.replace(self.staging / name, self.local / name)
                write_classes(self.dest, self.names, self.templates)
                write_manifest(self.dest, old_splits, **extra)  # atomic: the completion marker
        except storage.StorageError as e:
            raise ShardError(str(e)) from None
        except OSError as e:
            raise ShardError(f"cannot write to {storage.display(self.dest)}: "
                             f"{e.strerror or type(e).__name__}") from None
        for name in stale:  # shards of the split's previous version, no longer referenced
            try:
                storage.remove(storage.child(self.dest, name, "shard"))
            except storage.StorageError:
                pass
        return old_splits[self.split]

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if not self.remote and self.created:
            try:
                self.local.rmdir()  # only when nothing was published into it
            except OSError:
                pass


def _preview(names: Sequence[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _write_split(dest_: _Destination, samples: Iterator[tuple], shard_size: int, stats: ReadStats,
                 src: str, source: str) -> dict:
    """Write ``(key, image bytes, ext, label)`` tuples as the split, then publish it."""
    caption = dest_.templates[0]
    try:
        with SplitWriter(dest_.staging, dest_.split, int(shard_size)) as w:
            for key, data, ext, label, origin in samples:
                name = dest_.names[label]
                w.write(key, data, caption.format(name), label,
                        {"class": name, "source": origin, "poisoned": False}, image_ext=ext)
        if w.count == 0:
            reasons = "; ".join(f"{r}: {c}" for r, c in stats.reasons.most_common(3))
            raise ShardError(f"no usable images in {storage.display(src)}"
                             + (f" (skipped {stats.skipped}: {reasons})" if stats.skipped else ""))
        entry = dest_.publish(w.info, source)
    finally:
        dest_.cleanup()
    return {"corpus_dir": storage.display(dest_.dest), "split": dest_.split, "classes": len(dest_.names),
            **entry, **stats.as_dict()}


def _merge_stats(stats: Optional[ReadStats], local: ReadStats) -> None:
    if stats is not None:
        stats.merge(local)


# ---------------------------------------------------------------- ImageFolder

def _rel(base_path: str, entry_path: str) -> str:
    return entry_path[len(base_path):].lstrip("/")


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def imagefolder_to_corpus(src: str | Path, dest: str | Path, split: str = "test",
                          class_names: Spec = None, templates: Spec = None, shard_size: int = 5000,
                          image_size: Optional[int] = None,
                          stats: Optional[ReadStats] = None) -> dict:
    """Convert an ImageFolder-style directory (local or storage URI; one sub-folder per class,
    sorted; files anywhere below it with an image suffix) into split ``split`` of the corpus at
    ``dest``.

    Captions are the first template with the class name; metadata is ``{"class", "source" (the
    file's path inside ``src``), "poisoned": False}``; keys are ``<folder>-<file>`` with every
    character other than letters, digits, ``_`` and ``-`` replaced. Images are kept as JPEG/PNG/WebP
    bytes or converted to PNG (see :func:`image_payload`); with ``image_size`` they are resized and
    centre-cropped. Hidden files and folders are ignored; unreadable images are skipped and counted
    in ``stats``. ``class_names`` and ``templates`` are specs for :func:`class_names` and
    :func:`templates` (templates None keeps an existing corpus's templates).

    Returns:
        ``{"corpus_dir", "split", "classes", "count", "shards", "per_class", "source", "samples",
        "skipped", "skip_reasons", "ignored_members"}``.

    Raises:
        ShardError: a missing source, no class folders, class names that do not fit, classes that
            differ from those already at ``dest``, or no usable image at all.
    """
    from pyarrow import fs

    src = str(src)
    _check_shard_size(shard_size)
    tmpl = None if templates is None else _templates(templates)
    try:
        storage.check_uri(src, "image folder")
        if not storage.is_dir(src):
            raise ShardError(f"image folder not found: {storage.display(src)}")
        folders = sorted(e.base_name for e in storage.listdir(src)
                         if e.type == fs.FileType.Directory and not e.base_name.startswith("."))
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    if not folders:
        raise ShardError(f"{storage.display(src)} has no class sub-folders")
    names = _class_names(class_names, folders)
    dest_ = _Destination(str(dest), split, names, tmpl)
    local = ReadStats()
    prefixes = [_key_part(f) for f in folders]
    if len(set(prefixes)) < len(prefixes):
        prefixes = [f"{i:05d}_{p}" for i, p in enumerate(prefixes)]

    def samples():
        for label, folder in enumerate(folders):
            furi = storage.join(src, folder)
            try:
                base = storage.filesystem(furi)[1]
                entries = storage.listdir(furi, recursive=True)
            except storage.StorageError:
                _skip(local, "folder: cannot list")
                continue
            files = sorted((_rel(base, e.path), e) for e in entries if e.type == fs.FileType.File)
            used: set = set()
            for rel, e in files:
                if _hidden(rel) or Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if e.size is not None and e.size > MAX_IMAGE_BYTES:
                    _skip(local, f"file: larger than {MAX_IMAGE_BYTES >> 20} MiB")
                    continue
                try:
                    data = storage.read_bytes(storage.join(furi, rel), MAX_IMAGE_BYTES)
                    payload, ext = image_payload(data, image_size)
                except storage.StorageError:
                    _skip(local, "file: cannot read")
                    continue
                except CorruptSample as err:
                    _skip(local, str(err))
                    continue
                key = base_key = f"{prefixes[label]}-{_key_part(rel)}"
                n = 1
                while key in used:  # names that differ only in replaced characters
                    key, n = f"{base_key}-{n}", n + 1
                used.add(key)
                local.samples += 1
                yield key, payload, ext, label, f"{folder}/{rel}"

    try:
        return _write_split(dest_, samples(), shard_size, local, src,
                            f"imagefolder:{storage.display(src)}")
    finally:
        _merge_stats(stats, local)


# ---------------------------------------------------------------- Hugging Face

def _feature_map(raw) -> dict:
    """Top-level features of a ``dataset_info.json`` / parquet ``huggingface`` metadata as a dict."""
    return raw if isinstance(raw, dict) else {}


def _schema_features(schema) -> dict:
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return _feature_map(((data or {}).get("info") or {}).get("features")
                        if isinstance(data, dict) else None)


def _parquet_split(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    m = _PARQUET_SHARD.match(name) or _PARQUET_PLAIN.match(name)
    if m:
        return m.group("split")
    parts = rel.split("/")
    return parts[-2] if len(parts) > 1 else "train"


def _hf_files(src: str, hf_split: Optional[str]) -> tuple[str, list[str], str, dict]:
    """``(kind, file URIs, split name, features)`` for an HF source: kind ``arrow`` (save_to_disk)
    or ``parquet``."""
    from pyarrow import fs

    try:
        storage.check_uri(src, "Hugging Face data set")
        what = storage.info(src).type
        if what == fs.FileType.NotFound:
            raise ShardError(f"Hugging Face data set not found: {storage.display(src)}")
        if what == fs.FileType.File:
            if not src.endswith(".parquet"):
                raise ShardError(f"{storage.display(src)} is not a parquet file nor a save_to_disk "
                                 f"directory")
            return "parquet", [src], hf_split or _parquet_split(storage.name_of(src)), {}
        ddict = storage.join(src, "dataset_dict.json")
        if storage.exists(ddict):
            data = storage.read_json(ddict, _SPEC_LIMIT)
            splits = data.get("splits") if isinstance(data, dict) else None
            splits = [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else []
            if hf_split is None and len(splits) == 1:
                hf_split = splits[0]
            if hf_split is None or hf_split not in splits:
                raise ShardError(f"{storage.display(src)} has splits {', '.join(splits) or 'none'}; "
                                 + ("choose one with --hf-split" if hf_split is None
                                    else f"not {hf_split!r}"))
            src = storage.child(src, hf_split, "split")
        state = storage.join(src, "state.json")
        if storage.exists(state):
            data = storage.read_json(state, _SPEC_LIMIT)
            entries = data.get("_data_files") if isinstance(data, dict) else None
            files = [storage.child(src, str(f.get("filename", "")), f"{state}: data file")
                     for f in (entries if isinstance(entries, list) else []) if isinstance(f, dict)]
            if not files:
                raise ShardError(f"{state} lists no data files")
            features = {}
            info = storage.join(src, "dataset_info.json")
            if storage.exists(info):
                meta = storage.read_json(info, _SPEC_LIMIT)
                features = _feature_map(meta.get("features") if isinstance(meta, dict) else None)
            return "arrow", files, hf_split or storage.name_of(src), features
        base = storage.filesystem(src)[1]
        by_split: dict = {}
        for e in storage.listdir(src, recursive=True):
            rel = _rel(base, e.path)
            if e.type == fs.FileType.File and rel.endswith(".parquet") and not _hidden(rel):
                by_split.setdefault(_parquet_split(rel), []).append(rel)
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    if not by_split:
        raise ShardError(f"{storage.display(src)} is not a Hugging Face data set (no dataset_dict.json, "
                         f"state.json or *.parquet)")
    if hf_split is None and len(by_split) == 1:
        hf_split = next(iter(by_split))
    if hf_split is None or hf_split not in by_split:
        raise ShardError(f"{storage.display(src)} has splits {', '.join(sorted(by_split))}; "
                         + ("choose one with --hf-split" if hf_split is None else f"not {hf_split!r}"))
    rels = sorted(by_split[hf_split], key=_natural)
    dirs = sorted({r.rpartition("/")[0] for r in rels})
    if len(dirs) > 1:
        raise ShardError(f"parquet files of split {hf_split!r} are in several folders of "
                         f"{storage.display(src)} ({', '.join(d or '.' for d in dirs)}); point at one")
    return "parquet", [storage.join(src, r) for r in rels], hf_split, {}


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _arrow_error(uri: str, e: BaseException) -> ShardError:
    text = str(e).strip().splitlines()
    return ShardError(f"cannot read {storage.display(uri)}: {text[0] if text else type(e).__name__}")


def _schema(kind: str, uri: str):
    """The Arrow schema of one arrow (IPC) or parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        filesystem_, path = storage.filesystem(uri)
        if kind == "parquet":
            with filesystem_.open_input_file(path) as f:
                return pq.ParquetFile(f).schema_arrow
        try:
            with filesystem_.open_input_stream(path) as f:
                return pa.ipc.open_stream(f).schema
        except pa.ArrowInvalid:  # an Arrow IPC *file* (not what save_to_disk writes, but valid)
            with filesystem_.open_input_file(path) as f:
                return pa.ipc.open_file(f).schema
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    except (OSError, pa.ArrowException) as e:
        raise _arrow_error(uri, e) from None


def _batches(kind: str, uri: str, columns: list[str]):
    """Record batches of ``columns`` of one arrow (IPC stream or file) or parquet file, read one
    at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        filesystem_, path = storage.filesystem(uri)
        if kind == "parquet":
            with filesystem_.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=columns)
            return
        try:
            f = filesystem_.open_input_stream(path)
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.close()
            f = filesystem_.open_input_file(path)
            reader = pa.ipc.open_file(f)
        with f:
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i).select(columns)
            else:
                for batch in reader:
                    yield batch.select(columns)
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    except (OSError, pa.ArrowException) as e:
        raise _arrow_error(uri, e) from None


def _pick_columns(schema, features: dict, image_column: Optional[str], label_column: Optional[str],
                  where: str) -> tuple[str, str, Optional[list]]:
    """The image and label columns, and the label's ClassLabel names (None when it has none)."""
    import pyarrow as pa

    def is_image(name):
        t = schema.field(name).type
        return (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t)

    def kind(name):
        f = features.get(name)
        return f.get("_type") if isinstance(f, dict) else None

    names = schema.names
    for given, what in ((image_column, "image"), (label_column, "label")):
        if given is not None and given not in names:
            raise ShardError(f"{where} has no {what} column {given!r}; columns: {', '.join(names)}")
    if image_column is None:
        image_column = next((n for n in names if kind(n) == "Image"), None) or next(
            (n for n in names if is_image(n) and kind(n) is None), None)
        if image_column is None:
            raise ShardError(f"{where} has no image column (an Image feature or a struct with bytes); "
                             f"columns: {', '.join(names)}: give --image-column")
    elif not is_image(image_column):
        raise ShardError(f"column {image_column!r} of {where} is not an image column "
                         f"(type {schema.field(image_column).type})")
    if label_column is None:
        label_column = next((n for n in names if kind(n) == "ClassLabel"), None)
        if label_column is None and "label" in names and kind("label") in (None, "Value"):
            label_column = "label"
        if label_column is None:
            raise ShardError(f"{where} has no label column (a ClassLabel feature); columns: "
                             f"{', '.join(names)}: give --label-column")
    if not pa.types.is_integer(schema.field(label_column).type):
        raise ShardError(f"label column {label_column!r} of {where} is not integer "
                         f"(type {schema.field(label_column).type})")
    feat = features.get(label_column)
    label_names = feat.get("names") if isinstance(feat, dict) and kind(label_column) == "ClassLabel" else None
    if label_names is not None and not (isinstance(label_names, list)
                                        and all(isinstance(n, str) for n in label_names)):
        raise ShardError(f"{where}: the ClassLabel names of {label_column!r} are not a list of strings")
    return image_column, label_column, label_names


def hf_to_corpus(src: str | Path, dest: str | Path, split: str = "test",
                 hf_split: Optional[str] = None, image_column: Optional[str] = None,
                 label_column: Optional[str] = None, class_names: Spec = None,
                 templates: Spec = None, shard_size: int = 5000,
                 stats: Optional[ReadStats] = None) -> dict:
    """Convert one split of a Hugging Face data set into split ``split`` of the corpus at ``dest``.

    ``src`` (local or storage URI) is a ``save_to_disk`` directory of a ``Dataset`` or a
    ``DatasetDict`` (``hf_split`` picks the split; required when there are several), a parquet
    file, or a directory of parquet files (recursively; a file's split is its name's prefix, as in
    ``train-00000-of-00001.parquet``, else its folder's name; ``hf_split`` picks one when there are
    several). Only pyarrow reads it, one record batch at a time.

    The image column defaults to the first ``Image`` feature and the label column to the first
    ``ClassLabel`` feature (else an integer column named ``label``); class names come from the
    ClassLabel names (``_`` turned into spaces) unless ``class_names`` (a spec for
    :func:`class_names`, whose folder names are then the ClassLabel names) overrides them. Image
    cells without embedded bytes (a ``path`` only) are skipped and counted, never followed; so are
    missing or out-of-range labels (e.g. ``-1`` for unlabelled test sets) and images that do not
    decode. Keys are ``<hf split>-<row number>``.

    Returns:
        the same summary as :func:`imagefolder_to_corpus`.

    Raises:
        ShardError: a missing source, an unknown split (with the available ones), no image or label
            column, class names that do not fit, or classes that differ from those at ``dest``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    src = str(src)
    _check_shard_size(shard_size)
    tmpl = None if templates is None else _templates(templates)
    kind, files, source_split, features = _hf_files(src, hf_split)
    where = storage.display(files[0])
    schema = _schema(kind, files[0])
    features = features or _schema_features(schema)
    img_col, lbl_col, label_names = _pick_columns(schema, features, image_column, label_column, where)
    if label_names is None and class_names is None:
        raise ShardError(f"label column {lbl_col!r} of {where} has no class names (not a ClassLabel): "
                         f"give class names (a file or imagenet)")
    names = _class_names(class_names, label_names)
    dest_ = _Destination(str(dest), split, names, tmpl)
    local = ReadStats()
    prefix = _key_part(source_split)

    def samples():
        row = 0
        for uri in files:
            schema_ = _schema(kind, uri)
            if img_col not in schema_.names or lbl_col not in schema_.names:
                raise ShardError(f"{storage.display(uri)} lacks column {img_col!r} or {lbl_col!r}")
            for batch in _batches(kind, uri, [img_col, lbl_col]):
                n = batch.num_rows
                try:
                    batch.validate(full=True)
                    images = batch.column(img_col)
                    if pa.types.is_struct(images.type):
                        images = pc.struct_field(images, "bytes")
                    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
                        raise pa.ArrowInvalid(f"image bytes are {images.type}")
                    labels = batch.column(lbl_col)
                    if not pa.types.is_integer(labels.type):
                        raise pa.ArrowInvalid(f"labels are {labels.type}")
                    labels = labels.to_pylist()
                except pa.ArrowException:
                    for _ in range(n):
                        _skip(local, "arrow: invalid record batch")
                    row += n
                    continue
                for i in range(n):
                    r, row = row, row + 1
                    data = images[i].as_py()
                    label = labels[i]
                    if data is None:
                        _skip(local, "image: no embedded bytes (path only; not followed)")
                        continue
                    if label is None:
                        _skip(local, "label: missing")
                        continue
                    if not 0 <= label < len(names):
                        _skip(local, "label: -1 (unlabelled)" if label == -1 else "label: out of range")
                        continue
                    if len(data) > MAX_IMAGE_BYTES:
                        _skip(local, f"file: larger than {MAX_IMAGE_BYTES >> 20} MiB")
                        continue
                    try:
                        payload, ext = image_payload(data)
                    except CorruptSample as err:
                        _skip(local, str(err))
                        continue
                    local.samples += 1
                    yield f"{prefix}-{r:08d}", payload, ext, label, f"{source_split}/{r}"

    try:
        return _write_split(dest_, samples(), shard_size, local, src,
                            f"hf:{storage.display(src)}:{source_split}")
    finally:
        _merge_stats(stats, local)


# ---------------------------------------------------------------- helpers for the CLI

def source_name(src: str | Path) -> str:
    """A short name for a source, used for the default destination ``<root>/corpus/<name>``:
    the last path component (without ``.parquet``; a hub ``data`` folder or a parquet shard is
    named after the folder that holds it)."""
    src = str(src).rstrip("/")
    name = storage.name_of(src)
    if name.endswith(".parquet") and (_PARQUET_SHARD.match(name) or name == "data.parquet"):
        return source_name(storage.parent(src))
    if name == "data":
        return storage.name_of(storage.parent(src)) or name
    return name[:-len(".parquet")] if name.endswith(".parquet") else name


def summary_line(res: dict) -> str:
    """One line for a written split: destination, samples, shards, skipped counts with reasons."""
    reasons = ", ".join(f"{r}: {c}" for r, c in sorted(res.get("skip_reasons", {}).items()))
    return (f"wrote split {res['split']!r} of {res['corpus_dir']}: {res['count']} samples "
            f"({res['classes']} classes) in {len(res['shards'])} shards; skipped "
            f"{res['skipped']}" + (f" ({reasons})" if reasons else ""))
