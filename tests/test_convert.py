"""rvpt.convert: ImageFolder and Hugging Face imports, CLIP_benchmark read in place, the CLI."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rvpt import convert, storage, synthetic
from rvpt.shards import ReadStats, ShardError, iter_batches, iter_samples, open_corpus

from conftest import run_job

FOLDERS = ["n0000001", "n0000002", "n0000003"]
NAMES = ["golden retriever", "tabby cat", "red fox"]
PER_CLASS = 4
FORMATS = ["PNG", "JPEG", "WEBP", "BMP"]  # every format three times over the 12 images
EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    opts = {"JPEG": {"quality": 90}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(arr).save(buf, format=fmt, **opts)
    return buf.getvalue()


def _images() -> list[tuple[int, str, bytes]]:
    """``(label, format, bytes)`` for 3 classes x 4 images of 32x32, class-major."""
    out = []
    for label in range(len(FOLDERS)):
        for i in range(PER_CLASS):
            k = label * PER_CLASS + i
            png = synthetic.render(0, "base", "test", k, label=label, num_classes=len(FOLDERS)).png
            arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            out.append((label, FORMATS[k % len(FORMATS)], _encode(arr, FORMATS[k % len(FORMATS)])))
    return out


def _imagefolder(root: Path, images, junk: bool = True) -> Path:
    for n, (label, fmt, data) in enumerate(images):
        d = root / FOLDERS[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{n:02d}.{EXT[fmt]}").write_bytes(data)
    if junk:
        (root / FOLDERS[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (root / FOLDERS[1] / "notes.txt").write_text("not an image: ignored")
        (root / FOLDERS[2] / ".hidden.png").write_bytes(images[0][2])
    return root


def _names_file(path: Path) -> Path:
    path.write_text("".join(f"{f} {n}\n" for f, n in zip(FOLDERS, NAMES)))
    return path


def _clip_benchmark(root: Path, images) -> Path:
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    (root / "test" / "nshards.txt").write_text("2\n")
    for shard in range(2):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tf:
            for n, (label, fmt, data) in enumerate(images):
                if n * 2 // len(images) != shard:
                    continue
                if fmt == "BMP":  # CLIP_benchmark stores webp/png/jpg: the same pixels as PNG
                    data, fmt = _encode(np.asarray(Image.open(io.BytesIO(data))), "PNG"), "PNG"
                for ext, payload in ((EXT[fmt], data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{n:04d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return root


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """``datasets`` with its caches under the test's tmp dir (set before it is imported)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets
    return datasets


def _hf_dataset(datasets, images):
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[n.replace(" ", "_")
                                                                      for n in NAMES])})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for _, _, data in images],
         "label": [label for label, _, _ in images]}, features=features)


def _evaluate(loaded, corpus) -> tuple[dict, list, list]:
    from rvpt.metrics import evaluate_accuracy
    from rvpt.zeroshot import class_embeddings, predict

    c = open_corpus(corpus)
    clf = class_embeddings(loaded, c.classes.names, c.classes.templates)

    def batches():
        return iter_batches(iter_samples(c.split("test").shards, loaded.image_size), 16)

    preds, labels = [], []
    for b in batches():
        preds += predict(loaded.encode_images, b["image"].float().div(255), clf).tolist()
        labels += b["label"].tolist()
    return evaluate_accuracy(loaded, batches(), clf), preds, labels


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RVPT_CACHE_DIR", str(tmp_path / "rvpt-cache"))


def _members(corpus, split="test") -> set:
    exts = set()
    for url in open_corpus(corpus).split(split).shards:
        with tarfile.open(url) as tf:
            exts |= {m.name.rsplit(".", 1)[1] for m in tf.getmembers()}
    return exts


