"""EftCLIP (Hossain et al.): oracle-guided trigger detection, then fine-tuning on a compact
curated set.

The defender holds an image-caption set that may be poisoned (``data = "suspect_pairs"``), the
suspected model, and an oracle that says which objects are really in an image
(:mod:`rvpt.oracles`; the paper prompts FastSAM/SAM with object names).

1. **Detection** (:meth:`EftCLIP.curate`): CLIP scores the dataset's object names for each image;
   the ``tau`` best are the candidates and their softmax (over the candidates) the confidences. A
   candidate with confidence ≥ ``theta`` that the oracle does not find flags the image. For the
   flagged images an occlusion scan (a grey cell moved over a ``occlusion_cells``² grid) finds the
   region that drives the prediction: the candidate trigger (its mean map is saved as
   ``trigger_heatmap.png``).
2. **Affected labels and victims**: the labels that receive at least ``affected_share`` of the
   flagged predictions; the victims are the flagged images predicted as one of them.
3. **Compact set**: each victim with a caption of what the oracle finds in it (the template filled
   with those objects; when the oracle finds none of the candidates, a flagged image is shown to
   it again with every object name, ``caption_names = "all"`` — a victim's real object is often
   not among CLIP's guesses once the trigger has taken over), plus ``clean_ratio`` clean pairs per victim whose oracle objects include an
   affected label; CLIP is fine-tuned on it with the CLIP loss (AdamW, small lr, few epochs;
   ``inmodal_weight`` adds CleanCLIP's in-modality terms).

The paper's algorithm sections were not readable here (only their abstracts and figures): the
meaning of θ and τ above, the affected-label rule, the compact set's make-up and the recipe are
reconstructions, each a parameter. Detection precision/recall against the known poisoned pairs is
reported when the pairs say which they are (the embedded benchmark's do).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import torch
from pydantic import Field

from ..oracles import OracleError, detection_quality, make_oracle
from ..shards import Sample
from .base import DefenseError, DefenseParams, register_defense
from .cleanclip import CleanCLIP, CleanCLIPObjective, CleanCLIPParams


class EftCLIPParams(DefenseParams):
    theta: float = Field(0.66, gt=0, le=1, description="confidence at which a prediction counts "
                         "(paper: 0.66)")
    tau: int = Field(5, ge=2, description="candidate object names per image (CLIP's best)")
    oracle: str = Field("ground_truth", description="'ground_truth' (the data's own objects) or "
                        "'package.module:function', a segmentation callable (rvpt.oracles)")
    oracle_noise: float = Field(0.0, ge=0, le=1, description="ground-truth oracle: rate of missed "
                                "and of invented objects")
    oracle_min_score: float = Field(0.5, ge=0, le=1, description="segmentation oracle: a "
                                    "detection's least score")
    affected_share: float = Field(0.2, gt=0, le=1, description="a label is affected when it gets "
                                  "this share of the flagged predictions")
    caption_names: Literal["all", "candidates"] = Field(
        "all", description="names the oracle is asked for a victim's caption when it finds none "
        "of the candidates: 'all' the dataset's, 'candidates' none more (the victim is dropped)")
    clean_ratio: float = Field(1.0, ge=0, description="clean pairs of affected labels per victim")
    max_victims: Optional[int] = Field(None, ge=1, description="cap on victims in the compact set")
    occlusion_cells: int = Field(4, ge=0, description="occlusion grid per side (0: no scan)")
    occlusion_images: int = Field(64, ge=1, description="victims the occlusion scan looks at")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the fine-tuning")
    inmodal_weight: float = Field(0.0, ge=0, description="CleanCLIP's in-modality losses (0: off)")


@register_defense("eftclip")
class EftCLIP(CleanCLIP):
    """Finds victims with an oracle, fine-tunes all of CLIP on a compact curated set."""

    Params = EftCLIPParams
    space = {"theta": [0.5, 0.66, 0.8], "tau": [3, 5]}
    trained = "all weights"
    data = "suspect_pairs"
    recipe = {"optimizer": "adamw", "batch_size": 64, "epochs": 5, "weight_decay": 0.1,
              "warmup_epochs": 0, "schedule": "constant", "augment": False}

    @classmethod
    def recipe_from_params(cls, params: EftCLIPParams) -> dict:
        return {"lr": params.lr}

    def setup(self) -> None:
        p = self.params
        if p.tau > len(self.class_names):
            raise DefenseError(f"eftclip: tau={p.tau} candidates but the dataset has "
                               f"{len(self.class_names)} object names")
        try:
            self.oracle = make_oracle(p.oracle, p.oracle_noise, self.seed, p.oracle_min_score)
        except OracleError as e:
            raise DefenseError(f"eftclip: {e}") from None
        for q in self.loaded.model.parameters():
            q.requires_grad_(True)
        self.module = CleanCLIPObjective(
            self.loaded, CleanCLIPParams(lr=p.lr, inmodal_weight=p.inmodal_weight), self.seed)
        self.detection: dict = {}
        self.heatmap: Optional[torch.Tensor] = None

    # -- 1. detection ---------------------------------------------------------------------------
    @torch.no_grad()
    def screen(self, batch: dict, clf: torch.Tensor) -> list[dict]:
        """One batch of suspect pairs: per pair, CLIP's confident candidates, what the oracle
        finds, and whether it is flagged."""
        p = self.params
        x = batch["image"].float().div(255)
        self.loaded.model.eval()
        scale = float(self.loaded.model.logit_scale.exp().clamp(max=100))
        logits = scale * self.loaded.encode_images(x) @ clf.T
        top = logits.topk(p.tau, dim=-1)
        conf = top.values.softmax(-1).cpu()
        cands = [[self.class_names[j] for j in row] for row in top.indices.tolist()]
        metas = [{**(m or {}), "key": k} for m, k in zip(batch["meta"], batch["key"])]
        found = self._ask(x, cands, metas)
        out = []
        for i, (names, f) in enumerate(zip(cands, found)):
            confident = [n for n, c in zip(names, conf[i].tolist()) if c >= p.theta]
            unconfirmed = [n for n in confident if n not in f]
            out.append({"flag": bool(unconfirmed), "pred": unconfirmed[0] if unconfirmed else None,
                        "found": sorted(f), "poisoned": (batch["meta"][i] or {}).get("poisoned")})
        again = [i for i, r in enumerate(out) if r["flag"] and not r["found"]]
        if again and p.caption_names == "all":
            more = self._ask(x[again], [list(self.class_names)] * len(again), [metas[i] for i in again])
            for i, f in zip(again, more):
                out[i]["found"] = sorted(f)
        return out

    def _ask(self, x, cands, metas) -> list:
        try:
            return self.oracle(x, cands, metas)
        except OracleError as e:
            raise DefenseError(f"eftclip: {e}") from None

    def _occlusion(self, images01: torch.Tensor, labels: list[int], clf: torch.Tensor) -> torch.Tensor:
        """Mean drop of the predicted label's probability when each grid cell is greyed out."""
        g = self.params.occlusion_cells
        size = images01.shape[-1]
        edges = [round(i * size / g) for i in range(g + 1)]
        scale = float(self.loaded.model.logit_scale.exp().clamp(max=100))
        idx = torch.tensor(labels)

        def prob(x):
            return (scale * self.loaded.encode_images(x) @ clf.T).softmax(-1).cpu()[
                torch.arange(len(x)), idx]

        base = prob(images01)
        heat = torch.zeros(g, g)
        for r in range(g):
            for c in range(g):
                x = images01.clone()
                x[:, :, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0.5
                heat[r, c] = float((base - prob(x)).mean())
        return heat

    @torch.no_grad()
    def curate(self, make_batches: Callable[[], Iterable[dict]]) -> tuple[list[Sample], dict]:
        """Detection over the suspect pairs, then the compact fine-tuning set (two passes over
        ``make_batches()``: flags first, then clean pairs of the affected labels)."""
        from ..zeroshot import class_embeddings

        p, start = self.params, time.perf_counter()
        clf = class_embeddings(self.loaded, self.class_names, self.templates[:1])
        flags, truth, victims, preds = [], [], [], Counter()
        for batch in make_batches():
            for i, r in enumerate(self.screen(batch, clf)):
                flags.append(r["flag"])
                truth.append(r["poisoned"] if isinstance(r["poisoned"], bool) else None)
                if r["flag"]:
                    preds[r["pred"]] += 1
                    if r["found"]:
                        victims.append((r["pred"], Sample(
                            key=str(batch["key"][i]), image=batch["image"][i],
                            label=self._label(r["found"]), text=self._caption(r["found"]),
                            meta={"victim": True, "predicted": r["pred"],
                                  "was": batch["text"][i], "poisoned": r["poisoned"]})))
        n_flag = sum(flags)
        affected = sorted(n for n, k in preds.items() if n_flag and k / n_flag >= p.affected_share)
        victims = [s for pred, s in victims if pred in affected][:p.max_victims]
        if victims and p.occlusion_cells:
            look = victims[:p.occlusion_images]
            self.heatmap = self._occlusion(
                torch.stack([s.image for s in look]).float().div(255),
                [self.class_names.index(s.meta["predicted"]) for s in look], clf)
        want = round(p.clean_ratio * len(victims))
        clean: list[Sample] = []
        if want and affected:
            for batch in make_batches():
                for i, r in enumerate(self.screen(batch, clf)):
                    if not r["flag"] and set(r["found"]) & set(affected):
                        clean.append(Sample(key=str(batch["key"][i]), image=batch["image"][i],
                                            label=int(batch["label"][i]),
                                            text=str(batch["text"][i]), meta={"victim": False}))
                        if len(clean) >= want:
                            break
                if len(clean) >= want:
                    break
        quality = detection_quality(flags, truth)
        self.detection = {
            "screened": len(flags), "flagged": n_flag, "precision": quality["precision"],
            "recall": quality["recall"], "affected": ",".join(affected), "victims": len(victims),
            "victims_poisoned": sum(1 for s in victims if s.meta.get("poisoned") is True),
            "clean_added": len(clean), "curate_s": round(time.perf_counter() - start, 2)}
        if self.heatmap is not None:
            r, c = divmod(int(self.heatmap.argmax()), self.heatmap.shape[1])
            self.detection.update(occlusion_peak_row=r, occlusion_peak_col=c,
                                  occlusion_peak_drop=float(self.heatmap.max()))
        return victims + clean, dict(self.detection)

    def _label(self, found: list[str]) -> int:
        return next((self.class_names.index(f) for f in found if f in self.class_names), -1)

    def _caption(self, found: list[str]) -> str:
        return self.templates[0].format(" and a ".join(found))

    def report(self, attack, target, batches: Iterable[dict]) -> dict:
        return {f"eft_{k}": v for k, v in self.detection.items()
                if isinstance(v, (int, float)) or v is None}

    # -- state -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        out = super().save(directory)
        (Path(out) / "eftclip.json").write_text(json.dumps(
            {"params": self.params.model_dump(mode="json"), "detection": self.detection,
             "heatmap": self.heatmap.tolist() if self.heatmap is not None else None}, indent=1))
        if self.heatmap is not None:
            from PIL import Image

            h = self.heatmap.clamp(min=0)
            h = (h / h.max() if float(h.max()) > 0 else h) * 255
            img = Image.fromarray(h.round().byte().numpy(), mode="L")
            img.resize((self.loaded.image_size * 4,) * 2, Image.NEAREST).save(
                Path(out) / "trigger_heatmap.png")
        return out

    def load(self, directory: str | Path) -> None:
        super().load(directory)
        meta = Path(directory) / "eftclip.json"
        if meta.exists():
            data = json.loads(meta.read_text())  # (a Train worker's save has no detection)
            if data.get("detection"):
                self.detection = data["detection"]
            if data.get("heatmap") is not None:
                self.heatmap = torch.tensor(data["heatmap"])
