"""Contrastive (CLIP) training of a whole model on image-caption batches.

Used to pretrain the embedded benchmark's clean tiny CLIP; the backdoor factory fine-tunes with the
same loop. The loss is open_clip's :class:`~open_clip.ClipLoss`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import open_clip
import torch

from .models import LoadedClip


@dataclass
class TrainHistory:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    losses: list = field(default_factory=list)  # mean loss per epoch

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name \
            or "logit_scale" in name or "embedding" in name or "token_embedding" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def random_crops(batches: Iterable[dict], scale: tuple[float, float]) -> Iterator[dict]:
    """Random-resized crops (per image, area share in ``scale``) of batches' uint8 ``image``,
    drawn from torch's global generator."""
    from torchvision.transforms import v2

    for batch in batches:
        size = batch["image"].shape[-1]
        tf = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)
        yield {**batch, "image": torch.stack([tf(img) for img in batch["image"]])}


def train_contrastive(loaded: LoadedClip, epoch_batches: Callable[[int], Iterable[dict]],
                      epochs: int, steps_per_epoch: int, lr: float, weight_decay: float = 0.1,
                      warmup_steps: int = 0, progress: Optional[Callable[[int, int, float], None]] = None,
                      compile: bool = False) -> TrainHistory:
    """Train ``loaded.model`` with the CLIP loss.

    ``epoch_batches(epoch)`` yields batches with ``image`` (uint8 [B,3,H,W]) and ``text`` (captions).
    ``steps_per_epoch`` sizes the cosine schedule. ``progress(step, total, loss)`` is called after
    every step. ``compile`` runs the forward pass through ``torch.compile`` (the weights stay
    ``loaded.model``'s; batches of one shape compile once).
    """
    model = loaded.model
    model.train()
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    total = max(1, epochs * steps_per_epoch)
    hist = TrainHistory()
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        epoch_loss, n = 0.0, 0
        for batch in epoch_batches(epoch):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, lr, warmup_steps)
            images = loaded.normalize(batch["image"].float().div(255))
            texts = loaded.tokenizer(batch["text"]).to(loaded.device)
            img_f, txt_f, scale = forward(images, texts)[:3]
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            hist.samples += len(batch["text"])
            value = loss.item()
            epoch_loss += value
            n += 1
            if progress is not None:
                progress(step, total, value)
        hist.losses.append(epoch_loss / max(1, n))
    hist.steps = step
    hist.seconds = time.perf_counter() - start
    model.eval()
    return hist
