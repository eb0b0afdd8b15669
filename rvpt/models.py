"""Loading and saving CLIP models (open_clip) from every source the pipeline accepts.

One entry point, :func:`load_clip`, returns a :class:`LoadedClip` (fp32, eval mode) from:

* an architecture name alone (random init; open_clip built-ins plus the tiny configs shipped in
  ``rvpt/model_configs``),
* a name plus an open_clip pretrained tag (the real open_clip download path, but it never hangs:
  cached weights load offline, and an unreachable hub fails fast with a :class:`ModelError`),
* an open_clip Hugging Face hub name ``hf-hub:ORG/REPO`` (or ``hf-hub:ORG/REPO@REVISION``): the repo's
  ``open_clip_config.json`` and one weights file, cached ones read offline, otherwise downloaded after the
  same fast reachability probe; weights go through the same safe readers as local files,
* a checkpoint path or object-storage URI (``s3://``, ``gs://``: fetched once into a local cache),
  format auto-detected: a model directory written by :func:`save_model_dir`, an
  open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``), an OpenAI-format state dict or
  TorchScript archive, or a CleanCLIP-style training checkpoint.

Checkpoint files are read with ``torch.load(weights_only=True)`` or safetensors only; TorchScript
archives by :mod:`rvpt.torchscript`, which takes their tensors and runs none of their code
(``torch.jit.load`` only with ``trust_torchscript``). Nothing is ever unpickled with
``weights_only=False``, and a model config that would make open_clip fetch from a hub is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
import pickle
import re
import socket
import ssl
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, set_model_preprocess_cfg
from open_clip.pretrained import download_pretrained, get_pretrained_cfg
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn

from . import storage

__all__ = [
    "CONFIG_DIR",
    "LoadedClip",
    "ModelError",
    "known_models",
    "load_clip",
    "register_configs",
    "save_cleanclip_checkpoint",
    "save_model_dir",
    "save_openai_state_dict",
]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
MODEL_DIR_CONFIG = "open_clip_config.json"
MODEL_DIR_WEIGHTS = "open_clip_model.safetensors"
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
_WEIGHT_FILES = (MODEL_DIR_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin")
_PROBE_TIMEOUT_S = 3.0
_HUB_PREFIX = "hf-hub:"  # open_clip's schema for Hugging Face hub models
_HUB_WEIGHT_FILES = (MODEL_DIR_WEIGHTS, "open_clip_pytorch_model.bin")  # preference order, as open_clip
_HUB_REVISION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")
_SIMPLE_TOKENIZER_CLEAN = ("lower", "whitespace", "canonicalize")
_HOW_TO_SUPPLY = (
    "supply weights with model.checkpoint=PATH (an open_clip checkpoint file or model directory, an "
    "OpenAI-format state dict / TorchScript archive, or a CleanCLIP checkpoint), or pre-populate the "
    "Hugging Face cache (HF_HOME) on a machine with network access"
)


class ModelError(Exception):
    """A user-caused model loading/saving error; the message is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------- registry


def _our_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_configs() -> list[str]:
    """Register every JSON config in ``rvpt/model_configs`` with open_clip (idempotent).

    Returns the names of our architectures.
    """
    ours = _our_names()
    if not set(ours) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
    return ours


def known_models() -> list[str]:
    """All architecture names :func:`load_clip` accepts: ours first, then open_clip's built-ins.

    Hugging Face hub models (``hf-hub:ORG/REPO``) are accepted as well but cannot be listed.
    """
    ours = register_configs()
    return ours + [n for n in open_clip.list_models() if n not in ours]


def _unknown_name_error(name: str) -> ModelError:
    ours = _our_names()
    builtins = [n for n in open_clip.list_models() if n not in ours]
    common = [n for n in ("ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "RN50") if n in builtins]
    close = difflib.get_close_matches(name, known_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ModelError(
        f"unknown model name '{name}'{hint}; known: {', '.join(ours)}, plus {len(builtins)} open_clip "
        f"built-ins (e.g. {', '.join(common)}; see rvpt.models.known_models()); Hugging Face hub models are "
        f"accepted as {_HUB_PREFIX}ORG/REPO")


def _canonical_name(name: str) -> str:
    if name.startswith(_HUB_PREFIX):  # reached only with model.checkpoint or model.pretrained
        raise ModelError(
            f"'{name}' is a Hugging Face hub model that brings its own weights; it cannot be combined with "
            f"model.pretrained or model.checkpoint (with a checkpoint give an architecture name, or no name)")
    name = name.replace("/", "-")  # open_clip does the same: ViT-B/32 -> ViT-B-32
    if name not in known_models():
        raise _unknown_name_error(name)
    return name


# ----------------------------------------------------------------------------- LoadedClip


@dataclass
class LoadedClip:
    """A CLIP model ready for inference, with its tokenizer and preprocessing constants.

    ``model`` is an open_clip ``CLIP`` (fp32, eval mode); ``name`` is its open_clip architecture name
    (``inferred-...`` when the architecture was inferred from a checkpoint and matches no registered
    config); ``mean``/``std`` come from ``model.visual.preprocess_cfg``; ``source`` says in words where
    the weights came from; ``model_cfg`` is the open_clip architecture config (used by
    :func:`save_model_dir`).
    """

    model: nn.Module
    tokenizer: Callable[..., Tensor]
    name: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    model_cfg: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def _input_hw(self) -> tuple[int, int]:
        size = getattr(self.model.visual, "image_size", self.image_size)
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def normalize(self, images01: Tensor) -> Tensor:
        """Turn images in [0, 1] of shape [B, 3, H, W] into model input (differentiable).

        Resizes (bilinear, antialias) to the model's input size when H/W differ, then applies the
        mean/std normalisation. The result is float32 on the model's device.
        """
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images01.shape)}")
        x = images01.to(device=self.device, dtype=torch.float32)
        hw = self._input_hw()
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, images01: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, D] for images in [0, 1]."""
        return self.model.encode_image(self.normalize(images01), normalize=True)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        """L2-normalised text embeddings [N, D]."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)


