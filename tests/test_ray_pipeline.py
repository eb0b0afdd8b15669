"""The Ray layer at the smoke size: Ray Data reading and few-shot sampling, distributed evaluation,
the Ray Train loop with a killed worker, and a shard whose pickle member must never run."""
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import SMOKE, run_job


@pytest.fixture(scope="module")
def backdoored(corpus, smoke_root):
    out = smoke_root / "poison-ray.json"
    r = run_job("poison.py", *SMOKE, f"paths.root={smoke_root}", "--attack", "badnet", "--out",
                str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())["attacks"]["badnet"]["model"]["model_dir"]


def _cfg(smoke_root, *over):
    from pipeline.config import load_config
    return load_config("configs/smoke.yaml", [f"paths.root={smoke_root}", *over])


def test_ray_data_reads_shards_and_samples_the_same_shots(ray_local, corpus):
    from pipeline.data import few_shot_split, read_split, valid_rows
    from rvpt.fewshot import split_few_shot
    from rvpt.shards import iter_samples, split_urls

    cdir = corpus["corpus_dir"]
    rows = valid_rows(read_split(cdir, "test", 32)).take_all()
    assert len(rows) == 48 and rows[0]["image"].shape == (3, 32, 32)
    train, val, stats = few_shot_split(cdir, "fewshot", 2, 32, seed=3)
    assert stats.samples == 36 and stats.skipped == 0
    local_train, local_val = split_few_shot(iter_samples(split_urls(cdir, "fewshot"), 32), 2, 6, 3)
    assert sorted(r["key"] for r in train.take_all()) == sorted(s.key for s in local_train)
    assert sorted(r["key"] for r in val.take_all()) == sorted(s.key for s in local_val)


@pytest.mark.parametrize("actors", [1, 2])
def test_distributed_evaluation_equals_the_single_loop(ray_local, corpus, backdoored, smoke_root,
                                                       actors):
    from pipeline.backdoor import evaluate_backdoor, load_backdoored
    from pipeline.evaluation import evaluate_distributed
    from rvpt.shards import read_classes

    info = read_classes(corpus["corpus_dir"])
    loaded, attack, target, _ = load_backdoored(backdoored, None, info.names)
    local = evaluate_backdoor(_cfg(smoke_root), loaded, corpus["corpus_dir"], attack, target)
    dist = evaluate_distributed(corpus["corpus_dir"], "test", backdoored, 32, info.names,
                                info.templates, concurrency=actors, batch_size=7)
    assert dist["counts"] == local["counts"] and dist["asr"] == local["asr"]


def test_pickle_member_in_a_shard_executes_nothing(ray_local, tmp_path):
    """A `.pkl` member whose unpickling would write a marker file: the pipeline's reader hands it
    over as bytes and drops it; the marker never appears."""
    from pipeline.data import read_split, stats_of, valid_rows
    from rvpt.shards import encode_png, write_classes, write_manifest

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cdir = tmp_path / "corpus"
    write_classes(cdir, ["a", "b"], ["a photo of a {}."])
    with tarfile.open(cdir / "test-00000.tar", "w") as tf:
        for i in range(3):
            members = {"png": encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8)),
                       "cls": str(i % 2).encode(), "pkl": pickle.dumps(Evil())}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    write_manifest(cdir, {"test": {"count": 3, "shards": ["test-00000.tar"]}})
    ds = read_split(str(cdir), "test", 8).materialize()
    rows = valid_rows(ds).take_all()
    assert len(rows) == 3 and set(rows[0]) == {"image", "label", "key", "text"}
    assert stats_of(ds).ignored_members == {"pkl": 3}
    assert not marker.exists()


def test_killed_train_worker_resumes_from_its_checkpoint(ray_local, corpus, backdoored, smoke_root,
                                                         tmp_path):
    from pipeline.data import few_shot_split
    from pipeline.train import make_trainer

    cfg = _cfg(smoke_root, "defense.train.epochs=3", "defense.train.shots=2",
               "defense.train.batch_size=2", "ray.fail_at_epoch=1", "ray.max_failures=1",
               "ray.num_workers=2", "ray.cpus_per_worker=0.3")
    train, val, _ = few_shot_split(corpus["corpus_dir"], "fewshot", 2, 32, seed=0)
    trainer = make_trainer(cfg, backdoored, corpus["corpus_dir"], train, val, train.count(),
                           name="killed", storage_path=str(tmp_path))
    result = trainer.fit()
    assert result.error is None
    # the second attempt started after the last checkpoint (epoch 0) and finished all epochs
    assert result.metrics["start_epoch"] == 1 and result.metrics["epoch"] == 2
    assert 0.0 <= result.metrics["val_ca"] <= 1.0
    with result.checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "train_state.json").read_text())["epoch"] == 2


