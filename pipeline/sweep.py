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

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from .config import Config, ConfigError, config_hash
from .session import ray_init  # noqa: F401 (re-exported: benchmarks use it)

REUSED = "reused"
SLIM = ("cfg", "datasets", "models", "uri", "code", "root", "defense_modules")  # what the driver callback needs (it is saved to disk)
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

def spaces(cfg: Config) -> dict[str, dict[str, list]]:
    """Each swept defense's search space: ``sweep.space[defense]``, else the space the defense
    declares; every param and value checked against the defense's parameters (one-line errors)."""
    from rvpt.defenses import DefenseError, get_defense

    out = {}
    for name in cfg.sweep.defenses:
        try:
            cls = get_defense(name)
        except DefenseError as e:
            raise ConfigError(f"config error: sweep.defenses: {e}") from None
        space = cfg.sweep.space.get(name, cls.space)
        for param, values in space.items():
            if param not in cls.Params.model_fields:
                raise ConfigError(f"config error: sweep.space.{name}: {param!r} is not a parameter "
                                  f"of {name} (its parameters: "
                                  f"{', '.join(sorted(cls.Params.model_fields)) or 'none'})")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"config error: sweep.space.{name}.{param}: a non-empty list of "
                                  f"values")
            for v in values:
                try:
                    cls.parse({**fixed_params(cfg, name), param: v})
                except DefenseError as e:
                    raise ConfigError(f"config error: sweep.space.{name}.{param}: {e}") from None
        out[name] = {k: list(v) for k, v in space.items()}
    return out


def fixed_params(cfg: Config, defense: str) -> dict:
    """Parameters a sweep holds fixed for a defense: ``defense.params`` when it names that defense."""
    return dict(cfg.defense.params) if cfg.defense.name == defense else {}


def _draws(space: dict[str, list], how: str, n: int, seed: int) -> list[dict]:
    import itertools
    import random

    names = sorted(space)
    grid = [dict(zip(names, combo)) for combo in itertools.product(*(space[k] for k in names))]
    if how == "grid" or len(grid) <= n:
        return grid
    return random.Random(seed).sample(grid, n)


def settings(cfg: Config) -> list[dict]:
    """Every trial: each attack x dataset x defense (those a defense can be measured against) with
    each point of the defense's search space (grid), or ``num_samples`` seeded draws of it."""
    from rvpt.attacks import get_attack
    from rvpt.defenses import get_defense

    out = []
    for defense, space in spaces(cfg).items():
        cls = get_defense(defense)
        for attack in cfg.sweep.attacks:
            if cls.applies_to(get_attack(attack)):
                continue
            for dataset in cfg.sweep.datasets:
                for params in _draws(space, cfg.sweep.search, cfg.sweep.num_samples, cfg.seed):
                    out.append({"attack": attack, "dataset": dataset, "defense": defense,
                                "params": params})
    order = {a: i for i, a in enumerate(cfg.sweep.attacks)}
    return sorted(out, key=lambda s: order[s["attack"]])  # by attack, then defense as listed


def not_applicable(cfg: Config) -> list[dict]:
    """The attack x dataset x defense groups a defense cannot be measured against, with why."""
    from rvpt.attacks import get_attack
    from rvpt.defenses import get_defense

    return [{"attack": a, "dataset": d, "defense": f, "params": {}, "reason": reason}
            for f in cfg.sweep.defenses for a in cfg.sweep.attacks
            if (reason := get_defense(f).applies_to(get_attack(a)))
            for d in cfg.sweep.datasets]


def trial_config(base: Config, setting: dict) -> Config:
    """The config one trial runs: the defense, its fixed and searched parameters, the epochs."""
    cfg = base.model_copy(deep=True)
    cfg.defense.name = setting["defense"]
    cfg.defense.params = {**fixed_params(base, setting["defense"]), **setting["params"]}
    if cfg.sweep.epochs:
        cfg.defense.train.epochs = cfg.sweep.epochs
    return cfg


