"""BadNet: a small noise patch (image mean + Gaussian noise, resampled per image) pasted at a
random position; or a fixed patch image the user brings."""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from .base import (Attack, AttackError, AttackParams, read_trigger_image, register_attack,
                   scaled)


class BadNetParams(AttackParams):
    patch_size: Optional[int] = Field(None, ge=1, description="pixels; default 16 at 224 px, scaled")
    position: Literal["random", "center", "bottom_right", "top_left"] = "random"
    noise_std: float = Field(1.0, gt=0, description="std of the Gaussian noise around the mean")
    patch_image: Optional[str] = Field(None, description="a fixed patch from an image file")


def place(images: torch.Tensor, patch: torch.Tensor, position: str, gen: torch.Generator):
    """Paste ``patch`` [B,3,p,p] (or [3,p,p]) into images at the named or random positions."""
    B, _, H, W = images.shape
    p = patch.shape[-1]
    out = images.clone()
    patch = patch.expand(B, *patch.shape[-3:]) if patch.ndim == 3 else patch
    if position == "random":
        ys = torch.randint(0, H - p + 1, (B,), generator=gen)
        xs = torch.randint(0, W - p + 1, (B,), generator=gen)
    else:
        y, x = {"center": ((H - p) // 2, (W - p) // 2), "bottom_right": (H - p, W - p),
                "top_left": (0, 0)}[position]
        ys, xs = torch.full((B,), y), torch.full((B,), x)
    for i in range(B):
        out[i, :, ys[i]:ys[i] + p, xs[i]:xs[i] + p] = patch[i]
    return out


@register_attack("badnet")
class BadNet(Attack):
    Params = BadNetParams

    def check(self) -> None:
        self.size = self.params.patch_size or scaled(16, self.image_size)
        self.fixed = None
        if self.params.patch_image:
            im = read_trigger_image(self.params.patch_image, f"{self.name}: patch_image")
            arr = np.asarray(im.resize((self.size, self.size), Image.NEAREST), dtype=np.float32) / 255
            self.fixed = torch.from_numpy(arr).permute(2, 0, 1)
        if self.size > self.image_size:
            raise AttackError(f"badnet: patch_size {self.size} is larger than the image "
                              f"({self.image_size} px)")

    def _apply(self, images, gen):
        if self.fixed is not None:
            patch = self.fixed
        else:
            B = images.shape[0]
            mean = images.mean(dim=(2, 3), keepdim=True)
            noise = torch.randn(B, 3, self.size, self.size, generator=gen) * self.params.noise_std
            patch = (mean + noise).clamp(0, 1)
        return place(images, patch, self.params.position, gen)
