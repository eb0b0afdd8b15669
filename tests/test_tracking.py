"""MLflow tracking (one run per trial, idempotent), selection rules, jobs/best.py and jobs/report.py
on a small fake sweep in a temporary sqlite store."""
import csv
import json
import math

import pytest
from conftest import run_job

from pipeline import tracking
from pipeline.select import RULES, score

EXPERIMENT = "sweep-test"
# Per attack, four settings (defense, depth) with metrics chosen so that the rules disagree:
#   ca -> the 1st, asr -> the 2nd, combo (weight 1) -> the 3rd; combo with weight 0.05 -> the 1st.
VALUES = [dict(ca=0.90, asr=0.80), dict(ca=0.50, asr=0.00), dict(ca=0.85, asr=0.10),
          dict(ca=0.80, asr=0.30)]
SETTINGS = {"badnet": [("vpt", 1), ("vpt", 3), ("rvpt", 1), ("rvpt", 3)],
            "blended": [("rvpt", 3), ("vpt", 1), ("vpt", 3), ("rvpt", 1)]}
EXPECTED = {  # (rule, weight) -> attack -> (defense, depth)
    ("ca", 1.0): {a: s[0] for a, s in SETTINGS.items()},
    ("asr", 1.0): {a: s[1] for a, s in SETTINGS.items()},
    ("combo", 1.0): {a: s[2] for a, s in SETTINGS.items()},
    ("combo", 0.05): {a: s[0] for a, s in SETTINGS.items()},
}
LAYERS = 4


