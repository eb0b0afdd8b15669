"""Deep visual prompts (VPT-deep) for open_clip's VisionTransformer, of any size.

From block ``depth`` on (0-based; the first ``depth`` blocks stay unprompted), every block gets
``length`` learnable prompt tokens inserted after the CLS token; each block's prompt outputs are
discarded and replaced by the next block's own prompts, and the prompt tokens are dropped before
pooling. The backbone stays frozen: :class:`VisualPrompts` holds the only trainable parameters and
is saved apart from it (``prompts.safetensors`` + ``prompts.json``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

PROMPTS_FILE = "prompts.safetensors"
PROMPTS_META = "prompts.json"


def vision_blocks(visual: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "_embeds") or not hasattr(visual, "_pool"):
        raise TypeError("visual prompts need an open_clip VisionTransformer (ViT) image tower")
    return blocks


class VisualPrompts(nn.Module):
    """``prompts[i]`` ([length, width]) is inserted at block ``depth + i``."""

    def __init__(self, num_blocks: int, width: int, depth: int = 3, length: int = 50,
                 init_std: float = 0.02, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 0 <= depth < num_blocks:
            raise ValueError(f"prompt depth must be in [0, {num_blocks - 1}] for a "
                             f"{num_blocks}-block ViT, got {depth}")
        if length < 0:
            raise ValueError(f"prompt length must be >= 0, got {length}")
        self.num_blocks, self.width, self.depth, self.length = num_blocks, width, depth, length
        self.init_std = init_std
        init = torch.randn(num_blocks - depth, length, width, generator=generator) * init_std
        self.prompts = nn.Parameter(init)

    @classmethod
    def for_model(cls, model: nn.Module, depth: int = 3, length: int = 50, init_std: float = 0.02,
                  seed: Optional[int] = None) -> "VisualPrompts":
        visual = getattr(model, "visual", model)
        blocks = vision_blocks(visual)
        width = visual.class_embedding.shape[-1]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return cls(len(blocks), width, depth, length, init_std, gen)

    def meta(self) -> dict:
        return {"num_blocks": self.num_blocks, "width": self.width, "depth": self.depth,
                "length": self.length, "init_std": self.init_std}

    def save(self, directory: str | Path, **extra) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"prompts": self.prompts.detach().cpu().contiguous()}, str(d / PROMPTS_FILE))
        (d / PROMPTS_META).write_text(json.dumps({**self.meta(), **extra}, indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "VisualPrompts":
        d = Path(directory)
        if not (d / PROMPTS_META).exists() or not (d / PROMPTS_FILE).exists():
            raise FileNotFoundError(f"no prompts ({PROMPTS_META} + {PROMPTS_FILE}) in {d}")
        meta = json.loads((d / PROMPTS_META).read_text())
        p = cls(meta["num_blocks"], meta["width"], meta["depth"], meta["length"],
                meta.get("init_std", 0.02))
        tensor = load_file(str(d / PROMPTS_FILE))["prompts"]
        if tensor.shape != p.prompts.shape:
            raise ValueError(f"prompts in {d} have shape {tuple(tensor.shape)}, expected "
                             f"{tuple(p.prompts.shape)}")
        with torch.no_grad():
            p.prompts.copy_(tensor)
        return p


FeatureSite = Literal["block", "embedding"]


def visual_forward(visual: nn.Module, x: Tensor, prompts: Optional[VisualPrompts] = None,
                   collect_from: Optional[int] = None, feature_site: FeatureSite = "block"
                   ) -> tuple[Tensor, list[Tensor]]:
    """Run the image tower on normalised images ``x``, with or without prompts.

    Returns the (unnormalised, projected) image embedding and, when ``collect_from`` is given, the
    CLS token after every block from ``collect_from`` on. With ``feature_site="embedding"`` the last
    collected feature is the final projected embedding instead of the last block's CLS output.
    """
    blocks = vision_blocks(visual)
    if prompts is not None and prompts.num_blocks != len(blocks):
        raise ValueError(f"prompts were made for {prompts.num_blocks} blocks, the model has "
                         f"{len(blocks)}")
    batch_first = getattr(visual.transformer, "batch_first", True)
    h = visual._embeds(x)  # [B, 1+N, D]
    B = h.shape[0]
    L = prompts.length if prompts is not None else 0
    feats: list[Tensor] = []
    for i, blk in enumerate(blocks):
        if prompts is not None and i >= prompts.depth:
            p = prompts.prompts[i - prompts.depth].to(h.dtype).unsqueeze(0).expand(B, -1, -1)
            rest = h[:, 1:] if i == prompts.depth else h[:, 1 + L:]
            h = torch.cat([h[:, :1], p, rest], dim=1)
        if batch_first:
            h = blk(h)
        else:
            h = blk(h.transpose(0, 1)).transpose(0, 1)
        if collect_from is not None and i >= collect_from:
            feats.append(h[:, 0])
    if prompts is not None and L:
        h = torch.cat([h[:, :1], h[:, 1 + L:]], dim=1)
    pooled, _ = visual._pool(h)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    if feats and feature_site == "embedding":
        feats[-1] = pooled
    return pooled, feats


class PromptedImageEncoder(nn.Module):
    """A frozen CLIP image tower with trainable deep prompts; ``forward`` gives normalised
    embeddings (and, for the repelling loss, the prompted blocks' CLS features)."""

    def __init__(self, visual: nn.Module, prompts: VisualPrompts):
        super().__init__()
        self.visual = visual
        self.prompts = prompts
        for p in self.visual.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PromptedImageEncoder":
        """Only the prompts train; the frozen tower stays in eval mode (no dropout)."""
        super().train(mode)
        self.visual.eval()
        return self

    def forward(self, x: Tensor, with_features: bool = False,
                feature_site: FeatureSite = "block"):
        emb, feats = visual_forward(self.visual, x, self.prompts,
                                    self.prompts.depth if with_features else None, feature_site)
        emb = nn.functional.normalize(emb, dim=-1)
        return (emb, feats) if with_features else emb
