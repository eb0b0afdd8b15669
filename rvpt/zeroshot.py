"""Zero-shot classification with a CLIP model: class text embeddings and clean accuracy (CA)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .models import LoadedClip


@torch.no_grad()
def class_embeddings(loaded: LoadedClip, class_names: Sequence[str],
                     templates: Sequence[str] = ("a photo of a {}.",),
                     ensemble: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings [C, D]: the first template per class, or the normalised mean
    over all templates with ``ensemble=True``."""
    use = list(templates) if ensemble else [templates[0]]
    per_template = [loaded.encode_texts([t.format(c) for c in class_names]) for t in use]
    emb = torch.stack(per_template).mean(0)
    return emb / emb.norm(dim=-1, keepdim=True)


@torch.no_grad()
def predict(loaded: LoadedClip, images_uint8: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Predicted class indices for a uint8 [B,3,H,W] batch."""
    feats = loaded.encode_images(images_uint8.float().div(255))
    return (feats @ classifier.T).argmax(dim=-1)


@torch.no_grad()
def evaluate_accuracy(loaded: LoadedClip, batches: Iterable[dict], classifier: torch.Tensor,
                      progress: Optional[object] = None) -> dict:
    """Top-1 accuracy over batches with ``image`` (uint8) and ``label``; returns counts too, so
    results from split data can be summed."""
    loaded.model.eval()
    correct = total = 0
    for batch in batches:
        pred = predict(loaded, batch["image"], classifier)
        correct += int((pred == batch["label"]).sum())
        total += int(batch["label"].numel())
        if progress is not None:
            progress.update(int(batch["label"].numel()))
    return {"acc": correct / total if total else float("nan"), "correct": correct, "total": total}