def _trial(attack, defense, depth, seed, ca, asr):
    name = f"{attack}-{defense}-d{depth}-s{seed}"
    tags = {"attack": attack, "dataset": "syn", "defense": defense, "model": "tiny",
            "trial_key": f"key-{name}", "sweep": EXPERIMENT, "space": "depth,length,alpha"}
    params = {"defense": defense, "depth": depth, "length": 8, "alpha": 2.0, "shots": 4,
              "seed": seed, "epochs": 1, "lr": 0.01, "unset": None}
    metrics = {"ca": ca, "asr": asr, "asr_all": asr + 0.01, "pa": 1 - asr, "pr_mean": 0.5 + depth / 10,
               "val_ca": ca - 0.02, "score": ca, "nan_metric": math.nan, "none_metric": None}
    for pert in ("noise", "trigger"):
        for layer in range(LAYERS):
            metrics[f"pr/{pert}/{layer}"] = 1 - 0.1 * layer * (1 if pert == "noise" else depth)
        metrics[f"pr/{pert}"] = 0.8
    return name, tags, params, metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with 9 finished runs: 2 attacks x 2 defenses x 2 depths, plus a second seed of
    badnet/rvpt/depth 1 with the same metrics (a tie the earlier run wins)."""
    root = tmp_path_factory.mktemp("mlflow")
    (root / "prompts").mkdir()
    (root / "prompts" / "prompts.json").write_text("{}")
    (root / "config.yaml").write_text("seed: 0\n")
    uri = tracking.default_uri(root)
    ids = {}
    trials = [(a, d, depth, 0, v) for a, s in SETTINGS.items() for (d, depth), v in zip(s, VALUES)]
    trials.append(("badnet", "rvpt", 1, 1, VALUES[2]))
    for attack, defense, depth, seed, v in trials:
        name, tags, params, metrics = _trial(attack, defense, depth, seed, **v)
        ids[name] = tracking.log_trial(uri, EXPERIMENT, name, tags, params, metrics,
                                       {"config.yaml": root / "config.yaml",
                                        "prompts": root / "prompts"})
    return {"root": root, "uri": uri, "ids": ids}


def test_score_rules():
    m = {"ca": 0.8, "asr": 0.3}
    assert score(m, "ca") == 0.8
    assert score(m, "asr") == -0.3
    assert score(m, "combo") == pytest.approx(0.5)
    assert score(m, "combo", weight=2.0) == pytest.approx(0.2)
    for bad in ({}, {"ca": None, "asr": None}, {"ca": math.nan, "asr": math.nan}):
        for rule in RULES:
            assert score(bad, rule) == -math.inf
    assert score({"ca": 0.7}, "ca") == 0.7 and score({"ca": 0.7}, "combo") == -math.inf
    with pytest.raises(ValueError, match="unknown selection rule 'pa'; known: ca, asr, combo"):
        score(m, "pa")


def test_log_trial_schema_and_idempotent(store):
    uri = store["uri"]
    df = tracking.runs_frame(uri, EXPERIMENT)
    assert len(df) == 9 and set(df["status"]) == {"FINISHED"}
    # logging a trial again (same trial_key) returns the same run and logs nothing
    name, tags, params, metrics = _trial("badnet", "vpt", 1, 0, **VALUES[0])
    again = tracking.log_trial(uri, EXPERIMENT, name, tags, params, {"ca": 0.0})
    assert again == store["ids"][name]
    df = tracking.runs_frame(uri, EXPERIMENT)
    assert len(df) == 9
    row = df.set_index("run_id").loc[again]
    assert row["metrics.ca"] == 0.90 and row["tags.mlflow.runName"] == name
    assert row["params.depth"] == "1" and row["tags.trial_key"] == f"key-{name}"
    assert row[f"metrics.pr/trigger/{LAYERS - 1}"] == pytest.approx(0.7)
    assert "metrics.nan_metric" not in df and "metrics.none_metric" not in df
    assert "params.unset" not in df
    # artifacts: the file at its key, the directory as a folder; under the store, not the cwd
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert {a.path for a in client.list_artifacts(again)} == {"config.yaml", "prompts"}
    assert [a.path for a in client.list_artifacts(again, "prompts")] == ["prompts/prompts.json"]
    assert row["artifact_uri"].startswith(str(store["root"].resolve() / "mlartifacts"))
    # find_run
    assert tracking.find_run(uri, EXPERIMENT, f"key-{name}").info.run_id == again
    assert tracking.find_run(uri, EXPERIMENT, "no-such-key") is None
    assert tracking.find_run(uri, "no-such-experiment", f"key-{name}") is None


@pytest.mark.parametrize("rule,weight", sorted(EXPECTED))
def test_best_per_group(store, rule, weight):
    df = tracking.runs_frame(store["uri"], EXPERIMENT)
    best = tracking.best_per_group(df, rule, weight)
    # the searched params (tags.space) become columns of their own
    assert list(best.columns) == list(tracking.BEST_COLUMNS) + ["alpha", "depth", "length"]
    assert set(best["setting"]) <= {f"depth={d} length=8 alpha=2.0" for d in (1, 3)}
    assert list(best["attack"]) == ["badnet", "blended"] and set(best["dataset"]) == {"syn"}
    got = {r["attack"]: (r["defense"], r["depth"]) for r in tracking.records(best)}
    assert got == EXPECTED[(rule, weight)]
    if (rule, weight) == ("combo", 1.0):  # badnet's two tied seeds: the earlier run wins
        assert best.iloc[0]["run_name"] == "badnet-rvpt-d1-s0"
        assert best.iloc[0]["score"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="known: ca, asr, combo"):
        tracking.best_per_group(df, "oracle")


def test_missing_experiment_and_store(store, tmp_path):
    with pytest.raises(tracking.TrackingError) as e:
        tracking.runs_frame(store["uri"], "nope")
    msg = str(e.value)
    assert "'nope'" in msg and EXPERIMENT in msg and "\n" not in msg
    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(tracking.TrackingError, match="no MLflow store"):
        tracking.runs_frame(f"sqlite:///{missing}", EXPERIMENT)
    assert not missing.exists()
    assert tracking.default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.default_uri(tmp_path).startswith("sqlite:////")


def _expected_rows(rule, weight=1.0):
    return [(a, *EXPECTED[(rule, weight)][a]) for a in ("badnet", "blended")]


def test_best_job(store, tmp_path, capsys):
    out = tmp_path / "best.json"
    r = run_job("best.py", "--tracking-uri", store["uri"], "--experiment", EXPERIMENT,
                "--rule", "asr", "--out", str(out), f"paths.root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "badnet" in r.stdout and "blended" in r.stdout and "ASR %" in r.stdout
    recs = json.loads(out.read_text())
    assert [(x["attack"], x["defense"], x["depth"]) for x in recs] == _expected_rows("asr")
    assert recs[0]["ca"] == 0.5 and recs[0]["run_id"] and recs[0]["run_name"]
    _check_csv(store, tmp_path, capsys)


def _check_csv(store, tmp_path, capsys):
    """jobs/best.py's code in process (a second subprocess would cost another torch import):
    CSV output, the combo weight, a missing experiment."""
    from pipeline.best import add_args, best
    from pipeline.cli import main

    csv_out = tmp_path / "best.csv"
    argv = ["--tracking-uri", store["uri"], "--experiment", EXPERIMENT, "--rule", "combo",
            "--out", str(csv_out), f"paths.root={tmp_path}"]
    assert main("best", best, argv=argv, extra_args=add_args) == 0
    rows = list(csv.DictReader(csv_out.open()))
    assert [(x["attack"], x["defense"], int(x["depth"])) for x in rows] == _expected_rows("combo")
    assert main("best", best, argv=argv + ["--weight", "0.05"], extra_args=add_args) == 0
    rows = list(csv.DictReader(csv_out.open()))
    assert [(x["attack"], x["defense"], int(x["depth"])) for x in rows] == _expected_rows("combo", 0.05)

    # a missing experiment is one line on stderr, exit status 2
    capsys.readouterr()
    assert main("best", best, argv=["--tracking-uri", store["uri"], "--experiment", "nope"],
                extra_args=add_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no experiment 'nope'") and err.count("\n") == 1
    assert EXPERIMENT in err


def test_report_job(store, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.report import add_args, report, seed_means

    out = tmp_path / "report.json"
    argv = ["--tracking-uri", store["uri"], "--experiment", EXPERIMENT, "--rule", "combo",
            "--out", str(out), f"paths.root={tmp_path}"]
    assert main("report", report, argv=argv, extra_args=add_args) == 0
    res = json.loads(out.read_text())
    folder = tmp_path / "reports" / EXPERIMENT  # the default --dir
    assert res["report"] == str(folder / "report.md")
    assert str(folder / "report.md") in capsys.readouterr().out
    text = (folder / "report.md").read_text()
    for word in ("badnet", "blended", "rvpt", "vpt", "asr_vs_ca.png", "pr_per_layer.png", "combo"):
        assert word in text
    for png in ("asr_vs_ca.png", "pr_per_layer.png"):
        data = (folder / png).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    # seeds that share every other param are averaged in the per-attack tables
    means = seed_means(tracking.runs_frame(store["uri"], EXPERIMENT), "combo")
    row = means[(means["attack"] == "badnet") & (means["defense"] == "rvpt")].iloc[0]
    assert row["seeds"] == 2 and row["params.depth"] == "1" and row["ca"] == pytest.approx(0.85)


def test_a_trial_stopped_early_is_recorded_but_never_chosen(tmp_path):
    """The sweep's driver callback records a trial the scheduler stopped (no test metrics) as a run
    tagged ``stopped_early``; best_per_group and the report leave it out of their tables."""
    from pipeline.config import load_config
    from pipeline.report import write_report
    from pipeline.sweep import SweepCallback, identify, run_record, settings

    cfg = load_config("configs/smoke.yaml")
    uri = tracking.default_uri(tmp_path)
    base = {"cfg": cfg.model_dump(mode="json"), "uri": uri, "root": str(tmp_path),
            "models": {"badnet": {"synthetic": "/models/bd"}},
            "datasets": {"synthetic": {"corpus": "/corpus", "fewshot_split": "fewshot",
                                       "test_split": "test"}}}
    done, stopped = ({"setting": s} for s in settings(cfg)[:2])
    c, setting, spec, key = identify(done, base)
    tags, params = run_record(c, setting, spec, key, "/models/bd")
    tracking.log_trial(uri, cfg.sweep.name, "run_trial_00000", tags, params,
                       {"ca": 0.4, "asr": 0.2, "val_ca": 0.5})

    class Trial:
        config = stopped
        last_result = {"val_ca": 0.9, "training_iteration": 1}

        def __str__(self):
            return "run_trial_00001"

    cb = SweepCallback(base)
    cb.on_trial_complete(0, [], Trial())
    # a trial that finished (its last report has its trial_key) logged itself: nothing more is added
    Trial.config, Trial.last_result = done, {"trial_key": key, "ca": 0.4}
    cb.on_trial_complete(0, [], Trial())

    df = tracking.runs_frame(uri, cfg.sweep.name)
    assert len(df) == 2
    # the stopped trial's record is kept in the sweep's ledger too, and it reached MLflow
    ledger = tracking.Ledger(str(tmp_path), cfg.sweep.name)
    assert ledger.keys() == [identify(stopped, base)[3]] and ledger.pending() == []
    row = df[df[f"tags.{tracking.STOPPED_TAG}"].notna()].iloc[0]
    assert row["tags.trial_key"] == identify(stopped, base)[3] != key
    assert row["metrics.val_ca"] == 0.9 and row["metrics.epochs_run"] == 1
    assert math.isnan(row["metrics.ca"]) and row["params.length"] == "4" and params["length"] == 2
    assert row["params.depth"] == "3" and row["tags.attack"] == "badnet"
    best = tracking.best_per_group(df, "ca")  # the stopped run's higher val_ca does not count
    assert list(best["run_name"]) == ["run_trial_00000"]
    res = write_report(df, tmp_path / "report", cfg.sweep.name, "ca", uri=uri)
    assert res["runs"] == 2 and res["evaluated"] == 1
    assert "2: 1 evaluated, 1 stopped early" in (tmp_path / "report" / "report.md").read_text()
