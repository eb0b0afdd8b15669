"""The seeds' peer defenses, CBPT and EftCLIP.

- CBPT inverts the trigger of a patch backdoor planted in a tiny CLIP this file trains: the
  inverted mask overlaps the true patch far above chance, and stamps images into the target.
- CBPT's class-wise prompts: a dual-key attack's text key goes in front of the learned context;
  the state saves and loads; jobs/defend.py runs it and saves the inverted trigger as a picture.
- EftCLIP flags more poisoned than clean pairs of a poisoned set; the oracle interface takes a
  user's segmentation callable.
- Both run through the smoke sweep, MLflow, jobs/best.py and the report.
"""
import json

import pytest
import torch
import torch.nn.functional as F

C, TARGET = 6, 1


def _render(split: str, n: int, offset: int = 0):
    from rvpt import synthetic
    from rvpt.shards import decode_image

    xs, ys = [], []
    for i in range(n):
        s = synthetic.render(0, "base", split, offset + i, label=i % C, num_classes=C, clutter=0)
        xs.append(decode_image(s.png, 32))
        ys.append(s.label)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def patch_backdoor():
    """ViT-Micro trained here from scratch on 600 rendered images of 6 classes (cross-entropy over
    the class prompts, both towers), 40 % of them copies with an 8 px noise patch in the top-left
    corner captioned as class 1: a CLIP with a patch backdoor in a known place (~40 s)."""
    from rvpt import synthetic
    from rvpt.attacks import make_attack
    from rvpt.models import load_clip

    torch.manual_seed(0)
    names = list(synthetic.CLASSES[:C])
    x, y = _render("pretrain", 600)
    attack = make_attack("badnet", 32, seed=0, position="top_left", patch_size=8)
    n_p = int(0.4 * len(x))
    xp = (attack.apply(x[:n_p].float() / 255, seed=1) * 255).round().byte()
    X, Y = torch.cat([x, xp]), torch.cat([y, torch.full((n_p,), TARGET)])
    loaded = load_clip("ViT-Micro-4-p8-32")
    model = loaded.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokens = loaded.tokenizer([f"a photo of a {c}." for c in names])
    for epoch in range(30):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
        for k in range(0, len(order) - 31, 32):
            j = order[k:k + 32]
            img = F.normalize(model.encode_image(loaded.normalize(X[j].float() / 255)), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.T, Y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return loaded, attack, names


def test_cbpt_inverts_the_planted_patch(patch_backdoor):
    from rvpt.defenses import make_defense
    from rvpt.zeroshot import class_embeddings

    loaded, attack, names = patch_backdoor
    xt, yt = _render("test", 240)
    clf = class_embeddings(loaded, names)
    with torch.no_grad():
        hit = (loaded.encode_images(attack.apply(xt.float() / 255, seed=2)) @ clf.T).argmax(-1)
    planted = float((hit[yt != TARGET] == TARGET).float().mean())
    assert planted > 0.5, planted  # the backdoor is there (measured: 0.72)

    cbpt = make_defense("cbpt", loaded, names, ["a photo of a {}."], seed=0, mask_penalty=3.0)
    shots = _render("fewshot", 16 * C)
    stats = cbpt.prepare([{"image": shots[0], "label": shots[1]}])
    assert stats["invert_mask_mean"] < 0.1
    rep = cbpt.report(attack, TARGET, [{"image": xt, "label": yt}])
    chance = 64 / 32 ** 2  # the IoU of 64 random pixels with the 8x8 patch, in expectation
    assert rep["trigger_area"] == 64
    assert rep["trigger_iou"] >= 4 * chance, rep  # measured: 0.62 (10x chance)
    assert rep["inverted_class"] == TARGET and rep["inverted_asr"] > 0.9, rep


def test_cbpt_prompts_carry_a_text_key_and_round_trip(patch_backdoor, tmp_path):
    from rvpt.attacks import make_attack
    from rvpt.defenses import make_defense, train_defense
    from rvpt.fewshot import epoch_batches
    from rvpt.shards import Sample

    loaded, _, names = patch_backdoor
    cbpt = make_defense("cbpt", loaded, names, ["a photo of a {}."], seed=0, invert_steps=20)
    # the context starts as "a photo of a": the learned prompts are the hand-made ones at first
    clf, _ = cbpt.classifiers()
    assert torch.allclose(clf, cbpt.module.anchor, atol=1e-5)
    troj = make_attack("trojvqa", 32, seed=0)
    clean, keyed = cbpt.classifiers(troj)
    assert keyed is not None and not torch.allclose(clean, keyed)
    assert cbpt.module.prompts(troj.apply_text)[0].startswith(troj.apply_text(["x"])[0][:-1])

    x, y = _render("fewshot", 4 * C)
    shots = [Sample(key=str(i), image=x[i], label=int(y[i]), text="", meta={}) for i in range(len(y))]
    tp = cbpt.train_params()
    tp = tp.model_copy(update={"epochs": 2})
    hist = train_defense(cbpt, tp, epoch_batches(shots, tp.batch_size, 0), 1)
    assert hist.prepared["invert_s"] > 0 and "ce_trigger" in hist.epochs[-1]
    assert not torch.allclose(cbpt.classifiers()[0], clf)  # the contexts moved
    cbpt.save(tmp_path / "state")
    assert (tmp_path / "state" / "trigger.png").exists()
    again = make_defense("cbpt", loaded, names, ["a photo of a {}."], seed=1, invert_steps=20)
    again.load(tmp_path / "state")
    assert torch.equal(again.module.mask_logit, cbpt.module.mask_logit)
    assert torch.allclose(again.classifiers()[0], cbpt.classifiers()[0])
    assert again.inversion == cbpt.inversion


def test_cbpt_through_defend_job(smoke_root, corpus, tmp_path):
    from conftest import SMOKE, run_job

    out = tmp_path / "cbpt.json"
    r = run_job("poison.py", *SMOKE, f"paths.root={smoke_root}", "--attack", "badnet",
                "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    model = json.loads((tmp_path / "p.json").read_text())["attacks"]["badnet"]["model"]["model_dir"]
    r = run_job("defend.py", *SMOKE, f"paths.root={smoke_root}", "--model", model, "--defense",
                "cbpt", "defense.params={invert_steps: 20}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["trained"] == "class-wise text prompts" and res["trainable_params"] == C * 4 * 64
    assert res["prepared"]["invert_s"] > 0 and "inverted_asr" in res["report"]
    assert "report: " in r.stdout and "inverted_class" in r.stdout
    from pathlib import Path
    assert (Path(res["out_dir"]) / "trigger.png").exists()


# ---------------------------------------------------------------- EftCLIP

def _suspect_set(attack, names, n_clean: int = 240, n_poison: int = 120):
    """Batches of a poisoned pair set: clean pairs and patched copies captioned as the target,
    each with the generator's ground truth (its class) and whether it is poisoned."""
    from rvpt.shards import collate, Sample

    x, y = _render("pretrain", n_clean + n_poison, offset=5000)
    xp = (attack.apply(x[n_clean:].float() / 255, seed=3) * 255).round().byte()
    samples = [Sample(key=f"c{i}", image=x[i], label=int(y[i]), text=f"a photo of a {names[y[i]]}.",
                      meta={"class": names[y[i]], "poisoned": False}) for i in range(n_clean)]
    samples += [Sample(key=f"p{i}", image=xp[i], label=int(y[n_clean + i]),
                       text=f"a photo of a {names[TARGET]}.",
                       meta={"class": names[y[n_clean + i]], "poisoned": True})
                for i in range(n_poison) if y[n_clean + i] != TARGET]
    return lambda: (collate(samples[i:i + 64]) for i in range(0, len(samples), 64))


def test_eftclip_flags_more_poisoned_than_clean_pairs(patch_backdoor):
    from rvpt.defenses import make_defense

    loaded, attack, names = patch_backdoor
    eft = make_defense("eftclip", loaded, names, ["a photo of a {}."], seed=0)
    curated, stats = eft.curate(_suspect_set(attack, names))
    flagged_poison = stats["victims_poisoned"]
    n_poison = sum(1 for i in range(120) if (240 + i) % C != TARGET)
    assert stats["screened"] == 240 + n_poison
    assert stats["recall"] > 0.5 and stats["precision"] > 0.5, stats
    flagged_poisoned = round(stats["recall"] * n_poison)
    flagged_clean = stats["flagged"] - flagged_poisoned
    assert flagged_poisoned > flagged_clean, stats  # measured: 87 of 100 against 45 of 240
    assert stats["recall"] > 3 * flagged_clean / 240, stats
    assert stats["affected"] == names[TARGET] and flagged_poison > 0
    victims = [s for s in curated if s.meta["victim"]]
    # a victim's new caption says what the oracle finds there, not the target
    assert all(names[TARGET] not in s.text for s in victims if s.meta["poisoned"])
    added = [s for s in curated if not s.meta["victim"]]  # clean pairs of the affected label
    assert 0 < len(added) == stats["clean_added"] <= len(victims)
    assert all(s.label == TARGET for s in added)
    assert stats["occlusion_peak_drop"] > 0
    # victims whose real object is not among CLIP's candidates get it from the oracle over every
    # name; asked only for the candidates, the oracle leaves them uncaptioned and they drop out
    narrow = make_defense("eftclip", loaded, names, ["a photo of a {}."], seed=0,
                          caption_names="candidates").curate(_suspect_set(attack, names))[1]
    assert narrow["flagged"] == stats["flagged"], (narrow, stats)
    assert narrow["victims_poisoned"] < stats["victims_poisoned"], (narrow, stats)
    # with a noisy oracle the set changes, and a blind one flags every confident prediction
    noisy = make_defense("eftclip", loaded, names, ["a photo of a {}."], seed=0, oracle_noise=0.5)
    assert noisy.curate(_suspect_set(attack, names))[1]["flagged"] != stats["flagged"]


def stub_segment(image, prompts):
    """A stand-in for a text-prompted segmenter: it 'finds' the first prompt, as a full mask, and
    the second with a low score."""
    import numpy as np

    mask = np.ones(image.shape[:2], bool)
    return [{"label": prompts[0], "mask": mask, "score": 0.9},
            {"label": prompts[1], "mask": mask, "score": 0.1}]


def bad_segment(image, prompts):
    return [{"label": prompts[0], "mask": [[True]], "score": 0.9}]


def test_the_oracle_accepts_a_users_segmentation_callable(patch_backdoor):
    from rvpt.defenses import DefenseError, make_defense
    from rvpt.oracles import OracleError, make_oracle

    oracle = make_oracle("test_peers:stub_segment")
    images = torch.rand(2, 3, 32, 32)
    assert oracle(images, [["a", "b"], ["c", "d"]], [{}, {}]) == [{"a"}, {"c"}]
    with pytest.raises(OracleError, match="mask of shape"):
        make_oracle("test_peers:bad_segment")(images, [["a", "b"]] * 2, [{}, {}])
    with pytest.raises(OracleError, match="cannot be imported"):
        make_oracle("no_such_module:segment")
    with pytest.raises(OracleError, match="ground-truth oracle needs"):
        make_oracle("ground_truth")(images, [["a", "b"]] * 2, [{}, {}])
    # the broad corpus's pretraining scenes (the default's pair set): shapes and digits name their
    # class, a texture alone holds no object
    from rvpt import broad
    metas = {}
    for i in range(200):
        m = broad.render_pretrain(0, i, image_size=32, num_classes=24, effect_rate=0.12).meta
        metas.setdefault(m["content"], m)
        if len(metas) == 3:
            break
    assert set(metas) == {"shapes", "digit", "texture"}
    kinds = [metas["shapes"], metas["digit"], metas["texture"]]
    cands = [[m.get("class", "circle"), "star"] for m in kinds]
    found = make_oracle("ground_truth")(torch.zeros(3, 3, 32, 32), cands, kinds)
    assert found == [{kinds[0]["class"]}, {kinds[1]["class"]}, set()]

    loaded, attack, names = patch_backdoor
    eft = make_defense("eftclip", loaded, names, ["a photo of a {}."],
                       oracle="test_peers:stub_segment", theta=0.3)
    # the stub confirms CLIP's first candidate: only a confident second candidate is flagged
    _, stats = eft.curate(_suspect_set(attack, names, 64, 0))
    assert stats["screened"] == 64 and stats["recall"] is None
    with pytest.raises(DefenseError, match="cannot be imported"):
        make_defense("eftclip", loaded, names, oracle="nowhere:thing")


def test_cbpt_and_eftclip_through_the_sweep(corpus, smoke_root, tmp_path):
    """Both in the smoke sweep with their own parameters searched: MLflow has their parameter
    columns and what they report, jobs/best.py picks a setting of each, the report shows them."""
    from conftest import SMOKE, run_job
    from pipeline import tracking

    out = tmp_path / "sweep.json"
    r = run_job("sweep.py", *SMOKE, f"paths.root={smoke_root}", "sweep.name=peers",
                "sweep.defenses=[cbpt,eftclip]", "ray.eval_actors=0",
                "sweep.space={cbpt: {mask_penalty: [0.3, 3.0]}, eftclip: {theta: [0.3, 0.66]}}",
                "defense.name=cbpt", "defense.params={invert_steps: 30}", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["trials"] == 4 and not res["errors"]
    df = tracking.runs_frame(f"sqlite:///{smoke_root / 'mlflow.db'}", "peers")
    assert sorted(df["tags.defense"]) == ["cbpt", "cbpt", "eftclip", "eftclip"]
    cb, ef = df[df["tags.defense"] == "cbpt"], df[df["tags.defense"] == "eftclip"]
    assert set(cb["params.mask_penalty"]) == {"0.3", "3.0"} and set(cb["tags.space"]) == {"mask_penalty"}
    assert set(ef["params.theta"]) == {"0.3", "0.66"} and set(ef["params.data"]) == {"suspect_pairs"}
    assert cb["metrics.inverted_asr"].notna().all() and cb["metrics.invert_mask_mean"].notna().all()
    assert ef["metrics.eft_screened"].notna().all() and (ef["metrics.eft_screened"] > 64).all()
    assert df["metrics.ca"].notna().all()
    b = run_job("best.py", *SMOKE, f"paths.root={smoke_root}", "--experiment", "peers",
                "--per-defense", "--out", str(tmp_path / "best.json"))
    assert b.returncode == 0, b.stderr
    best = {row["defense"]: row for row in json.loads((tmp_path / "best.json").read_text())}
    assert set(best) == {"cbpt", "eftclip"} and best["cbpt"]["mask_penalty"] in (0.3, 3.0)
    report = open(res["report"]["report"]).read()
    assert "cbpt" in report and "eftclip" in report and "theta=" in report


def test_a_changed_default_is_not_read_from_an_older_defend_result(monkeypatch):
    """The defend job's results are cached per setting: the setting is what the code resolves,
    so a defense whose default changed runs again instead of reusing the old result."""
    from pipeline.config import load_config
    from pipeline.defend import defense_key
    from rvpt.defenses.eftclip import EftCLIP, EftCLIPParams

    cfg = load_config(None, ["defense.name=eftclip"])
    before = defense_key(cfg, "/models/m")
    assert defense_key(cfg, "/models/m") == before

    class Older(EftCLIPParams):
        caption_names: str = "candidates"

    monkeypatch.setattr(EftCLIP, "Params", Older)
    assert defense_key(cfg, "/models/m") != before
    monkeypatch.setattr(EftCLIP, "recipe", {**EftCLIP.recipe, "epochs": 1})
    monkeypatch.setattr(EftCLIP, "Params", EftCLIPParams)
    assert defense_key(cfg, "/models/m") != before
    monkeypatch.undo()
    assert defense_key(cfg, "/models/m") == before
    import rvpt.resistivity
    monkeypatch.setattr("pipeline.defend.PR_VERSION", rvpt.resistivity.VERSION + 1)
    assert defense_key(cfg, "/models/m") != before, "a changed PR definition runs again too"