def test_imagefolder_imagenet_names_and_templates(tmp_path):
    images = _images()
    src = _imagefolder(tmp_path / "src", images)
    dest = tmp_path / "corpus"
    stats = ReadStats()
    res = convert.imagefolder_to_corpus(src, dest, split="test", shard_size=5, stats=stats,
                                        class_names=_names_file(tmp_path / "synsets.txt"),
                                        templates="openai")
    c = open_corpus(dest)
    assert c.classes.names == NAMES and len(c.classes.templates) == 80
    assert c.classes.prompts() == [f"a bad photo of a {n}." for n in NAMES]
    assert res["count"] == len(images) == c.split("test").count and len(res["shards"]) == 3
    assert res["skipped"] == 1 and stats.skipped == 1  # broken.jpg; notes.txt and .hidden ignored
    assert res["skip_reasons"] == {"image: unsupported or unrecognised format": 1}
    # JPEG / PNG / WebP kept as their bytes, BMP converted to PNG
    assert _members(dest) == {"jpg", "png", "webp", "txt", "cls", "json"}
    sample = next(iter_samples(c.split("test").shards))
    assert sample.text == "a bad photo of a golden retriever." and sample.meta["class"] == NAMES[0]
    assert "." not in sample.key and "/" not in sample.key

    # a second split joins the corpus (templates kept); the first split's shards stay
    res2 = convert.imagefolder_to_corpus(src, dest, split="fewshot",
                                         class_names=_names_file(tmp_path / "synsets.txt"))
    c = open_corpus(dest)
    assert set(c.splits) == {"test", "fewshot"} and len(c.classes.templates) == 80
    assert res2["count"] == len(images) and all(Path(u).is_file() for u in c.split("test").shards)
    # re-importing a split with fewer shards leaves no stale shard behind
    convert.imagefolder_to_corpus(src, dest, split="test", shard_size=100,
                                  class_names=_names_file(tmp_path / "synsets.txt"))
    assert sorted(p.name for p in dest.glob("test-*.tar")) == ["test-00000.tar"]
    assert not list(dest.glob(".staging*"))

    with pytest.raises(ShardError, match="differ from the 3 already in") as e:
        convert.imagefolder_to_corpus(src, dest, split="val")  # folder names, not the real ones
    assert "\n" not in str(e.value)
    with pytest.raises(ShardError, match=r"'imagenet' need exactly 1000 classes; the source has 3") as e:
        convert.imagefolder_to_corpus(src, tmp_path / "other", class_names="imagenet")
    assert "\n" not in str(e.value) and not (tmp_path / "other").exists()
    with pytest.raises(ShardError, match="not found"):
        convert.imagefolder_to_corpus(tmp_path / "missing", dest)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ShardError, match="no class sub-folders"):
        convert.imagefolder_to_corpus(tmp_path / "flat", dest)


