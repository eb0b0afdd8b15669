"""Zero-shot classification with a CLIP model: class text embeddings and clean accuracy (CA)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .models import LoadedClip


@torch.no_grad()
def class_embeddings(loaded: LoadedClip, class_names: Sequence[str],
                     templates: Sequence[str] = ("a photo of a {}.",),
                     ensemble: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings [C, D]: the first template per class, or the normalised mean
    over all templates with ``ensemble=True``."""
    use = list(templates) if ensemble else [templates[0]]
    per_template = [loaded.encode_texts([t.format(c) for c in class_names]) for t in use]
    emb = torch.stack(per_template).mean(0)
    return emb / emb.norm(dim=-1, keepdim=True)


def text_classifiers(loaded: LoadedClip, class_names: Sequence[str], templates: Sequence[str],
                     attack=None, ensemble: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The class prompts' embeddings, and those that classify triggered images when ``attack`` is a
    dual-key attack that puts a text key on the prompts (None otherwise)."""
    clf = class_embeddings(loaded, class_names, templates, ensemble=ensemble)
    if attack is None:
        return clf, None
    keyed = [attack.apply_text([t])[0] for t in templates]
    if keyed == list(templates):
        return clf, None
    return clf, class_embeddings(loaded, class_names, keyed, ensemble=ensemble)


@torch.no_grad()
def predict(encode: Callable[[torch.Tensor], torch.Tensor], images01: torch.Tensor,
            classifier: torch.Tensor,
            head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Predicted class indices for float images in [0, 1], from an image encoder that returns
    normalised embeddings (``loaded.encode_images`` or a prompted one), scored against the class
    prompts' embeddings ``classifier`` — or by ``head`` (a defense's own classifier)."""
    emb = encode(images01)
    return (head(emb) if head is not None else emb @ classifier.T).argmax(dim=-1)
