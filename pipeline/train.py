"""Ray Train: the worker loop that drives any registered defense, and the trainer around it.

Every worker builds the defense on the (backdoored) model, wraps its trainable module with
``prepare_model`` (DDP when there are several workers), reads its share of the few-shot set from
``get_dataset_shard("train")`` and runs :func:`rvpt.defenses.train_defense` — the same loop the
local job runs. After every epoch rank 0 measures the defender-visible validation accuracy
(``val_ca``, on held-out clean pool images) and saves a checkpoint of the trainable state and the
optimizer; a restarted worker group resumes from the latest checkpoint (``FailureConfig``).
"""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Optional

from .config import Config

TRAIN_STATE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def _numpy_batches(it, device=None):
    import torch

    for b in it:
        out = {"image": torch.from_numpy(b["image"]), "label": torch.from_numpy(b["label"]),
               "key": [str(k) for k in b["key"]]}
        if "text" in b:
            out["text"] = [str(t) for t in b["text"]]
        yield out


def weights_digest(params):
    """Two float64 sums over parameters: equal on every DDP replica exactly when they are in sync
    (replicas are bitwise identical after each synchronised step)."""
    import torch

    ps = [p.detach().double() for p in params]
    return torch.stack([sum(p.sum() for p in ps), sum(p.abs().sum() for p in ps)]).cpu()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``cfg`` (the resolved Config as a dict), ``model`` (model
    dir), ``corpus`` (URI), ``n_train`` (training set size: few-shot images or pairs),
    ``threads``. Reports per epoch the defense's training stats, the defender-visible ``val_ca``
    and, with several workers, ``replicas_in_sync`` (1.0 when every worker holds the same
    weights)."""
    import ray.train
    import ray.train.torch
    import torch

    from rvpt.defenses import import_defenses, make_defense, train_defense
    from rvpt.metrics import backdoor_counts
    from rvpt.shards import read_classes

    from .backdoor import load_backdoored

    import_defenses(config.get("defense_modules"))
    cfg = Config.model_validate(config["cfg"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    info = read_classes(config["corpus"])
    loaded, _, _, _ = load_backdoored(config["model"], None, info.names)
    d = cfg.defense
    defense = make_defense(d.name, loaded, info.names, info.templates, seed=cfg.seed, **d.params)
    tp = defense.train_params(d.train)

    start_epoch, opt_state = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            defense.load(cdir)
            start_epoch = json.loads((Path(cdir) / TRAIN_STATE).read_text())["epoch"] + 1
            opt_state = torch.load(Path(cdir) / OPTIMIZER_FILE, weights_only=True)
    defense.seed = cfg.seed * 1009 + rank  # augmentation differs per worker; DDP syncs the prompts
    module = ray.train.torch.prepare_model(defense.module)
    shard = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    steps = max(1, math.ceil(config["n_train"] / world / tp.batch_size))
    fail_at: Optional[int] = config.get("fail_at_epoch")

    def epoch_batches(epoch: int):
        it = shard.iter_batches(batch_size=tp.batch_size, batch_format="numpy",
                                local_shuffle_buffer_size=max(tp.batch_size, 256),
                                local_shuffle_seed=cfg.seed * 1000 + epoch)
        for i, batch in enumerate(_numpy_batches(it)):
            if fail_at is not None and ckpt is None and epoch == fail_at and rank == 0 and i == 1:
                time.sleep(3)  # let the controller register the last checkpoint first
                print(f"fail_at_epoch={fail_at}: killing worker {rank} mid-epoch", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    def on_epoch_end(epoch: int, stats: dict, opt) -> None:
        metrics = {**stats, "epoch": epoch, "start_epoch": start_epoch}
        if world > 1:
            import torch.distributed as dist

            mine = weights_digest(defense.trainable_parameters())
            every = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather_object(every, mine)
            metrics["replicas_in_sync"] = float(all(torch.equal(mine, o) for o in every))
        if rank == 0:
            clf, _ = defense.classifiers()  # its text may be trained
            c = backdoor_counts(loaded, _numpy_batches(val.iter_batches(batch_size=256,
                                                                        batch_format="numpy")),
                                clf, encode=defense.encode, head=defense.head)
            metrics["val_ca"] = c["correct"] / c["n"] if c["n"] else float("nan")
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                defense.save(tmp)
                torch.save(opt.state_dict(), Path(tmp) / OPTIMIZER_FILE)
                (Path(tmp) / TRAIN_STATE).write_text(json.dumps({"epoch": epoch, **metrics}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    if start_epoch < tp.epochs:
        train_defense(defense, tp, epoch_batches, steps, module=module, start_epoch=start_epoch,
                      optimizer_state=opt_state, on_epoch_end=on_epoch_end)


def make_trainer(cfg: Config, model: str, corpus: str, train_ds, val_ds, n_train: int,
                 name: str, storage_path: str, callbacks: Optional[list] = None,
                 defense_modules: Optional[dict] = None):
    """A ``TorchTrainer`` for one defense run, sized by ``cfg.ray``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **r.worker_resources}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "model": model, "corpus": corpus,
                           "n_train": n_train, "threads": max(1, int(r.cpus_per_worker)),
                           "fail_at_epoch": r.fail_at_epoch, "defense_modules": defense_modules},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]))
