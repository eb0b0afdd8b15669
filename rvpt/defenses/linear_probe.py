"""Linear probe: a linear head on the frozen image features of the few-shot set.

The paper's baseline (RVPT, App. C): SGD, constant lr 0.01, momentum 0.9, batch 32, 40 epochs, on
the same k shots per class as prompt tuning. The backbone stays frozen; the features are the
model's L2-normalised image embeddings, cached per sample (the recipe does not augment). The head
is a batch norm without affine parameters followed by a linear layer (MAE's linear probe): CLIP
embeddings of one domain point in nearly one direction, and the few hundred SGD steps of the
paper's recipe only fit a linear layer on standardised features (without it, the smoke test's probe
stayed at 64 % training accuracy after 200 epochs). CA, ASR and PA are measured through the head
(its batch norm with the running statistics of the shots). It has no text side, so an attack whose
trigger is half text (TrojVQA's key on the prompts) cannot be measured through it: "not
applicable".
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Defense, DefenseError, DefenseParams, register_defense

HEAD_FILE = "linear_head.safetensors"


class LinearProbeParams(DefenseParams):
    standardize: bool = Field(True, description="a batch norm (no affine) before the linear layer")


class ProbeObjective(nn.Module):
    """The head on cached frozen features, with cross-entropy."""

    def __init__(self, loaded, num_classes: int, standardize: bool):
        super().__init__()
        self.loaded = loaded
        dim = int(loaded.model.visual.output_dim)
        linear = nn.Linear(dim, num_classes)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False) if standardize
                                  else nn.Identity(), linear)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def features(self, images01: torch.Tensor, keys=None) -> torch.Tensor:
        if keys is not None and all(k in self.cache for k in keys):
            return torch.stack([self.cache[k] for k in keys])
        f = self.loaded.encode_images(images01)
        if keys is not None:
            for k, v in zip(keys, f):
                self.cache[k] = v.detach()
        return f

    def forward(self, batch: dict):
        logits = self.head(self.features(batch["image"], batch.get("key")))
        ce = F.cross_entropy(logits, batch["label"])
        return ce, {"ce": ce.detach(), "acc": (logits.argmax(-1) == batch["label"]).float().mean(),
                    "loss": ce.detach()}


@register_defense("linear_probe")
class LinearProbe(Defense):
    """A linear head on the frozen image features of the few-shot set (the paper's baseline)."""

    Params = LinearProbeParams
    space: dict = {}
    trained = "a linear head"
    data = "fewshot"
    classifies = "head"
    recipe = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 32, "epochs": 40,
              "schedule": "constant", "weight_decay": 0.0, "augment": False, "warmup_epochs": 0}

    @classmethod
    def applies_to(cls, attack: type):
        if getattr(attack, "text_trigger", False):
            return (f"a linear probe has no text side, and {attack.name}'s trigger is half text "
                    f"(a key on the class prompts)")
        return None

    def setup(self) -> None:
        for q in self.loaded.model.parameters():
            q.requires_grad_(False)
        self.module = ProbeObjective(self.loaded, len(self.class_names),
                                     self.params.standardize).to(self.loaded.device)
        self.head = self._logits

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head at inference (its batch norm on running statistics), whatever mode training
        left it in."""
        head = self.module.head
        was = head.training
        head.eval()
        try:
            return head(features)
        finally:
            head.train(was)

    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        return self.module.features(images01)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous()
                   for k, v in self.module.head.state_dict().items()}, str(d / HEAD_FILE))
        return d

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / HEAD_FILE
        if not path.is_file():
            raise DefenseError(f"{self.name}: no {HEAD_FILE} in {directory}")
        state = load_file(str(path))
        try:
            self.module.head.load_state_dict(state)
        except RuntimeError:
            raise DefenseError(f"{self.name}: the head in {directory} does not fit this model and "
                               f"these classes") from None
