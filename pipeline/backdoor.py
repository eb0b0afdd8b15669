"""The backdoor factory and undefended evaluation: plant an attack in a clean CLIP, measure it.

A backdoored model directory (``models/backdoor-<attack>-<hash>/``) holds the open_clip config and
weights, ``attack.json`` (+ tensors) with everything needed to re-apply the same trigger (target
class, parameters, seeds, learned state, poisoning settings), ``config.yaml`` and ``summary.json``
(written last: a directory without it is rebuilt). The poisoned pairs are written as shards to
``corpus/poisoned-<attack>-<hash>/`` (split ``poison``, ``json.poisoned = true``; a dual-key
attack's partial-key pairs ``json.poisoned = false``).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from rvpt.attacks import ATTACKS, Attack, load_attack, make_attack
from rvpt.metrics import backdoor_counts, rates
from rvpt.models import LoadedClip, ModelError, load_clip, save_model_dir
from rvpt.poison import (has_partial_keys, limited, mix_in, natural_captions, poison_count,
                         target_index)
from rvpt.pretrain import train_contrastive
from rvpt import storage
from rvpt.shards import ReadStats, iter_batches, read_classes, write_classes, write_manifest
from rvpt.zeroshot import text_classifiers

from . import build
from .config import Config, ConfigError, PoisonConfig, config_hash
from .data import write_poisoned
from .session import ray_init


def backdoor_key(cfg: Config, pc: PoisonConfig, clean_model: dict, corpus_dir: str) -> str:
    clean = storage.name_of(clean_model["model_dir"]) if clean_model.get("model_dir") else \
        cfg.model.model_dump(exclude={"trust_torchscript"})
    key = {"factory": 2, "clean": clean, "poison": pc.model_dump(exclude={"attacks"}),
           "seed": cfg.seed, "corpus": storage.name_of(corpus_dir)}
    fields = getattr(ATTACKS.get(pc.attack), "Params", None)
    if fields is not None and "partial_keys" in fields.model_fields:
        # dual-key pairs came later (factory 2 made none): a default-on change of the data
        key["partial_keys"] = bool(pc.params.get("partial_keys", True))
    return config_hash(key)


def _make_attack(cfg: Config, pc: PoisonConfig, image_size: int) -> Attack:
    return make_attack(pc.attack, image_size, seed=cfg.seed, **pc.params)


def check_poison_config(cfg: Config, names: list[str], corpus_dir: str, image_size: int) -> None:
    """Fail before any training when an attack's settings make no sense (one-line errors)."""
    class_names = read_classes(corpus_dir).names
    for name in names:
        pc = cfg.poison.for_attack(name)
        try:
            target_index(pc.target, class_names)
        except ValueError as e:
            raise ConfigError(f"config error: poison.target: {e}") from None
        _make_attack(cfg, pc, image_size)


