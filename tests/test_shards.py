import io
import json
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rvpt import synthetic
from rvpt.convert import imagefolder_to_corpus
from rvpt.shards import (ReadRules, ReadStats, SplitWriter, ShardError, iter_batches,
                         iter_samples, read_classes, read_manifest, split_urls, write_classes,
                         write_manifest)


def _corpus(tmp_path: Path, n: int = 10) -> Path:
    write_classes(tmp_path, synthetic.CLASSES[:4], synthetic.PROMPT_TEMPLATES)
    with SplitWriter(tmp_path, "test", shard_size=4) as w:
        for i in range(n):
            s = synthetic.render(0, "base", "test", i, label=i % 4, num_classes=4)
            w.write(s.key, s.png, s.caption, s.label, s.meta)
    write_manifest(tmp_path, {"test": w.info})
    return tmp_path


def _add_members(shard: Path, members: dict) -> None:
    """Append raw members to an existing tar shard."""
    with tarfile.open(shard, "a") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_write_read_roundtrip(tmp_path):
    corpus = _corpus(tmp_path)
    urls = split_urls(corpus, "test")
    assert len(urls) == 3 and read_manifest(corpus)["splits"]["test"]["count"] == 10
    stats = ReadStats()
    samples = list(iter_samples(urls, image_size=32, stats=stats))
    assert [s.label for s in samples] == [i % 4 for i in range(10)]
    assert samples[0].image.shape == (3, 32, 32) and samples[0].image.dtype.__str__() == "torch.uint8"
    assert samples[3].text == synthetic.render(0, "base", "test", 3, label=3, num_classes=4).caption
    assert stats.samples == 10 and stats.skipped == 0
    batches = list(iter_batches(iter(samples), 4))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    assert read_classes(corpus).prompts()[0] == "a photo of a circle."


def test_shards_readable_by_tar_and_webdataset(tmp_path):
    corpus = _corpus(tmp_path)
    url = split_urls(corpus, "test")[0]
    listing = subprocess.run(["tar", "tf", url], capture_output=True, text=True, check=True).stdout
    names = listing.split()
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "txt", "cls", "json"}
    ds = wds.WebDataset(url, shardshuffle=False).decode("pil")
    first = next(iter(ds))
    assert isinstance(first["png"], Image.Image) and json.loads(json.dumps(first["json"]))["split"]


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    corpus = _corpus(tmp_path, n=4)
    shard = Path(split_urls(corpus, "test")[0])
    _add_members(shard, {"bad-0001.png": b"\x89PNG\r\n\x1a\nthis is not a png",
                         "bad-0001.cls": b"1", "bad-0001.txt": b"broken"})
    stats = ReadStats()
    samples = list(iter_samples([str(shard)], stats=stats))
    assert len(samples) == 4 and stats.skipped == 1
    assert "image" in next(iter(stats.reasons))


def test_pickle_member_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return (Path.touch, (Path(self.path),))

    # the payload is live: unpickling it does create its marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(str(probe))))
    assert probe.exists()

    corpus = _corpus(tmp_path, n=2)
    shard = Path(split_urls(corpus, "test")[0])
    payload = pickle.dumps(Payload(str(marker)))
    _add_members(shard, {"base-test-0000000.pkl": payload,
                         "evil-0001.png": synthetic.render(0, "base", "test", 0).png,
                         "evil-0001.pkl": payload, "evil-0001.pth": payload})
    stats = ReadStats()
    samples = list(iter_samples([str(shard)], stats=stats, rules=ReadRules(require_label=False)))
    assert len(samples) == 3 and not marker.exists()  # the evil sample's image is kept, unlabelled
    assert stats.ignored_members["pkl"] == 2 and stats.ignored_members["pth"] == 1
    # its key appears again after other keys (the appended .pkl): counted, not merged
    assert stats.reasons == {"key: duplicate in shard": 1}
    stats = ReadStats()
    assert len(list(iter_samples([str(shard)], stats=stats))) == 2  # labels required by default
    assert stats.reasons["cls: missing"] == 1


def test_imagefolder_converter(tmp_path):
    src = tmp_path / "folder"
    for cls in ("golden_retriever", "tabby_cat"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i).integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / cls / f"img{i}.jpg")
    (src / "tabby_cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "tabby_cat" / "notes.txt").write_text("ignored")
    out = tmp_path / "corpus"
    res = imagefolder_to_corpus(src, out, split="test", image_size=16)
    assert res["count"] == 6 and res["skipped"] == 1
    assert read_classes(out).names == ["golden retriever", "tabby cat"]
    samples = list(iter_samples(split_urls(out, "test")))
    assert {s.label for s in samples} == {0, 1} and samples[0].image.shape == (3, 16, 16)
    assert samples[0].text == "a photo of a golden retriever."
    imagefolder_to_corpus(src, out, split="fewshot")
    assert set(read_manifest(out)["splits"]) == {"test", "fewshot"}
    assert len(split_urls(out, "test")) == len(res["shards"])  # a split lists only its own shards
    with pytest.raises(ShardError, match="not found"):
        imagefolder_to_corpus(tmp_path / "missing", out)


def test_split_writer_lists_only_what_it_wrote(tmp_path):
    """Re-writing a split with fewer shards, and a split whose name prefixes another's, list only
    their own shards (a directory glob would list stale and foreign ones)."""
    def write(split, n):
        with SplitWriter(tmp_path, split, shard_size=2) as w:
            for i in range(n):
                s = synthetic.render(0, "base", "test", i, label=0, num_classes=4)
                w.write(f"{split}-{i}", s.png, s.caption, s.label, s.meta)
        return w.info["shards"]

    assert write("val-v2", 2) == ["val-v2-00000.tar"]
    assert write("val", 6) == ["val-00000.tar", "val-00001.tar", "val-00002.tar"]
    assert write("val", 2) == ["val-00000.tar"]
    assert write("50%", 1) == ["50%-00000.tar"]


def test_missing_corpus_errors(tmp_path):
    with pytest.raises(ShardError, match="not a corpus directory .no classes.json"):
        split_urls(tmp_path, "test")
    with pytest.raises(ShardError, match="corpus not found"):
        read_classes(tmp_path / "nothing")
    write_classes(tmp_path, ["a", "b"], ["a photo of a {}."])
    with pytest.raises(ShardError, match="no manifest.json"):
        split_urls(tmp_path, "test")
    corpus = _corpus(tmp_path / "c", n=2)
    with pytest.raises(ShardError, match="no split 'nope'"):
        split_urls(corpus, "nope")
