"""CBPT, class-wise backdoor prompt tuning (Kong et al., 2025): both encoders stay frozen.

1. Trigger inversion by contrastive learning (:meth:`CBPT.prepare`, on the defender's clean shots):
   a dummy trigger — a mask ``m`` (H×W) and a pattern ``p`` (3×H×W), ``x̃ = (1-m)·x + m·p`` — is
   fitted so that triggered images of *different* classes are pulled together in the image
   embedding space (a backdoor collapses them onto its target) while each is pushed away from its
   own clean version:

       L_inv = mean_i [ -mean_{j: y_j≠y_i} log softmax_k(s_ik)[j] ] + λ·mean(m)

   where, for anchor ``x̃_i``, the candidates ``k`` are the other triggered images ``x̃_j``
   (similarity ``cos(f(x̃_i), f(x̃_j))/τ``) and its own clean image (``cos(f(x̃_i), f(x_i))/τ``).
2. Class-wise text prompts (CoOp with a context per class, text encoder frozen): class ``c`` is
   ``[V_1^c … V_M^c] name_c.``, trained with

       L = CE(clean shots) + α·CE(dummy-triggered shots, their true labels) + β·(1 - cos(t_c, t̂_c))

   so that the trigger's feature region is re-classified while clean accuracy is kept. ``t̂_c`` is
   the class's hand-made prompt embedding (a KgCoOp-style anchor).

The paper's method sections were not readable here (only their abstracts and figures): the trigger
parametrisation, the positives/negatives above, the third loss and every number below are
reconstructions, each a parameter. Classification is by the learned class prompts; a dual-key
attack's text key goes in front of them (``"SUDO [V…] name."``) exactly as on hand-made prompts.
:meth:`CBPT.report` says how the inverted trigger matches the true one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Defense, DefenseError, DefenseParams, register_defense

STATE_FILE = "cbpt.safetensors"
PLACEHOLDER = "x"  # the token whose embedding the learned context replaces


class CBPTParams(DefenseParams):
    length: int = Field(4, ge=1, description="context tokens per class (CoOp: 16; 4 starts from "
                        "'a photo of a')")
    init: Literal["template", "random"] = Field(
        "template", description="context init: the first template's words before the class name "
        "(when they are `length` tokens), or N(0, 0.02)")
    trigger_weight: float = Field(1.0, ge=0, description="α: CE on dummy-triggered shots")
    anchor_weight: float = Field(1.0, ge=0, description="β: 1 - cos to the hand-made prompt")
    mask_penalty: float = Field(1.0, ge=0, description="λ: weight of the mask's mean area in the "
                                "inversion (larger: a smaller trigger)")
    invert_steps: int = Field(300, ge=0, description="Adam steps of the trigger inversion (0: no "
                              "trigger, plain class-wise CoOp)")
    invert_lr: float = Field(0.1, gt=0)
    invert_batch: int = Field(64, ge=2)
    temperature: float = Field(0.1, gt=0, description="τ of the inversion's contrastive loss")


def _token_embedding(model: nn.Module) -> nn.Embedding:
    emb = getattr(model, "token_embedding", None)
    if emb is None and hasattr(model, "text"):
        emb = getattr(model.text, "token_embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise DefenseError("cbpt: needs an open_clip text transformer (token_embedding); this "
                           "model's text tower has none")
    return emb


class CBPTObjective(nn.Module):
    """Class contexts (trained), the inverted trigger (buffers: found once by ``prepare``) and
    CBPT's loss. The image and text towers stay frozen."""

    def __init__(self, loaded, class_names: list[str], template: str, p: CBPTParams, seed: int):
        super().__init__()
        self.loaded, self.p = loaded, p
        self.names = class_names
        embedding = _token_embedding(loaded.model)  # not a submodule: the tower stays the model's
        tok = loaded.tokenizer([PLACEHOLDER])[0]
        self.x_id = int(tok[1])
        prefix, _, suffix = template.partition("{}")
        self.suffix = suffix
        gen = torch.Generator().manual_seed(seed)
        width = embedding.embedding_dim
        ctx = torch.randn(len(class_names), p.length, width, generator=gen) * 0.02
        words = loaded.tokenizer([prefix.strip()])[0]
        words = words[1:int(words.argmax())]  # between start and end of text
        if p.init == "template" and len(words) == p.length:
            with torch.no_grad():
                ctx[:] = embedding(words.to(loaded.device)).cpu()
        self.ctx = nn.Parameter(ctx.to(loaded.device))
        size = loaded.image_size
        self.register_buffer("mask_logit", torch.full((1, 1, size, size), -20.0,
                                                      device=loaded.device))
        self.register_buffer("pattern_logit", torch.zeros(1, 3, size, size, device=loaded.device))
        with torch.no_grad():
            hand = loaded.encode_texts([template.format(c) for c in class_names])
        self.register_buffer("anchor", hand)
        self.logit_scale = float(loaded.model.logit_scale.exp().clamp(max=100))

    # -- the trigger --------------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        return torch.sigmoid(self.mask_logit)

    def stamp(self, x01: torch.Tensor) -> torch.Tensor:
        m, pat = torch.sigmoid(self.mask_logit), torch.sigmoid(self.pattern_logit)
        return (1 - m) * x01.to(m.device) + m * pat

    # -- the class prompts --------------------------------------------------------------------
    def prompts(self, apply_text=None) -> list[str]:
        texts = [" ".join([PLACEHOLDER] * self.p.length) + f" {c}{self.suffix}" for c in self.names]
        return list(apply_text(texts)) if apply_text is not None else texts

    def text_features(self, apply_text=None) -> torch.Tensor:
        """Normalised class embeddings [C, D] from the learned contexts (differentiable)."""
        tokens = self.loaded.tokenizer(self.prompts(apply_text)).to(self.loaded.device)
        slots = tokens == self.x_id
        # the first `length` placeholders of each prompt are the context (a class name may hold x)
        slots &= slots.cumsum(1) <= self.p.length
        if not bool((slots.sum(1) == self.p.length).all()):
            raise DefenseError("cbpt: a prompt lost its context tokens (truncated by the "
                               "tokenizer's context length?)")
        ctx = self.ctx

        def put(_module, _inputs, out):
            out = out.clone()
            out[slots] = ctx.reshape(-1, ctx.shape[-1]).to(out.dtype)
            return out

        hook = _token_embedding(self.loaded.model).register_forward_hook(put)
        try:
            return F.normalize(self.loaded.model.encode_text(tokens), dim=-1)
        finally:
            hook.remove()

    def forward(self, batch: dict):
        x, y = batch["image"], batch["label"]
        with torch.no_grad():
            img = self.loaded.encode_images(x)
            img_t = self.loaded.encode_images(self.stamp(x))
        t = self.text_features()
        logits = self.logit_scale * img @ t.T
        ce = F.cross_entropy(logits, y)
        ce_t = F.cross_entropy(self.logit_scale * img_t @ t.T, y)
        anchor = (1 - (t * self.anchor).sum(-1)).mean()
        loss = ce + self.p.trigger_weight * ce_t + self.p.anchor_weight * anchor
        stats = {"ce": ce.detach(), "ce_trigger": ce_t.detach(), "anchor": anchor.detach(),
                 "acc": (logits.argmax(-1) == y).float().mean(), "loss": loss.detach()}
        return loss, stats


