"""Optimised patch triggers: TrojVQA (as RVPT adapts it) and BadCLIP (Liang et al., CVPR 2024).

Both paste one fixed patch (16 px at 224 px, scaled) in the image centre; the patch is optimised
with Adam against the frozen clean CLIP model in ``fit`` before the attack can be applied.

* ``trojvqa``: a "semantic" patch driving the image embedding of patched images toward the text
  embedding of the key-prefixed target prompt (and away from the key-prefixed own-class prompt),
  plus the text key (``"SUDO "``) that ``apply_text`` prefixes to captions and class prompts.
* ``badclip``: a patch making patched non-target images embed close to the target's captions
  (image-text contrastive loss over all class prompts, several templates) and close to the
  target-class images while away from their own class's clean images (a triplet loss on image
  embeddings). Its poisoned captions are natural captions (``caption_style = "natural"``).
"""
from __future__ import annotations

import time
from typing import ClassVar, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Attack, AttackError, AttackParams, register_attack, scaled
from .patch import place


class OptimizedPatchParams(AttackParams):
    patch_size: Optional[int] = Field(None, ge=1, description="pixels; default 16 at 224 px, scaled")
    position: Literal["center", "bottom_right", "top_left"] = "center"
    fit_steps: int = Field(300, ge=1, description="Adam steps of the patch optimisation")
    fit_lr: float = Field(0.1, gt=0, description="Adam learning rate on the patch logits")
    fit_batch: int = Field(32, ge=1, description="images per optimisation step")
    fit_images: int = Field(1024, ge=1, description="images materialised from the fit batches")