def _finish(model: nn.Module, name: str, model_cfg: dict[str, Any], source: str, device: str | torch.device,
            tokenizer: Callable[..., Tensor] | None = None) -> LoadedClip:
    model = model.float().eval().to(device)
    pp = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    defaults = PreprocessCfg()
    size = getattr(model.visual, "image_size", pp.get("size", defaults.size))
    if tokenizer is None:
        context_length = int(model_cfg.get("text_cfg", {}).get("context_length", model.context_length))
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        name=name,
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=tuple(float(v) for v in pp.get("mean", defaults.mean)),
        std=tuple(float(v) for v in pp.get("std", defaults.std)),
        source=source,
        model_cfg=model_cfg,
    )


# ----------------------------------------------------------------------------- building / loading weights


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Silence open_clip's 'initialized randomly' warning when we load weights right after."""
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _create(name: str, **kwargs: Any) -> nn.Module:
    """open_clip.create_model in fp32 on CPU; never fetches tower weights (pretrained_text=False)."""
    try:
        return open_clip.create_model(name, precision="fp32", device="cpu", pretrained_text=False, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/FileNotFoundError with long texts
        raise ModelError(f"open_clip could not create '{name}': {exc}") from exc


def _build_arch(name: str, model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised model for a registered name, or for an unregistered (inferred) config."""
    with _quiet_random_init():
        if name in open_clip.list_models():
            return _create(name)
        model = open_clip.CLIP(**model_cfg)
    size = model.visual.image_size
    set_model_preprocess_cfg(model, dataclasses.asdict(PreprocessCfg(size=size)))
    return model


def _prepare_state_dict(model: nn.Module, sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """Apply the benign key/shape conventions open_clip's own load_checkpoint applies (no resizing)."""
    own = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - set(own)  # e.g. attn_mask, kept by TorchScript archives
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_INT_KEYS and k not in transient}
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = open_clip.model.convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in sd and isinstance(param, Tensor) and param.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(param.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)
    return sd


def _load_weights(model: nn.Module, sd: Mapping[str, Any], arch: str, where: str) -> None:
    """Strictly load ``sd`` into ``model``; any mismatch is a one-line ModelError."""
    sd = _prepare_state_dict(model, sd)
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise ModelError(f"{where}: entry '{key}' is a {type(value).__name__}, not a tensor")
    own = model.state_dict()
    for key, ref in own.items():
        if key in sd and tuple(sd[key].shape) != tuple(ref.shape):
            raise ModelError(
                f"{where} does not fit architecture {arch}: '{key}' has shape {tuple(sd[key].shape)} in the "
                f"checkpoint but {tuple(ref.shape)} in the model")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: '{unexpected[0]}')")
        raise ModelError(f"{where} does not fit architecture {arch}: {' and '.join(parts)}")
    model.load_state_dict(sd, strict=True)  # copy_ casts fp16 checkpoints up to the fp32 parameters


# ----------------------------------------------------------------------------- architecture inference


