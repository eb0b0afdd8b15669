"""The defense registry, the recipe every training defense shares, and the one training loop.

A defense is built around a (backdoored) CLIP and the class names/templates. It exposes
``module`` — the ``nn.Module`` that trains (wrap it in DDP on a cluster), whose
``forward(images01, labels, keys)`` returns ``(loss, stats)`` (``keys`` name the samples when
their pixels are not augmented, for caches; else None) — and ``encode`` for evaluation (float
images in [0, 1] -> normalised embeddings). :func:`train_defense` is the only training loop: the
local job and the Ray Train worker both call it, each with its own batch source.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..params import parse_params

DEFENSES: dict[str, type["Defense"]] = {}


class DefenseError(ValueError):
    """A user-caused defense error (unknown name, nonsensical parameter); one-line message."""


def register_defense(name: str):
    def deco(cls: type["Defense"]) -> type["Defense"]:
        cls.name = name
        DEFENSES[name] = cls
        return cls
    return deco


def get_defense(name: str) -> type["Defense"]:
    if name not in DEFENSES:
        raise DefenseError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


class TrainParams(BaseModel):
    """The CoOp recipe (the paper's): SGD lr 0.002 with cosine decay after a 1-epoch constant
    warm-up, batch 32, 50 epochs, random-resized-crop + flip; mixed precision on a GPU."""

    model_config = ConfigDict(extra="forbid")
    shots: int = Field(16, ge=1, description="clean images per class")
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, gt=0, description="constant lr during warm-up (CoOp)")
    augment: bool = Field(True, description="random-resized-crop + horizontal flip")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop scale")
    amp: bool = Field(True, description="mixed precision when a GPU is present")


class DefenseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainHistory:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    epochs: list = field(default_factory=list)  # per-epoch mean of every stat

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


class Defense:
    """Base class: subclasses set ``Params`` and build ``self.module`` in ``setup``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    #: whether the defense trains (a zero-shot "none" does not)
    trains: ClassVar[bool] = True

    def __init__(self, loaded, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 seed: int = 0, **params: Any):
        self.loaded = loaded
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.seed = int(seed)
        self.params = parse_params(self.Params, params, self.name, DefenseError)
        self.module: nn.Module = nn.Identity()
        self.setup()

    # -- to override ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Build ``self.module`` (the trainable part)."""

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings for evaluation."""
        return self.loaded.encode_images(images01)

    def save(self, directory: str | Path) -> Path:
        """Save the trainable state (small; apart from the backbone)."""
        raise NotImplementedError

    def load(self, directory: str | Path) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def lr_at(epoch_float: float, tp: TrainParams) -> float:
    """CoOp schedule: constant ``warmup_lr`` for ``warmup_epochs``, then cosine from ``lr``."""
    if epoch_float < tp.warmup_epochs:
        return tp.warmup_lr
    span = max(1e-9, tp.epochs - tp.warmup_epochs)
    progress = min(1.0, (epoch_float - tp.warmup_epochs) / span)
    return 0.5 * tp.lr * (1 + math.cos(math.pi * progress))


def augmenter(tp: TrainParams, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image random-resized-crop + horizontal flip on float images [B,3,H,W] (torch's global
    generator, seeded by :func:`train_defense`)."""
    from torchvision.transforms import v2

    if not tp.augment:
        return lambda x: x
    tf = v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(tp.crop_scale), antialias=True),
                     v2.RandomHorizontalFlip()])
    return lambda x: torch.stack([tf(img) for img in x])


def train_defense(defense: Defense, tp: TrainParams,
                  epoch_batches: Callable[[int], Iterable[dict]], steps_per_epoch: int,
                  module: Optional[nn.Module] = None, start_epoch: int = 0,
                  optimizer_state: Optional[dict] = None,
                  progress: Optional[Callable[[int, dict], None]] = None,
                  on_epoch_end: Optional[Callable[[int, dict, torch.optim.Optimizer], None]] = None
                  ) -> TrainHistory:
    """Train a defense with the CoOp recipe. ``epoch_batches(epoch)`` yields batches with
    ``image`` (uint8 [B,3,H,W]) and ``label``. ``module`` is ``defense.module`` or its DDP
    wrapper. ``on_epoch_end(epoch, stats, optimizer)`` is where callers checkpoint; training
    resumes from ``start_epoch`` with ``optimizer_state``."""
    module = module if module is not None else defense.module
    params = defense.trainable_parameters()
    opt = torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    device = defense.loaded.device
    use_amp = tp.amp and device.type == "cuda"
    augment = augmenter(tp, defense.loaded.image_size)
    torch.manual_seed(defense.seed * 1000 + start_epoch)
    hist = TrainHistory()
    module.train()
    start = time.perf_counter()
    for epoch in range(start_epoch, tp.epochs):
        sums: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(epoch_batches(epoch)):
            lr = lr_at(epoch + i / max(1, steps_per_epoch), tp)
            for g in opt.param_groups:
                g["lr"] = lr
            x = augment(batch["image"].float().div(255))
            y = batch["label"].to(device)
            keys = None if tp.augment else batch.get("key")  # cached features need fixed pixels
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, stats = module(x, y, keys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist.steps += 1
            hist.samples += len(y)
            n += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if progress is not None:
                progress(hist.steps, {k: float(v) for k, v in stats.items()})
        epoch_stats = {k: v / max(1, n) for k, v in sums.items()}
        hist.epochs.append(epoch_stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_stats, opt)
    hist.seconds = time.perf_counter() - start
    module.eval()
    return hist
