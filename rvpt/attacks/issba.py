"""ISSBA (Li et al., ICCV 2021): a sample-specific invisible trigger, StegaStamp-style, pure torch.

A small residual encoder embeds a fixed secret (``secret_bits`` bits drawn from the attack seed)
into each image: the secret goes through a linear layer to a ``secret_map``² × 3 map, upsampled to
the image size and stacked with the image; a plain conv stack turns that into a residual, and the
triggered image is ``clamp(image + residual_scale · tanh(residual), 0, 1)``. Because the encoder
sees the image, the residual differs from image to image. A conv decoder (adaptive pooling, so any
image size works) recovers the bits from triggered images.

``fit`` trains encoder and decoder jointly on clean images, as StegaStamp does: *random* secrets per
batch (with one fixed secret the decoder could output it from the bias alone and the encoder would
learn nothing), a BCE bit loss on the decoder's output for the triggered image plus light noise
(``fit_noise``, robustness to uint8 quantisation and resampling), and an L2 image loss on the
residual that starts after ``image_loss_start`` of the steps (bits first, then imperceptibility)
and ramps up to ``image_weight``. ``apply`` then embeds the fixed secret. The defaults, at 32 px on
the synthetic benchmark: ~96 % of the bits recovered on held-out images, PSNR ~35 dB (mean
|residual| ~3.5/255, capped at ``residual_scale`` = 13/255), ~30 s on one CPU thread; the fit runs
single-threaded so that the weights are bit-identical on any host. No pretrained StegaStamp weights
are used (no TensorFlow); ``loaded`` (the CLIP model) is not needed and may be None. Encoder,
decoder and secret are saved in ``attack_tensors.safetensors``.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydantic import Field

from .base import Attack, AttackError, AttackParams, register_attack


class ISSBAParams(AttackParams):
    secret_bits: int = Field(100, description="length of the embedded secret (paper: 100)")
    secret: Optional[str] = Field("Stega!!", description="the secret string (the papers': "
                                  "'Stega!!'): its UTF-8 bits, repeated to secret_bits (StegaStamp "
                                  "appends BCH parity instead); None: random bits from the seed")
    residual_scale: float = Field(0.05, description="max |residual| in [0, 1] pixel units; 0.05 "
                                  "≈ 13/255 caps the trigger, the image loss keeps it well below")
    secret_map: int = Field(16, description="side of the spatial map the secret is projected to "
                            "before upsampling to the image size (StegaStamp: 50 at 400 px)")
    width: int = Field(8, description="conv channels of encoder and decoder (the secret's linear "
                       "maps hold most of the parameters)")
    fit_steps: int = Field(600, description="Adam steps of the encoder/decoder fit")
    fit_lr: float = Field(5e-3, description="Adam learning rate")
    fit_batch: int = Field(32, description="images per fit step")
    fit_images: int = Field(2048, description="at most this many clean images are taken from "
                            "the batches for the fit")
    image_weight: float = Field(1.0, description="final weight of the L2 image loss, measured on "
                                "residual / residual_scale, against the BCE bit loss")
    image_loss_start: float = Field(0.25, description="fraction of the steps trained on the bit "
                                    "loss alone; the image loss weight then ramps linearly to "
                                    "image_weight at the last step")
    fit_noise: float = Field(2 / 255, description="std of Gaussian noise added to triggered images "
                             "before decoding during the fit")


def secret_bits(text: str, bits: int) -> torch.Tensor:
    """The bits of ``text`` (UTF-8, most significant first), repeated to ``bits`` (a repetition
    code; StegaStamp pads its 56 data bits with BCH parity to 100)."""
    data = [(byte >> (7 - k)) & 1 for byte in text.encode("utf-8") for k in range(8)]
    return torch.tensor([data[i % len(data)] for i in range(bits)], dtype=torch.float32)


class Encoder(nn.Module):
    def __init__(self, bits: int, secret_map: int, width: int):
        super().__init__()
        self.secret_map = secret_map
        self.project = nn.Linear(bits, 3 * secret_map * secret_map)
        self.net = nn.Sequential(
            nn.Conv2d(6, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, images: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """Raw residual (before tanh/scale) for images [B,3,H,W] and secrets [B,bits] in {0,1}."""
        B, _, H, W = images.shape
        m = self.project(secret * 2 - 1).view(B, 3, self.secret_map, self.secret_map)
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        return m + self.net(torch.cat([images * 2 - 1, m], dim=1))


class Decoder(nn.Module):
    def __init__(self, bits: int, secret_map: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 3, 1),
            nn.AdaptiveAvgPool2d(secret_map), nn.Flatten(),
            nn.Linear(3 * secret_map * secret_map, bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Bit logits [B,bits] for images [B,3,H,W] in [0,1]."""
        return self.net(images * 2 - 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b).item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


