"""Perturbation Resistivity (PR): cos(f(x), f(x+δ)) of the CLS token, per layer, averaged over images.

Perturbations (the paper's): Gaussian noise (std 0.001), Gaussian blur (kernel 3, σ² = 5, i.e.
σ = √5), colour jitter (brightness 0.5, hue 0.3), horizontal flip, and — given an attack — the
trigger itself. Works for any open_clip ViT with or without deep prompts. Low PR means the encoder
reacts strongly to small off-class perturbations, the paper's explanation of backdoor vulnerability.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .prompts import VisualPrompts, visual_forward

Perturb = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _noise(x, gen):
    return x + torch.randn(x.shape, generator=gen) * 0.001


BLUR_SIGMA = 5 ** 0.5  # the paper's blur: kernel 3, σ² = 5 (torchvision's default for kernel 3 is σ = 0.8)


def _blur(x, gen):
    """Gaussian blur, kernel 3 × 3 with σ = √5 (variance 5) as in the paper."""
    from torchvision.transforms.v2 import functional as TF
    return TF.gaussian_blur(x, kernel_size=3, sigma=BLUR_SIGMA)


def _jitter(x, gen):
    from torchvision.transforms import v2
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tf = v2.ColorJitter(brightness=0.5, hue=0.3)
        return torch.stack([tf(img) for img in x])


def _flip(x, gen):
    return x.flip(-1)


# Bump when a perturbation's definition changes: cached results that carry PR are keyed on it.
VERSION = 2  # 2: blur at σ² = 5 (1: torchvision's default σ 0.8)

PERTURBATIONS: dict[str, Perturb] = {"noise": _noise, "blur": _blur, "jitter": _jitter,
                                     "flip": _flip}


@torch.no_grad()
def cls_per_layer(loaded, images01: torch.Tensor,
                  prompts: Optional[VisualPrompts] = None) -> list[torch.Tensor]:
    """The CLS token after every block (prompted blocks carry their prompts)."""
    _, feats = visual_forward(loaded.model.visual, loaded.normalize(images01), prompts,
                              collect_from=0)
    return feats


@torch.no_grad()
def perturbation_resistivity(loaded, batches: Iterable[dict],
                             prompts: Optional[VisualPrompts] = None, attack=None,
                             names: Optional[Iterable[str]] = None, seed: int = 0,
                             max_images: Optional[int] = None) -> dict:
    """``{"pr/<perturbation>/<layer>": value, "pr/<perturbation>": mean over layers,
    "pr_mean": mean over the off-class perturbations (not the trigger)}``."""
    perturbs = {n: PERTURBATIONS[n] for n in (names or PERTURBATIONS)}
    if attack is not None:
        perturbs["trigger"] = lambda x, gen: attack.apply(x, seed=int(gen.initial_seed()))
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    loaded.model.eval()
    for batch in batches:
        x = batch["image"].float().div(255)
        if max_images is not None:
            x = x[: max(0, max_images - n)]
        if not len(x):
            break
        base = cls_per_layer(loaded, x, prompts)
        for name, fn in perturbs.items():
            other = cls_per_layer(loaded, fn(x, gen).clamp(0, 1), prompts)
            cos = torch.stack([F.cosine_similarity(a, b, dim=-1).sum() for a, b in zip(base, other)])
            sums[name] = sums.get(name, 0) + cos.cpu()
        n += len(x)
    out: dict = {}
    for name, total in sums.items():
        per_layer = (total / max(1, n)).tolist()
        for layer, v in enumerate(per_layer):
            out[f"pr/{name}/{layer}"] = v
        out[f"pr/{name}"] = sum(per_layer) / len(per_layer)
    off = [out[f"pr/{k}"] for k in perturbs if k != "trigger"]
    out["pr_mean"] = sum(off) / len(off) if off else None
    out["pr_images"] = n
    return out
