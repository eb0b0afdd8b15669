"""RVPT (Repulsive Visual Prompt Tuning) and plain VPT, its α = 0 ablation.

Loss = CE(logit_scale · cos(prompted image embedding, frozen class text embeddings), label)
     + α · L_FR, where L_FR is the cosine between the prompted CLS token and the CLS token of the
same frozen model without prompts (computed without gradients), averaged over the prompted blocks
and the batch. With a margin m the repelling term is max(L_FR, m) (m = 1 is plain VPT).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..prompts import PromptedImageEncoder, VisualPrompts, visual_forward
from ..zeroshot import class_embeddings
from .base import Defense, DefenseError, DefenseParams, register_defense


class PromptParams(DefenseParams):
    depth: int = Field(3, ge=0, description="non-prompted leading blocks (prompts in the rest)")
    length: int = Field(50, ge=0, description="prompt tokens per prompted block")
    alpha: float = Field(2.0, ge=0, description="weight of the feature-repelling loss")
    margin: Optional[float] = Field(None, ge=-1, le=1, description="repel term max(L_FR, m)")
    feature_site: Literal["block", "embedding"] = Field(
        "block", description="last block's feature: its CLS output, or the projected embedding")
    init_std: float = Field(0.02, gt=0)
    cache_frozen: bool = Field(False, description="cache the frozen model's features per sample "
                               "(used only when augmentation is off)")


class VPTParams(PromptParams):
    alpha: float = Field(0.0, ge=0, description="weight of the feature-repelling loss")


class PromptObjective(nn.Module):
    """The trainable module: prompts on the frozen tower, and the RVPT loss."""

    def __init__(self, loaded, prompts: VisualPrompts, text_emb: torch.Tensor, p: PromptParams):
        super().__init__()
        self.loaded = loaded
        self.encoder = PromptedImageEncoder(loaded.model.visual, prompts)
        self.register_buffer("text_emb", text_emb, persistent=False)
        self.logit_scale = float(loaded.model.logit_scale.exp().clamp(max=100))
        self.p = p
        self.cache: dict[str, list[torch.Tensor]] = {}

    def frozen_features(self, x: torch.Tensor, keys) -> list[torch.Tensor]:
        depth, site = self.encoder.prompts.depth, self.p.feature_site
        use_cache = self.p.cache_frozen and keys is not None
        if use_cache and all(k in self.cache for k in keys):
            feats = [self.cache[k] for k in keys]
            return [torch.stack(f) for f in zip(*feats)]
        with torch.no_grad():
            _, ref = visual_forward(self.encoder.visual, x, None, depth, site)
        if use_cache:
            for j, k in enumerate(keys):
                self.cache[k] = [f[j].detach() for f in ref]
        return ref

    def forward(self, batch: dict):
        labels, keys = batch["label"], batch.get("key")
        x = self.loaded.normalize(batch["image"])
        repel = self.p.alpha > 0
        out = self.encoder(x, with_features=repel, feature_site=self.p.feature_site)
        emb, feats = out if repel else (out, [])
        logits = self.logit_scale * emb @ self.text_emb.T
        ce = F.cross_entropy(logits, labels)
        stats = {"ce": ce.detach(), "acc": (logits.argmax(-1) == labels).float().mean()}
        loss = ce
        if repel:
            ref = self.frozen_features(x, keys)
            fr = torch.stack([F.cosine_similarity(a, b.to(a.dtype), dim=-1).mean()
                              for a, b in zip(feats, ref)]).mean()
            stats["fr"] = fr.detach()
            if self.p.margin is not None:
                fr = torch.clamp(fr, min=self.p.margin)
            loss = ce + self.p.alpha * fr
        stats["loss"] = loss.detach()
        return loss, stats


@register_defense("rvpt")
class RVPT(Defense):
    """Deep visual prompts trained with CE + α·feature-repelling loss (α = 2)."""

    Params = PromptParams
    space = {"depth": [3, 6], "length": [10, 50], "alpha": [1.0, 2.0]}
    trained = "prompts"
    data = "fewshot"

    def setup(self) -> None:
        p = self.params
        try:
            prompts = VisualPrompts.for_model(self.loaded.model, p.depth, p.length, p.init_std,
                                              seed=self.seed)
        except (ValueError, TypeError) as e:
            raise DefenseError(f"{self.name}: {e}") from None
        prompts.to(self.loaded.device)
        text = class_embeddings(self.loaded, self.class_names, self.templates[:1])
        for q in self.loaded.model.parameters():
            q.requires_grad_(False)
        self.module = PromptObjective(self.loaded, prompts, text, p)

    @property
    def prompts(self) -> VisualPrompts:
        return self.module.encoder.prompts

    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module.encoder(self.loaded.normalize(images01))

    def save(self, directory: str | Path) -> Path:
        return self.prompts.save(directory, defense=self.name,
                                 params=self.params.model_dump(mode="json"))

    def load(self, directory: str | Path) -> None:
        loaded = VisualPrompts.load(directory)
        if loaded.prompts.shape != self.prompts.prompts.shape:
            raise DefenseError(f"{self.name}: prompts in {directory} do not fit this model/params")
        with torch.no_grad():
            self.prompts.prompts.copy_(loaded.prompts)


@register_defense("vpt")
class VPT(RVPT):
    """Plain visual prompt tuning: RVPT with α = 0 (the paper's ablation)."""

    Params = VPTParams
    space = {"depth": [3, 6], "length": [10, 50]}


@register_defense("none")
class NoDefense(Defense):
    """The backdoored model as it is, zero-shot."""

    def save(self, directory: str | Path) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return Path(directory)

    def load(self, directory: str | Path) -> None:
        pass
