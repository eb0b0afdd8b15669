"""rvpt.models: loading every weight format, savers, and the never-hang pretrained path (CPU, offline)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import warnings
from pathlib import Path

import huggingface_hub.constants as hf_constants
import open_clip
import pytest
import torch

from rvpt import models as M

MICRO = "ViT-Micro-4-p8-32"
OURS = ["ViT-Micro-4-p8-32", "ViT-Mini-8-p4-32", "ViT-Mini-8-p8-64", "ViT-Tiny-12-p8-32",
        "ViT-Tiny-12-p8-64", "ViT-W192-12-p8-32"]
TEXTS = ["a photo of a cat", "a photo of a dog", "trigger"]


@pytest.fixture(scope="module")
def micro() -> M.LoadedClip:
    torch.manual_seed(0)
    return M.load_clip(MICRO)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # 40 px on purpose: normalize() must resize to the model's 32 px.
    return torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty HF cache and a hub that refuses connections, whatever the machine's real network."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # discard port: connection refused
    return tmp_path


@pytest.fixture(scope="module")
def saved(micro, tmp_path_factory):
    """Path of ``micro`` saved in a given format, written once per module (tracing is the slow one)."""
    root, paths = tmp_path_factory.mktemp("saved"), {}

    def get(fmt: str) -> Path:
        if fmt not in paths:
            paths[fmt] = _save(fmt, micro, root)
        return paths[fmt]

    return get


def _assert_same(a: M.LoadedClip, b: M.LoadedClip, images: torch.Tensor) -> None:
    assert torch.equal(a.encode_images(images), b.encode_images(images))
    assert torch.equal(a.encode_texts(TEXTS), b.encode_texts(TEXTS))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(fmt: str, loaded: M.LoadedClip, tmp_path: Path) -> Path:
    if fmt == "model_dir":
        return M.save_model_dir(loaded, MICRO, tmp_path / "model")
    if fmt == "openai":
        return M.save_openai_state_dict(loaded.model, tmp_path / "openai.pt")
    if fmt == "cleanclip":
        return M.save_cleanclip_checkpoint(loaded.model, tmp_path / "cleanclip.pt")
    if fmt == "torchscript":  # an OpenAI-style JIT archive (not pickle: read with torch.jit.load)
        img, txt = torch.ones(2, 3, 32, 32), torch.zeros(2, 24, dtype=torch.long)
        with warnings.catch_warnings():  # torch.jit is deprecated in torch 2.14 (still loads); tracer chatter
            warnings.simplefilter("ignore")
            traced = torch.jit.trace_module(loaded.model, {"encode_image": (img,), "encode_text": (txt,)})
            torch.jit.save(traced, str(tmp_path / "openai-jit.pt"))
        return tmp_path / "openai-jit.pt"
    raise AssertionError(fmt)


def test_tiny_configs_are_registered() -> None:
    assert set(OURS) <= set(open_clip.list_models())
    assert M.known_models()[:len(OURS)] == OURS
    before = len(open_clip.list_models())
    M.register_configs()
    M.register_configs()
    assert len(open_clip.list_models()) == before  # idempotent
    tiny = M.load_clip("ViT-Tiny-12-p8-32")
    assert len(tiny.model.visual.transformer.resblocks) == 12
    assert tiny.image_size == 32 and tiny.source.startswith("random init")


def test_random_init_loadedclip(micro: M.LoadedClip, images: torch.Tensor) -> None:
    assert isinstance(micro.model, open_clip.CLIP) and not micro.model.training
    assert all(p.dtype == torch.float32 for p in micro.model.parameters())
    assert micro.image_size == 32 and micro.mean == open_clip.OPENAI_DATASET_MEAN
    assert micro.std == open_clip.OPENAI_DATASET_STD
    x = micro.normalize(images)
    assert x.shape == (3, 3, 32, 32)
    same_size = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(micro.mean).view(1, 3, 1, 1)
    std = torch.tensor(micro.std).view(1, 3, 1, 1)
    assert torch.allclose(micro.normalize(same_size), (same_size - mean) / std)  # no resize at native size
    img, txt = micro.encode_images(images), micro.encode_texts(TEXTS)
    assert img.shape == (3, 64) and txt.shape == (3, 64) and not img.requires_grad
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("pass_name", [True, False], ids=["named", "inferred"])
@pytest.mark.parametrize("fmt", ["model_dir", "openai", "cleanclip", "torchscript"])
def test_local_formats_round_trip_exactly(fmt, pass_name, micro, images, saved) -> None:
    path = saved(fmt)
    loaded = M.load_clip(MICRO if pass_name else None, checkpoint=path)
    assert loaded.name == MICRO  # inferred from shapes: the registered config is preferred
    assert not loaded.model.training
    assert str(path) in loaded.source
    _assert_same(micro, loaded, images)


def test_unregistered_architecture_is_inferred_from_shapes(images, tmp_path) -> None:
    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 24, "layers": 2, "width": 64, "patch_size": 6},
           "text_cfg": {"context_length": 16, "width": 64, "heads": 1, "layers": 1}}
    torch.manual_seed(2)
    model = open_clip.CLIP(**cfg).eval()
    loaded = M.load_clip(checkpoint=M.save_openai_state_dict(model, tmp_path / "odd.pt"))
    assert loaded.name.startswith("inferred-ViT") and loaded.image_size == 24
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(loaded.normalize(images)), dim=-1)
    assert torch.equal(ref, loaded.encode_images(images))
    again = M.load_clip(checkpoint=M.save_model_dir(loaded, None, tmp_path / "odd-dir"))  # config travels along
    assert again.name == loaded.name
    _assert_same(loaded, again, images)


def test_saved_files_have_the_documented_layout(micro, images, tmp_path) -> None:
    d = M.save_model_dir(micro, None, tmp_path / "dir", extra_config={"provenance": "test"})
    cfg = json.loads((d / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == open_clip.get_model_config(MICRO) and cfg["provenance"] == "test"
    assert set(cfg["preprocess_cfg"]) == {"mean", "std", "interpolation", "resize_mode"}
    # open_clip itself reads the directory (local-dir: schema) to the same model
    native = open_clip.create_model(f"local-dir:{d}").eval()
    with torch.no_grad():
        emb = torch.nn.functional.normalize(native.encode_image(micro.normalize(images)), dim=-1)
    assert torch.equal(emb, micro.encode_images(images))

    sd = torch.load(M.save_openai_state_dict(micro, tmp_path / "oa.pt"), weights_only=True)
    assert (sd["input_resolution"], sd["context_length"], sd["vocab_size"]) == (32, 24, 49408)
    assert "visual.proj" in sd and "text_projection" in sd
    ck = torch.load(M.save_cleanclip_checkpoint(micro, tmp_path / "cc.pt"), weights_only=True)
    assert ck["epoch"] == 0 and all(k.startswith("module.") for k in ck["state_dict"])


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(M.ModelError) as info:
        M.load_clip("ViT-Mikro-4-p8-32")
    msg = str(info.value)
    assert "\n" not in msg and "ViT-Mikro-4-p8-32" in msg
    assert all(name in msg for name in OURS) and "ViT-B-32" in msg
    assert msg.index("ViT-Tiny-12-p8-64") < msg.index("open_clip")  # ours first


def test_missing_checkpoint(tmp_path) -> None:
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(M.ModelError) as info:
        M.load_clip(MICRO, checkpoint=missing)
    assert str(info.value) == f"checkpoint not found: {missing}"


def test_unknown_pretrained_tag_lists_tags() -> None:
    with pytest.raises(M.ModelError) as info:
        M.load_clip("ViT-B-32", pretrained="no-such-tag")
    assert "laion2b_s34b_b79k" in str(info.value) and "openai" in str(info.value)


def test_pretrained_tag_without_network_fails_fast(no_network) -> None:
    start = time.monotonic()
    with pytest.raises(M.ModelError) as info:
        M.load_clip("ViT-B-32", pretrained="openai")
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert elapsed < 20, elapsed
    assert "\n" not in msg and "ViT-B-32/openai" in msg and "not cached" in msg
    assert "model.checkpoint=PATH" in msg and "CleanCLIP" in msg and "cache" in msg
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE is False  # restored


def test_pretrained_tag_with_user_offline_mode_fails_fast(no_network, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(M.ModelError, match="HF_HUB_OFFLINE is set"):
        M.load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.monotonic() - start < 20
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_pretrained_tag_loads_from_hf_cache_offline(no_network, monkeypatch, micro, images) -> None:
    """The real open_clip tag path, served from a pre-populated HF cache with the hub unreachable."""
    from open_clip.pretrained import _PRETRAINED, _pcfg

    monkeypatch.setitem(_PRETRAINED, MICRO, {"rvpt_test": _pcfg(hf_hub="rvpt-test/micro-clip/", quick_gelu=True)})
    repo = Path(hf_constants.HF_HUB_CACHE) / "models--rvpt-test--micro-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    M.save_model_dir(micro, None, repo / "snapshots" / commit)  # same layout as an open_clip HF repo
    loaded = M.load_clip(MICRO, pretrained="rvpt_test")
    assert "cache" in loaded.source
    _assert_same(micro, loaded, images)
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE is False  # restored


def test_probe_has_a_hard_deadline() -> None:
    """A host that accepts TCP but never answers TLS (like a black-holing gateway) is unreachable, fast."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # never accept(): the kernel completes the TCP handshake, nothing else happens
        start = time.monotonic()
        assert M._reachable("127.0.0.1", server.getsockname()[1], timeout=1.0) is False
        assert time.monotonic() - start < 2
        assert M._reachable("127.0.0.1", server.getsockname()[1], timeout=1.0, tls=False) is True


def test_shape_mismatch_names_key_and_shapes(micro, tmp_path) -> None:
    path = M.save_openai_state_dict(micro, tmp_path / "micro.pt")
    with pytest.raises(M.ModelError) as info:
        M.load_clip("ViT-Tiny-12-p8-64", checkpoint=path)  # 64 px: 65 position embeddings, not 17
    msg = str(info.value)
    assert "\n" not in msg and "'visual.positional_embedding'" in msg and "(17, 64)" in msg and "(65, 64)" in msg
    with pytest.raises(M.ModelError, match="missing key"):
        M.load_clip("ViT-Tiny-12-p8-32", checkpoint=path)  # same widths, more blocks


def test_checkpoint_with_pickled_objects_is_refused(micro, tmp_path) -> None:
    path = tmp_path / "with-args.pt"
    torch.save({"state_dict": micro.model.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(M.ModelError, match="never unpickled"):
        M.load_clip(MICRO, checkpoint=path)


def test_argument_errors(tmp_path) -> None:
    with pytest.raises(M.ModelError, match="no model given"):
        M.load_clip()
    with pytest.raises(M.ModelError, match="not both"):
        M.load_clip(MICRO, pretrained="openai", checkpoint=tmp_path)