def test_poisoned_corpus_written_through_ray_data_matches_the_local_maker(ray_local, corpus,
                                                                          tmp_path):
    """The factory's Ray Data writer: same pairs as the single-process maker (pixels, captions,
    labels, marks), twice the same, non-target sources only."""
    from pipeline.data import write_poisoned
    from rvpt.attacks import make_attack
    from rvpt.poison import make_poisoned_pairs
    from rvpt.shards import iter_samples, read_classes, split_urls, write_classes, write_manifest

    cdir = corpus["corpus_dir"]
    info = read_classes(cdir)
    attack = make_attack("badnet", 32, seed=5)
    attack.save(tmp_path / "attack", target=2)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        split = write_poisoned(cdir, str(out), str(tmp_path / "attack"), 30, 2, info.names,
                               info.templates, seed=5, image_size=32, shard_size=12)
        assert split["count"] == 30 and len(split["shards"]) >= 2
        assert sum(split["per_class"].values()) == 30 and "2" not in split["per_class"]
        write_classes(out, info.names, info.templates)
        write_manifest(out, {"poison": split})
        outs.append({s.key: s for s in iter_samples(split_urls(out, "poison"))})
    a, b = outs
    assert a.keys() == b.keys()
    sources = list(reversed(split_urls(cdir, "pretrain")))
    local = {p.key: p for p in make_poisoned_pairs(attack, iter_samples(sources, 32), 30, 2,
                                                   info.names, info.templates, seed=5)}
    assert local.keys() == a.keys()
    for key, s in a.items():
        assert torch.equal(s.image, b[key].image) and s.text == b[key].text
        p = local[key]
        assert s.text == p.caption and s.label == p.label and s.label != 2
        assert s.meta["poisoned"] is True and s.meta["source_key"] in key
        assert info.names[2] in s.text
    from rvpt.shards import decode_image
    assert all(torch.equal(decode_image(local[k].png), a[k].image) for k in a)


def test_placement_groups_of_dead_actors_are_released(ray_local):
    """A group made inside an actor outlives it (as a killed Train controller's did, starving the
    sweep); the sweep's callback frees such groups and leaves the driver's own alone."""
    import time

    ray = ray_local
    from ray.util.placement_group import placement_group, placement_group_table, \
        remove_placement_group

    from pipeline.sweep import release_orphaned_placement_groups

    release_orphaned_placement_groups()  # whatever earlier tests left
    mine = placement_group([{"CPU": 0.25}])
    ray.get(mine.ready())

    @ray.remote(num_cpus=0)
    class Maker:
        def make(self):
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready())
            return pg.id.hex()

    maker = Maker.remote()
    made = ray.get(maker.make.remote())
    assert release_orphaned_placement_groups() == 0  # its creator is alive
    ray.kill(maker)
    deadline, removed = time.time() + 30, 0
    while time.time() < deadline and not removed:
        time.sleep(0.5)
        removed = release_orphaned_placement_groups()
    assert removed == 1
    table = placement_group_table()
    deadline = time.time() + 30
    while time.time() < deadline and table[made]["state"] != "REMOVED":
        time.sleep(0.5)
        table = placement_group_table()
    assert table[made]["state"] == "REMOVED"
    assert table[mine.id.hex()]["state"] == "CREATED"
    remove_placement_group(mine)


def test_a_local_instance_listens_on_loopback_only():
    """Even when Ray was imported before ``ray_init`` (Tune is, by the sweep job), the local instance
    takes 127.0.0.1 as its address, not the machine's network address."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import ray.tune, ray, json\n"
        "from pipeline.config import load_config\n"
        "from pipeline.session import ray_init\n"
        "cfg = load_config('configs/smoke.yaml', ['ray.num_cpus=1'])\n"
        "ray_init(cfg)\n"
        "print(json.dumps([ray.util.get_node_ip_address(),"
        " [n['NodeManagerAddress'] for n in ray.nodes()]]))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["RAY_TMPDIR"] = f"/tmp/rvpt-lo-{os.getpid()}"  # short: Ray's socket paths have a limit
    try:
        r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=180)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    node_ip, managers = json.loads(r.stdout.strip().splitlines()[-1])
    assert node_ip == "127.0.0.1" and managers == ["127.0.0.1"]
