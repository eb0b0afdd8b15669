"""Any defense through the whole pipeline.

- A toy defense defined in this file (one class, one decorator, its own parameter and search space)
  runs through the smoke sweep — this file is also the sweep's driver script (see ``__main__``) —
  and lands in MLflow with its parameter columns; jobs/best.py picks among its settings; the report
  shows it. Nothing outside this file knows it.
- CleanCLIP trains with 2 Ray Train workers (DDP): after a step both hold the same weights; a killed
  worker resumes from its checkpoint.
- The linear probe classifies as well as a plain logistic regression on the same features, and is
  "not applicable" to TrojVQA, without an error.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import nn

from rvpt.defenses import Defense, DefenseParams, register_defense

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


class ToyParams(DefenseParams):
    temperature: float = Field(1.0, gt=0, description="divides the image embedding")


@register_defense("toy")
class Toy(Defense):
    """Learns one additive offset to the image embedding (a defense in name only)."""

    Params = ToyParams
    space = {"temperature": [0.5, 2.0]}
    trained = "an embedding offset"
    data = "fewshot"
    recipe = {"lr": 0.01, "epochs": 1, "augment": False, "schedule": "constant"}

    def setup(self):
        for q in self.loaded.model.parameters():
            q.requires_grad_(False)
        self.module = nn.Module()
        self.module.offset = nn.Parameter(torch.zeros(self.loaded.model.visual.output_dim))
        text = self.loaded.encode_texts([self.templates[0].format(c) for c in self.class_names])
        self.module.register_buffer("text", text)

        def forward(batch):
            logits = 100 * self.encode(batch["image"], grad=True) @ self.module.text.T
            loss = nn.functional.cross_entropy(logits, batch["label"])
            return loss, {"loss": loss.detach()}

        self.module.forward = forward

    def encode(self, images01, grad=False):
        emb = self.loaded.encode_images(images01) / self.params.temperature + self.module.offset
        return nn.functional.normalize(emb if grad else emb.detach(), dim=-1)

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({"offset": self.module.offset.detach()}, Path(directory) / "toy.pt")
        return Path(directory)

    def load(self, directory):
        state = torch.load(Path(directory) / "toy.pt", weights_only=True)
        with torch.no_grad():
            self.module.offset.copy_(state["offset"])


def test_a_defense_defined_here_runs_through_the_sweep(tmp_path, corpus, smoke_root):
    out = tmp_path / "sweep.json"
    r = subprocess.run([sys.executable, str(HERE), "--config", "configs/smoke.yaml",
                        f"paths.root={smoke_root}", "sweep.name=toy", "sweep.defenses=[toy]",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["trials"] == 2 and not res["errors"]

    from pipeline import tracking

    df = tracking.runs_frame(f"sqlite:///{smoke_root / 'mlflow.db'}", "toy")
    assert len(df) == 2 and set(df["tags.defense"]) == {"toy"}
    assert set(df["params.temperature"]) == {"0.5", "2.0"} and set(df["tags.space"]) == {"temperature"}
    assert set(df["params.trained"]) == {"an embedding offset"}
    assert df["metrics.ca"].notna().all() and df["metrics.val_ca"].notna().all()

    best_out = tmp_path / "best.json"
    b = subprocess.run([sys.executable, str(REPO / "jobs" / "best.py"), "--config",
                        "configs/smoke.yaml", f"paths.root={smoke_root}", "--experiment", "toy",
                        "--out", str(best_out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert b.returncode == 0, b.stderr
    [best] = json.loads(best_out.read_text())
    assert best["defense"] == "toy" and best["temperature"] in (0.5, 2.0)
    assert f"temperature={best['temperature']}" in best["setting"] in b.stdout
    report = Path(res["report"]["report"]).read_text()
    assert "toy" in report and "temperature=" in report


# ---------------------------------------------------------------- CleanCLIP with DDP

@pytest.fixture(scope="module")
def backdoored(corpus, smoke_root):
    from conftest import SMOKE, run_job

    out = smoke_root / "poison-defenses.json"
    r = run_job("poison.py", *SMOKE, f"paths.root={smoke_root}", "--attack", "badnet,trojvqa",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    return {a: m["model"]["model_dir"] for a, m in json.loads(out.read_text())["attacks"].items()}


def _cleanclip_run(corpus, model, smoke_root, storage, *over, pairs: int = 16):
    from pipeline.config import load_config
    from pipeline.data import few_shot_split, read_split, valid_rows
    from pipeline.train import make_trainer

    cfg = load_config("configs/smoke.yaml", [f"paths.root={smoke_root}", "defense.name=cleanclip",
                                             "defense.params={}", "defense.train.batch_size=8",
                                             "ray.num_workers=2", "ray.cpus_per_worker=0.3",
                                             *over])
    rules = cfg.read_rules(6, require_label=False)
    ds = valid_rows(read_split(corpus["corpus_dir"], "pretrain", 32, rules)).limit(pairs)
    _, val, _ = few_shot_split(corpus["corpus_dir"], "fewshot", 2, 32, seed=0)
    trainer = make_trainer(cfg, model, corpus["corpus_dir"], ds, val, pairs, name="cleanclip",
                           storage_path=str(storage))
    return trainer.fit()


def test_cleanclip_replicas_stay_in_sync(ray_local, corpus, backdoored, smoke_root, tmp_path):
    """One step on each of two workers (16 pairs, batch 8, each worker its own half and its own
    augmentations): the workers' weights are identical afterwards (DDP averaged the gradients),
    and they moved away from the backdoored model's."""
    from safetensors.torch import load_file

    result = _cleanclip_run(corpus, backdoored["badnet"], smoke_root, tmp_path,
                            "defense.train.epochs=1")
    assert result.error is None
    assert result.metrics["replicas_in_sync"] == 1.0
    before = load_file(str(Path(backdoored["badnet"]) / "open_clip_model.safetensors"))
    with result.checkpoint.as_directory() as d:
        after = load_file(str(Path(d) / "open_clip_model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_cleanclip_killed_worker_resumes(ray_local, corpus, backdoored, smoke_root, tmp_path):
    """Worker 0 killed in its second step of epoch 1 (32 pairs: two steps per worker and epoch):
    the group restarts from the checkpoint of epoch 0 and finishes."""
    result = _cleanclip_run(corpus, backdoored["badnet"], smoke_root, tmp_path,
                            "defense.train.epochs=3", "ray.fail_at_epoch=1", "ray.max_failures=1",
                            pairs=32)
    assert result.error is None
    assert result.metrics["start_epoch"] == 1 and result.metrics["epoch"] == 2
    assert result.metrics["replicas_in_sync"] == 1.0


def test_cleanclip_trains_on_pair_shards_the_user_names(backdoored, smoke_root, tmp_path):
    """A CC3M-style pair shard set (img2dataset's output, no class names) read in place as
    defense.pairs: its count from the stats files, the corrupt image counted, not a dataset."""
    from conftest import SMOKE, img2dataset_dir, run_job
    from rvpt.shards import ShardError, open_corpus, read_classes

    pairs = tmp_path / "cc3m-clean"
    img2dataset_dir(pairs, 20, corrupt=7)
    corpus = open_corpus(pairs)
    assert corpus.format == "pair shards" and list(corpus.splits) == ["train"]
    assert corpus.split("train").count == 40 and len(corpus.split("train").shards) == 2
    with pytest.raises(ShardError, match="pair shards without class names"):
        read_classes(pairs)

    out = tmp_path / "defend.json"
    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model", backdoored["badnet"],
                "--defense", "cleanclip", f"defense.pairs.corpus={pairs}", "defense.pairs.split=train",
                "defense.pairs.count=null", "defense.train.epochs=1", "defense.train.batch_size=8",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["trained"] == "all weights" and res["train_samples"] == 40
    assert res["samples_seen"] == 39  # the corrupt one skipped, and counted:
    assert res["pairs_read"]["samples"] == 39 and res["pairs_read"]["skipped"] == 1
    assert "train (clean pairs): 39 valid, 1 skipped" in r.stdout
    assert res["after"]["ca"] is not None

    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model", backdoored["badnet"],
                "--defense", "cleanclip", f"defense.pairs.corpus={pairs}", "defense.pairs.split=train",
                "defense.pairs.count=41")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "has 40 pairs, fewer than defense.pairs.count=41"), r.stderr


