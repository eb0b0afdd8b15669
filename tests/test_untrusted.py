"""Untrusted models and shards: nothing in them executes, no valid sample is dropped uncounted, and
every error a user can cause is one line. Each input is made by the test (tests/untrusted.py)."""
import json
import socket
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_job
from untrusted import (CLASSES, corpus, hostile_torchscript, image_bytes, sample, tar_bytes)


# ---------------------------------------------------------------- nothing in a checkpoint runs

def test_torchscript_code_never_runs(tmp_path):
    from rvpt.models import ModelError, load_clip

    # the archive is hostile: torch.jit.load runs its __setstate__, which creates the marker
    proof = tmp_path / "proof-marker"
    hostile_torchscript(tmp_path / "proof.pt", proof)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(tmp_path / "proof.pt"))
    assert proof.exists()

    marker = tmp_path / "marker"
    archive = hostile_torchscript(tmp_path / "clip.pt", marker)
    with pytest.raises(ModelError) as err:
        load_clip(checkpoint=archive)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and "model.trust_torchscript=true" in msg and "custom state" in msg
    r = run_job("evaluate.py", "--config", "configs/smoke.yaml", f"paths.root={tmp_path}",
                "--model", str(archive), "--corpus", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists()


def test_openai_style_torchscript_archive_loads_without_running_code(tmp_path):
    """A traced tiny CLIP (OpenAI's releases are TorchScript): its tensors load by the safe reader
    and give the same model as the original weights."""
    import warnings

    from rvpt.models import load_clip

    torch.manual_seed(0)
    loaded = load_clip("ViT-Micro-4-p8-32")
    image = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(loaded.model, {"encode_image": image})
        torch.jit.save(traced, str(tmp_path / "clip.pt"))
    again = load_clip(checkpoint=tmp_path / "clip.pt")
    assert "no code run" in again.source
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.allclose(loaded.encode_images(image), again.encode_images(image))


def test_model_dir_naming_a_hub_tokenizer_fails_fast_offline(tmp_path, monkeypatch):
    from rvpt.models import ModelError, load_clip, save_model_dir

    d = save_model_dir(load_clip("ViT-Micro-4-p8-32"), None, tmp_path / "m")
    config = json.loads((d / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "some-org/some-tokenizer"
    (d / "open_clip_config.json").write_text(json.dumps(config))
    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_clip(checkpoint=d)
    assert time.perf_counter() - start < 5 and not calls
    assert "hf_tokenizer_name" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- no manifest name leaves its corpus

@pytest.mark.parametrize("name", ["pipe:touch {marker}; cat test-00000.tar", "../outside.tar",
                                  "/etc/passwd", "s3://other-bucket/x.tar", "sub/../../x.tar"])
def test_manifest_shard_names_stay_inside_the_corpus(tmp_path, name):
    from rvpt.shards import ShardError, open_corpus

    marker = tmp_path / "marker"
    c = corpus(tmp_path / "c", {"test": [tar_bytes(sample("a", 0))]})
    manifest = json.loads((c / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"] = [name.format(marker=marker)]
    (c / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="is not a relative name inside"):
        open_corpus(c)
    r = run_job("evaluate.py", "--config", "configs/smoke.yaml", f"paths.root={tmp_path}",
                "--model", str(tmp_path / "m"), "--corpus", str(c), cwd=tmp_path)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert not marker.exists() and not (tmp_path / "touch").exists()


# ---------------------------------------------------------------- one reader, counted skips

def _mixed_shards() -> dict:
    """Shards of every kind: clean, payload members, corrupt images, odd image modes, unlabelled,
    labels out of range, a truncated tar, random bytes, an empty file, deep JSON."""
    clean = tar_bytes(sum((sample(f"c{i}", i % 3) for i in range(6)), []))
    payload = tar_bytes(sum((sample(f"p{i}", i % 3, pkl=b"\x80\x04cos\nsystem\n.", pth=b"PK")
                             for i in range(3)), []))
    odd = tar_bytes(sample("l", 0, image_bytes(1, "PNG", "L"))
                    + sample("rgba", 1, image_bytes(2, "PNG", "RGBA"))
                    + sample("cmyk", 2, image_bytes(3, "JPEG", "CMYK"), ext="jpg")
                    + sample("p", 0, image_bytes(4, "PNG", "P"))
                    + sample("webp", 1, image_bytes(5, "WEBP"), ext="webp"))
    corrupt = tar_bytes(sample("bad1", 0, b"not an image") + sample("bad2", 1, b"\x89PNG\r\n")
                        + sample("eps", 2, b"%!PS-Adobe-3.0 EPSF-3.0\n", ext="png")
                        + sample("ok1", 2))
    unlabelled = tar_bytes(sample("u1", None) + sample("u2", None) + sample("ok2", 1))
    labels = tar_bytes(sample("big", 10 ** 23) + sample("neg", -1) + sample("out", 3)
                       + sample("ok3", 0))
    deep = tar_bytes(sample("deep", 0, meta=None, json=b"[" * 200_000 + b"]" * 200_000)
                     + sample("ok4", 2))
    whole = tar_bytes(sum((sample(f"t{i}", i % 3) for i in range(4)), []))
    truncated = whole[: len(whole) // 2 + 100]
    return {"clean": clean, "payload": payload, "odd": odd, "corrupt": corrupt,
            "unlabelled": unlabelled, "labels": labels, "deep": deep, "truncated": truncated,
            "random": bytes(range(256)) * 7, "empty": b""}


def test_plain_reader_counts_every_skip():
    from rvpt.shards import ReadRules, ReadStats, read_shard

    rules = ReadRules(num_classes=3)
    got = {}
    for name, data in _mixed_shards().items():
        path = Path(f"/tmp/rvpt-mixed-{name}.tar")
        path.write_bytes(data)
        stats = ReadStats()
        keys = [s.key for s in read_shard(str(path), 16, stats, rules)]
        got[name] = (keys, stats)
        path.unlink()
    assert got["clean"][0] == [f"c{i}" for i in range(6)]
    assert got["payload"][0] == ["p0", "p1", "p2"]
    assert got["payload"][1].ignored_members == {"pkl": 3, "pth": 3}
    assert got["odd"][0] == ["l", "rgba", "cmyk", "p", "webp"]  # every mode kept, none lost
    assert got["corrupt"][0] == ["ok1"] and got["corrupt"][1].skipped == 3
    assert got["unlabelled"][0] == ["ok2"] and got["unlabelled"][1].reasons["cls: missing"] == 2
    assert got["labels"][0] == ["ok3"]
    assert got["labels"][1].reasons == {"cls: not an integer label": 1, "cls: label out of range": 2}
    assert got["deep"][0] == ["ok4"] and got["deep"][1].reasons["json: nested too deeply"] == 1
    assert 0 < len(got["truncated"][0]) < 4 and got["truncated"][1].bad_shards == 1
    for name in ("random", "empty"):
        assert got[name][0] == [] and got[name][1].bad_shards == 1


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A corpus whose fewshot and test splits mix every kind of shard (counts as a manifest that
    believes every sample is valid would state them)."""
    from rvpt.models import load_clip, save_model_dir

    tmp = tmp_path_factory.mktemp("mixed")
    shards = list(_mixed_shards().values())
    c = corpus(tmp / "corpus", {"fewshot": shards, "test": shards},
               counts={"fewshot": 60, "test": 60})
    torch.manual_seed(0)
    model = save_model_dir(load_clip("ViT-Micro-4-p8-32"), None, tmp / "model")
    return c, model, tmp


def test_both_readers_agree_on_a_mixed_corpus(ray_local, mixed):
    """jobs/evaluate.py (the plain reader), Ray Data's few-shot draw and its distributed evaluation
    report the same valid samples and the same skip reasons; no label -1 is ever counted."""
    from pipeline.data import few_shot_split
    from pipeline.evaluation import evaluate_distributed
    from rvpt.shards import ReadRules

    c, model, tmp = mixed
    out = tmp / "eval.json"
    r = run_job("evaluate.py", "--config", "configs/smoke.yaml", f"paths.root={tmp}", "--model",
                str(model), "--corpus", str(c), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    plain = json.loads(out.read_text())
    read = plain["read"]
    # clean 6, payload 3, odd modes 5, one good sample in each of four broken shards, and what the
    # truncated shard held before its break
    assert read["samples"] == plain["counts"]["n"] and 18 < read["samples"] < 22
    assert f"read test: {read['samples']} valid, {read['skipped']} skipped" in r.stdout
    assert read["skip_reasons"]["missing: fewer samples than the manifest states"] > 0
    assert read["samples"] + read["skipped"] == 60

    rules = ReadRules(num_classes=3)
    ray_eval = evaluate_distributed(str(c), "test", str(model), 32, CLASSES, ["a photo of a {}."],
                                    rules=rules)
    assert ray_eval["read"] == read
    assert ray_eval["counts"]["n"] == plain["counts"]["n"]
    train, val, stats = few_shot_split(str(c), "fewshot", 1, 32, seed=0, rules=rules)
    assert stats.as_dict() == read  # the same shards as the test split
    rows = train.take_all() + val.take_all()
    assert len(rows) == read["samples"] and all(0 <= r["label"] < 3 for r in rows)


# ---------------------------------------------------------------- limits hold without the memory

def test_pixel_and_member_limits(tmp_path):
    """A 20 KB PNG of 127.7 Mpx is skipped before it is decoded; a member over the size cap is
    skipped without being read (its gzip shard is read through in chunks)."""
    import io

    from PIL import Image

    from rvpt.shards import ReadRules, ReadStats, read_shard

    buf = io.BytesIO()
    Image.new("L", (11300, 11300)).save(buf, format="PNG", optimize=True)
    bomb = buf.getvalue()
    assert len(bomb) < 200_000
    big = b"\0" * (8 << 20)
    shard = tmp_path / "s.tar.gz"
    shard.write_bytes(tar_bytes(sample("bomb", 0, bomb) + sample("big", 1, big)
                                + sample("fine", 2), gz=True))
    stats = ReadStats()
    keys = [s.key for s in read_shard(str(shard), 16, stats,
                                      ReadRules(num_classes=3, max_member_bytes=1 << 20))]
    assert keys == ["fine"]
    assert stats.reasons == {"image: more than 64000000 pixels": 1,
                             "png: member larger than 1048576 bytes": 1}


# ---------------------------------------------------------------- property: both readers, any damage

def _clean_members(n: int = 4, offset: int = 0) -> list:
    return sum((sample(f"s{offset + i}", i % 3) for i in range(n)), [])


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("mix"), st.permutations(list(range(4 * 4))), st.integers(0, 16)),
)


def _damaged(kind, offset: int) -> bytes:
    members = _clean_members(offset=offset)
    if kind[0] == "mix":  # members reordered and some dropped: keys split, samples incomplete
        order, drop = kind[1], kind[2]
        members = [members[i] for i in order[drop:]]
        return tar_bytes(members)
    data = bytearray(tar_bytes(members))
    if kind[0] == "truncate":
        return bytes(data[: int(len(data) * kind[1])])
    for where, xor in kind[1]:
        i = min(len(data) - 1, int(len(data) * where))
        data[i] ^= xor
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(damage, min_size=1, max_size=4))
def test_plain_reader_never_raises_and_accounts_for_every_sample(tmp_path_factory, kinds):
    from rvpt.shards import ReadRules, ReadStats, iter_samples

    tmp = tmp_path_factory.mktemp("prop")
    paths = []
    for i, kind in enumerate(kinds):
        p = tmp / f"{i}.tar"
        p.write_bytes(_damaged(kind, 10 * i))
        paths.append(str(p))
    stats = ReadStats()
    got = list(iter_samples(paths, 16, stats, rules=ReadRules(num_classes=3)))
    assert stats.samples == len(got) <= 4 * len(kinds)
    assert all(0 <= s.label < 3 and s.image.shape == (3, 16, 16) for s in got)
    assert len({s.key for s in got}) == len(got)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(damage, min_size=3, max_size=6))
def test_both_readers_return_the_same_keys_and_skips(ray_local, tmp_path_factory, kinds):
    from pipeline.data import STATS, merge_stats, read_split, valid_rows
    from rvpt.shards import ReadRules, ReadStats, iter_samples

    c = corpus(tmp_path_factory.mktemp("both"),
               {"test": [_damaged(k, 10 * i) for i, k in enumerate(kinds)]})
    shards = [str(c / f"test-{i:05d}.tar") for i in range(len(kinds))]
    rules = ReadRules(num_classes=3)
    stats = ReadStats()
    plain = sorted(s.key for s in iter_samples(shards, 16, stats, rules=rules))
    ds = read_split(str(c), "test", 16, rules).materialize()
    ray_keys = sorted(r["key"] for r in valid_rows(ds).take_all())
    ray_stats = merge_stats(r[STATS] for r in ds.select_columns([STATS]).take_all())
    assert ray_keys == plain
    assert ray_stats.as_dict() == stats.as_dict()


# ---------------------------------------------------------------- every user error is one line

def _attack_json(tmp: Path, **fields) -> Path:
    d = tmp / "attack"
    d.mkdir(parents=True, exist_ok=True)
    (d / "attack.json").write_text(json.dumps({"attack": "badnet", "target": 0, "image_size": 32,
                                               **fields}))
    return d / "attack.json"


@pytest.mark.parametrize("fields, expected", [
    ({"params": 5}, "params must be an object"),
    ({"image_size": "abc"}, "image_size must be an integer"),
    ({"image_size": 1e12}, "image_size must be within"),
    ({"seed": 1e30}, "seed must be an integer"),
    ({"tensors": "../../outside.safetensors"}, "tensors '../../outside.safetensors' is not a file name inside"),
    ({"tensors": "/etc/passwd"}, "is not a file name inside"),
    ({"params": {"patch_image": "../x.png"}}, "params.patch_image '../x.png' is not a file name inside"),
    ({"params": {"patch_image": "bomb.png"}}, "more than 16000000 pixels"),
    ({"attack": "blended", "image_size": 0}, "image_size must be within"),
])
def test_attack_json_errors_are_one_line(tmp_path, fields, expected):
    import io

    from PIL import Image

    from rvpt.attacks import AttackError, load_attack

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    (tmp_path / "attack").mkdir()
    (tmp_path / "attack" / "bomb.png").write_bytes(buf.getvalue())
    path = _attack_json(tmp_path, **fields)
    with pytest.raises(AttackError) as err:
        load_attack(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_target_that_is_not_a_class_is_one_line(tmp_path):
    from pipeline.backdoor import load_backdoored
    from pipeline.config import ConfigError
    from rvpt.models import load_clip, save_model_dir

    d = save_model_dir(load_clip("ViT-Micro-4-p8-32"), None, tmp_path / "m")
    (d / "attack.json").write_text(json.dumps({"attack": "badnet", "target": [1, 2]}))
    with pytest.raises(ConfigError, match="target must be a class index or name"):
        load_backdoored(str(d), None, CLASSES)


@pytest.mark.parametrize("case", ["config_dir", "config_binary", "manifest_not_json",
                                  "manifest_no_shards", "classes_string", "sweep_name",
                                  "tracking_down"])
def test_job_errors_are_one_line(tmp_path, case, capsys):
    from pipeline.cli import main
    from pipeline.jobs import evaluate, sweep

    c = corpus(tmp_path / "c", {"test": [tar_bytes(sample("a", 0))]})
    argv = ["--config", "configs/smoke.yaml", f"paths.root={tmp_path}"]
    run = evaluate
    if case == "config_dir":
        argv[1] = str(tmp_path)
        expect = "is not a file"
    elif case == "config_binary":
        (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe\x00 seed: 1")
        argv[1] = str(tmp_path / "bad.yaml")
        expect = "is not UTF-8"
    elif case == "manifest_not_json":
        (c / "manifest.json").write_text("{not json")
        expect = "manifest.json is not valid JSON"
    elif case == "manifest_no_shards":
        (c / "manifest.json").write_text(json.dumps({"splits": {"test": {"count": 1}}}))
        expect = "has no list of shards"
    elif case == "classes_string":
        (c / "classes.json").write_text(json.dumps({"classes": "abc"}))
        expect = "lists no classes"
    elif case == "sweep_name":
        argv.append("sweep.name=../../escape")
        run, expect = sweep, "sweep.name: String should match pattern"
    else:
        from services import free_port
        argv.append(f"tracking.uri=http://127.0.0.1:{free_port()}")
        run, expect = sweep, "does not answer"
    import argparse

    def with_args(cfg, args: argparse.Namespace):
        args.corpus, args.model, args.attack, args.split = str(c), str(tmp_path / "m"), None, "test"
        args.save_examples, args.check, args.sync = None, False, False
        return run(cfg, args)

    rc = main("test", with_args, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err
