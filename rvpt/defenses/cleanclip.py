"""CleanCLIP (Bansal et al., 2023): fine-tune all of CLIP on clean image-caption pairs.

Loss (weights 1:1, as the paper and RVPT's re-run use them):

    L = ½ [CE(s·I·Tᵀ) + CE(s·T·Iᵀ)]          CLIP's contrastive loss on the pairs
      + ½ [CE(s·I·Ĩᵀ) + CE(s·T·T̃ᵀ)]          in-modality self-supervision: each image against
                                               its augmented view, each caption against its own

(I, T: normalised image/caption embeddings of the batch; Ĩ, T̃ of their augmentations; s: the
model's logit scale; the targets are the diagonal). AdamW over every weight.

Choices where the paper is silent here, made parameters: the image view is a random-resized-crop
(scale ``crop_scale``), horizontal flip and colour jitter (CleanCLIP used AutoAugment); the caption
view is an EDA-style edit (CleanCLIP used EDA with WordNet synonyms, unavailable offline): each
word is dropped with probability ``word_drop`` and two words swap places, seeded per step.
Negatives are the local batch on each worker (DDP averages the gradients). The data is a clean
pair set disjoint from the few-shot pool (``defense.pairs`` in the pipeline).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Defense, DefenseError, DefenseParams, TrainParams, register_defense


class CleanCLIPParams(DefenseParams):
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate (paper: 5e-6; 3e-6 for "
                      "WaNet and ISSBA)")
    clip_weight: float = Field(1.0, ge=0, description="weight of the image-caption loss")
    inmodal_weight: float = Field(1.0, ge=0, description="weight of the in-modality losses")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="image view's crop scale")
    word_drop: float = Field(0.1, ge=0, lt=1, description="caption view: word drop probability")


def augment_caption(text: str, gen: torch.Generator, drop: float) -> str:
    """An EDA-style view of a caption: words dropped with probability ``drop`` (one is always
    kept), then two positions swapped."""
    words = text.split()
    if len(words) < 2:
        return text
    keep = torch.rand(len(words), generator=gen) >= drop
    if not keep.any():
        keep[int(torch.randint(len(words), (1,), generator=gen))] = True
    words = [w for w, k in zip(words, keep.tolist()) if k]
    if len(words) >= 2:
        i, j = torch.randperm(len(words), generator=gen)[:2].tolist()
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


class CleanCLIPObjective(nn.Module):
    """All of CLIP, trainable, and CleanCLIP's loss."""

    def __init__(self, loaded, p: CleanCLIPParams, seed: int):
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.p = p
        from torchvision.transforms import v2

        self.view = v2.Compose([
            v2.RandomResizedCrop(loaded.image_size, scale=tuple(p.crop_scale), antialias=True),
            v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)])
        self.gen = torch.Generator().manual_seed(seed)

    def _images(self, x01: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.loaded.normalize(x01)), dim=-1)

    def _texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.loaded.tokenizer(list(texts)).to(self.loaded.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def forward(self, batch: dict):
        texts = batch.get("text")
        if texts is None or len(texts) != len(batch["image"]):
            raise DefenseError("cleanclip trains on image-caption pairs: the batch has no captions")
        x = batch["image"]
        img, txt = self._images(x), self._texts(texts)
        scale = self.model.logit_scale.exp().clamp(max=100)
        target = torch.arange(len(x), device=img.device)
        clip = (F.cross_entropy(scale * img @ txt.T, target)
                + F.cross_entropy(scale * txt @ img.T, target)) / 2
        inmodal = torch.zeros((), device=img.device)
        if self.p.inmodal_weight:
            views = torch.stack([self.view(im) for im in x])
            text_views = [augment_caption(t, self.gen, self.p.word_drop) for t in texts]
            img_v, txt_v = self._images(views), self._texts(text_views)
            inmodal = (F.cross_entropy(scale * img @ img_v.T, target)
                       + F.cross_entropy(scale * txt @ txt_v.T, target)) / 2
        loss = self.p.clip_weight * clip + self.p.inmodal_weight * inmodal
        return loss, {"clip": clip.detach(), "inmodal": inmodal.detach(), "loss": loss.detach()}


@register_defense("cleanclip")
class CleanCLIP(Defense):
    """Fine-tunes all of CLIP on clean pairs: CLIP loss + in-modality self-supervision, 1:1."""

    Params = CleanCLIPParams
    space = {"lr": [5e-6, 3e-6]}
    trained = "all weights"
    data = "pairs"
    recipe = {"optimizer": "adamw", "batch_size": 64, "epochs": 10, "weight_decay": 0.1,
              "warmup_epochs": 0, "augment": False}

    @classmethod
    def recipe_from_params(cls, params: CleanCLIPParams) -> dict:
        return {"lr": params.lr}

    def setup(self) -> None:
        for q in self.loaded.model.parameters():
            q.requires_grad_(True)
        self.module = CleanCLIPObjective(self.loaded, self.params, self.seed)

    def augmentation(self, tp: TrainParams) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: x  # its views are made inside the objective

    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        self.loaded.model.eval()
        return self.loaded.encode_images(images01)

    def save(self, directory: str | Path) -> Path:
        from ..models import save_model_dir

        return save_model_dir(self.loaded, None, directory)

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        from ..models import MODEL_DIR_WEIGHTS

        path = Path(directory) / MODEL_DIR_WEIGHTS
        if not path.is_file():
            raise DefenseError(f"{self.name}: no {MODEL_DIR_WEIGHTS} in {directory}")
        try:
            self.loaded.model.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError:
            raise DefenseError(f"{self.name}: the weights in {directory} do not fit this model") \
                from None