# ---------------------------------------------------------------- linear probe

def test_linear_probe_matches_a_logistic_regression():
    """The probe (SGD, the paper's recipe) on a clean model's features against a logistic
    regression fit to convergence (L-BFGS, standardised features) on the same features: test
    accuracies within 5 points (16 shots per class, 60 test images per class, rendered here)."""
    from rvpt import synthetic
    from rvpt.defenses import make_defense, train_defense
    from rvpt.fewshot import epoch_batches
    from rvpt.models import load_clip
    from rvpt.shards import Sample, decode_image

    C = 6
    names = synthetic.CLASSES[:C]

    def render(split, n):
        return [Sample(key=s.key, image=decode_image(s.png, 32), label=s.label, text="", meta={})
                for s in (synthetic.render(0, "base", split, i, label=i % C, num_classes=C)
                          for i in range(n))]

    shots, test = render("fewshot", 16 * C), render("test", 60 * C)
    torch.manual_seed(0)
    loaded = load_clip("ViT-Micro-4-p8-32")  # untrained: its features still carry colour, shape
    probe = make_defense("linear_probe", loaded, names, ["a photo of a {}."])
    tp = probe.train_params()
    assert (tp.optimizer, tp.lr, tp.momentum, tp.batch_size, tp.epochs, tp.schedule) == \
        ("sgd", 0.01, 0.9, 32, 40, "constant")
    train_defense(probe, tp, epoch_batches(shots, tp.batch_size, 0), -(-len(shots) // 32))
    x = torch.stack([s.image for s in test]).float() / 255
    y = torch.tensor([s.label for s in test])
    with torch.no_grad():
        acc_probe = float((probe.head(probe.encode(x)).argmax(-1) == y).float().mean())
        f = probe.encode(torch.stack([s.image for s in shots]).float() / 255)
        ft = probe.encode(x)
    y_train = torch.tensor([s.label for s in shots])
    mu, sd = f.mean(0), f.std(0) + 1e-6
    lr = nn.Linear(f.shape[1], C)
    opt = torch.optim.LBFGS(lr.parameters(), max_iter=1000, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lr((f - mu) / sd), y_train) \
            + 1e-3 * lr.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc_lr = float((lr((ft - mu) / sd).argmax(-1) == y).float().mean())
    assert acc_lr > 1.5 / C  # the features do carry the classes
    assert abs(acc_probe - acc_lr) <= 0.05, (acc_probe, acc_lr)


def test_linear_probe_is_not_applicable_to_trojvqa(backdoored, smoke_root, tmp_path):
    from conftest import SMOKE, run_job

    out = tmp_path / "defend.json"
    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model",
                backdoored["trojvqa"], "--defense", "linear_probe", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "not applicable: a linear probe has no text side" in r.stdout
    assert "no text side" in json.loads(out.read_text())["not_applicable"]


def test_every_defense_declares_itself():
    from rvpt.defenses import DEFENSES

    for name, cls in DEFENSES.items():
        d = cls.declaration()
        assert d["data"] in ("none", "fewshot", "pairs", "suspect_pairs")
        assert d["classifies"] in ("text", "head")
        assert set(d["space"]) <= set(cls.Params.model_fields), name
        assert (d["trained"] == "nothing") == (d["data"] == "none"), name
        cls.recipe_for(cls.parse())  # the recipe is a valid TrainParams


if __name__ == "__main__":  # the sweep's driver for the toy defense (its workers import this file)
    import test_defenses  # noqa: F401  registers Toy under this module's importable name
    from pipeline.cli import main
    from pipeline.jobs import sweep

    sys.exit(main("sweep with the toy defense", sweep))
