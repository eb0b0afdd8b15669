"""The defense registry, what a defense declares, the training recipe and the one training loop.

A defense is built around a (backdoored) CLIP and the class names/templates, and declares itself
on its class (the sweep, tracking, tables and jobs read these, never a defense's name):

- ``Params``: its typed parameters; ``space``: its default search space (param -> values);
- ``trained``: what it trains (``"nothing"``, ``"prompts"``, ``"a linear head"``, ``"all
  weights"``...); ``data``: what it trains on (``"none"``, ``"fewshot"``: k labelled clean images
  per class, ``"pairs"``: clean image-caption pairs, ``"suspect_pairs"``: a pair set that may be
  poisoned, which it screens first with :meth:`Defense.curate`); ``classifies``: ``"text"``
  (zero-shot over class prompts, or its own class embeddings: :meth:`Defense.classifiers`) or
  ``"head"`` (its own head: :attr:`Defense.head`);
- ``recipe``: its training recipe over :class:`TrainParams` (the CoOp recipe by default);
- :meth:`Defense.applies_to`: why it cannot defend against an attack (None when it can).

It exposes ``module`` — the ``nn.Module`` that trains (wrap it in DDP on a cluster), whose
``forward(batch)`` returns ``(loss, stats)``; ``batch`` holds ``image`` (float [B,3,H,W] in [0,1],
augmented by the recipe), ``label``, ``key`` (the samples' keys when their pixels are not
augmented, for caches; else None) and ``text`` — and ``encode`` for evaluation (float images in
[0, 1] -> normalised embeddings, scored by ``head`` or by the class prompts).
:func:`train_defense` is the only training loop: the local job and the Ray Train worker both call
it, each with its own batch source.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..params import parse_params

DEFENSES: dict[str, type["Defense"]] = {}


class DefenseError(ValueError):
    """A user-caused defense error (unknown name, nonsensical parameter); one-line message."""


def register_defense(name: str):
    """Class decorator: ``@register_defense("name")`` — the one step that adds a defense."""
    def deco(cls: type["Defense"]) -> type["Defense"]:
        cls.name = name
        DEFENSES[name] = cls
        return cls
    return deco


def defense_modules(names) -> dict[str, str]:
    """``{name: module}`` of the named defenses defined outside this package (a user's own, e.g.
    in a test file or their project): what worker processes must import to know them."""
    return {n: DEFENSES[n].__module__ for n in names
            if n in DEFENSES and not DEFENSES[n].__module__.startswith("rvpt.")}


def import_defenses(modules: Optional[dict]) -> None:
    """Import the modules that define defenses this process does not know yet (a Ray worker of a
    sweep that runs a user's defense: its module travels with the job)."""
    import importlib

    for name, module in (modules or {}).items():
        if name not in DEFENSES:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise DefenseError(f"defense {name!r} is defined in module {module!r}, which this "
                                   f"process cannot import ({e})") from None


def get_defense(name: str) -> type["Defense"]:
    if name not in DEFENSES:
        raise DefenseError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


class TrainParams(BaseModel):
    """A training recipe; the defaults are the CoOp recipe (the paper's, for prompt tuning): SGD lr
    0.002 with cosine decay after a 1-epoch constant warm-up, batch 32, 50 epochs,
    random-resized-crop + flip; mixed precision on a GPU. A defense's ``recipe`` changes what it
    needs (e.g. AdamW, a constant lr)."""

    model_config = ConfigDict(extra="forbid")
    shots: int = Field(16, ge=1, description="clean images per class (few-shot defenses)")
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["coop", "constant"] = Field(
        "coop", description="coop: constant warmup_lr for warmup_epochs, then cosine from lr")
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, gt=0, description="constant lr during warm-up (CoOp)")
    augment: bool = Field(True, description="random-resized-crop + horizontal flip")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop scale")
    flip: bool = Field(True, description="with augment: random horizontal flips (off for tasks "
                       "whose classes are mirror images of each other)")
    amp: bool = Field(True, description="mixed precision when a GPU is present")


class TrainOverrides(BaseModel):
    """What a config sets of the recipe: every field left None keeps the defense's own value
    (``Defense.recipe`` over :class:`TrainParams`); ``shots`` is shared by the few-shot defenses."""

    model_config = ConfigDict(extra="forbid")
    shots: int = Field(16, ge=1, description="clean images per class (few-shot defenses)")
    epochs: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    optimizer: Optional[Literal["sgd", "adamw"]] = None
    lr: Optional[float] = Field(None, gt=0)
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    weight_decay: Optional[float] = Field(None, ge=0)
    schedule: Optional[Literal["coop", "constant"]] = None
    warmup_epochs: Optional[int] = Field(None, ge=0)
    warmup_lr: Optional[float] = Field(None, gt=0)
    augment: Optional[bool] = None
    crop_scale: Optional[tuple[float, float]] = None
    flip: Optional[bool] = None
    amp: Optional[bool] = None


class DefenseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainHistory:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    epochs: list = field(default_factory=list)  # per-epoch mean of every stat
    prepared: dict = field(default_factory=dict)  # what Defense.prepare returned, and its time

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


