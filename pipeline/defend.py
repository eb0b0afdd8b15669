"""One local defense run: a backdoored model, k clean shots per class, a defense, before/after.

Results go to ``defenses/<defense>-<hash>/`` (the trainable state, e.g. ``prompts.safetensors``,
plus ``summary.json`` written last), keyed by the model, the defense settings and the seed, so a
second run reuses them.
"""
from __future__ import annotations

import resource
from typing import Optional

from rvpt import storage
from rvpt.defenses import DefenseError, make_defense, train_defense
from rvpt.fewshot import epoch_batches, sample_few_shot
from rvpt.resistivity import VERSION as PR_VERSION, perturbation_resistivity
from rvpt.shards import ReadStats, iter_batches, read_classes

from . import backdoor, build
from .config import Config, ConfigError, config_hash


def resistivity(cfg: Config, loaded, corpus_dir: str, attack, prompts=None) -> dict:
    if not cfg.defense.pr_images:
        return {}
    samples = build.samples(cfg, corpus_dir, "test", loaded.image_size)
    return perturbation_resistivity(loaded, iter_batches(samples, 128), prompts=prompts,
                                    attack=attack, seed=cfg.seed, max_images=cfg.defense.pr_images)


def pair_batches(cfg: Config, corpus_dir: str, image_size: int, tp, stats: ReadStats):
    """``(epoch -> batches, n)``: ``defense.pairs.count`` clean image-caption pairs, streamed from
    their corpus each epoch (shards and a buffer shuffled by the epoch's seed)."""
    from rvpt.poison import limited

    p = cfg.defense.pairs
    location = cfg.locate(p.corpus) if p.corpus else corpus_dir
    n = build.pairs_count(cfg, location)

    def batches(epoch: int):
        s = cfg.seed * 1000 + epoch
        pairs = build.samples(cfg, location, p.split, image_size,  # the first read counted
                              stats=stats if epoch == 0 else ReadStats(),
                              require_label=False, shuffle_shards=True, seed=s)
        return iter_batches(limited(pairs, n), tp.batch_size, shuffle_buffer=2048, seed=s)

    return batches, n


def suspect_batches(cfg: Config, corpus_dir: str, image_size: int, attack_json: dict,
                    batch_size: int = 128):
    """``(make_batches, sources)``: the image-caption set a defender holds that may be poisoned
    (EftCLIP's input) — ``defense.pairs`` (its count), plus the poisoned pairs the model was
    fine-tuned with when its attack.json names them (the embedded benchmark's models do: the
    attacker's own training mix). ``make_batches()`` reads it from the start each time."""
    from rvpt.poison import limited
    from rvpt.shards import MANIFEST

    p = cfg.defense.pairs
    location = cfg.locate(p.corpus) if p.corpus else corpus_dir
    sources = [(location, p.split, build.pairs_count(cfg, location))]
    poisoned = (attack_json.get("poison") or {}).get("poisoned_shards")
    if isinstance(poisoned, str) and storage.exists(storage.join(poisoned, MANIFEST)):
        sources.append((poisoned, "poison", None))

    def make():
        for loc, split, n in sources:
            samples = build.samples(cfg, loc, split, image_size, require_label=False)
            yield from iter_batches(limited(samples, n) if n else samples, batch_size)

    return make, sources


def _measure(cfg, loaded, corpus_dir, attack, target, defense=None) -> dict:
    res = backdoor.evaluate_backdoor(cfg, loaded, corpus_dir, attack, target, defense=defense)
    return {**res, **resistivity(cfg, loaded, corpus_dir, attack,
                                 getattr(defense, "prompts", None))}


REPORT_IMAGES = 512  # test images a defense's own report looks at (Defense.report)


def defense_report(cfg: Config, defense, attack, target, corpus_dir: str, split: str,
                   image_size: int) -> dict:
    """``defense.report`` on the first test images (nothing read when it reports nothing)."""
    from rvpt.defenses import Defense
    from rvpt.poison import limited

    if attack is None or type(defense).report is Defense.report:
        return {}
    samples = limited(build.samples(cfg, corpus_dir, split, image_size), REPORT_IMAGES)
    return defense.report(attack, target, iter_batches(samples, 128))


def defense_key(cfg: Config, model: str) -> str:
    """The cache key of a defend run: the config's defense section with the defense's parameters
    and recipe as its code resolves them, so that a changed default is not read from an older
    result."""
    from rvpt.defenses import get_defense

    d = cfg.defense
    try:
        cls = get_defense(d.name)
        resolved = {"params": cls.Params(**d.params).model_dump(mode="json"),
                    "recipe": dict(cls.recipe)}
    except Exception:  # an unknown defense or bad parameters: defend() reports it
        resolved = None
    return config_hash({"defend": 1, "model": storage.display(model), "defense": d,
                        "resolved": resolved, "seed": cfg.seed, "corpus": cfg.corpus,
                        "pr": PR_VERSION})