def _infer_openai_cfg(sd: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """open_clip model_cfg from OpenAI-format tensor shapes (as build_model_from_openai_state_dict does).

    Heads are not visible in shapes: like OpenAI, heads = width // 64. QuickGELU is assumed.
    Returns None when the keys are not OpenAI-format CLIP keys.
    """
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision: dict[str, Any] = {
                "image_size": patch * grid,
                "layers": len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]),
                "width": width,
                "patch_size": patch,
                "head_width": 64,
                "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            }
        elif "visual.attnpool.positional_embedding" in sd:
            counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            out = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"image_size": out * 32, "layers": counts, "width": sd["visual.layer1.0.conv1.weight"].shape[0],
                      "head_width": 64}
        else:
            return None
        text_width = sd["ln_final.weight"].shape[0]
        text = {
            "context_length": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            "mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        }
        embed_dim = sd["text_projection"].shape[1]
    except (KeyError, IndexError):
        return None
    return {"embed_dim": int(embed_dim), "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}


def _signature(cfg: Mapping[str, Any]) -> tuple | None:
    """Everything about a plain CLIP config that affects weights or outputs; None for non-plain configs."""
    if set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}:
        return None
    try:
        vision = dataclasses.asdict(CLIPVisionCfg(**cfg["vision_cfg"]))
        text = dataclasses.asdict(CLIPTextCfg(**cfg["text_cfg"]))
    except (TypeError, KeyError):
        return None
    for d in (vision, text):
        d.pop("patch_dropout", None)
        d.pop("output_tokens", None)
        d.pop("hf_model_pretrained", None)
        d.pop("timm_model_pretrained", None)
        d["mlp_ratio"] = float(d["mlp_ratio"])
    size = vision["image_size"]
    vision["image_size"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if isinstance(vision["layers"], list):
        vision["layers"] = tuple(vision["layers"])
    return (cfg["embed_dim"], bool(cfg.get("quick_gelu", False)), repr(sorted(vision.items())),
            repr(sorted(text.items())))


def _match_registered(cfg: dict[str, Any]) -> str | None:
    """The first registered name (ours first) whose config is exactly ``cfg``, else None."""
    target = _signature(cfg)
    for name in known_models():
        cand = open_clip.get_model_config(name)
        if cand is not None and _signature(cand) == target:
            return name
    return None


def _inferred_name(cfg: dict[str, Any]) -> str:
    v = cfg["vision_cfg"]
    if "patch_size" in v:
        return f"inferred-ViT-W{v['width']}-L{v['layers']}-P{v['patch_size']}-{v['image_size']}"
    return f"inferred-RN-W{v['width']}-L{'x'.join(map(str, v['layers']))}-{v['image_size']}"


# ----------------------------------------------------------------------------- checkpoint files


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


def _strip_prefixes(sd: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    stripped = False
    out = dict(sd)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
            stripped = True
    return out, stripped


def _read_checkpoint_file(path: Path, torchscript: str = "safe") -> tuple[dict[str, Any], str, str | None]:
    """Read a checkpoint file into (state dict, description, architecture name stored in it or None).

    TorchScript archives (OpenAI's original releases) are read by ``torchscript``: ``"safe"`` takes
    their tensors without running anything (:mod:`rvpt.torchscript`); ``"refuse"`` refuses them;
    ``"trust"`` runs ``torch.jit.load``, which executes code stored in the archive (e.g. a
    ``__setstate__``): only for archives the user trusts (``model.trust_torchscript``).
    """
    where = f"checkpoint {path}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"could not read safetensors {where}: {exc}") from exc
        sd, _ = _strip_prefixes(sd)
        return sd, f"open_clip safetensors checkpoint {path}", None
    if _is_torchscript(path):
        if torchscript == "refuse":
            raise ModelError(f"{where} is a TorchScript archive, which is not accepted from this source (it can "
                             f"carry code); supply safetensors or a plain state dict")
        if torchscript == "safe":
            from .torchscript import UnsafeArchive, read_state_dict
            try:
                sd = read_state_dict(path)
            except UnsafeArchive as exc:
                raise ModelError(f"TorchScript {where} cannot be read without running its code: {exc}; if you "
                                 f"trust it, set model.trust_torchscript=true (torch.jit.load then runs the "
                                 f"archive's code)") from None
            except (OSError, zipfile.BadZipFile) as exc:
                raise ModelError(f"could not read TorchScript {where}: {exc}") from None
            return sd, f"OpenAI TorchScript archive {path} (tensors read, no code run)", None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated in torch 2.14
                scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelError(f"could not read TorchScript {where}: {exc}") from exc
        return dict(scripted.state_dict()), f"OpenAI TorchScript archive {path} (its code was run: trusted)", None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{where} holds Python objects beyond tensors/containers, which are never unpickled here "
            f"(weights_only=True); re-save it as a plain state dict of tensors") from exc
    except Exception as exc:
        raise ModelError(f"could not read {where}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"{where} holds a {type(obj).__name__}, not a state dict")
    stored_name = obj.get("name") if isinstance(obj.get("name"), str) else None
    inner_key = next((k for k in ("state_dict", "model_state_dict", "model") if isinstance(obj.get(k), dict)), None)
    if inner_key is not None:
        sd, stripped = _strip_prefixes(obj[inner_key])
        epoch = f" (epoch {obj['epoch']})" if "epoch" in obj else ""
        kind = "CleanCLIP-style checkpoint" if stripped and stored_name is None else "open_clip training checkpoint"
        return sd, f"{kind} {path}{epoch}", stored_name
    sd, _ = _strip_prefixes(obj)
    kind = "OpenAI-format state dict" if any(k in sd for k in _OPENAI_INT_KEYS) else "state dict"
    return sd, f"{kind} {path}", stored_name


def _read_model_config(config_path: Path) -> dict[str, Any]:
    """The JSON object in an ``open_clip_config.json``, checked to hold a ``model_cfg`` object."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read {config_path}: {exc}") from exc
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ModelError(f"{config_path} has no 'model_cfg' entry")
    if not isinstance(config["model_cfg"], dict):
        raise ModelError(f"{config_path}: 'model_cfg' is a {type(config['model_cfg']).__name__}, not an object")
    return config


def describe_model_dir(location: str) -> dict[str, Any]:
    """What a model directory (local or object storage) holds, without loading or downloading its
    weights: ``{"model_name", "image_size", "weights"}``. One-line ModelError when it is not a
    usable model directory (no config, a config without ``model_cfg``, no weights file)."""
    location = str(location)
    try:
        names = {e.base_name for e in storage.listdir(location)}
        if not names:
            raise ModelError(f"model directory not found (or empty): {storage.display(location)}")
        if MODEL_DIR_CONFIG not in names:
            raise ModelError(f"model directory {storage.display(location)} has no {MODEL_DIR_CONFIG}")
        config = storage.read_json(storage.join(location, MODEL_DIR_CONFIG), 16 << 20)
    except storage.StorageError as exc:
        raise ModelError(str(exc)) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{storage.join(location, MODEL_DIR_CONFIG)} has no 'model_cfg' object")
    weights = next((f for f in _WEIGHT_FILES if f in names), None)
    if weights is None:
        raise ModelError(f"model directory {storage.display(location)} has no weights file "
                         f"(looked for {', '.join(_WEIGHT_FILES)})")
    size = (config["model_cfg"].get("vision_cfg") or {}).get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int) or not 1 <= size <= 4096:
        raise ModelError(f"{storage.join(location, MODEL_DIR_CONFIG)}: vision_cfg.image_size "
                         f"{size!r} is not a size in pixels")
    return {"model_name": config.get("model_name"), "image_size": size, "weights": weights}


def model_image_size(checkpoint: str) -> int:
    """The input size of a model: read from a model directory's config (no weights are fetched),
    or by loading any other checkpoint."""
    try:
        if storage.is_dir(str(checkpoint)):
            return describe_model_dir(str(checkpoint))["image_size"]
    except storage.StorageError as exc:
        raise ModelError(f"checkpoint {checkpoint}: {exc}") from None
    return load_clip(checkpoint=checkpoint).image_size


def _check_offline_config(model_cfg: Mapping[str, Any], where: str) -> None:
    """Refuse a model config that would make open_clip fetch from a hub or run outside code while the
    architecture is built: Hugging Face text towers and tokenizers (``AutoConfig`` /
    ``AutoTokenizer.from_pretrained``, remote code), pretrained timm towers, tokenizer file paths."""
    text = model_cfg.get("text_cfg") or {}
    vision = model_cfg.get("vision_cfg") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ModelError(f"{where}: text_cfg and vision_cfg must be objects")
    named = [f"text_cfg.{k}={text[k]!r}" for k in ("hf_model_name", "hf_tokenizer_name") if text.get(k)]
    named += [f"vision_cfg.{k}=true" for k in ("timm_model_pretrained",) if vision.get(k)]
    named += [f"text_cfg.{k}=true" for k in ("hf_model_pretrained",) if text.get(k)]
    if named:
        raise ModelError(f"{where} names {', '.join(named)}, which open_clip would fetch from a hub (and may run "
                         f"code from); only models with open_clip's own towers and tokenizer load here")
    kwargs = text.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"clean", "additional_special_tokens"}:
        raise ModelError(f"{where}: text_cfg.tokenizer_kwargs may only set clean and additional_special_tokens")


def _load_model_dir(path: Path, name: str | None, device: str | torch.device,
                    torchscript: str = "safe") -> LoadedClip:
    config_path = path / MODEL_DIR_CONFIG
    if not config_path.is_file():
        raise ModelError(f"checkpoint directory {path} has no {MODEL_DIR_CONFIG} (expected a directory written "
                         f"by save_model_dir or open_clip's save_for_hf)")
    config = _read_model_config(config_path)
    _check_offline_config(config["model_cfg"], str(config_path))
    weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise ModelError(f"checkpoint directory {path} has no weights file (looked for {', '.join(_WEIGHT_FILES)})")
    stored = config.get("model_name") or path.name
    if name is None or name == stored or name.replace("/", "-") == stored:
        arch = stored
        with _quiet_random_init():
            model = _create(f"local-dir:{path}", load_weights=False)
        model_cfg = config["model_cfg"]
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    else:
        arch = _canonical_name(name)
        model_cfg = open_clip.get_model_config(arch)
        model = _build_arch(arch, model_cfg)
        tokenizer = open_clip.get_tokenizer(arch)
    sd, _, _ = _read_checkpoint_file(weights, torchscript)
    _load_weights(model, sd, arch, f"checkpoint {weights}")
    return _finish(model, arch, model_cfg, f"model directory {path}", device, tokenizer)


def _load_checkpoint(path: Path, name: str | None, device: str | torch.device,
                     torchscript: str = "safe") -> LoadedClip:
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _load_model_dir(path, name, device, torchscript)
    sd, source, stored_name = _read_checkpoint_file(path, torchscript)
    if name is None and stored_name is not None and stored_name.replace("/", "-") in known_models():
        name = stored_name
    if name is not None:
        arch = _canonical_name(name)
        model_cfg = open_clip.get_model_config(arch)
    else:
        model_cfg = _infer_openai_cfg(sd)
        if model_cfg is None:
            raise ModelError(f"cannot infer the architecture of {source} (no OpenAI-format CLIP keys such as "
                             f"'visual.proj'); pass model.name")
        arch = _match_registered(model_cfg) or _inferred_name(model_cfg)
        source += f"; architecture inferred from tensor shapes as {arch} (QuickGELU assumed)"
    model = _build_arch(arch, model_cfg)
    _load_weights(model, sd, arch, f"checkpoint {path}")
    tokenizer = open_clip.get_tokenizer(arch) if arch in open_clip.list_models() else None
    return _finish(model, arch, model_cfg, source, device, tokenizer)


# ----------------------------------------------------------------------------- pretrained tags


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force Hugging Face hub offline mode; restores HF_HUB_OFFLINE (env and hub constant) afterwards.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the module constant is patched as well.
    """
    import huggingface_hub.constants as hf_constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _user_offline() -> bool:
    """Has the user put the Hugging Face hub in offline mode (env, or the constant read at import)?"""
    import huggingface_hub.constants as hf_constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(hf_constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    """The Hugging Face hub URL: HF_ENDPOINT now, else the value huggingface_hub read at import."""
    import huggingface_hub.constants as hf_constants

    return os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT


def _download_host(cfg: Mapping[str, Any]) -> tuple[str, int, bool]:
    """(host, port, expect_tls) that open_clip would download ``cfg`` from, or the proxy in between."""
    if cfg.get("hf_hub"):
        url = _hub_endpoint()
    else:
        url = cfg.get("url", "")
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(parsed.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or 80, False
    return host, port, parsed.scheme != "http"


def _reachable(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S, tls: bool = True) -> bool:
    """Can ``host:port`` be reached within ``timeout`` seconds in all (DNS included)?

    With ``tls`` a verified TLS handshake for ``host`` is required as well, so an intercepting gateway that
    accepts every TCP connection does not count as the hub. Runs in a daemon thread to bound DNS too.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if tls:
                    ctx = ssl.create_default_context()
                    with contextlib.suppress(ImportError, OSError):
                        import certifi  # the CA bundle requests/httpx use, next to the system store

                        ctx.load_verify_locations(certifi.where())
                    with ctx.wrap_socket(sock, server_hostname=host):
                        pass
            result.append(True)
        except OSError:  # includes ssl.SSLError and socket.timeout
            result.append(False)

    thread = threading.Thread(target=attempt, name="rvpt-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_weights(cfg: Mapping[str, Any]) -> str | None:
    """Local path of the weights for a pretrained cfg if already cached, without any network access."""
    if cfg.get("hf_hub"):
        try:
            with _hf_offline():
                return download_pretrained(dict(cfg)) or None
        except Exception:
            return None
    url = cfg.get("url", "")
    if url:  # open_clip's URL cache (download_pretrained_from_url's default location)
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return str(target) if target.is_file() else None
    return cfg.get("file")


def _load_pretrained(name: str, tag: str, device: str | torch.device) -> LoadedClip:
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no open_clip pretrained tags"
        raise ModelError(f"unknown pretrained tag '{tag}' for model {name}; {known}")
    model_cfg = open_clip.get_model_config(name)
    quick_gelu = bool(cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)
    if quick_gelu:  # e.g. ViT-B-32 + openai: the weights were trained with QuickGELU
        model_cfg["quick_gelu"] = True
    kwargs = {"pretrained": tag, "force_quick_gelu": quick_gelu}
    if _cached_weights(cfg):
        with _hf_offline():
            model = _create(name, **kwargs)
        return _finish(model, name, model_cfg, f"open_clip pretrained {name}/{tag} (local cache)", device,
                       open_clip.get_tokenizer(name))
    if cfg.get("hf_hub") and _user_offline():
        raise ModelError(f"weights for {name}/{tag} are not cached and HF_HUB_OFFLINE is set; {_HOW_TO_SUPPLY}")
    host, port, tls = _download_host(cfg)
    if not _reachable(host, port, tls=tls):
        raise ModelError(f"weights for {name}/{tag} are not cached and the download host {host}:{port} cannot be "
                         f"reached; {_HOW_TO_SUPPLY}")
    model = _create(name, **kwargs)
    return _finish(model, name, model_cfg, f"open_clip pretrained {name}/{tag} (downloaded from {host})", device,
                   open_clip.get_tokenizer(name))


# ----------------------------------------------------------------------------- Hugging Face hub models (hf-hub:)


def _parse_hub_name(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/REPO[@REVISION]`` -> (repo id, revision or None); malformed names are a ModelError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    spec = name[len(_HUB_PREFIX):]
    repo_id, at, revision = spec.partition("@")
    problem = None
    if not repo_id:
        problem = "the repo id is empty"
    elif repo_id.count("/") != 1:
        problem = f"'{repo_id}' is not of the form ORG/REPO"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            problem = (f"'{repo_id}' is not a valid repo id (letters, digits, '-', '_', '.'; no '--' or '..'; "
                       f"at most 96 characters)")
    if problem is None and at:
        if not _HUB_REVISION_RE.fullmatch(revision) or ".." in revision or "//" in revision or revision.endswith("/"):
            problem = f"'{revision}' is not a valid revision (a branch, tag or commit hash)"
    if problem:
        raise ModelError(f"invalid Hugging Face hub model name '{name}': {problem}; expected {_HUB_PREFIX}ORG/REPO or "
                         f"{_HUB_PREFIX}ORG/REPO@REVISION")
    return repo_id, (revision if at else None)


def _cached_hub_files(repo_id: str, revision: str | None) -> tuple[Path, Path] | None:
    """(config, weights) of a hub repo from the local HF cache, same snapshot, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    with _hf_offline():
        config = try_to_load_from_cache(repo_id, MODEL_DIR_CONFIG, revision=revision)
        if not isinstance(config, str):
            return None
        for filename in _HUB_WEIGHT_FILES:
            weights = try_to_load_from_cache(repo_id, filename, revision=revision)
            if isinstance(weights, str) and Path(weights).parent == Path(config).parent:
                return Path(config), Path(weights)
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _download_hub_files(name: str, repo_id: str, revision: str | None, endpoint: str, host: str) -> tuple[Path, Path]:
    """Download the config, then one weights file from the same commit (safetensors preferred)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        config = Path(hf_hub_download(repo_id, MODEL_DIR_CONFIG, revision=revision, endpoint=endpoint))
        commit = config.parent.name  # snapshots/<commit>/open_clip_config.json: pin the weights to it
        for filename in _HUB_WEIGHT_FILES:
            try:
                return config, Path(hf_hub_download(repo_id, filename, revision=commit, endpoint=endpoint))
            except EntryNotFoundError:
                continue
    except GatedRepoError as exc:
        raise ModelError(f"{name}: the repository is gated on {host}; accept its terms and set HF_TOKEN, or "
                         f"{_HOW_TO_SUPPLY}") from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(f"{name}: no such repository on {host} (or it is private: set HF_TOKEN)") from exc
    except EntryNotFoundError as exc:
        raise ModelError(f"{name} is not an open_clip model: the repository has no {MODEL_DIR_CONFIG}") from exc
    except Exception as exc:  # revision not found, HTTP and network errors, disk errors
        raise ModelError(f"could not download {name} from {host}: {_first_line(exc)}") from exc
    raise ModelError(f"{name} has no open_clip weights file (looked for {', '.join(_HUB_WEIGHT_FILES)})")


def _hub_tokenizer(name: str, model_cfg: Mapping[str, Any]) -> Callable[..., Tensor]:
    """The tokenizer open_clip would use for a hub config, built without network; HF tokenizers are refused."""
    text_cfg = model_cfg.get("text_cfg", {})
    if not isinstance(text_cfg, dict):
        raise ModelError(f"{name}: 'text_cfg' in {MODEL_DIR_CONFIG} is not an object")
    hf_parts = [f"{key}={text_cfg[key]!r}" for key in ("hf_tokenizer_name", "hf_model_name") if text_cfg.get(key)]
    if hf_parts:
        raise ModelError(f"{name} has a Hugging Face tokenizer/text tower ({', '.join(hf_parts)}), which is not "
                         f"supported offline; use an open_clip model with the default text tower")
    context_length = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise ModelError(f"{name}: text_cfg.context_length {context_length!r} is not an integer >= 2")
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ModelError(f"{name}: text_cfg.tokenizer_kwargs is not an object")
    clean = kwargs.get("clean", "lower")
    extra = kwargs.get("additional_special_tokens")
    unsupported = sorted(set(kwargs) - {"clean", "additional_special_tokens"})  # e.g. bpe_path: a local file path
    if unsupported or clean not in _SIMPLE_TOKENIZER_CLEAN or not (
            extra is None or (isinstance(extra, list) and all(isinstance(t, str) for t in extra))):
        raise ModelError(f"{name}: unsupported text_cfg.tokenizer_kwargs {json.dumps(kwargs)[:200]} (accepted: clean "
                         f"in {', '.join(_SIMPLE_TOKENIZER_CLEAN)}; additional_special_tokens: a list of strings)")
    return open_clip.SimpleTokenizer(context_length=context_length, clean=clean, additional_special_tokens=extra)


def _load_hub(name: str, device: str | torch.device) -> LoadedClip:
    """``hf-hub:ORG/REPO[@REVISION]``: loaded like a model directory, from the HF cache or after a download."""
    repo_id, revision = _parse_hub_name(name)
    files = _cached_hub_files(repo_id, revision)
    if files is not None:
        how = "local cache"
    else:
        if _user_offline():
            raise ModelError(f"{name} is not cached and HF_HUB_OFFLINE is set; {_HOW_TO_SUPPLY}")
        endpoint = _hub_endpoint()
        host, port, tls = _download_host({"hf_hub": repo_id})
        if not _reachable(host, port, tls=tls):
            raise ModelError(f"{name} is not cached and the download host {host}:{port} cannot be reached; "
                             f"{_HOW_TO_SUPPLY}")
        files = _download_hub_files(name, repo_id, revision, endpoint, host)
        how = f"downloaded from {host}"
    config_path, weights = files
    config = _read_model_config(config_path)
    model_cfg = config["model_cfg"]
    tokenizer = _hub_tokenizer(name, model_cfg)  # before building: HF text towers would reach the network
    with _hf_offline(), _quiet_random_init():  # everything is local now; nothing may be fetched while building
        model = _create(f"local-dir:{config_path.parent}", load_weights=False)
    sd, _, _ = _read_checkpoint_file(weights, torchscript="refuse")
    _load_weights(model, sd, name, f"weights {weights.name} of {name}")
    return _finish(model, name, model_cfg, f"{name} ({how}; {weights.name}, snapshot {config_path.parent.name})",
                   device, tokenizer)


def weights_source(name: str, pretrained: str | None = None) -> str:
    """Where :func:`load_clip` would take the weights of a pretrained tag or an ``hf-hub:`` name
    from, found without downloading anything: ``"local cache"`` or ``"downloadable from HOST"``.
    A one-line ModelError when they cannot be had (unknown tag, offline and not cached, host
    unreachable within seconds)."""
    register_configs()
    if name.startswith(_HUB_PREFIX):
        repo_id, revision = _parse_hub_name(name)
        if _cached_hub_files(repo_id, revision) is not None:
            return "local cache"
        cfg: Mapping[str, Any] = {"hf_hub": repo_id}
        what = name
    else:
        arch = _canonical_name(name)
        cfg = get_pretrained_cfg(arch, pretrained or "")
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ModelError(f"unknown pretrained tag '{pretrained}' for model {arch}; known tags: "
                             f"{', '.join(tags) or 'none'}")
        if _cached_weights(cfg):
            return "local cache"
        what = f"weights for {arch}/{pretrained}"
    if cfg.get("hf_hub") and _user_offline():
        raise ModelError(f"{what} are not cached and HF_HUB_OFFLINE is set; {_HOW_TO_SUPPLY}")
    host, port, tls = _download_host(cfg)
    if not _reachable(host, port, tls=tls):
        raise ModelError(f"{what} are not cached and the download host {host}:{port} cannot be "
                         f"reached; {_HOW_TO_SUPPLY}")
    return f"downloadable from {host}"


# ----------------------------------------------------------------------------- public entry point


def load_clip(
    name: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    trust_torchscript: bool = False,
) -> LoadedClip:
    """Load a CLIP model as fp32 in eval mode.

    * ``name`` only: random init of a known architecture (see :func:`known_models`).
    * ``name`` + ``pretrained``: an open_clip pretrained tag (cached weights load offline; otherwise the
      download host is probed for ~3 s and a ModelError explains how to supply weights if unreachable).
    * ``name`` = ``hf-hub:ORG/REPO`` (optionally ``@REVISION``) alone: an open_clip model on the Hugging Face
      hub (its ``open_clip_config.json`` plus ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
      with the same cache / offline / fast-failure behaviour; only the default (CLIP BPE) text tower is supported.
    * ``checkpoint``: a model directory, open_clip checkpoint, OpenAI state dict / TorchScript archive or
      CleanCLIP checkpoint; ``name`` is optional (taken from the directory, from an open_clip training
      checkpoint's ``name`` entry, or inferred from OpenAI-format tensor shapes). A TorchScript archive's
      tensors are read without running its code; ``trust_torchscript`` runs ``torch.jit.load`` instead
      (it executes the archive's code).

    Raises:
        ModelError: for every user-caused problem, with a one-line message.
    """
    register_configs()
    if checkpoint is not None and pretrained is not None:
        raise ModelError("give either model.pretrained (a tag) or model.checkpoint (a path), not both")
    if checkpoint is not None:
        if storage.is_remote(str(checkpoint)):  # object storage: a cached local copy
            try:
                checkpoint = storage.local_copy(str(checkpoint))
            except storage.StorageError as exc:
                raise ModelError(f"checkpoint {checkpoint}: {exc}") from None
        return _load_checkpoint(Path(checkpoint).expanduser(), name, device,
                                "trust" if trust_torchscript else "safe")
    if name is None:
        raise ModelError("no model given: set model.name (optionally with model.pretrained) or model.checkpoint")
    if name.startswith(_HUB_PREFIX) and pretrained is None:
        return _load_hub(name, device)
    arch = _canonical_name(name)
    if pretrained is not None:
        if os.path.isfile(pretrained):  # open_clip also accepts a file path as `pretrained`
            return _load_checkpoint(Path(pretrained), arch, device, "trust" if trust_torchscript else "safe")
        return _load_pretrained(arch, pretrained, device)
    model = _create(arch)
    return _finish(model, arch, open_clip.get_model_config(arch), "random init (no pretrained weights)", device,
                   open_clip.get_tokenizer(arch))


# ----------------------------------------------------------------------------- savers


def _unwrap(loaded_or_model: LoadedClip | nn.Module) -> nn.Module:
    return loaded_or_model.model if isinstance(loaded_or_model, LoadedClip) else loaded_or_model


def _cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def save_model_dir(
    loaded_or_model: LoadedClip | nn.Module,
    name: str | None,
    path: str | Path,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory that ``open_clip.create_model('local-dir:PATH')`` and :func:`load_clip` read.

    Layout: ``open_clip_config.json`` = ``{"model_cfg", "preprocess_cfg", "model_name", **extra_config}``
    and ``open_clip_model.safetensors`` (the model's state dict). ``name`` may be None for a LoadedClip.
    """
    model = _unwrap(loaded_or_model)
    if isinstance(loaded_or_model, LoadedClip) and name in (None, loaded_or_model.name):
        name, model_cfg = loaded_or_model.name, loaded_or_model.model_cfg
    else:
        if name is None:
            raise ModelError("save_model_dir needs the architecture name for a bare model")
        name = name.replace("/", "-")
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise _unknown_name_error(name)
    reserved = {"model_cfg", "preprocess_cfg", "model_name"}
    if extra_config and reserved & set(extra_config):
        raise ModelError(f"extra_config may not set {', '.join(sorted(reserved & set(extra_config)))}")
    pp = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    defaults = dataclasses.asdict(PreprocessCfg())
    preprocess_cfg = {k: pp.get(k, defaults[k]) for k in ("mean", "std", "interpolation", "resize_mode")}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "model_name": name, **(extra_config or {})}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(_cpu_state_dict(model), str(out / MODEL_DIR_WEIGHTS))
    (out / MODEL_DIR_CONFIG).write_text(json.dumps(_jsonable(config), indent=2) + "\n")
    return out


def _openai_compatible(model: nn.Module) -> None:
    if not isinstance(model, open_clip.CLIP) or not isinstance(getattr(model, "text_projection", None), nn.Parameter):
        raise ModelError(f"{type(model).__name__} has no OpenAI-format state dict (need a plain open_clip CLIP)")
    if _infer_openai_cfg(model.state_dict()) is None:
        raise ModelError("this model's vision tower has no OpenAI-format state dict (need a plain ViT or ModifiedResNet)")


def save_openai_state_dict(model: LoadedClip | nn.Module, path: str | Path) -> Path:
    """torch.save an OpenAI-format state dict (OpenAI key names plus the ints input_resolution,
    context_length and vocab_size), as OpenAI's non-JIT checkpoints are laid out."""
    m = _unwrap(model)
    _openai_compatible(m)
    sd: dict[str, Any] = _cpu_state_dict(m)
    size = m.visual.image_size
    sd["input_resolution"] = int(size[0] if isinstance(size, (tuple, list)) else size)
    sd["context_length"] = int(m.context_length)
    sd["vocab_size"] = int(m.vocab_size)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    return out


def save_cleanclip_checkpoint(model: LoadedClip | nn.Module, path: str | Path) -> Path:
    """torch.save a CleanCLIP-style checkpoint: ``{"epoch": 0, "state_dict": {"module." + key: tensor}}``."""
    m = _unwrap(model)
    _openai_compatible(m)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in _cpu_state_dict(m).items()}}, out)
    return out


register_configs()