def test_class_name_and_template_specs(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("golden retriever\ntabby cat\nred fox\n")
    assert convert.class_names(f, FOLDERS) == NAMES
    f.write_text(json.dumps(dict(zip(FOLDERS, NAMES))))
    assert convert.class_names(f, FOLDERS) == NAMES
    f.write_text(json.dumps(NAMES))
    assert convert.class_names(f, FOLDERS) == NAMES
    f.write_text("n0000001 golden retriever\nn0000002 tabby cat\nn0000009 zebra\nn0000010 x\n")
    with pytest.raises(ShardError, match="maps 2 of 3 classes; missing: n0000003"):
        convert.class_names(f, FOLDERS)
    f.write_text("a\nb\n")
    with pytest.raises(ShardError, match="lists 2 class names; the source has 3"):
        convert.class_names(f, FOLDERS)
    assert convert.class_names(None, ["tabby_cat"]) == ["tabby cat"]
    assert len(convert.class_names("imagenet", None)) == 1000
    with pytest.raises(ShardError, match="is not a file"):
        convert.class_names(tmp_path / "nope.txt", FOLDERS)

    assert convert.templates(None) == ["a photo of a {}."]
    assert len(convert.templates("openai")) == 80 == len(convert.templates("imagenet"))
    assert convert.templates("simple")[0] == "itap of a {}."
    t = tmp_path / "templates.txt"
    t.write_text("a photo of a {c}.\n\nart of the {}.\n")
    assert convert.templates(t) == ["a photo of a {}.", "art of the {}."]
    t.write_text("no slot here\n")
    with pytest.raises(ShardError, match="needs exactly one"):
        convert.templates(t)
    with pytest.raises(ShardError, match="nor a known name"):
        convert.templates("fancy")


def test_all_formats_give_the_same_accuracy(tmp_path, hf_env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rvpt.models import load_clip

    datasets = hf_env
    images = _images()
    ds = _hf_dataset(datasets, images)
    corpora = {}

    src = _imagefolder(tmp_path / "folder", images)
    corpora["imagefolder"] = tmp_path / "c-folder"
    res = convert.imagefolder_to_corpus(src, corpora["imagefolder"],
                                        class_names=_names_file(tmp_path / "synsets.txt"))
    assert res["count"] == len(images)

    corpora["clip_benchmark"] = _clip_benchmark(tmp_path / "cb", images)  # read in place

    # save_to_disk of a DatasetDict: the split must be chosen
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds}).save_to_disk(tmp_path / "hf")
    with pytest.raises(ShardError, match="has splits train, test; choose one with --hf-split"):
        convert.hf_to_corpus(tmp_path / "hf", tmp_path / "c-hf")
    with pytest.raises(ShardError, match="not 'validation'"):
        convert.hf_to_corpus(tmp_path / "hf", tmp_path / "c-hf", hf_split="validation")
    corpora["hf_disk"] = tmp_path / "c-hf"
    res = convert.hf_to_corpus(tmp_path / "hf", corpora["hf_disk"], hf_split="test")
    assert res["count"] == len(images) and res["skipped"] == 0
    assert _members(corpora["hf_disk"]) == {"jpg", "png", "webp", "txt", "cls", "json"}

    # parquet, hub layout: data/<split>-0000i-of-0000n.parquet, plus a path-only image cell
    data = tmp_path / "pq" / "data"
    ds.to_parquet(str(data / "test-00000-of-00002.parquet"))
    ds.select(range(2)).to_parquet(str(data / "train-00000-of-00001.parquet"))
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    secret = src / FOLDERS[0] / "img00.png"  # a real image: it must not be read through `path`
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": str(secret)}], cell),
                             "label": pa.array([0], pa.int64())}),
                   data / "test-00001-of-00002.parquet")
    with pytest.raises(ShardError, match="choose one with --hf-split"):
        convert.hf_to_corpus(tmp_path / "pq", tmp_path / "c-pq")
    corpora["hf_parquet"] = tmp_path / "c-pq"
    stats = ReadStats()
    res = convert.hf_to_corpus(tmp_path / "pq", corpora["hf_parquet"], hf_split="test",
                               stats=stats)
    assert res["count"] == len(images) and res["skipped"] == 1 == stats.skipped
    assert list(res["skip_reasons"]) == ["image: no embedded bytes (path only; not followed)"]
    # a single parquet file; and the ClassLabel ids mapped through an ImageNet-style file
    hf_names = tmp_path / "hf_names.txt"
    hf_names.write_text("".join(f"{n.replace(' ', '_')}\t{n.upper()}\n" for n in NAMES))
    res = convert.hf_to_corpus(data / "test-00000-of-00002.parquet", tmp_path / "c-one",
                               class_names=hf_names)
    assert open_corpus(tmp_path / "c-one").classes.names == [n.upper() for n in NAMES]

    torch.manual_seed(0)
    loaded = load_clip("ViT-Micro-4-p8-32")
    results = {k: _evaluate(loaded, c) for k, c in corpora.items()}
    for name, (acc, preds, labels) in results.items():
        assert open_corpus(corpora[name]).classes.names == NAMES, name
        assert acc["total"] == len(images), name
        assert labels == [label for label, _, _ in images], name
    base_acc, base_preds, _ = results["imagefolder"]
    for name, (acc, preds, _) in results.items():
        assert preds == base_preds and acc == base_acc, name


