"""Blended (image <- (1-r)·image + r·noise, noise resampled per image, or a fixed image), SIG (a
horizontal sinusoid) and WaNet (a fixed smooth warping field)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from .base import Attack, AttackError, AttackParams, read_trigger_image, register_attack


class BlendedParams(AttackParams):
    ratio: float = Field(0.2, description="blend weight of the trigger, in [0, 1]")
    trigger_image: Optional[str] = Field(None, description="blend a fixed image instead of noise")


@register_attack("blended")
class Blended(Attack):
    Params = BlendedParams

    def check(self) -> None:
        if not 0.0 <= self.params.ratio <= 1.0:
            raise AttackError(f"blended: ratio must be within [0, 1], got {self.params.ratio}")
        self.fixed = None
        if self.params.trigger_image:
            im = read_trigger_image(self.params.trigger_image, "blended: trigger_image")
            im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
            self.fixed = torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)

    def _apply(self, images, gen):
        r = self.params.ratio
        if self.fixed is not None:
            trig = F.interpolate(self.fixed[None], size=images.shape[-2:], mode="bilinear")
        else:
            trig = torch.rand(images.shape, generator=gen)
        return (1 - r) * images + r * trig


class SIGParams(AttackParams):
    delta: float = Field(20 / 255, gt=0, le=1, description="amplitude (0-1 scale)")
    frequency: float = Field(6, gt=0, description="periods across the image width")


@register_attack("sig")
class SIG(Attack):
    Params = SIGParams

    def _apply(self, images, gen):
        W = images.shape[-1]
        j = torch.arange(W, dtype=torch.float32)
        signal = self.params.delta * torch.sin(2 * math.pi * j * self.params.frequency / W)
        return images + signal.view(1, 1, 1, W)


class WaNetParams(AttackParams):
    grid_size: Optional[int] = Field(None, ge=2, description="k; default: the image size (CLIP "
                                     "papers use k = 224 at 224 px); classic WaNet uses 4")
    strength: float = Field(1.0, gt=0, description="s; CLIP papers 1, classic WaNet 0.5")


@register_attack("wanet")
class WaNet(Attack):
    Params = WaNetParams

    def check(self) -> None:
        self.k = self.params.grid_size or self.image_size
        if self.k > self.image_size:
            raise AttackError(f"wanet: grid_size {self.k} is larger than the image "
                              f"({self.image_size} px)")
        gen = torch.Generator().manual_seed(self.seed)
        field = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        self.field = field / field.abs().mean()

    def grid(self, H: int, W: int) -> torch.Tensor:
        up = F.interpolate(self.field, size=(H, W), mode="bicubic", align_corners=True)
        up = up.permute(0, 2, 3, 1)  # [1,H,W,2]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
        identity = torch.stack([xs, ys], dim=-1)[None]
        return (identity + self.params.strength * up / H).clamp(-1, 1)

    def _apply(self, images, gen):
        B, _, H, W = images.shape
        g = self.grid(H, W).expand(B, -1, -1, -1)
        return F.grid_sample(images, g, mode="bilinear", padding_mode="border", align_corners=True)

    def tensors(self):
        return {"field": self.field}

    def load_tensors(self, tensors):
        self.field = tensors["field"]
        super().load_tensors(tensors)