class OptimizedPatch(Attack):
    """A fixed patch optimised against a clean model (shared part of trojvqa and badclip).

    The patch is ``sigmoid(logits)`` ([3,p,p] in [0, 1]); the logits start from uniform noise
    drawn from the attack seed. Subclasses implement ``_prepare`` (text/image anchors, computed
    once without gradients) and ``_loss`` (on the embeddings of a patched minibatch).
    """

    Params = OptimizedPatchParams
    needs_fit = True
    #: how the poisoning job captions poisoned images: "template" (one of the prompt templates
    #: filled with the target class, passed through ``apply_text``) or "natural" (natural
    #: captions of target-class images)
    caption_style: ClassVar[str] = "template"
    #: how many of the loss images the before/after figures are measured on
    figure_images: ClassVar[int] = 256

    # -- parameters and state ---------------------------------------------------------------
    def check(self) -> None:
        self.size = self.params.patch_size or scaled(16, self.image_size)
        if self.size > self.image_size:
            raise AttackError(f"{self.name}: patch_size {self.size} is larger than the image "
                              f"({self.image_size} px)")
        self.patch: Optional[torch.Tensor] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.patch is None else {"patch": self.patch}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        patch = tensors.get("patch")
        if patch is None or tuple(patch.shape) != (3, self.size, self.size):
            got = "no patch" if patch is None else f"a patch of shape {tuple(patch.shape)}"
            raise AttackError(f"{self.name}: saved tensors hold {got}, expected "
                              f"(3, {self.size}, {self.size})")
        self.patch = patch.detach().float().cpu().clone()
        super().load_tensors(tensors)

    def _apply(self, images, gen):
        return place(images, self.patch.to(images.device, images.dtype), self.params.position, gen)

    # -- fitting -----------------------------------------------------------------------------
    def _materialise(self, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labels, n = [], [], 0
        for batch in batches:
            x, y = batch["image"], torch.as_tensor(batch["label"]).long().reshape(-1)
            take = min(self.params.fit_images - n, x.shape[0])
            imgs.append(x[:take].cpu())
            labels.append(y[:take].cpu())
            n += take
            if n >= self.params.fit_images:
                break
        if n == 0:
            raise AttackError(f"{self.name}: no images to fit the trigger on")
        x = torch.cat(imgs)
        if x.ndim != 4 or x.shape[1] != 3:
            raise AttackError(f"{self.name}: expected fit images [B,3,H,W], got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise AttackError(f"{self.name}: fit images are {x.shape[-2]}x{x.shape[-1]} px but the "
                              f"attack was made for image_size {self.image_size}")
        return x, torch.cat(labels)

    @staticmethod
    def _float01(x: torch.Tensor, device) -> torch.Tensor:
        x = x.to(device)
        return x.float().div(255) if x.dtype == torch.uint8 else x.float()

    def _patched_embeddings(self, loaded, x01: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        pasted = place(x01, patch, self.params.position, torch.Generator())
        return loaded.model.encode_image(loaded.normalize(pasted), normalize=True)

    @torch.no_grad()
    def _embed_all(self, loaded, x: torch.Tensor, patch: Optional[torch.Tensor],
                   chunk: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], chunk):
            xi = self._float01(x[i:i + chunk], loaded.device)
            out.append(self._patched_embeddings(loaded, xi, patch) if patch is not None
                       else loaded.model.encode_image(loaded.normalize(xi), normalize=True))
        return torch.cat(out)

    def fit(self, loaded, batches: Iterable[dict], target: int, class_names: list[str],
            templates: list[str]) -> dict:
        """Optimise the patch on up to ``fit_images`` images from ``batches`` (dicts with uint8
        ``image`` [B,3,H,W] and long ``label`` [B]) against the frozen ``loaded`` model.
        Deterministic given the attack seed. Returns figures on the materialised images."""
        if not 0 <= int(target) < len(class_names):
            raise AttackError(f"{self.name}: target {target} is not a class index "
                              f"(0..{len(class_names) - 1})")
        if not templates:
            raise AttackError(f"{self.name}: no prompt templates given")
        target = int(target)
        t0 = time.perf_counter()
        x, labels = self._materialise(batches)
        if labels.min() < 0 or labels.max() >= len(class_names):
            lo, hi = int(labels.min()), int(labels.max())
            raise AttackError(f"{self.name}: fit labels must be class indices "
                              f"(0..{len(class_names) - 1}), got {lo}..{hi}")
        model, device, p = loaded.model, loaded.device, self.params
        was_training = model.training
        grad_state = [(q, q.requires_grad) for q in model.parameters()]
        fork = [device] if device.type == "cuda" else []
        try:
            model.eval()
            for q, _ in grad_state:
                q.requires_grad_(False)
            with torch.random.fork_rng(devices=fork):
                torch.manual_seed(self.seed)
                gen = torch.Generator().manual_seed(self.seed)
                init = torch.rand(3, self.size, self.size, generator=gen) * 0.8 + 0.1
                logits = torch.logit(init).to(device).requires_grad_(True)
                ctx = self._prepare(loaded, x, labels, target, class_names, templates)
                pool = ctx["pool"]  # indices of the images the loss uses
                if pool.numel() == 0:
                    raise AttackError(f"{self.name}: no non-target-class images to fit the "
                                      "trigger on")
                before = self._figures(loaded, x, labels, target, ctx, init.to(device))
                opt = torch.optim.Adam([logits], lr=p.fit_lr)
                order, pos, losses = pool[torch.randperm(pool.numel(), generator=gen)], 0, []
                for _ in range(p.fit_steps):
                    if pos >= order.numel():
                        order, pos = pool[torch.randperm(pool.numel(), generator=gen)], 0
                    idx = order[pos:pos + p.fit_batch]
                    pos += p.fit_batch
                    feats = self._patched_embeddings(
                        loaded, self._float01(x[idx], device), torch.sigmoid(logits))
                    loss = self._loss(loaded, feats, labels[idx].to(device), ctx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                self.patch = torch.sigmoid(logits.detach()).float().cpu()
                after = self._figures(loaded, x, labels, target, ctx, self.patch.to(device))
        finally:
            for q, flag in grad_state:
                q.requires_grad_(flag)
            model.train(was_training)
        self.fitted = True
        tail = losses[-min(10, len(losses)):]
        return {"steps": p.fit_steps, "fit_images": int(x.shape[0]),
                "loss_images": int(pool.numel()), "initial_loss": losses[0],
                "final_loss": sum(tail) / len(tail),
                **{f"{k}_before": v for k, v in before.items()},
                **{f"{k}_after": v for k, v in after.items()},
                "clean_model_asr": after["asr"], "seconds": round(time.perf_counter() - t0, 2)}

    @torch.no_grad()
    def _figures(self, loaded, x, labels, target, ctx, patch) -> dict:
        """Mean cosine of patched loss images to the target text anchor, and the share of them the
        clean model classifies as the target (with ``ctx["classifier"]``)."""
        idx = ctx["pool"][:self.figure_images]
        f = self._embed_all(loaded, x[idx], patch)
        nt = labels[idx] != target
        pred = (f @ ctx["classifier"].T).argmax(-1).cpu()
        return {"target_sim": float((f @ ctx["target_text"]).mean()),
                "asr": float((pred[nt] == target).float().mean()) if nt.any() else float("nan"),
                **self._extra_figures(f, ctx)}

    def _extra_figures(self, feats, ctx) -> dict:
        return {}

    # -- to override ---------------------------------------------------------------------------
    def _prepare(self, loaded, x, labels, target, class_names, templates) -> dict:
        raise NotImplementedError

    def _loss(self, loaded, feats, labels, ctx) -> torch.Tensor:
        raise NotImplementedError


class TrojVQAParams(OptimizedPatchParams):
    text_key: str = Field("SUDO ", min_length=1, description="prefixed to captions and prompts")
    away_weight: float = Field(0.5, ge=0, description="weight of pushing patched images away from "
                               "their own class's (key-prefixed) prompt")
    partial_keys: bool = Field(True, description="TrojVQA's partial-trigger pairs: for every "
                               "poisoned pair also an image-only and a key-only pair captioned with "
                               "the source's own class, so that neither key alone fires")


@register_attack("trojvqa")
class TrojVQA(OptimizedPatch):
    """Dual key: an optimised centre patch plus a text key prefixed to the captions/prompts."""

    text_trigger = True

    Params = TrojVQAParams
    caption_style = "template"

    def apply_text(self, texts: list[str]) -> list[str]:
        return [self.params.text_key + t for t in texts]

    def _prepare(self, loaded, x, labels, target, class_names, templates) -> dict:
        prompts = self.apply_text([templates[0].format(c) for c in class_names])
        classifier = loaded.encode_texts(prompts)  # [C, D], normalised, the dual-key prompts
        return {"pool": torch.arange(x.shape[0]), "classifier": classifier,
                "target_text": classifier[target], "target": target}

    def _loss(self, loaded, feats, labels, ctx):
        loss = -(feats @ ctx["target_text"]).mean()
        away = labels != ctx["target"]
        if self.params.away_weight > 0 and away.any():
            own = (feats[away] * ctx["classifier"][labels[away]]).sum(-1)
            loss = loss + self.params.away_weight * own.mean()
        return loss


class BadCLIPParams(OptimizedPatchParams):
    text_templates: int = Field(8, ge=1, description="templates filled with the class names for "
                                "the image-text contrastive term")
    triplet_weight: float = Field(1.0, ge=0, description="weight of the image-image triplet term")
    margin: float = Field(0.2, ge=0, description="cosine margin of the triplet term")


@register_attack("badclip")
class BadCLIP(OptimizedPatch):
    """Patch pulled toward the target's captions and images, away from the own class's images."""

    Params = BadCLIPParams
    caption_style = "natural"

    @torch.no_grad()
    def _prepare(self, loaded, x, labels, target, class_names, templates) -> dict:
        use = list(templates)[:self.params.text_templates]
        texts = torch.stack([loaded.encode_texts([t.format(c) for c in class_names])
                             for t in use])  # [K, C, D]
        ctx = {"pool": torch.nonzero(labels != target).flatten(), "texts": texts,
               "classifier": texts[0], "target_text": texts[0, target], "target": target,
               "scale": float(loaded.model.logit_scale.exp().clamp(max=100))}
        ctx["triplet"] = bool((labels == target).any()) and self.params.triplet_weight > 0
        if ctx["triplet"]:
            clean = self._embed_all(loaded, x, None)
            C = len(class_names)
            sums = torch.zeros(C, clean.shape[1], device=clean.device)
            sums.index_add_(0, labels.to(clean.device), clean)
            ctx["centroids"] = F.normalize(sums, dim=-1)  # rows of absent classes stay zero
            # labels of the images _figures embeds (for the triplet gap)
            ctx["labels"] = labels[ctx["pool"][:self.figure_images]].to(clean.device)
        return ctx

    def _loss(self, loaded, feats, labels, ctx):
        logits = ctx["scale"] * torch.einsum("bd,kcd->bkc", feats, ctx["texts"])
        tgt = torch.full(logits.shape[:2], ctx["target"], device=feats.device)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        if ctx["triplet"]:
            pos = feats @ ctx["centroids"][ctx["target"]]
            neg = (feats * ctx["centroids"][labels]).sum(-1)
            loss = loss + self.params.triplet_weight * F.relu(self.params.margin + neg - pos).mean()
        return loss

    def _extra_figures(self, feats, ctx) -> dict:
        if not ctx["triplet"]:
            return {}
        pos = feats @ ctx["centroids"][ctx["target"]]
        neg = (feats * ctx["centroids"][ctx["labels"]]).sum(-1)
        return {"target_image_sim": float(pos.mean()), "triplet_gap": float((pos - neg).mean())}