@register_attack("issba")
class ISSBA(Attack):
    Params = ISSBAParams
    needs_fit = True

    def check(self) -> None:
        p = self.params
        if p.secret_bits < 1:
            raise AttackError(f"issba: secret_bits must be at least 1, got {p.secret_bits}")
        if not 0 < p.residual_scale <= 1:
            raise AttackError(f"issba: residual_scale must be within (0, 1], got "
                              f"{p.residual_scale}")
        for key in ("secret_map", "width", "fit_steps", "fit_batch", "fit_images"):
            if getattr(p, key) < 1:
                raise AttackError(f"issba: {key} must be at least 1, got {getattr(p, key)}")
        if p.secret_map > self.image_size:
            raise AttackError(f"issba: secret_map {p.secret_map} is larger than the image "
                              f"({self.image_size} px)")
        if not p.fit_lr > 0:
            raise AttackError(f"issba: fit_lr must be positive, got {p.fit_lr}")
        for key in ("image_weight", "fit_noise"):
            if not getattr(p, key) >= 0:
                raise AttackError(f"issba: {key} must be non-negative, got {getattr(p, key)}")
        if not 0 <= p.image_loss_start < 1:
            raise AttackError(f"issba: image_loss_start must be within [0, 1), got "
                              f"{p.image_loss_start}")
        if p.secret:
            self.secret = secret_bits(p.secret, p.secret_bits)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            self.secret = torch.randint(0, 2, (p.secret_bits,), generator=gen).float()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.seed)
            self.encoder = Encoder(p.secret_bits, p.secret_map, p.width)
            self.decoder = Decoder(p.secret_bits, p.secret_map, p.width)
        self.encoder.eval()
        self.decoder.eval()

    # -- the trigger ---------------------------------------------------------------------------
    def _embed(self, images: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        residual = self.params.residual_scale * torch.tanh(self.encoder(images, secret))
        return (images + residual).clamp(0, 1)

    def _apply(self, images, gen):
        with torch.no_grad():
            return self._embed(images, self.secret.expand(images.shape[0], -1))

    @torch.no_grad()
    def decode_bits(self, images: torch.Tensor) -> torch.Tensor:
        """The decoder's bits (0./1.) [B,bits] for float images [B,3,H,W] in [0,1]."""
        return (self.decoder(images.float()) > 0).float()

    @torch.no_grad()
    def bit_accuracy(self, images: torch.Tensor) -> torch.Tensor:
        """Per image, the fraction of the secret's bits the decoder recovers (≈ 0.5 on clean
        images, ≈ 1 on triggered ones after a good fit)."""
        return (self.decode_bits(images) == self.secret).float().mean(dim=1)

    # -- fit -----------------------------------------------------------------------------------
    def _clean_images(self, batches: Iterable[dict]) -> torch.Tensor:
        chunks, n = [], 0
        for batch in batches:
            x = batch["image"]
            x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False).clamp(0, 1)
            chunks.append(x[:self.params.fit_images - n])
            n += chunks[-1].shape[0]
            if n >= self.params.fit_images:
                break
        if n == 0:
            raise AttackError("issba: fit got no images")
        return torch.cat(chunks)

    def fit(self, loaded, batches: Iterable[dict], target: int, class_names: list[str],
            templates: list[str]) -> dict:
        p = self.params
        start = time.perf_counter()
        data = self._clean_images(batches)
        N = data.shape[0]
        threads = torch.get_num_threads()
        try:
            # One thread: bit-identical weights whatever the host's thread count, and these tiny
            # convolutions run faster single-threaded (two threads on busy cores: ~20x slower).
            torch.set_num_threads(1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._train(data)
        finally:
            torch.set_num_threads(threads)
        self.fitted = True
        seconds = time.perf_counter() - start
        return {**self.evaluate(data[:512]), "steps": p.fit_steps, "images": N,
                "seconds": round(seconds, 2)}

    def _train(self, data: torch.Tensor) -> None:
        p = self.params
        gen = torch.Generator().manual_seed(self.seed + 1)
        opt = torch.optim.Adam(list(self.encoder.parameters()) + list(self.decoder.parameters()),
                               lr=p.fit_lr)
        self.encoder.train()
        self.decoder.train()
        for step in range(p.fit_steps):
            x = data[torch.randint(0, data.shape[0], (min(p.fit_batch, data.shape[0]),),
                                   generator=gen)]
            secret = torch.randint(0, 2, (x.shape[0], p.secret_bits), generator=gen).float()
            y = self._embed(x, secret)
            noisy = y + p.fit_noise * torch.randn(y.shape, generator=gen)
            bit_loss = F.binary_cross_entropy_with_logits(self.decoder(noisy), secret)
            image_loss = ((y - x) / p.residual_scale).pow(2).mean()
            ramp = (step / p.fit_steps - p.image_loss_start) / (1 - p.image_loss_start)
            loss = bit_loss + p.image_weight * max(0.0, ramp) * image_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.encoder.eval()
        self.decoder.eval()

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict:
        """Bit accuracy on triggered images (fixed secret; also after uint8 rounding, as poisoned
        images are stored), on clean images (should be ≈ 0.5), and the trigger's PSNR."""
        y = self._apply(images, torch.Generator())
        y8 = (y * 255).round() / 255
        d = (y - images).abs()
        return {"bit_acc": self.bit_accuracy(y).mean().item(),
                "bit_acc_uint8": self.bit_accuracy(y8).mean().item(),
                "clean_bit_acc": self.bit_accuracy(images).mean().item(),
                "psnr": psnr(y, images), "mean_abs_residual": d.mean().item(),
                "max_abs_residual": d.max().item()}

    # -- state -----------------------------------------------------------------------------------
    def tensors(self):
        out = {"secret": self.secret}
        out.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        return out

    def load_tensors(self, tensors):
        try:
            secret = tensors["secret"].float()
            if secret.shape != (self.params.secret_bits,):
                raise ValueError(f"secret has shape {tuple(secret.shape)}")
            for name, net in (("encoder", self.encoder), ("decoder", self.decoder)):
                net.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                     if k.startswith(name + ".")})
        except (KeyError, ValueError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AttackError(f"issba: saved tensors do not match the parameters: {msg}") from None
        self.secret = secret
        super().load_tensors(tensors)