def trial_key(cfg: Config, model: str, corpus: str, spec: dict) -> str:
    return config_hash({"trial": 1, "model": model, "corpus": corpus, "spec": spec,
                        "defense": cfg.defense, "seed": cfg.seed,
                        "ensemble": cfg.eval.prompt_ensemble, "pr": cfg.defense.pr_images})


def identify(config: dict, base: dict) -> tuple[Config, dict, dict, str]:
    """A trial's ``(config, setting, dataset spec, trial_key)`` from its Tune ``config``."""
    setting = config["setting"]
    cfg = trial_config(Config.model_validate(base["cfg"]), setting)
    spec = base["datasets"][setting["dataset"]]
    key = trial_key(cfg, model_of(base, setting), spec["corpus"], spec)
    return cfg, setting, spec, key


def model_of(base: dict, setting: dict) -> str:
    """The backdoored model a trial defends: the one for its attack on its dataset."""
    return base["models"][setting["attack"]][setting["dataset"]]


def run_record(cfg: Config, setting: dict, spec: dict, key: str, model: str,
               code: Optional[dict] = None) -> tuple[dict, dict]:
    """The MLflow tags and params of a trial's run (``code``: the code version's tags): the defense's
    parameters as it declares them (``tags.space`` names the searched ones) and its recipe."""
    from rvpt.defenses import get_defense

    d, r = cfg.defense, cfg.ray
    cls = get_defense(d.name)
    parsed = cls.parse(d.params)
    tags = {"attack": setting["attack"], "dataset": setting["dataset"], "defense": d.name,
            "model": cfg.model.name, "trial_key": key, "sweep": cfg.sweep.name,
            "space": ",".join(sorted(setting.get("params") or {})), **(code or {})}
    params = {"defense": d.name, **parsed.model_dump(mode="json"), "seed": cfg.seed,
              "workers": r.num_workers, "model_dir": model, "corpus": spec["corpus"]}
    if cls.trained != "nothing":
        tp = cls.recipe_for(parsed, d.train)
        params.update(epochs=tp.epochs, lr=tp.lr, batch_size=tp.batch_size,
                      optimizer=tp.optimizer, trained=cls.trained, data=cls.data)
        if cls.data == "fewshot":
            params["shots"] = tp.shots
        elif cls.data in ("pairs", "suspect_pairs"):
            params.update(pairs=d.pairs.count, pairs_corpus=d.pairs.corpus or spec["corpus"])
    return tags, params


def fewshot_key(dataset: str, image_size: int, shots: int, seed: int) -> str:
    return f"{dataset}@{image_size}px/{shots}shots/seed{seed}"


def draw_few_shot_sets(cfg: Config, base: dict) -> tuple[dict, dict]:
    """Every few-shot set the sweep's trials will train on, drawn once with Ray Data (all trials of
    a dataset share it: the draw depends only on the shots and the seed). Returns the image size
    of each model (by location) and ``(train, val, n_train)`` sets, keyed by :func:`fewshot_key`."""
    from rvpt.models import model_image_size

    from .data import few_shot_split

    from rvpt.shards import read_classes

    from .tables import read_line

    sizes = {m: model_image_size(m) for per in base["models"].values() for m in per.values()}
    shots = cfg.defense.train.shots
    out = {}
    for name, spec in base["datasets"].items():
        used = {sizes[per[name]] for per in base["models"].values()}
        rules = cfg.read_rules(len(read_classes(spec["corpus"]).names))
        for size in sorted(used):
            train, val, stats = few_shot_split(spec["corpus"], spec["fewshot_split"], shots, size,
                                               cfg.seed, rules)
            print(read_line(f"{name} {spec['fewshot_split']} (few-shot pool, {size} px)",
                            stats.as_dict()), flush=True)
            out[fewshot_key(name, size, shots, cfg.seed)] = (train, val, train.count(),
                                                             stats.as_dict())
    return sizes, out


