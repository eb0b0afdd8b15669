"""rvpt.models: open_clip ``hf-hub:ORG/REPO`` names, served from a fake Hugging Face cache (CPU, no network)."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch

from rvpt import models as M

MICRO = "ViT-Micro-4-p8-32"
REPO = "rvpt-test/micro-hub"
NAME = f"hf-hub:{REPO}"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
TEXTS = ["a photo of a cat", "trigger"]


@pytest.fixture(scope="module")
def micro() -> M.LoadedClip:
    torch.manual_seed(0)
    return M.load_clip(MICRO)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty HF cache in tmp_path (env and the constants huggingface_hub read at import), hub offline mode off,
    and a hub endpoint that refuses connections."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # discard port: connection refused
    return cache


@pytest.fixture
def offline(monkeypatch) -> None:
    """The user's HF_HUB_OFFLINE=1 (env and constant)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_sockets(monkeypatch) -> list:
    """Every attempt to open a network connection is recorded and refused."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _snapshot(cache: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """``models--ORG--REPO`` with ``refs/main`` -> commit; returns the (created) snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _publish(cache: Path, micro: M.LoadedClip, **kw) -> Path:
    snap = M.save_model_dir(micro, None, _snapshot(cache, **kw))
    assert sorted(p.name for p in snap.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert "model_cfg" in json.loads((snap / "open_clip_config.json").read_text())
    return snap


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def _assert_same(a: M.LoadedClip, b: M.LoadedClip, images: torch.Tensor) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.encode_images(images), b.encode_images(images))
    assert torch.equal(a.encode_texts(TEXTS), b.encode_texts(TEXTS))


def test_offline_and_not_cached_fails_fast(hf_cache, offline) -> None:
    start = time.monotonic()
    with pytest.raises(M.ModelError) as info:
        M.load_clip("hf-hub:nobody/nothing")
    assert time.monotonic() - start < 5
    msg = _one_line(info)
    assert "hf-hub:nobody/nothing" in msg and "not cached" in msg and "HF_HUB_OFFLINE" in msg
    assert "model.checkpoint=PATH" in msg and "Hugging Face cache" in msg


def test_not_cached_and_hub_unreachable_fails_fast(hf_cache) -> None:
    start = time.monotonic()
    with pytest.raises(M.ModelError) as info:
        M.load_clip("hf-hub:nobody/nothing", pretrained=None, checkpoint=None)
    assert time.monotonic() - start < 5
    msg = _one_line(info)
    assert "cannot be reached" in msg and "127.0.0.1:9" in msg and "model.checkpoint=PATH" in msg
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE is False  # restored


def test_cached_repo_loads_offline_without_network(hf_cache, offline, no_sockets, micro, images) -> None:
    _publish(hf_cache, micro)
    loaded = M.load_clip(NAME)
    assert loaded.name == NAME and "(local cache" in loaded.source and NAME in loaded.source
    assert not loaded.model.training and loaded.image_size == 32
    assert (loaded.mean, loaded.std) == (micro.mean, micro.std)
    _assert_same(micro, loaded, images)
    pinned = M.load_clip(f"{NAME}@{COMMIT}")  # a commit hash as the revision: snapshots/<commit>
    assert pinned.name == f"{NAME}@{COMMIT}"
    _assert_same(micro, pinned, images)
    assert no_sockets == []
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hf_constants.HF_HUB_OFFLINE is True  # left as the user set it


def test_cached_repo_loads_without_offline_mode(hf_cache, no_sockets, micro, images) -> None:
    """Cached files need no network even when the user did not ask for offline mode."""
    _publish(hf_cache, micro)
    _assert_same(micro, M.load_clip(NAME), images)
    assert no_sockets == []
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE is False


def test_cached_pytorch_bin_weights(hf_cache, offline, no_sockets, micro, images) -> None:
    snap = _publish(hf_cache, micro)
    (snap / "open_clip_model.safetensors").unlink()
    torch.save(micro.model.state_dict(), snap / "open_clip_pytorch_model.bin")
    loaded = M.load_clip(NAME)
    assert "open_clip_pytorch_model.bin" in loaded.source
    _assert_same(micro, loaded, images)
    assert no_sockets == []