def defend(cfg: Config, model: str, corpus_dir: str, attack_file: Optional[str] = None,
           force: bool = False) -> dict:
    """Train ``cfg.defense`` on the backdoored ``model`` and measure it before and after."""
    d = cfg.defense
    out = storage.join(cfg.root(), "defenses", f"{d.name}-{defense_key(cfg, model)}")
    if storage.exists(storage.join(out, build.SUMMARY)) and not force:
        return {**storage.read_json(storage.join(out, build.SUMMARY)), "cached": True}
    info = read_classes(corpus_dir)
    loaded, attack, target, attack_json = backdoor.load_backdoored(model, attack_file, info.names,
                                                                          cfg.torch_device())
    try:
        defense = make_defense(d.name, loaded, info.names, info.templates, seed=cfg.seed, **d.params)
    except DefenseError as e:
        raise ConfigError(f"config error: defense: {e}") from None
    base = {**defense.declaration(), "out_dir": out, "model": model, "defense": d.name,
            "params": defense.params.model_dump(mode="json"), "seed": cfg.seed,
            "attack": attack_json.get("attack"), "target": target}
    reason = defense.applies_to(type(attack)) if attack is not None else None
    if reason:  # measured through nothing: said so, not an error
        return {**base, "not_applicable": reason, "cached": False}
    build.set_threads(cfg.pretrain.threads)
    tp = defense.train_params(d.train)
    data, n_train, pool_stats, pairs_stats = None, 0, ReadStats(), ReadStats()
    if defense.data == "fewshot":  # drawn before any long work (too few images fail at once)
        pool = build.samples(cfg, corpus_dir, d.fewshot_split, loaded.image_size, stats=pool_stats)
        try:
            shots = sample_few_shot(pool, tp.shots, len(info.names), seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(f"config error: defense.train.shots: {e}") from None
        data, n_train = epoch_batches(shots, tp.batch_size, cfg.seed), len(shots)
    elif defense.data == "pairs":
        data, n_train = pair_batches(cfg, corpus_dir, loaded.image_size, tp, pairs_stats)
    elif defense.data == "suspect_pairs":  # screened first: it trains on what it keeps
        make, sources = suspect_batches(cfg, corpus_dir, loaded.image_size, attack_json)
        print(f"screening {', '.join(f'{storage.display(loc)} [{split}]' for loc, split, _ in sources)}"
              f" ...", flush=True)
        curated, _ = defense.curate(make)  # what it found: defense.report
        if not curated:
            print("nothing flagged: nothing to fine-tune on", flush=True)
        data, n_train = epoch_batches(curated, tp.batch_size, cfg.seed), len(curated)
    before = _measure(cfg, loaded, corpus_dir, attack, target)
    hist = None
    if defense.trains and n_train:
        steps = -(-n_train // tp.batch_size)
        bar = build.progress_bar(total=tp.epochs * steps, desc=f"training {d.name}", unit="step")

        def on_step(step, stats):
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)

        hist = train_defense(defense, tp, data, steps, progress=on_step)
        bar.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    after = _measure(cfg, loaded, corpus_dir, attack, target, defense)
    report = defense_report(cfg, defense, attack, target, corpus_dir, "test", loaded.image_size)
    summary = {**base,
               "trainable_params": defense.num_trainable() if defense.trains else 0,
               "shots": tp.shots if defense.data == "fewshot" else 0,
               "train_samples": n_train if defense.trains else 0,
               "samples_seen": hist.samples if hist else 0,
               "recipe": tp.model_dump(mode="json") if defense.trains else None,
               "train_s": round(hist.seconds, 1) if hist else 0.0,
               "step_s": round(hist.step_s, 4) if hist else 0.0,
               "peak_rss_mib": round(peak, 1),
               "prepared": hist.prepared if hist else {}, "report": report,
               "epoch_stats": hist.epochs if hist else [], "before": before, "after": after,
               "fewshot_read": pool_stats.as_dict(), "pairs_read": pairs_stats.as_dict()}
    with storage.publish(out, build.SUMMARY) as tmp:
        defense.save(tmp)
        cfg.dump(tmp / "config.yaml")
        storage.write_json(str(tmp / build.SUMMARY), summary)
    return {**summary, "cached": False}