def test_hf_column_errors(tmp_path, hf_env):
    datasets = hf_env
    images = _images()[:3]
    plain = datasets.Dataset.from_dict({"picture": [{"bytes": d, "path": None} for _, _, d in images],
                                        "y": [0, 1, 2], "caption": ["a", "b", "c"]},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "y": datasets.Value("int64"),
                                                                   "caption": datasets.Value("string")}))
    plain.save_to_disk(tmp_path / "plain")
    with pytest.raises(ShardError, match="no label column .*give --label-column"):
        convert.hf_to_corpus(tmp_path / "plain", tmp_path / "c")
    with pytest.raises(ShardError, match="'caption' .* is not integer"):
        convert.hf_to_corpus(tmp_path / "plain", tmp_path / "c", label_column="caption")
    with pytest.raises(ShardError, match="has no class names .*give class names"):
        convert.hf_to_corpus(tmp_path / "plain", tmp_path / "c", label_column="y")
    with pytest.raises(ShardError, match="has no image column 'img'"):
        convert.hf_to_corpus(tmp_path / "plain", tmp_path / "c", image_column="img")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES))
    res = convert.hf_to_corpus(tmp_path / "plain", tmp_path / "c", label_column="y",
                               class_names=names)
    assert res["count"] == 3 and open_corpus(tmp_path / "c").classes.names == NAMES
    with pytest.raises(ShardError, match="not found"):
        convert.hf_to_corpus(tmp_path / "missing", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="is not a Hugging Face data set"):
        convert.hf_to_corpus(tmp_path / "empty", tmp_path / "c")


def test_object_storage_source_and_destination(tmp_path, hf_env, s3):
    """Through the session's S3 server: an ImageFolder read from s3://, written to s3://, then an
    HF split added to the same remote corpus."""
    images = _images()
    storage.upload(_imagefolder(tmp_path / "src", images, junk=False), s3.uri("convert", "src"))
    dest = s3.uri("convert", "corpus")
    res = convert.imagefolder_to_corpus(s3.uri("convert", "src"), dest, shard_size=5,
                                        class_names=_names_file(tmp_path / "synsets.txt"))
    assert res["count"] == len(images) and res["corpus_dir"] == dest
    _hf_dataset(hf_env, images).save_to_disk(tmp_path / "hf")
    convert.hf_to_corpus(tmp_path / "hf", dest, split="fewshot")
    c = open_corpus(dest)
    assert set(c.splits) == {"test", "fewshot"} and c.classes.names == NAMES
    for split in ("test", "fewshot"):
        assert len(list(iter_samples(c.split(split).shards))) == len(images)
    assert not list((tmp_path / "rvpt-cache" / "staging").iterdir())


def test_make_corpus_cli(tmp_path):
    images = _images()
    src = _imagefolder(tmp_path / "pets", images)
    out = tmp_path / "summary.json"
    r = run_job("make_corpus.py", f"paths.root={tmp_path / 'root'}", "--from-imagefolder", str(src),
                "--class-names", str(_names_file(tmp_path / "synsets.txt")), "--templates",
                "simple", "--split", "test", "--out", str(out))
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "root" / "corpus" / "pets"
    assert f"wrote split 'test' of {dest}: 12 samples (3 classes) in 1 shards; skipped 1 " \
           f"(image: unsupported or unrecognised format: 1)" in r.stdout
    summary = json.loads(out.read_text())
    assert summary["count"] == 12 and summary["corpus_dir"] == str(dest)
    assert open_corpus(dest).classes.prompts() == [f"itap of a {n}." for n in NAMES]

    r = run_job("make_corpus.py", "--from-hf", str(tmp_path / "nope"), "--dest", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: Hugging Face data set not found: {tmp_path / 'nope'}"]
