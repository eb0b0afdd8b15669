"""The verbs behind ``jobs/*.py``: each takes the resolved config and parsed arguments, prints a
human summary and returns a JSON-able dict (written by ``--out``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rvpt.attacks import ATTACKS
from rvpt.poison import example_grid
from rvpt.shards import (iter_batches, read_classes, read_manifest)

from . import backdoor, build
from .config import Config, ConfigError
from .tables import pct, read_line, table


def _print_corpus(c: dict) -> None:
    print(build.corpus_line(c))
    print(table([(k, v["count"], v["shards"]) for k, v in c["splits"].items()],
                 ("split", "samples", "shards")))


def make_corpus(cfg: Config, args: argparse.Namespace) -> dict:
    """Build the configured corpus, or import one split of a data set into a corpus.

    ``--from-imagefolder DIR`` / ``--from-hf PATH`` convert (see :mod:`rvpt.convert`) into split
    ``--split`` (default test) of ``--dest`` (a path or URI; default ``<paths.root>/corpus/<source
    name>``), with ``--class-names``, ``--templates`` and, for HF, ``--hf-split``,
    ``--image-column``, ``--label-column``. Prints one line per split written and returns its
    summary. CLIP_benchmark WebDataset directories need no conversion: ``open_corpus`` reads them
    in place (give the directory as the corpus).
    """
    src_if, src_hf = getattr(args, "from_imagefolder", None), getattr(args, "from_hf", None)
    if src_if or src_hf:
        from rvpt import convert, storage
        from rvpt.shards import ShardError

        if src_if and src_hf:
            raise ShardError("give --from-imagefolder or --from-hf, not both")
        src = src_if or src_hf
        dest = args.dest or storage.join(str(cfg.root()), "corpus", convert.source_name(src))
        common = dict(split=args.split, class_names=getattr(args, "class_names", None),
                      templates=getattr(args, "templates", None), shard_size=cfg.corpus.shard_size)
        if src_if:
            res = convert.imagefolder_to_corpus(src_if, dest, **common)
        else:
            res = convert.hf_to_corpus(src_hf, dest, hf_split=getattr(args, "hf_split", None),
                                       image_column=getattr(args, "image_column", None),
                                       label_column=getattr(args, "label_column", None), **common)
        print(convert.summary_line(res))
        return res
    c = build.resolve_corpus(cfg)
    _print_corpus(c)
    return c


def _evaluate(cfg: Config, corpus: dict, model: dict) -> dict:
    loaded = build.load_model(cfg, model)
    splits = read_manifest(corpus["corpus_dir"])["splits"]
    metrics = {}
    for split, name in (("test", "ca"), ("shift_test", "ca_shift")):
        if split in splits:
            res = build.zero_shot(cfg, loaded, corpus["corpus_dir"], split)
            metrics[name] = round(res["ca"], 4)
            metrics[f"{name}_n"] = res["n"]
            metrics[f"{name}_read"] = res["read"]
            print(read_line(split, res["read"]))
    return metrics


def pretrain(cfg: Config, args: argparse.Namespace) -> dict:
    corpus = build.resolve_corpus(cfg)
    _print_corpus(corpus)
    model = build.clean_model(cfg, corpus)
    print(build.clean_model_line(cfg, model))
    metrics = _evaluate(cfg, corpus, model)
    print(table([(k, f"{100 * metrics[k]:.2f} %", metrics[f"{k}_n"]) for k in ("ca", "ca_shift")
                  if k in metrics], ("zero-shot", "accuracy", "images")))
    return {"corpus": corpus, "model": model, "metrics": metrics}


def attack_names(spec: str) -> list[str]:
    """``badnet``, ``badnet,blended`` or ``all`` (every registered attack)."""
    names = sorted(ATTACKS) if spec == "all" else [a.strip() for a in spec.split(",") if a.strip()]
    for n in names:
        if n not in ATTACKS:
            raise ConfigError(f"unknown attack {n!r}; known: {', '.join(sorted(ATTACKS))}")
    return names


def _save_examples(cfg: Config, corpus_dir: str, attack, path: str, n: int = 8) -> None:
    samples = build.samples(cfg, corpus_dir, "test", attack.image_size)
    batch = next(iter_batches(samples, n))
    example_grid(attack, batch["image"], path, seed=cfg.seed)
    print(f"examples: {path} (top: clean, bottom: triggered)")


def poison(cfg: Config, args: argparse.Namespace) -> dict:
    """Plant each named attack in the clean model and evaluate it undefended."""
    names = attack_names(args.attack or cfg.poison.attack)
    corpus = build.resolve_corpus(cfg)
    _print_corpus(corpus)
    backdoor.check_poison_config(cfg, names, corpus["corpus_dir"], cfg.corpus.image_size)
    clean = build.clean_model(cfg, corpus)
    clean_loaded = build.load_model(cfg, clean)
    results, rows = {}, []
    for name in names:
        model = backdoor.build_backdoored(cfg, name, corpus, clean)
        state = "reused" if model.get("cached") else f"built in {model['wall_s']} s"
        print(f"{name}: {model['model_dir']} ({state})")
        loaded, attack, target, _ = backdoor.load_backdoored(model["model_dir"],
                                                             device=cfg.torch_device())
        if args.save_examples:
            path = args.save_examples if len(names) == 1 else \
                str(Path(args.save_examples).with_stem(f"{Path(args.save_examples).stem}-{name}"))
            _save_examples(cfg, corpus["corpus_dir"], attack, path)
        before = backdoor.evaluate_backdoor(cfg, clean_loaded, corpus["corpus_dir"], attack, target)
        after = backdoor.evaluate_backdoor(cfg, loaded, corpus["corpus_dir"], attack, target)
        results[name] = {"model": model, "clean_model": before, "backdoored": after}
        print(read_line("test", after["read"]))
        print(f"{name}: CA {pct(after['ca'])} % (clean model {pct(before['ca'])} %), ASR "
              f"{pct(after['asr'])} % (clean model {pct(before['asr'])} %)", flush=True)
        rows.append((name, model["target_name"], model["rate"], model["n_poison"], model["lr"],
                     model["epochs"], pct(before["ca"]), pct(after["ca"]), pct(before["asr"]),
                     pct(after["asr"]), pct(after["asr_all"]), pct(after["pa"]), model["wall_s"]))
    print(table(rows, ("attack", "target", "rate", "poisoned", "lr", "epochs", "CA clean %",
                        "CA %", "ASR clean %", "ASR %", "ASR_all %", "PA %", "wall s")))
    return {"corpus": corpus, "clean_model": clean, "attacks": results}


def evaluate(cfg: Config, args: argparse.Namespace) -> dict:
    """CA (and ASR / ASR_all / PA when the model has an attack) of one model on a corpus split."""
    corpus = {"corpus_dir": args.corpus} if args.corpus else build.resolve_corpus(cfg)
    names = read_classes(corpus["corpus_dir"]).names
    loaded, attack, target, data = backdoor.load_backdoored(args.model, args.attack, names,
                                                             cfg.torch_device())
    if args.save_examples and attack is not None:
        _save_examples(cfg, corpus["corpus_dir"], attack, args.save_examples)
    res = backdoor.evaluate_backdoor(cfg, loaded, corpus["corpus_dir"], attack, target, args.split)
    label = f"{attack.name} -> {names[target]}" if attack is not None else "none"
    print(f"model: {args.model} ({loaded.source}); attack: {label}; split: {args.split} "
          f"({res['counts']['n']} images)")
    print(read_line(args.split, res["read"]))
    print(table([tuple(pct(res.get(k)) for k in ("ca", "asr", "asr_all", "pa"))],
                 ("CA %", "ASR %", "ASR_all %", "PA %")))
    return {"model": args.model, "attack": data, "corpus": corpus["corpus_dir"], **res}


def defend(cfg: Config, args: argparse.Namespace) -> dict:
    """Train a defense on a backdoored model; CA / ASR / ASR_all / PA / PR before and after."""
    from . import defend as defend_mod

    if args.defense and args.defense != cfg.defense.name:
        from rvpt.defenses import DefenseError, get_defense

        try:
            fields = get_defense(args.defense).Params.model_fields
        except DefenseError as e:
            raise ConfigError(f"config error: --defense: {e}") from None
        # the config's defense.params are another defense's: keep those this one has too
        cfg.defense.params = {k: v for k, v in cfg.defense.params.items() if k in fields}
        cfg.defense.name = args.defense
    corpus = {"corpus_dir": args.corpus} if args.corpus else build.resolve_corpus(cfg)
    res = defend_mod.defend(cfg, args.model, corpus["corpus_dir"], args.attack)
    if res.get("not_applicable"):
        print(f"defense: {res['defense']} on {res['attack']}: not applicable: "
              f"{res['not_applicable']}")
        return res
    state = "reused" if res.get("cached") else f"trained in {res['train_s']} s"
    data = {"fewshot": f"{res['shots']} shots per class",
            "pairs": f"{res['train_samples']} clean pairs",
            "suspect_pairs": f"{res['train_samples']} pairs it curated"
            }.get(res.get("data"), "no training data")
    print(f"defense: {res['defense']} (trains {res.get('trained', '-')}: "
          f"{res['trainable_params']:,} parameters; {data}; seed {res['seed']}; {state}) -> "
          f"{res['out_dir']}")
    rows = [(when, *(pct(res[when].get(k)) for k in ("ca", "asr", "asr_all", "pa")),
             *(f"{res[when][k]:.4f}" if res[when].get(k) is not None else "-"
               for k in ("pr_mean", "pr/trigger")))
            for when in ("before", "after")]
    print(table(rows, ("", "CA %", "ASR %", "ASR_all %", "PA %", "mean PR", "trigger PR")))
    if res.get("data") == "fewshot":
        print(read_line(f"{cfg.defense.fewshot_split} (few-shot pool)", res["fewshot_read"]))
    elif res.get("data") == "pairs":
        print(read_line(f"{cfg.defense.pairs.split} (clean pairs)", res["pairs_read"]))
    print(read_line("test", res["after"]["read"]))
    for what, values in (("prepared", res.get("prepared")), ("report", res.get("report"))):
        if values:  # what the defense says of itself (e.g. CBPT's inverted trigger)
            print(f"{what}: " + ", ".join(f"{k} {_short(v)}" for k, v in values.items()))
    return res


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sweep(cfg: Config, args: argparse.Namespace) -> dict:
    """The main job: build what is missing, run (or resume) the Ray Tune sweep, record every trial
    in MLflow, print the best hyperparameters per attack x dataset and write the report."""
    if getattr(args, "check", False):
        from . import check

        summary = check.report(check.run_checks(cfg))
        if not summary["ok"]:
            failed = sum(c["ok"] is False for c in summary["checks"])
            raise ConfigError(f"--check: {failed} check(s) failed (table above); nothing was run")
        return summary
    from . import sweep as sweep_mod

    if getattr(args, "sync", False):
        from . import tracking

        uri = sweep_mod.tracking_uri(cfg)
        tracking.probe(uri)
        res = sweep_mod.sync(cfg, uri)
        if not res["sent"] and not res["pending"]:
            print(f"MLflow {uri}: nothing to send for sweep {cfg.sweep.name!r}")
        return res
    res = sweep_mod.run_sweep(cfg)
    print(f"sweep {res['tune_run']}: {res['trials']} trials ({res['reused']} reused), "
          f"{len(res['errors'])} failed; {res['wall_s']} s; MLflow {res['tracking_uri']} "
          f"experiment {res['experiment']!r}")
    if res["pending"]:
        print(f"{res['pending']} trial result(s) have not reached MLflow yet: they are kept in "
              f"{res['ledger']} (the tables below come from there); run the same command with "
              f"--sync once the server answers")
    for err in res["errors"]:
        print(f"  failed trial: {err}")
    rule = cfg.sweep.select
    print(f"best per attack x dataset (rule: {rule.rule}"
          f"{f', weight {rule.weight}' if rule.rule == 'combo' else ''}):")
    rows = [(b.get("attack"), b.get("dataset"), b.get("defense"), b.get("setting"),
             pct(b.get("ca")), pct(b.get("asr")), pct(b.get("asr_all")), pct(b.get("pa")))
            for b in res["best"]]
    print(table(rows, ("attack", "dataset", "defense", "setting", "CA %", "ASR %", "ASR_all %",
                       "PA %")))
    for na in res.get("not_applicable", []):
        print(f"  not applicable: {na['defense']} on {na['attack']} ({na['dataset']}): "
              f"{na['reason']}")
    if cfg.sweep.report:
        from . import report
        frame, source = sweep_mod.results_frame(cfg, res["tracking_uri"])
        res["report"] = report.publish_report(frame, report.default_dir(cfg, res["experiment"]),
                                              res["experiment"], rule.rule, rule.weight,
                                              source)
        print(f"report: {res['report']['report']}")
    return res