def test_torchscript_weights_from_the_hub_are_refused(hf_cache, offline, no_sockets, micro) -> None:
    snap = _publish(hf_cache, micro)
    (snap / "open_clip_model.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(snap / "open_clip_pytorch_model.bin"))
    with pytest.raises(M.ModelError) as info:
        M.load_clip(NAME)
    assert "TorchScript" in _one_line(info)
    assert no_sockets == []


def test_download_path_pins_weights_to_the_config_commit(hf_cache, monkeypatch, micro, images, tmp_path) -> None:
    """Not cached and the hub reachable: config first, then weights from the same commit (safetensors first,
    falling back to the .bin), from the endpoint that was probed. The hub itself is faked."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    remote = M.save_model_dir(micro, None, tmp_path / "remote")
    torch.save(micro.model.state_dict(), remote / "open_clip_pytorch_model.bin")
    (remote / "open_clip_model.safetensors").unlink()  # the repo has only the .bin
    calls = []

    def fake_download(repo_id, filename, *, revision=None, endpoint=None, **kwargs):
        calls.append((repo_id, filename, revision, endpoint))
        if not (remote / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        dest = _snapshot(hf_cache) / filename
        dest.write_bytes((remote / filename).read_bytes())
        return str(dest)

    probes = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(M, "_reachable", lambda host, port, timeout=3.0, tls=True: probes.append((host, port)) or True)
    loaded = M.load_clip(f"{NAME}@v1")
    assert probes == [("127.0.0.1", 9)]
    endpoint = "https://127.0.0.1:9"
    assert calls == [(REPO, "open_clip_config.json", "v1", endpoint),
                     (REPO, "open_clip_model.safetensors", COMMIT, endpoint),
                     (REPO, "open_clip_pytorch_model.bin", COMMIT, endpoint)]
    assert "downloaded from 127.0.0.1" in loaded.source and "open_clip_pytorch_model.bin" in loaded.source
    _assert_same(micro, loaded, images)


@pytest.mark.parametrize("key", ["hf_tokenizer_name", "hf_model_name"])
def test_hf_tokenizer_text_tower_is_refused_without_network(key, hf_cache, no_sockets, micro) -> None:
    snap = _publish(hf_cache, micro)
    cfg = json.loads((snap / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"][key] = "some-org/some-tokenizer"
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.ModelError) as info:
        M.load_clip(NAME)
    msg = _one_line(info)
    assert key in msg and "not supported offline" in msg
    assert no_sockets == []


def test_unsafe_tokenizer_kwargs_are_refused(hf_cache, no_sockets, micro) -> None:
    snap = _publish(hf_cache, micro)
    cfg = json.loads((snap / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"bpe_path": "/etc/passwd"}
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.ModelError, match="tokenizer_kwargs") as info:
        M.load_clip(NAME)
    _one_line(info)
    assert no_sockets == []


def test_cached_repo_without_weights_is_not_cached(hf_cache, offline, micro) -> None:
    snap = _publish(hf_cache, micro)
    (snap / "open_clip_model.safetensors").unlink()
    with pytest.raises(M.ModelError, match="not cached") as info:
        M.load_clip(NAME)
    _one_line(info)


@pytest.mark.parametrize("name", [
    "hf-hub:", "hf-hub:org", "hf-hub:org/", "hf-hub:/repo", "hf-hub:a/b/c", "hf-hub:org/re po",
    "hf-hub:org--x/repo", "hf-hub:org/repo..x", "hf-hub:org/repo@", "hf-hub:org/repo@../../etc",
    "hf-hub:org/repo@main\nx",
])
def test_malformed_hub_names_fail_in_one_line(name, hf_cache, no_sockets) -> None:
    with pytest.raises(M.ModelError) as info:
        M.load_clip(name)
    msg = _one_line(info)
    assert "invalid Hugging Face hub model name" in msg and "hf-hub:ORG/REPO" in msg
    assert no_sockets == []


def test_hub_name_with_pretrained_or_checkpoint_is_refused(hf_cache, micro, tmp_path) -> None:
    with pytest.raises(M.ModelError, match="brings its own weights") as info:
        M.load_clip(NAME, pretrained="openai")
    _one_line(info)
    path = M.save_openai_state_dict(micro, tmp_path / "micro.pt")
    with pytest.raises(M.ModelError, match="brings its own weights"):
        M.load_clip(NAME, checkpoint=path)


def test_hub_model_round_trips_through_save_model_dir(hf_cache, no_sockets, micro, images, tmp_path) -> None:
    _publish(hf_cache, micro)
    loaded = M.load_clip(NAME)
    saved = M.save_model_dir(loaded, None, tmp_path / "copy")
    for name in (None, NAME):  # the stored model_name is the hub name
        again = M.load_clip(name, checkpoint=saved)
        assert again.name == NAME
        _assert_same(loaded, again, images)


def test_unknown_name_error_mentions_hub_names() -> None:
    with pytest.raises(M.ModelError) as info:
        M.load_clip("ViT-Mikro-4-p8-32")
    assert "hf-hub:ORG/REPO" in _one_line(info)
