"""``--check``: a config checked against what is really there, in seconds, before any cluster work.

Each check reads only what it must (manifests, class files, directory listings, model configs and
``attack.json``; never weights or shards' contents), runs in its own thread with a deadline, and ends
as one row: what was checked, ``ok`` / ``FAIL`` / ``-`` (not checked here), and a detail line.
"""
from __future__ import annotations

import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from rvpt import storage

from .config import Config

DEADLINE_S = 20.0


@dataclass
class Check:
    what: str
    ok: Optional[bool]  # None: not checked here
    detail: str

    @property
    def status(self) -> str:
        return "-" if self.ok is None else ("ok" if self.ok else "FAIL")


class Failed(Exception):
    """A check's one-line failure."""


def _run(checks: list[tuple[str, Callable[[], str]]], deadline_s: float) -> list[Check]:
    """Run every check at once in daemon threads; one row each, in the given order."""
    results: dict[int, Check] = {}

    def one(i: int, what: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            results[i] = Check(what, None, detail[2:]) if detail.startswith("- ") \
                else Check(what, True, detail)
        except Exception as e:  # noqa: BLE001 (every failure is a row, never a traceback)
            text = " ".join(str(e).split()) or type(e).__name__
            results[i] = Check(what, False, text.removeprefix("config error: "))

    threads = [threading.Thread(target=one, args=(i, w, f), daemon=True)
               for i, (w, f) in enumerate(checks)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return [results.get(i, Check(w, False, f"no answer within {deadline_s:.0f} s"))
            for i, (w, _) in enumerate(checks)]


# ---------------------------------------------------------------- the checks

def _writable(uri: str) -> str:
    storage.probe_writable(uri)
    return f"{storage.display(uri)} (writable)"


def _tracking(cfg: Config) -> str:
    from . import tracking

    uri = cfg.tracking.uri or tracking.default_uri(cfg.root())
    if tracking.is_local_store(uri):
        return f"{uri} (sqlite; its directory is the results root)"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                body = r.read(100).decode("utf-8", "replace").strip()
        except Exception as e:  # noqa: BLE001
            raise Failed(f"MLflow server {uri} cannot be reached: {e}") from None
        if body != "OK":
            raise Failed(f"{uri}/health answered {body!r}, not an MLflow server's 'OK'")
        return f"{uri} (server answers)"
    return f"- {uri} (not checked: neither sqlite nor an http(s) server)"


def _names(cfg: Config) -> str:
    from rvpt.attacks import ATTACKS
    from rvpt.defenses import DEFENSES

    from .sweep import not_applicable, settings

    bad = [a for a in cfg.sweep.attacks if a not in ATTACKS]
    if bad:
        raise Failed(f"unknown attack {bad[0]!r}; known: {', '.join(sorted(ATTACKS))}")
    bad = [d for d in cfg.sweep.defenses if d not in DEFENSES]
    if bad:
        raise Failed(f"unknown defense {bad[0]!r}; known: {', '.join(sorted(DEFENSES))}")
    trials, na = len(settings(cfg)), len(not_applicable(cfg))  # search spaces checked here
    return (f"attacks {', '.join(cfg.sweep.attacks)}; defenses {', '.join(cfg.sweep.defenses)}; "
            f"{trials} trials" + (f" ({na} defense x attack x dataset not applicable)" if na else ""))


def _pairs(cfg: Config, location: str) -> str:
    from rvpt.shards import open_corpus

    from .build import pairs_count

    split = cfg.defense.pairs.split
    corpus = open_corpus(location)
    info = corpus.split(split)
    missing = _missing_shards(info.shards)
    if missing:
        raise Failed(f"split {split!r}: {len(missing)} of {len(info.shards)} shards are missing "
                     f"(first: {storage.display(missing[0])})")
    return f"{corpus.format}, {split}: {len(info.shards)} shards, {pairs_count(cfg, location)} " \
           f"pairs used"


def _missing_shards(shards: list[str]) -> list[str]:
    """Shard locations that do not exist (one listing per directory)."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for s in shards:
        by_dir[storage.parent(s)].append(s)
    missing = []
    for d, items in by_dir.items():
        present = {e.base_name for e in storage.listdir(d)}
        missing += [s for s in items if storage.name_of(s) not in present]
    return missing


def _dataset(location: str, fewshot: str, test: str, shots: int) -> str:
    from rvpt.shards import labelled, open_corpus

    corpus = open_corpus(location)
    n_classes = len(labelled(corpus).names)
    parts = [f"{corpus.format} corpus, {n_classes} classes"]
    for role, name in (("few-shot pool", fewshot), ("test", test)):
        split = corpus.split(name)
        if not split.shards:
            raise Failed(f"split {name!r} ({role}) has no shards")
        missing = _missing_shards(split.shards)
        if missing:
            raise Failed(f"split {name!r}: {len(missing)} of {len(split.shards)} shards are missing "
                         f"(first: {storage.display(missing[0])})")
        if split.per_class:
            labels = {int(k): int(v) for k, v in split.per_class.items()}
            out = [k for k in labels if not 0 <= k < n_classes]
            if out:
                raise Failed(f"split {name!r} has labels outside [0, {n_classes - 1}] (e.g. {out[0]})")
            if role == "few-shot pool":
                short = [k for k in range(n_classes) if labels.get(k, 0) < shots]
                if short:
                    raise Failed(f"split {name!r}: class {corpus.classes.names[short[0]]!r} has "
                                 f"{labels.get(short[0], 0)} images, fewer than "
                                 f"defense.train.shots={shots} ({len(short)} such classes)")
        count = f"{split.count} samples" if split.count is not None else "count not stated"
        parts.append(f"{name}: {len(split.shards)} shards, {count}")
    return "; ".join(parts)


def _model(location: str, attack: str, dataset: Optional[str]) -> str:
    from rvpt.attacks import ATTACKS
    from rvpt.models import describe_model_dir
    from rvpt.poison import target_index
    from rvpt.shards import read_classes

    info = describe_model_dir(location)
    data = storage.read_json(storage.join(location, "attack.json"), 16 << 20) \
        if storage.exists(storage.join(location, "attack.json")) else None
    if data is None:
        raise Failed(f"{storage.display(location)} has no attack.json (the trigger to evaluate)")
    if not isinstance(data, dict) or data.get("attack") not in ATTACKS:
        raise Failed(f"{storage.join(location, 'attack.json')}: attack "
                     f"{data.get('attack') if isinstance(data, dict) else None!r} is not a known attack")
    if data["attack"] != attack:
        raise Failed(f"{storage.display(location)} holds a {data['attack']} backdoor, listed for "
                     f"{attack}")
    if "target" not in data:
        raise Failed(f"{storage.join(location, 'attack.json')} has no 'target'")
    detail = f"{info['model_name'] or 'model'} at {info['image_size']} px, {info['weights']}"
    if dataset is not None:
        try:
            t = target_index(data["target"], read_classes(dataset).names)
        except ValueError as e:
            raise Failed(f"target: {e}") from None
        detail += f", target {data['target']!r} (class {t})"
    return detail


def _clean_model(cfg: Config) -> str:
    from rvpt.models import ModelError, weights_source

    m = cfg.model
    if m.checkpoint:
        if not storage.exists(m.checkpoint):
            raise Failed(f"model.checkpoint {storage.display(m.checkpoint)} does not exist")
        return f"checkpoint {storage.display(m.checkpoint)}"
    if m.pretrained or m.name.startswith("hf-hub:"):
        try:
            return f"{m.name} {m.pretrained or ''}: {weights_source(m.name, m.pretrained)}".replace("  ", " ")
        except ModelError as e:
            raise Failed(str(e)) from None
    if cfg.corpus.kind == "synthetic" and cfg.pretrain.enabled:
        return f"{m.name}, pretrained here on the embedded corpus"
    raise Failed("no clean model: set model.pretrained, model.checkpoint or an hf-hub: name")


def run_checks(cfg: Config) -> list[Check]:
    """Every check of a sweep config (see the module docstring)."""
    checks: list[tuple[str, Callable[[], str]]] = []
    root = cfg.root()
    checks.append(("paths.root", lambda: _writable(root)))
    if cfg.ray.storage_path:
        checks.append(("ray.storage_path", lambda: _writable(cfg.ray.storage_path)))
    checks.append(("tracking", lambda: _tracking(cfg)))
    checks.append(("attacks, defenses", lambda: _names(cfg)))
    shots = cfg.defense.train.shots
    embedded = None
    locations = {}
    for name, spec in cfg.sweep.datasets.items():
        if spec.corpus is None:
            if cfg.corpus.kind == "synthetic":
                checks.append((f"dataset {name}", lambda: "the embedded corpus, built by the sweep"))
                locations[name] = None
                embedded = name
                continue
            location = cfg.locate(cfg.corpus.path)
        else:
            location = cfg.locate(spec.corpus)
        locations[name] = location
        checks.append((f"dataset {name}", lambda loc=location, s=spec:
                       _dataset(loc, s.fewshot_split, s.test_split, shots)))
    from rvpt.defenses import DEFENSES

    pairs_users = [d for d in cfg.sweep.defenses
                   if d in DEFENSES and DEFENSES[d].data in ("pairs", "suspect_pairs")]
    if pairs_users:
        p = cfg.defense.pairs
        if p.corpus is None and cfg.corpus.kind == "synthetic":
            checks.append((f"pairs ({', '.join(pairs_users)})",
                           lambda: f"the embedded corpus's {p.split} split"))
        else:
            location = cfg.locate(p.corpus or cfg.corpus.path)
            checks.append((f"pairs ({', '.join(pairs_users)})",
                           lambda: _pairs(cfg, location)))
    factory = [a for a in cfg.sweep.attacks if a not in cfg.sweep.models]
    for attack in cfg.sweep.attacks:
        if attack in factory:
            continue
        per = cfg.models_for(attack)
        for dataset, given in per.items():
            label = f"model {attack}" + (f" / {dataset}" if len(per) > 1 else "")
            checks.append((label, lambda loc=cfg.locate(given), a=attack, d=locations.get(dataset):
                           _model(loc, a, d)))
    if factory:
        checks.append((f"backdoor factory ({', '.join(factory)})",
                       lambda: "poisons the clean model on the embedded corpus"
                       if cfg.corpus.kind == "synthetic" or embedded else
                       "poisons the clean model on corpus " + storage.display(cfg.locate(cfg.corpus.path))))
        checks.append(("clean model", lambda: _clean_model(cfg)))
    if cfg.ray.use_gpu:
        checks.append(("GPUs", lambda: f"- {cfg.ray.num_workers} per trial asked for; not checked "
                       f"here (needs the cluster: `ray status` on the head lists them)"))
    return _run(checks, DEADLINE_S)


def report(checks: list[Check]) -> dict:
    """Print the checks as a table; the JSON summary."""
    from .tables import table

    print(table([(c.what, c.status, c.detail) for c in checks], ("check", "status", "detail")))
    failed = [c for c in checks if c.ok is False]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" if not failed else
          f"{len(failed)} of {len(checks)} checks FAILED")
    return {"ok": not failed, "checks": [asdict(c) | {"status": c.status} for c in checks]}