def build_backdoored(cfg: Config, attack_name: str, corpus: dict, clean_model: dict,
                     force: bool = False) -> dict:
    """Poison the clean model with one attack (cached). Returns the summary with ``model_dir``."""
    pc = cfg.poison.for_attack(attack_name)
    key = backdoor_key(cfg, pc, clean_model, corpus["corpus_dir"])
    out = storage.join(cfg.root(), "models", f"backdoor-{attack_name}-{key}")
    if storage.exists(storage.join(out, build.SUMMARY)) and not force:
        return {**storage.read_json(storage.join(out, build.SUMMARY)), "cached": True}
    corpus_dir = corpus["corpus_dir"]
    info = read_classes(corpus_dir)
    try:
        target = target_index(pc.target, info.names)
    except ValueError as e:
        raise ConfigError(f"config error: poison.target: {e}") from None
    loaded = build.load_model(cfg, clean_model)
    attack = _make_attack(cfg, pc, loaded.image_size)
    build.set_threads(cfg.pretrain.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    total = build.split_count(corpus_dir, "pretrain")

    def pairs(**kw):  # the clean image-caption pairs (labels optional)
        return build.samples(cfg, corpus_dir, "pretrain", loaded.image_size, require_label=False,
                             **kw)

    n_clean = min(pc.n_clean or total, total)

    fit_stats: dict = {}
    if attack.needs_fit:
        # labelled images only: a broad corpus's texture and digit pairs carry no class (-1)
        fit_batches = iter_batches(limited((s for s in pairs() if s.label >= 0), pc.fit_images),
                                   128)
        print(f"fitting the {attack_name} trigger on {pc.fit_images} clean images ...", flush=True)
        fit_stats = attack.fit(loaded, fit_batches, target, info.names, info.templates)

    n_poison = poison_count(pc.rate, n_clean)
    natural = natural_captions(pairs(), target) \
        if getattr(attack, "caption_style", "template") == "natural" else []
    pdir = storage.join(cfg.root(), "corpus", f"poisoned-{attack_name}-{key}")
    storage.remove(pdir)
    write_classes(pdir, info.names, info.templates)
    # the trigger as the Ray Data actors re-create it (kept beside the shards: it made them)
    with tempfile.TemporaryDirectory() as tmp:
        attack.save(tmp, target=target, target_name=info.names[target])
        storage.upload(tmp, storage.join(pdir, "attack"))
    extra = " (each with an image-only and a key-only pair)" if has_partial_keys(attack) else ""
    print(f"writing {n_poison} poisoned pairs{extra} through Ray Data ...", flush=True)
    ray_init(cfg)
    split = write_poisoned(corpus_dir, pdir, storage.join(pdir, "attack"), n_poison, target,
                           info.names, info.templates, natural, seed=cfg.seed,
                           image_size=loaded.image_size, shard_size=cfg.corpus.shard_size)
    write_manifest(pdir, {"poison": split}, source="poison", attack=attack_name, target=target,
                   rate=pc.rate, n_clean=n_clean)
    poisoned = sorted(build.samples(cfg, pdir, "poison", loaded.image_size, require_label=False),
                      key=lambda s: s.key)  # sources may be unlabelled pairs (label -1)
    sources = {s.meta.get("source_key") for s in poisoned}  # never also seen clean

    steps_per_epoch = max(1, (n_clean + len(poisoned)) // pc.batch_size)
    stats = ReadStats()

    def epoch_batches(epoch: int):
        s = cfg.seed * 1000 + epoch
        clean = limited((x for x in pairs(stats=stats, shuffle_shards=True, seed=s)
                         if x.key not in sources), n_clean)
        return iter_batches(mix_in(clean, n_clean, poisoned, seed=s),
                            pc.batch_size, shuffle_buffer=cfg.pretrain.shuffle_buffer, seed=s,
                            drop_last=True)

    bar = build.progress_bar(total=pc.epochs * steps_per_epoch,
                             desc=f"poisoning with {attack_name}", unit="step")

    def on_step(step, total_steps, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    hist = train_contrastive(loaded, epoch_batches, pc.epochs, steps_per_epoch, pc.lr,
                             pc.weight_decay, pc.warmup_steps, progress=on_step,
                             compile=cfg.pretrain.compile)
    bar.close()
    wall = time.perf_counter() - start
    n_partial = sum(1 for s in poisoned if not s.meta.get("poisoned", True))
    poison_info = {"rate": pc.rate, "n_poison": len(poisoned) - n_partial,
                   "n_partial": n_partial, "n_clean": n_clean,
                   "lr": pc.lr, "epochs": pc.epochs, "batch_size": pc.batch_size,
                   "poisoned_shards": pdir, "clean_model": clean_model.get("model_dir")}
    summary = {"model_dir": out, "attack": attack_name, "target": target,
               "target_name": info.names[target], **poison_info, "fit": fit_stats,
               "wall_s": round(wall, 1), "finetune_s": round(hist.seconds, 1),
               "epoch_losses": [round(x, 4) for x in hist.losses], "read": stats.as_dict()}
    with storage.publish(out, build.SUMMARY) as tmp:
        save_model_dir(loaded, loaded.name, tmp)
        attack.save(tmp, target=target, target_name=info.names[target], poison=poison_info,
                    fit=fit_stats)
        cfg.dump(tmp / "config.yaml")
        storage.write_json(str(tmp / build.SUMMARY), summary)
    return {**summary, "cached": False}


def evaluate_backdoor(cfg: Config, loaded: LoadedClip, corpus_dir: str, attack: Optional[Attack],
                      target: Optional[int], split: str = "test", defense=None) -> dict:
    """CA on clean images of ``split``; with an attack, ASR / ASR_all / PA on triggered copies.
    ``defense``: a trained defense (its image encoder, its classifiers or its own head); None: the
    model as it is, zero-shot."""
    info = read_classes(corpus_dir)
    if defense is None:
        clf, trig = text_classifiers(loaded, info.names, info.templates, attack,
                                     cfg.eval.prompt_ensemble)
        encode = head = None
    else:
        clf, trig = defense.classifiers(attack, cfg.eval.prompt_ensemble)
        encode, head = defense.encode, defense.head
    stats = ReadStats()
    samples = build.samples(cfg, corpus_dir, split, loaded.image_size, stats=stats)
    with build.progress_bar(desc=f"evaluating {split}", unit="img", leave=False) as bar:
        c = backdoor_counts(loaded, iter_batches(samples, cfg.eval.batch_size), clf, attack, target,
                            trigger_classifier=trig, encode=encode, progress=bar, head=head)
    return {**rates(c), "split": split, "read": stats.as_dict()}


def load_backdoored(model: str, attack_file: Optional[str] = None,
                    class_names: Optional[list] = None, device: str = "cpu"
                    ) -> tuple[LoadedClip, Optional[Attack], Optional[int], dict]:
    """A model (dir or checkpoint, local or on object storage) with its attack: ``attack.json``
    beside a model directory, or a hand-written one given as ``attack_file``. Returns (model, attack,
    target index, attack json)."""
    try:
        model = str(storage.local_copy(str(model)))  # object storage: one cached local copy
    except storage.StorageError as e:
        raise ModelError(f"checkpoint {model}: {e}") from None
    loaded = load_clip(checkpoint=model, device=device)
    path = attack_file or (Path(model) if Path(model).is_dir() else Path(model).parent)
    if attack_file is None and not (Path(path) / "attack.json").exists():
        return loaded, None, None, {}
    attack, data = load_attack(path)
    if "target" not in data:
        raise ConfigError(f"config error: {path}: attack.json needs a 'target' (class index or name)")
    try:
        target = target_index(data["target"], class_names) if class_names else int(data["target"])
    except ValueError as e:
        raise ConfigError(f"config error: {path}: target: {e}") from None
    return loaded, attack, target, data