def read_metrics(read: dict, prefix: str) -> dict:
    """What a reader kept and skipped, as run metrics: ``<prefix>_valid``, ``<prefix>_skipped`` and
    one ``<prefix>_skipped/<reason>`` per skip reason (reasons as metric-safe names)."""
    import re

    out = {f"{prefix}_valid": read.get("samples", 0), f"{prefix}_skipped": read.get("skipped", 0)}
    for reason, n in (read.get("skip_reasons") or {}).items():
        out[f"{prefix}_skipped/{re.sub(r'[^A-Za-z0-9_.-]+', '_', reason).strip('_')}"] = n
    return out


def pairs_key(cfg: Config, spec: dict, image_size: int) -> str:
    p = cfg.defense.pairs
    return f"{p.split}@{image_size}px/{p.count}"


def draw_pairs(cfg: Config, base: dict) -> dict:
    """The clean image-caption pairs of the defenses that train on pairs (CleanCLIP), as streamed
    Ray Datasets (``defense.pairs.count`` of them), per model image size: ``{key: (ds, n)}``."""
    from rvpt.defenses import get_defense
    from rvpt.shards import open_corpus

    from . import build
    from .data import read_split, valid_rows

    if not any(get_defense(d).data == "pairs" for d in cfg.sweep.defenses):
        return {}
    p = cfg.defense.pairs
    location = base["pairs_corpus"]
    corpus = open_corpus(location)
    n = build.pairs_count(cfg, location)
    rules = cfg.read_rules(corpus.num_classes, require_label=False)
    out = {}
    for size in sorted(set(base["image_sizes"].values())):
        ds = valid_rows(read_split(location, p.split, size, rules)).limit(n)
        out[pairs_key(cfg, {}, size)] = (ds, n)
        print(f"pairs for {', '.join(d for d in cfg.sweep.defenses if get_defense(d).data == 'pairs')}"
              f": {n} from {storage_display(location)} split {p.split!r} ({size} px)", flush=True)
    return out


def storage_display(location: str) -> str:
    from rvpt import storage

    return storage.display(location)


