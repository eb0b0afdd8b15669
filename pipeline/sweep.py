"""Ray Tune sweep: {attack x dataset x defense} x a search over prompt depth, length and alpha.

Each trial is a Tune function trainable that
1. returns the recorded result at once when MLflow already holds a finished run with the same
   ``trial_key`` (a re-run sweep adds no runs and repeats no training);
2. draws the few-shot set with Ray Data and runs the defense with Ray Train (``TorchTrainer``;
   per-epoch ``val_ca`` reaches Tune through ``TuneReportCallback`` for ASHA);
3. evaluates CA / ASR / ASR_all / PA over the full test shards with Ray Data actors, and PR;
4. logs one MLflow run (params, tags, metrics, resolved config and prompts as artifacts).

The driver builds whatever is missing first (corpus, clean model, backdoored models), and an
interrupted sweep resumes with ``Tuner.restore`` without repeating finished trials.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from .config import Config, ConfigError, config_hash
from .session import ray_init  # noqa: F401 (re-exported: benchmarks use it)

REUSED = "reused"
DATA_BUNDLE_CPUS = 1.0  # free CPUs budgeted per concurrent trial for its Ray Data work


# ---------------------------------------------------------------- Ray

def concurrency(cfg: Config) -> int:
    """Trials at once: the cluster's CPUs over what one trial holds (its Train workers plus a
    share for reading data), unless the config says."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    import ray

    r = cfg.ray
    if r.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        per = r.num_workers * (r.gpus_per_worker or 1)
        return max(1, int(gpus // per))
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // (r.num_workers * r.cpus_per_worker + DATA_BUNDLE_CPUS + 0.01)))


# ---------------------------------------------------------------- what a trial is

def settings(cfg: Config) -> list[dict]:
    """The grid: every group (attack x dataset x defense) with every (depth, length, alpha); VPT
    takes alpha = 0 only."""
    out = []
    sp = cfg.sweep.space
    for attack in cfg.sweep.attacks:
        for dataset in cfg.sweep.datasets:
            for defense in cfg.sweep.defenses:
                alphas = [0.0] if defense == "vpt" else (sp.alpha if defense == "rvpt" else [None])
                for depth in sp.depth:
                    for length in sp.length:
                        for alpha in alphas:
                            out.append({"attack": attack, "dataset": dataset, "defense": defense,
                                        "depth": depth, "length": length, "alpha": alpha})
    return out


def trial_config(base: Config, setting: dict) -> Config:
    """The config one trial runs: the defense and its searched parameters set."""
    cfg = base.model_copy(deep=True)
    cfg.defense.name = setting["defense"]
    params = dict(cfg.defense.params)
    if setting["defense"] in ("rvpt", "vpt"):
        params.update(depth=int(setting["depth"]), length=int(setting["length"]),
                      alpha=float(setting["alpha"] or 0.0))
    cfg.defense.params = params
    if cfg.sweep.epochs:
        cfg.defense.train.epochs = cfg.sweep.epochs
    return cfg


def trial_key(cfg: Config, model: str, corpus: str, spec: dict) -> str:
    return config_hash({"trial": 1, "model": model, "corpus": corpus, "spec": spec,
                        "defense": cfg.defense, "seed": cfg.seed,
                        "ensemble": cfg.eval.prompt_ensemble, "pr": cfg.defense.pr_images})


def _scalar_metrics(m: dict) -> dict:
    return {k: float(v) for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def run_trial(config: dict, base: dict) -> None:
    """The Tune function trainable (runs in a Ray actor)."""
    import torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rvpt.defenses import make_defense
    from rvpt.models import load_clip
    from rvpt.resistivity import perturbation_resistivity
    from rvpt.shards import iter_batches, iter_samples, split_urls

    from . import select, tracking
    from .data import corpus_classes, few_shot_split, read_split
    from .evaluation import evaluate_distributed
    from .train import make_trainer

    torch.set_num_threads(1)
    setting = config.get("setting") or {
        **config["group"], "depth": config["depth"], "length": config["length"],
        "alpha": config["alpha"] if config["group"]["defense"] == "rvpt" else 0.0}
    cfg = trial_config(Config.model_validate(base["cfg"]), setting)
    spec = base["datasets"][setting["dataset"]]
    corpus, model = spec["corpus"], base["models"][setting["attack"]]
    key = trial_key(cfg, model, corpus, spec)
    uri, exp = base["uri"], cfg.sweep.name
    existing = tracking.find_run(uri, exp, key)
    if existing is not None:
        tune.report({**existing.data.metrics, "trial_key": key, REUSED: 1.0})
        return
    ctx = tune.get_context()
    info = corpus_classes(corpus)
    image_size = load_clip(checkpoint=model).image_size
    d = cfg.defense
    train_ds, val_ds = few_shot_split(corpus, spec["fewshot_split"], d.train.shots, image_size,
                                      cfg.seed)
    n_train = train_ds.count()
    trainer = make_trainer(cfg, model, corpus, train_ds, val_ds, n_train,
                           name=f"train-{ctx.get_trial_id()}", storage_path=base["storage"],
                           callbacks=[TuneReportCallback()])
    start = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - start
    out = Path(base["root"]) / "sweeps" / exp / key
    shutil.rmtree(out, ignore_errors=True)
    state = out / "state"
    with result.checkpoint.as_directory() as cdir:
        shutil.copytree(cdir, state)
    r = cfg.ray
    if not r.eval_actors or d.pr_images:  # the defended model in this process
        from .backdoor import evaluate_backdoor, load_backdoored
        loaded, attack, target, _ = load_backdoored(model, None, info.names)
        defense = make_defense(d.name, loaded, info.names, info.templates, **d.params)
        defense.load(state)
    if r.eval_actors:
        metrics = evaluate_distributed(corpus, spec["test_split"], model, image_size, info.names,
                                       info.templates, d.name, d.params, str(state),
                                       cfg.eval.prompt_ensemble, r.eval_actors, r.eval_cpus,
                                       (r.gpus_per_worker or 1) if r.use_gpu else 0.0)
    else:  # in this trial's process: a small machine, a local corpus (README, "Sweeps")
        metrics = evaluate_backdoor(cfg, loaded, corpus, attack, target, spec["test_split"],
                                    encode=defense.encode)
        metrics.pop("split", None)
        metrics.pop("skipped", None)
    counts = metrics.pop("counts")
    if d.pr_images:
        if r.eval_actors:
            batches = ({"image": torch.from_numpy(b["image"])} for b in
                       read_split(corpus, spec["test_split"], image_size).limit(d.pr_images)
                       .iter_batches(batch_size=128, batch_format="numpy"))
        else:
            batches = iter_batches(iter_samples(split_urls(corpus, spec["test_split"]),
                                                image_size), 128)
        metrics.update(perturbation_resistivity(loaded, batches, getattr(defense, "prompts", None),
                                                attack, seed=cfg.seed, max_images=d.pr_images))
    metrics["val_ca"] = json.loads((state / "train_state.json").read_text()).get("val_ca")
    metrics["train_s"] = train_s
    metrics["n_test"] = counts["n"]
    metrics["score"] = select.score(metrics, cfg.sweep.select.rule, cfg.sweep.select.weight)
    cfg.dump(out / "config.yaml")
    tags = {"attack": setting["attack"], "dataset": setting["dataset"], "defense": d.name,
            "model": cfg.model.name, "trial_key": key, "sweep": exp}
    params = {"defense": d.name, **d.params, "shots": d.train.shots, "seed": cfg.seed,
              "epochs": d.train.epochs, "lr": d.train.lr, "batch_size": d.train.batch_size,
              "workers": r.num_workers, "model_dir": model, "corpus": corpus}
    tracking.log_trial(uri, exp, ctx.get_trial_name(), tags, params, _scalar_metrics(metrics),
                       {"config.yaml": str(out / "config.yaml"), "prompts": str(state)})
    tune.report({**_scalar_metrics(metrics), "trial_key": key, REUSED: 0.0})


# ---------------------------------------------------------------- the driver

def prepare(cfg: Config) -> dict:
    """Build what is missing (corpus, clean model, backdoored models); the trial's fixed inputs."""
    from . import backdoor, build, tracking

    root = cfg.root()
    datasets, corpus = {}, None
    for name, spec in cfg.sweep.datasets.items():
        uri = spec.corpus
        if uri is None:
            corpus = corpus or build.resolve_corpus(cfg)
            uri = corpus["corpus_dir"]
        datasets[name] = {"corpus": uri, "fewshot_split": spec.fewshot_split,
                          "test_split": spec.test_split}
    models = {}
    missing = [a for a in cfg.sweep.attacks if a not in cfg.sweep.models]
    if missing:
        corpus = corpus or build.resolve_corpus(cfg)
        backdoor.check_poison_config(cfg, missing, corpus["corpus_dir"], cfg.corpus.image_size)
        clean = build.clean_model(cfg, corpus)
        for attack in missing:
            print(f"backdoored model for {attack} ...", flush=True)
            models[attack] = backdoor.build_backdoored(cfg, attack, corpus, clean)["model_dir"]
    models.update(cfg.sweep.models)
    uri = cfg.tracking.uri or tracking.default_uri(root)
    tracking.ensure_experiment(uri, cfg.sweep.name, tracking.artifact_root(root))
    storage = cfg.ray.storage_path or str(root / "ray_results")
    return {"cfg": cfg.model_dump(mode="json"), "datasets": datasets, "models": models,
            "uri": uri, "storage": storage, "root": str(root)}


def sweep_run_name(cfg: Config, base: dict) -> str:
    key = config_hash({"sweep": cfg.sweep.model_dump(exclude={"report", "max_concurrent_trials"}),
                       "defense": cfg.defense, "seed": cfg.seed, "models": base["models"],
                       "datasets": base["datasets"]})
    return f"{cfg.sweep.name}-{key}"


def make_tuner(cfg: Config, base: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.sweep
    # The trial itself holds almost nothing. Ray Data work started inside it (few-shot sampling,
    # evaluation) is *not* captured by its placement group (Ray Data schedules with "SPREAD"), and
    # Train workers get their own group: both draw on the free pool, for which `concurrency` leaves
    # DATA_BUNDLE_CPUS per trial. (A data bundle reserved in the trial's group sat unused and, with
    # three trials on 6 logical CPUs, left < 1 free CPU for Ray Data's 1-CPU read tasks: they
    # waited forever, a hang seen in the end-to-end run.)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base),
                                    tune.PlacementGroupFactory([{"CPU": 0.01}]))
    name = sweep_run_name(cfg, base)
    path = f"{base['storage'].rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"resuming sweep {name} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True), name
    epochs = s.epochs or cfg.defense.train.epochs
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_ca", mode="max",
                              max_t=epochs + 1, grace_period=min(s.grace_period, epochs),
                              reduction_factor=s.reduction_factor) if s.scheduler == "asha" else None
    if s.search == "grid":
        space, num_samples, search_alg = {"setting": tune.grid_search(settings(cfg))}, 1, None
    else:
        groups = [{"attack": a, "dataset": d, "defense": f} for a in s.attacks
                  for d in s.datasets for f in s.defenses]
        space = {"group": tune.grid_search(groups), "depth": tune.choice(s.space.depth),
                 "length": tune.choice(s.space.length), "alpha": tune.choice(s.space.alpha)}
        num_samples, search_alg = s.num_samples, None
        if s.search == "optuna":
            raise ConfigError("config error: sweep.search: optuna is not available in this "
                              "install; use grid or random")
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg,
                                    num_samples=num_samples,
                                    max_concurrent_trials=concurrency(cfg)),
        run_config=tune.RunConfig(name=name, storage_path=base["storage"],
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  verbose=1))
    return tuner, name


def run_sweep(cfg: Config) -> dict:
    """Build what is missing, run (or resume) the sweep, and return the best trials per group."""
    from . import select, tracking

    start = time.perf_counter()
    base = prepare(cfg)
    ray_init(cfg)
    tuner, name = make_tuner(cfg, base)
    grid = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in grid if r.error]
    frame = tracking.runs_frame(base["uri"], cfg.sweep.name)
    best = tracking.best_per_group(frame, cfg.sweep.select.rule, cfg.sweep.select.weight)
    tune_best = None
    try:
        b = grid.get_best_result(metric="score", mode="max", scope="last")
        tune_best = b.metrics.get("trial_key")
    except RuntimeError:
        pass
    return {"tune_run": name, "storage": base["storage"], "tracking_uri": base["uri"],
            "experiment": cfg.sweep.name, "trials": len(grid), "errors": errors,
            "reused": sum(1 for r in grid if (r.metrics or {}).get(REUSED) == 1.0),
            "best": best.to_dict(orient="records"), "tune_best_trial_key": tune_best,
            "models": base["models"], "wall_s": round(time.perf_counter() - start, 1)}
