import io

import numpy as np
from PIL import Image

from rvpt import synthetic


def test_classes_and_templates():
    assert len(synthetic.CLASSES) >= 20 and len(set(synthetic.CLASSES)) == len(synthetic.CLASSES)
    assert len(synthetic.PROMPT_TEMPLATES) >= 5 and len(synthetic.CAPTION_TEMPLATES) >= 5


def test_render_is_seed_deterministic_and_order_free():
    a = synthetic.render(0, "base", "pretrain", 17)
    b = synthetic.render(0, "base", "pretrain", 17)
    c = synthetic.render(1, "base", "pretrain", 17)
    assert a.png == b.png and a.caption == b.caption
    assert a.png != c.png


def test_every_class_renders_visibly_and_captions_name_it():
    for label, name in enumerate(synthetic.CLASSES):
        for domain in synthetic.DOMAINS:
            s = synthetic.render(0, domain, "test", label, label=label, image_size=32)
            img = np.asarray(Image.open(io.BytesIO(s.png)))
            assert img.shape == (32, 32, 3)
            assert name in s.caption and s.label == label and s.meta["domain"] == domain


def test_attributes_vary_and_shift_domain_differs():
    metas = [synthetic.render(0, "base", "pretrain", i).meta for i in range(200)]
    for key in ("color", "size", "position", "background"):
        assert len({m[key] for m in metas}) >= 3, key
    shift = [synthetic.render(0, "shift", "test", i).meta for i in range(100)]
    assert not {m["background"] for m in shift} & {m["background"] for m in metas}
    assert not {m["color"] for m in shift} & {m["color"] for m in metas}
    assert {m["style"] for m in shift} >= {"outline", "hatched"}


def test_balanced_labels_for_eval_splits():
    labels = list(synthetic.split_labels("test", 48, 24))
    assert labels == [i % 24 for i in range(48)]
    assert set(synthetic.split_labels("pretrain", 5, 24)) == {None}