def _scalar_metrics(m: dict) -> dict:
    return {k: float(v) for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def run_trial(config: dict, base: dict) -> None:
    """The Tune function trainable (runs in a Ray actor)."""
    import torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rvpt.defenses import Defense, get_defense, import_defenses, make_defense
    from rvpt.resistivity import perturbation_resistivity
    from rvpt.shards import iter_batches, read_classes

    from . import select, tracking
    from . import build
    from .data import read_split, valid_rows
    from .defend import defense_report
    from .evaluation import evaluate_distributed
    from .train import TRAIN_STATE, make_trainer

    torch.set_num_threads(1)
    import_defenses(base.get("defense_modules"))
    cfg, setting, spec, key = identify(config, base)
    corpus, model = spec["corpus"], model_of(base, setting)
    uri, exp = base["uri"], cfg.sweep.name
    ledger = tracking.Ledger(base["root"], exp)
    done = ledger.get(key)  # computed before, whether or not MLflow has it yet
    if done is not None:
        tune.report({**(done.get("metrics") or {}), "trial_key": key, REUSED: 1.0})
        return
    try:
        existing = tracking.find_run(uri, exp, key)
    except Exception as e:  # noqa: BLE001 (MLflow down: the trial runs, its result is kept)
        existing = None
        print(f"warning: MLflow {uri} cannot be asked whether trial {key} ran before "
              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
              f"running it", flush=True)
    if existing is not None:
        tune.report({**existing.data.metrics, "trial_key": key, REUSED: 1.0})
        return
    ctx = tune.get_context()
    info = read_classes(corpus)
    image_size = base["image_sizes"][model]
    d = cfg.defense
    cls = get_defense(d.name)
    fkey = fewshot_key(setting["dataset"], image_size, d.train.shots, cfg.seed)
    fewshot_train, val_ds, n_fewshot, pool_read = base["fewshot"][fkey]
    r = cfg.ray
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        checkpoint, defense, n_train = None, None, 0
        if cls.trained != "nothing":
            if cls.data == "pairs":
                train_ds, n_train = base["pairs"][pairs_key(cfg, spec, image_size)]
            elif cls.data == "suspect_pairs":  # screened here; Train fine-tunes on what it keeps
                import ray

                from .backdoor import load_backdoored
                from .defend import suspect_batches

                loaded, _, _, attack_json = load_backdoored(model, None, info.names)
                defense = make_defense(d.name, loaded, info.names, info.templates, seed=cfg.seed,
                                       **d.params)
                make, _ = suspect_batches(cfg, base["pairs_corpus"], image_size, attack_json)
                curated, _ = defense.curate(make)
                train_ds = ray.data.from_items([{"image": c.image.numpy(), "label": c.label,
                                                 "key": c.key, "text": c.text} for c in curated])
                n_train = len(curated)
            else:
                train_ds, n_train = fewshot_train, n_fewshot
        if n_train:
            trainer = make_trainer(cfg, model, corpus, train_ds, val_ds, n_train,
                                   name=f"train-{ctx.get_trial_id()}",
                                   storage_path=base["storage"], callbacks=[TuneReportCallback()],
                                   defense_modules=base.get("defense_modules"))
            checkpoint = trainer.fit().checkpoint
            # The trained state lives in the Train run's checkpoint on ``ray.storage_path`` (shared
            # storage on a cluster): evaluation actors on any node read it from there, this
            # process reads a copy.
            state = Path(stack.enter_context(checkpoint.as_directory()))
        else:
            state = tmp / "state"
            state.mkdir()
        train_s = time.perf_counter() - start
        reports = cls.report is not Defense.report  # what it says of itself (e.g. CBPT's trigger)
        untrained = checkpoint is None  # nothing to train (or, curated, nothing kept)
        if not r.eval_actors or d.pr_images or untrained or reports:  # the defended model here
            from .backdoor import evaluate_backdoor, load_backdoored
            loaded, attack, target, _ = load_backdoored(model, None, info.names)
            if defense is None:
                defense = make_defense(d.name, loaded, info.names, info.templates, seed=cfg.seed,
                                       **d.params)
            else:  # the instance that curated the data keeps what it found
                loaded = defense.loaded
            if checkpoint is not None:
                defense.load(state)
        rules = cfg.read_rules(len(info.names))
        if r.eval_actors:
            metrics = evaluate_distributed(corpus, spec["test_split"], model, image_size, info.names,
                                           info.templates, d.name, d.params, checkpoint,
                                           cfg.eval.prompt_ensemble, r.eval_actors, r.eval_cpus,
                                           (r.gpus_per_worker or 1) if r.use_gpu else 0.0,
                                           resources=r.worker_resources, rules=rules,
                                           defense_modules=base.get("defense_modules"))
        else:  # in this trial's process: a small machine (README, "Sweeps")
            metrics = evaluate_backdoor(cfg, loaded, corpus, attack, target, spec["test_split"],
                                        defense=defense)
            metrics.pop("split", None)
        counts, read = metrics.pop("counts"), metrics.pop("read")
        if d.pr_images:
            if r.eval_actors:
                batches = ({"image": torch.from_numpy(b["image"])} for b in
                           valid_rows(read_split(corpus, spec["test_split"], image_size, rules))
                           .limit(d.pr_images).iter_batches(batch_size=128, batch_format="numpy"))
            else:
                batches = iter_batches(build.samples(cfg, corpus, spec["test_split"], image_size),
                                       128)
            metrics.update(perturbation_resistivity(loaded, batches,
                                                    getattr(defense, "prompts", None), attack,
                                                    seed=cfg.seed, max_images=d.pr_images))
        if reports:
            metrics.update(defense_report(cfg, defense, attack, target, corpus, spec["test_split"],
                                          image_size))
        if checkpoint is not None:
            metrics["val_ca"] = json.loads((state / TRAIN_STATE).read_text()).get("val_ca")
        metrics["train_s"] = train_s
        metrics["n_test"] = counts["n"]
        metrics.update(read_metrics(read, "test"), **read_metrics(pool_read, "fewshot"))
        metrics["score"] = select.score(metrics, cfg.sweep.select.rule, cfg.sweep.select.weight)
        cfg.dump(tmp / "config.yaml")
        tags, params = run_record(cfg, setting, spec, key, model, base.get("code"))
        artifacts = {"config.yaml": str(tmp / "config.yaml")}
        if checkpoint is not None:
            artifacts["state"] = str(state)
        tracking.record_trial(ledger, uri, exp, key, ctx.get_trial_name(), tags, params,
                              _scalar_metrics(metrics), artifacts)
    tune.report({**_scalar_metrics(metrics), "trial_key": key, REUSED: 0.0})


# ---------------------------------------------------------------- early stopping

def trial_group(config: dict) -> tuple:
    """``(attack, dataset, defense)`` of a trial's Tune ``config``."""
    g = config["setting"]
    return g["attack"], g["dataset"], g["defense"]


class GroupedASHA(ASHAScheduler):
    """ASHA whose rungs compare a trial only with trials of its own attack x dataset x defense:
    the alternatives a user chooses among.

    One ASHA over the whole grid compares a SIG trial's ``val_ca`` with a BadNet trial's, and RVPT
    (which trades clean accuracy for removing the backdoor) with VPT: in the default sweep it
    stopped 31 of 36 trials at their first rung, every RVPT trial among them, so the report had no
    RVPT result for any attack. Here every group gets its own bracket (the first trial of a group
    always reaches its next rung).
    """

    def __init__(self, *, grace_period: int, max_t: int, reduction_factor: float, **kwargs):
        super().__init__(grace_period=grace_period, max_t=max_t,
                         reduction_factor=reduction_factor, **kwargs)
        self._bracket_args = (grace_period, max_t, reduction_factor)
        self._groups: dict = {}

    def on_trial_add(self, tune_controller, trial):
        from ray.tune.schedulers.async_hyperband import _Bracket

        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        key = trial_group(trial.config)
        if key not in self._groups:
            grace, max_t, rf = self._bracket_args
            self._groups[key] = _Bracket(grace, max_t, rf, 0, stop_last_trials=self._stop_last_trials)
        self._trial_info[trial.trial_id] = self._groups[key]


# ---------------------------------------------------------------- driver-side callbacks

def release_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creating actor has died; return how many.

    A placement group made inside an actor outlives that actor: it is released only with the job
    or by ``remove_placement_group``. A Ray Train controller makes its workers' group; when the
    scheduler stops a trial, the trial's actor and its controller are killed and the group is left
    holding its CPUs (Train's own ``PlacementGroupCleaner`` did not free them in a 2-core run: 11
    such groups held 5.5 of 6 CPUs and every Ray Data read task waited forever). Groups made by a
    driver (Tune's trial groups) and detached ones are never touched.
    """
    import ray
    from ray._private.state import state  # the GCS table; the public one hides the creator
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    nil = ray.ActorID.nil().binary()
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                or pg.creator_actor_id in (b"", nil) or not pg.creator_actor_dead):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed


class SweepCallback(Callback):
    """The sweep's driver-side duties:

    - every ``every_s`` (and when a trial ends) release the placement groups of dead Train
      controllers (:func:`release_orphaned_placement_groups`);
    - record a trial the scheduler stopped early as an MLflow run tagged ``stopped_early``, with its
      last ``val_ca`` and how many epochs ran (the trial itself is killed before it can log).
    """

    def __init__(self, base: dict, every_s: float = 5.0):
        self.base, self.every_s = base, every_s
        self._last = 0.0

    def _release(self) -> None:
        try:
            release_orphaned_placement_groups()
        except Exception as e:  # noqa: BLE001 (housekeeping must never stop a sweep)
            print(f"warning: could not release orphaned placement groups: {e}", flush=True)
        self._last = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._release()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._last = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._last = 0.0
        last = trial.last_result or {}
        if "trial_key" in last:  # finished and logged by the trial itself
            return
        from . import tracking

        try:
            cfg, setting, spec, key = identify(trial.config, self.base)
            tags, params = run_record(cfg, setting, spec, key, model_of(self.base, setting),
                                      self.base.get("code"))
            tags[tracking.STOPPED_TAG] = "scheduler"
            metrics = {"val_ca": last.get("val_ca"), "epochs_run": last.get("training_iteration")}
            tracking.record_trial(tracking.Ledger(self.base["root"], cfg.sweep.name),
                                  self.base["uri"], cfg.sweep.name, key, str(trial), tags, params,
                                  _scalar_metrics({k: v for k, v in metrics.items()
                                                   if v is not None}))
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not record stopped trial {trial}: {e}", flush=True)


# ---------------------------------------------------------------- the driver

def tracking_uri(cfg: Config) -> str:
    """The sweep's tracking URI: ``tracking.uri``, else sqlite under a local results root."""
    from . import tracking

    try:
        return cfg.tracking.uri or tracking.default_uri(cfg.root())
    except tracking.TrackingError as e:
        raise ConfigError(f"config error: tracking.uri: {e}") from None


def sync(cfg: Config, uri: Optional[str] = None) -> dict:
    """Send the results of finished trials that could not reach MLflow (the sweep's Ledger) and
    say so in one line; ``{"sent", "pending", "ledger"}``."""
    from . import tracking

    uri = uri or tracking_uri(cfg)
    ledger = tracking.Ledger(cfg.root(), cfg.sweep.name)
    sent, pending = tracking.flush(ledger, uri, cfg.sweep.name)
    if sent or pending:
        print(f"MLflow {uri}: sent {sent} kept trial result(s)"
              + (f"; {pending} still pending in {ledger.base} (the server does not answer: run "
                 f"`jobs/sweep.py --sync` with the same config when it does)" if pending else ""),
              flush=True)
    return {"sent": sent, "pending": pending, "ledger": ledger.base}


def prepare(cfg: Config) -> dict:
    """Build what is missing (corpus, clean model, backdoored models); the trial's fixed inputs."""
    from rvpt import storage

    from . import backdoor, build, tracking

    root = cfg.root()
    uri = tracking_uri(cfg)
    tracking.probe(uri)  # seconds, before anything is built
    tracking.ensure_experiment(uri, cfg.sweep.name)
    sync(cfg, uri)  # results an earlier run could not send
    datasets, corpus = {}, None

    def embedded_corpus():
        c = build.resolve_corpus(cfg)
        print(build.corpus_line(c), flush=True)
        return c

    for name, spec in cfg.sweep.datasets.items():
        if spec.corpus is None:
            corpus = corpus or embedded_corpus()
            location = corpus["corpus_dir"]
        else:
            location = cfg.locate(spec.corpus)
        datasets[name] = {"corpus": location, "fewshot_split": spec.fewshot_split,
                          "test_split": spec.test_split}
    models = {}
    missing = [a for a in cfg.sweep.attacks if a not in cfg.sweep.models]
    if missing:
        corpus = corpus or embedded_corpus()
        backdoor.check_poison_config(cfg, missing, corpus["corpus_dir"], cfg.corpus.image_size)
        clean = build.clean_model(cfg, corpus)
        print(build.clean_model_line(cfg, clean), flush=True)
        for attack in missing:
            print(f"backdoored model for {attack} ...", flush=True)
            built = backdoor.build_backdoored(cfg, attack, corpus, clean)["model_dir"]
            models[attack] = {name: built for name in datasets}
    for attack in cfg.sweep.models:
        if attack in cfg.sweep.attacks:
            models[attack] = {name: cfg.locate(m) for name, m in cfg.models_for(attack).items()}
    pairs_corpus = None
    from rvpt.defenses import get_defense
    if any(get_defense(d).data in ("pairs", "suspect_pairs") for d in cfg.sweep.defenses):
        pairs_corpus = cfg.locate(cfg.defense.pairs.corpus) if cfg.defense.pairs.corpus else \
            (corpus or embedded_corpus())["corpus_dir"]
    storage_path = cfg.ray.storage_path or storage.join(root, "ray_results")
    from rvpt.defenses import defense_modules
    base = {"cfg": cfg.model_dump(mode="json"), "datasets": datasets, "models": models,
            "uri": uri, "storage": storage.display(storage_path), "root": root,
            "code": tracking.code_version(), "pairs_corpus": pairs_corpus,
            "defense_modules": defense_modules(cfg.sweep.defenses)}
    record_not_applicable(cfg, base)
    return base


def record_not_applicable(cfg: Config, base: dict) -> None:
    """One run per attack x dataset x defense a defense cannot be measured against, tagged
    ``not_applicable`` with the reason (no metrics): the tables say so instead of leaving a gap."""
    from . import tracking

    ledger = tracking.Ledger(base["root"], cfg.sweep.name)
    for setting in not_applicable(cfg):
        c, _, spec, key = identify({"setting": setting}, base)
        print(f"not applicable: {setting['defense']} on {setting['attack']} "
              f"({setting['dataset']}): {setting['reason']}", flush=True)
        if ledger.get(key) is not None:
            continue
        tags, params = run_record(c, setting, spec, key, model_of(base, setting), base.get("code"))
        tags[tracking.NOT_APPLICABLE_TAG] = setting["reason"]
        tracking.record_trial(ledger, base["uri"], cfg.sweep.name, key,
                              f"n/a-{setting['defense']}-{setting['attack']}-{setting['dataset']}",
                              tags, params, {})


def sweep_run_name(cfg: Config, base: dict) -> str:
    key = config_hash({"sweep": cfg.sweep.model_dump(exclude={"report", "max_concurrent_trials"}),
                       "defense": cfg.defense, "seed": cfg.seed, "models": base["models"],
                       "datasets": base["datasets"]})
    return f"{cfg.sweep.name}-{key}"


def make_tuner(cfg: Config, base: dict):
    from ray import tune

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
    from rvpt.defenses import get_defense

    epochs = s.epochs or max(get_defense(d).recipe_for(get_defense(d).parse(fixed_params(cfg, d)),
                                                       cfg.defense.train).epochs
                             for d in s.defenses)
    scheduler = GroupedASHA(time_attr="training_iteration", metric="val_ca", mode="max",
                            max_t=epochs + 1, grace_period=min(s.grace_period, epochs),
                            reduction_factor=s.reduction_factor) if s.scheduler == "asha" else None
    grid = settings(cfg)  # grid or seeded random draws: explicit settings either way
    at_once = concurrency(cfg)
    print(f"sweep {name}: {len(grid)} trials, up to {at_once} at a time", flush=True)
    tuner = tune.Tuner(
        trainable, param_space={"setting": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1,
                                    max_concurrent_trials=at_once),
        run_config=tune.RunConfig(name=name, storage_path=base["storage"],
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[SweepCallback({k: base[k] for k in SLIM})],
                                  verbose=1))
    return tuner, name


def results_frame(cfg: Config, uri: str):
    """``(frame, source)``: the sweep's runs from MLflow, or, when it does not answer (or still
    lacks results), from the sweep's Ledger (every finished trial is there)."""
    from . import tracking

    ledger = tracking.Ledger(cfg.root(), cfg.sweep.name)
    try:
        if not ledger.pending():
            return tracking.runs_frame(uri, cfg.sweep.name), uri
    except Exception:  # noqa: BLE001
        pass
    return ledger.frame(), ledger.base


def run_sweep(cfg: Config) -> dict:
    """Build what is missing, run (or resume) the sweep, and return the best trials per group."""
    from . import tracking

    start = time.perf_counter()
    base = prepare(cfg)
    ray_init(cfg)
    base["image_sizes"], base["fewshot"] = draw_few_shot_sets(cfg, base)
    base["pairs"] = draw_pairs(cfg, base)
    tuner, name = make_tuner(cfg, base)
    grid = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in grid if r.error]
    synced = sync(cfg, base["uri"])
    frame, source = results_frame(cfg, base["uri"])
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
            "best": tracking.records(best), "tune_best_trial_key": tune_best,
            "not_applicable": tracking.not_applicable(frame),
            "results_from": source, "pending": synced["pending"], "ledger": synced["ledger"],
            "models": base["models"], "wall_s": round(time.perf_counter() - start, 1)}