class Defense:
    """Base class: subclasses declare themselves (module docstring) and build ``self.module`` in
    ``setup``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    #: the default search space of a sweep: param -> values
    space: ClassVar[dict[str, list]] = {}
    #: what it trains, in words ("nothing" for a defense that does not train)
    trained: ClassVar[str] = "nothing"
    #: what it trains on: "none", "fewshot" (k labelled images per class) or "pairs"
    data: ClassVar[str] = "none"
    #: how it classifies: "text" (the class prompts, zero-shot) or "head" (``self.head``)
    classifies: ClassVar[str] = "text"
    #: its training recipe over TrainParams' defaults (CoOp)
    recipe: ClassVar[dict[str, Any]] = {}
    #: logits from ``encode``'s embeddings, for a defense that classifies with its own head
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def trains(self) -> bool:
        return self.trained != "nothing"

    @classmethod
    def applies_to(cls, attack: type) -> Optional[str]:
        """Why this defense cannot be measured against an attack (its class), or None."""
        return None

    @classmethod
    def declaration(cls) -> dict[str, Any]:
        """What the defense declares, for tables and run tags."""
        return {"defense": cls.name, "trained": cls.trained, "data": cls.data,
                "classifies": cls.classifies, "space": {k: list(v) for k, v in cls.space.items()},
                "parameters": sorted(cls.Params.model_fields)}

    @classmethod
    def parse(cls, params: Optional[dict] = None) -> DefenseParams:
        """Its parameters, validated (one-line DefenseError)."""
        return parse_params(cls.Params, dict(params or {}), cls.name, DefenseError)

    @classmethod
    def recipe_for(cls, params: DefenseParams,
                   overrides: Optional["TrainOverrides"] = None) -> TrainParams:
        """The recipe it trains with: TrainParams' defaults, its ``recipe``, the fields a config
        sets (``overrides``), then what its own parameters decide (:meth:`recipe_from_params`)."""
        set_ = {k: v for k, v in (overrides.model_dump() if overrides else {}).items()
                if v is not None}
        return TrainParams(**{**TrainParams().model_dump(), **cls.recipe, **set_,
                              **cls.recipe_from_params(params)})

    @classmethod
    def recipe_from_params(cls, params: DefenseParams) -> dict[str, Any]:
        """Recipe fields that are this defense's own (searched) parameters, e.g. CleanCLIP's lr."""
        return {}

    def train_params(self, overrides: Optional["TrainOverrides"] = None) -> TrainParams:
        return self.recipe_for(self.params, overrides)

    def make_optimizer(self, params: list, tp: TrainParams) -> torch.optim.Optimizer:
        if tp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=tp.lr, weight_decay=tp.weight_decay)
        return torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)

    def augmentation(self, tp: TrainParams) -> Callable[[torch.Tensor], torch.Tensor]:
        """What the loop does to a batch's float images before ``module`` sees them."""
        return augmenter(tp, self.loaded.image_size)

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

    def classifiers(self, attack=None, ensemble: bool = False
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """For a defense that classifies with text: the class embeddings [C, D] for clean images,
        and for triggered ones when ``attack`` puts a text key on the class prompts (else None).
        By default the class prompts through the (possibly trained) text tower."""
        from ..zeroshot import text_classifiers

        return text_classifiers(self.loaded, self.class_names, self.templates, attack, ensemble)

    def prepare(self, batches: Iterable[dict]) -> dict:
        """A pass over the training data before training, e.g. CBPT's trigger inversion: what it
        finds lives in ``module`` (buffers), so DDP hands rank 0's to every worker and
        checkpoints keep it. Returns stats for the run. Not called on a resumed run."""
        return {}

    def curate(self, make_batches: Callable[[], Iterable[dict]]) -> tuple[list, dict]:
        """For ``data = "suspect_pairs"``: screen the pairs (``make_batches()`` reads them from the
        start, as often as needed; batches carry ``meta``) and return the samples to train on and
        stats."""
        raise NotImplementedError(f"{self.name} declares no curation")

    def report(self, attack, target: Optional[int], batches: Iterable[dict]) -> dict:
        """Measurements of the trained defense itself on test batches (uint8 images, labels),
        given the true attack (e.g. how CBPT's inverted trigger matches it): scalars only."""
        return {}

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
    """The recipe's schedule: ``constant`` lr, or CoOp's: constant ``warmup_lr`` for
    ``warmup_epochs``, then cosine from ``lr``."""
    if tp.schedule == "constant":
        return tp.lr
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
    tf = v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(tp.crop_scale), antialias=True)]
                    + ([v2.RandomHorizontalFlip()] if tp.flip else []))
    return lambda x: torch.stack([tf(img) for img in x])


def train_defense(defense: Defense, tp: TrainParams,
                  epoch_batches: Callable[[int], Iterable[dict]], steps_per_epoch: int,
                  module: Optional[nn.Module] = None, start_epoch: int = 0,
                  optimizer_state: Optional[dict] = None,
                  progress: Optional[Callable[[int, dict], None]] = None,
                  on_epoch_end: Optional[Callable[[int, dict, torch.optim.Optimizer], None]] = None
                  ) -> TrainHistory:
    """Train a defense with recipe ``tp`` (its optimizer, schedule and augmentation).
    ``epoch_batches(epoch)`` yields batches with ``image`` (uint8 [B,3,H,W]), ``label`` and, for
    image-caption data, ``text``. ``module`` is ``defense.module`` or its DDP wrapper.
    ``on_epoch_end(epoch, stats, optimizer)`` is where callers checkpoint; training resumes from
    ``start_epoch`` with ``optimizer_state``."""
    module = module if module is not None else defense.module
    hist = TrainHistory()
    start = time.perf_counter()  # the time a defense trains includes its preparation
    if start_epoch == 0 and type(defense).prepare is not Defense.prepare:
        hist.prepared = {**defense.prepare(epoch_batches(0)),
                         "prepare_s": round(time.perf_counter() - start, 2)}
    params = defense.trainable_parameters()
    opt = defense.make_optimizer(params, tp)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    device = defense.loaded.device
    use_amp = tp.amp and device.type == "cuda"
    augment = defense.augmentation(tp)
    torch.manual_seed(defense.seed * 1000 + start_epoch)
    module.train()
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
            inputs = {"image": x, "label": y, "key": keys, "text": batch.get("text")}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, stats = module(inputs)
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