@register_defense("cbpt")
class CBPT(Defense):
    """Class-wise text prompts trained against an inverted dummy trigger; weights frozen."""

    Params = CBPTParams
    space = {"mask_penalty": [0.3, 3.0], "length": [4, 16]}
    trained = "class-wise text prompts"
    data = "fewshot"

    def setup(self) -> None:
        for q in self.loaded.model.parameters():
            q.requires_grad_(False)
        self.module = CBPTObjective(self.loaded, self.class_names, self.templates[0], self.params,
                                    self.seed)
        self.inversion: dict = {}

    # -- 1. trigger inversion ---------------------------------------------------------------------
    def prepare(self, batches: Iterable[dict]) -> dict:
        p, mod = self.params, self.module
        xs, ys = [], []
        for b in batches:
            xs.append(b["image"])
            ys.append(torch.as_tensor(b["label"]))
        if not xs or p.invert_steps == 0:
            return {}
        x_all = torch.cat(xs).float().div(255).to(self.loaded.device)
        y_all = torch.cat(ys).to(self.loaded.device)
        with torch.no_grad():
            f_all = self.loaded.encode_images(x_all)
        gen = torch.Generator().manual_seed(self.seed * 7919 + 1)
        size = self.loaded.image_size
        a = (torch.full((1, 1, size, size), -3.0) + 0.1 * torch.randn(1, 1, size, size,
                                                                     generator=gen))
        b = 0.5 * torch.randn(1, 3, size, size, generator=gen)
        a, b = a.to(x_all.device).requires_grad_(), b.to(x_all.device).requires_grad_()
        opt = torch.optim.Adam([a, b], lr=p.invert_lr)
        n, start, last = len(x_all), time.perf_counter(), {}
        for step in range(p.invert_steps):
            idx = torch.randperm(n, generator=gen)[:p.invert_batch].to(x_all.device)
            x, y, fc = x_all[idx], y_all[idx], f_all[idx]
            m, pat = torch.sigmoid(a), torch.sigmoid(b)
            ft = F.normalize(self.loaded.model.encode_image(self.loaded.normalize(
                (1 - m) * x + m * pat)), dim=-1)
            eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
            sim = (ft @ ft.T / p.temperature).masked_fill(eye, float("-inf"))
            own = (ft * fc).sum(-1, keepdim=True) / p.temperature
            logp = F.log_softmax(torch.cat([sim, own], 1), dim=1)[:, :len(x)]
            pos = (y[:, None] != y[None, :]).float()
            con = -(logp.masked_fill(eye, 0) * pos).sum(1) / pos.sum(1).clamp(min=1)
            loss = con.mean() + p.mask_penalty * m.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == p.invert_steps - 1:
                with torch.no_grad():
                    last = {"invert_contrast": float(con.mean()),
                            "invert_mask_mean": float(m.mean()),
                            "invert_collapse": float((ft @ ft.T)[~eye].mean())}
        with torch.no_grad():
            mod.mask_logit.copy_(a.detach())
            mod.pattern_logit.copy_(b.detach())
        self.inversion = {**last, "invert_s": round(time.perf_counter() - start, 2)}
        return dict(self.inversion)

    # -- classification --------------------------------------------------------------------------
    @torch.no_grad()
    def classifiers(self, attack=None, ensemble: bool = False):
        self.module.eval()
        clf = self.module.text_features()
        if attack is None or attack.apply_text(["a"]) == ["a"]:
            return clf, None
        return clf, self.module.text_features(attack.apply_text)

    # -- what it found -------------------------------------------------------------------------
    @torch.no_grad()
    def report(self, attack, target: Optional[int], batches: Iterable[dict]) -> dict:
        """The inverted trigger against the true one: ``inverted_asr`` — the share of non-target
        test images the *undefended* model (hand-made prompts) sends to the target when stamped
        with the inverted trigger; ``inverted_class_share`` — the share that lands in the class
        the stamped images go to most (``inverted_class``: was the target found?); and for a
        trigger that sits in a fixed place, ``trigger_iou``: the IoU of the inverted mask's
        top-k pixels (k = the true trigger's area) with the pixels the attack changes."""
        from ..metrics import trigger

        mod = self.module
        hand = mod.anchor
        xs, ys, changed = [], [], []
        for i, b in enumerate(batches):
            x = b["image"].float().div(255)
            xs.append(x)
            ys.append(torch.as_tensor(b["label"]))
            xt = trigger(attack, x, b.get("key"), seed=i)
            changed.append((xt - x).abs().amax(1) > 1.5 / 255)
        if not xs:
            return {}
        x, y, changed = torch.cat(xs), torch.cat(ys), torch.cat(changed)
        pred = (self.loaded.encode_images(mod.stamp(x)) @ hand.T).argmax(-1).cpu()
        out = {**self.inversion, "inverted_mask_area": float(mod.mask().mean())}
        counts = torch.bincount(pred, minlength=len(self.class_names))
        out["inverted_class"] = int(counts.argmax())
        out["inverted_class_share"] = float(counts.max() / len(pred))
        if target is not None:
            keep = y != target
            out["inverted_asr"] = float((pred[keep] == target).float().mean()) if keep.any() else None
        region = changed.float().mean(0) >= 0.5
        area = int(region.sum())
        if 0 < area <= 0.25 * region.numel():
            per_image = (changed & region).sum((1, 2)).float() / (changed | region).sum((1, 2)).clamp(min=1)
            if float(per_image.mean()) >= 0.8:  # the trigger sits in one place
                m = mod.mask()[0, 0].cpu()
                top = torch.zeros_like(region)
                top.view(-1)[m.view(-1).topk(area).indices] = True
                out["trigger_iou"] = float((top & region).sum() / (top | region).sum())
                out["trigger_area"] = area
        return out

    # -- state -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        mod = self.module
        save_file({"ctx": mod.ctx.detach().cpu().contiguous(),
                   "mask_logit": mod.mask_logit.cpu().contiguous(),
                   "pattern_logit": mod.pattern_logit.cpu().contiguous()}, str(d / STATE_FILE))
        (d / "cbpt.json").write_text(json.dumps({
            "defense": self.name, "params": self.params.model_dump(mode="json"),
            "class_names": self.class_names, "inversion": self.inversion}, indent=1))
        trigger_image(mod).save(d / "trigger.png")
        return d

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        d = Path(directory)
        state = load_file(str(d / STATE_FILE))
        mod = self.module
        if state["ctx"].shape != mod.ctx.shape or state["mask_logit"].shape != mod.mask_logit.shape:
            raise DefenseError(f"cbpt: the state in {directory} does not fit this model/params")
        with torch.no_grad():
            mod.ctx.copy_(state["ctx"])
            mod.mask_logit.copy_(state["mask_logit"])
            mod.pattern_logit.copy_(state["pattern_logit"])
        meta = d / "cbpt.json"
        if meta.exists():
            self.inversion = json.loads(meta.read_text()).get("inversion") or {}


def trigger_image(mod: CBPTObjective, scale: int = 4):
    """The inverted trigger as one picture: mask (white = trigger), pattern, and the stamp on grey."""
    from PIL import Image

    with torch.no_grad():
        m = mod.mask()[0].cpu().expand(3, -1, -1)
        pat = torch.sigmoid(mod.pattern_logit)[0].cpu()
        grey = torch.full_like(pat, 0.5)
        panels = torch.cat([m, pat, (1 - m) * grey + m * pat], dim=2)
    arr = (panels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
