"""The attack registry and the contract every attack keeps.

An attack is a trigger: typed parameters (pydantic, with the papers' defaults scaled to the image
size), an optional ``fit`` step for optimised triggers, and ``apply`` on batches of float images in
[0, 1]. Everything needed to re-apply the same trigger is saved as ``attack.json`` plus, for learned
state, ``attack_tensors.safetensors`` beside it.
"""
from __future__ import annotations

import io
import json
import operator
import shutil
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from PIL import Image
from safetensors.torch import load_file, save_file

from .. import storage
from ..params import parse_params

ATTACK_FILE = "attack.json"
TENSOR_FILE = "attack_tensors.safetensors"


class AttackError(ValueError):
    """A user-caused attack error (unknown name, nonsensical parameter); one-line message."""


class AttackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


ATTACKS: dict[str, type["Attack"]] = {}


def register_attack(name: str):
    """Class decorator: ``@register_attack("badnet")``."""
    def deco(cls: type["Attack"]) -> type["Attack"]:
        cls.name = name
        ATTACKS[name] = cls
        return cls
    return deco


class Attack:
    """Base class. Subclasses set ``Params`` and implement ``_apply``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[AttackParams]] = AttackParams
    #: whether ``fit`` must run (optimised triggers) before ``apply``
    needs_fit: ClassVar[bool] = False
    #: whether half of the trigger is text (a key on the class prompts): only a defense that
    #: classifies through the text side can be measured against it
    text_trigger: ClassVar[bool] = False

    def __init__(self, image_size: int, seed: int = 0, **params: Any):
        self.image_size = _integer(image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE,
                                   f"{self.name}: image_size")
        self.seed = _integer(seed, 0, 2 ** 63 - 1, f"{self.name}: seed")
        self.params = parse_params(self.Params, params, self.name, AttackError)
        self.fitted = not self.needs_fit
        self.check()

    # -- to override ---------------------------------------------------------------------------
    def check(self) -> None:
        """Reject parameters that make no sense for this image size (raise AttackError)."""

    def fit(self, loaded, batches: Iterable[dict], target: int, class_names: list[str],
            templates: list[str]) -> dict:
        """Optimise the trigger against a clean model (optimised attacks only)."""
        self.fitted = True
        return {}

    def _apply(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def apply_text(self, texts: list[str]) -> list[str]:
        """The text half of a dual-key trigger (identity for image-only attacks)."""
        return list(texts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned or sampled state that ``attack.json`` cannot hold as plain values."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fitted = True

    # -- shared --------------------------------------------------------------------------------
    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Triggered copies of float images [B,3,H,W] in [0,1]. Per-image randomness (patch
        position, noise) comes from a generator seeded by ``(attack seed, seed)``, so the same
        call gives identical pixels."""
        if not self.fitted:
            raise AttackError(f"{self.name}: the trigger must be fitted before it is applied")
        if images.ndim != 4 or images.shape[1] != 3:
            raise AttackError(f"{self.name}: expected images [B,3,H,W], got {tuple(images.shape)}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(seed))
        out = self._apply(images.float(), gen)
        return out.clamp(0, 1)

    def to_json(self) -> dict:
        return {"attack": self.name, "params": self.params.model_dump(mode="json"),
                "seed": self.seed, "image_size": self.image_size}

    def save(self, directory: str | Path, **extra: Any) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        data = {**self.to_json(), **extra}
        data["params"] = _bundle_files(data["params"], d)
        tensors = self.tensors()
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(d / TENSOR_FILE))
            data["tensors"] = TENSOR_FILE
        (d / ATTACK_FILE).write_text(json.dumps(data, indent=1))
        return d / ATTACK_FILE


def _is_file_param(key: str, value: Any) -> bool:
    """Parameters naming a file (a patch image, ...): load_attack reads them beside attack.json."""
    return isinstance(value, str) and bool(value) and key.endswith(("_image", "_file"))


def _bundle_files(params: dict, directory: Path) -> dict:
    """``params`` with every file parameter copied into ``directory`` as ``<key><suffix>`` and
    named by that, so the saved attack.json is self-contained and loads with load_attack (which
    accepts only names inside its own directory)."""
    out = dict(params)
    for key, value in params.items():
        if _is_file_param(key, value):
            src = Path(value)
            name = key + src.suffix.lower()
            if not src.is_file():
                raise AttackError(f"params.{key}: {value} is not a file")
            dst = directory / name
            if src.resolve() != dst.resolve():  # saving onto its own directory keeps the file
                shutil.copyfile(src, dst)
            out[key] = name
    return out


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096


def _integer(value: Any, lo: int, hi: int, what: str) -> int:
    """``value`` as an int in ``[lo, hi]`` (an integral float like 5.0 too); AttackError otherwise."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        value = int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise AttackError(f"{what} must be an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise AttackError(f"{what} must be within [{lo}, {hi}], got {v}")
    return v
#: trigger images named by attack parameters are untrusted too: formats, bytes and pixels bounded
TRIGGER_IMAGE_BYTES, TRIGGER_IMAGE_PIXELS = 32 << 20, 16_000_000


def read_trigger_image(path: str, what: str) -> Image.Image:
    """An RGB image from a file an attack's parameters name (JPEG, PNG or WebP, bounded in size and
    pixels); a one-line AttackError otherwise."""
    from ..shards import IMAGE_FORMATS

    try:
        with open(path, "rb") as fh:
            data = fh.read(TRIGGER_IMAGE_BYTES + 1)
        if len(data) > TRIGGER_IMAGE_BYTES:
            raise AttackError(f"{what} {path} is larger than {TRIGGER_IMAGE_BYTES} bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                if im.size[0] * im.size[1] > TRIGGER_IMAGE_PIXELS:
                    raise AttackError(f"{what} {path} has more than {TRIGGER_IMAGE_PIXELS} pixels")
                return im.convert("RGB")
    except AttackError:
        raise
    except Exception as e:  # noqa: BLE001 (missing, unreadable, not an allowed format, a bomb)
        raise AttackError(f"{what} {path}: cannot read it as a JPEG, PNG or WebP "
                          f"({type(e).__name__})") from None


def get_attack(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def make_attack(name: str, image_size: int, seed: int = 0, **params: Any) -> Attack:
    return get_attack(name)(image_size, seed, **params)


def load_attack(path: str | Path) -> tuple[Attack, dict]:
    """Load ``attack.json`` (a file or the directory holding it; local or on object storage, where
    its directory is fetched once into the cache). Returns the attack and the whole JSON (target
    class, poisoning settings, ...)."""
    if storage.is_remote(str(path)):
        uri = str(path).rstrip("/")
        try:
            path = storage.local_copy(storage.parent(uri)) / storage.name_of(uri) \
                if uri.endswith(".json") else storage.local_copy(uri)
        except storage.StorageError as e:
            raise AttackError(f"attack description {uri}: {e}") from None
    p = Path(path)
    f = p / ATTACK_FILE if p.is_dir() else p
    if not f.is_file():
        raise AttackError(f"attack description not found: {f}")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise AttackError(f"{f} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("attack"), str):
        raise AttackError(f"{f}: needs an object with an 'attack' name")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise AttackError(f"{f}: params must be an object, got {type(params).__name__}")
    params = dict(params)
    for key, value in list(params.items()):  # file parameters: names beside the json, inside its dir
        if _is_file_param(key, value):
            params[key] = str(_inside(f, value, f"params.{key}"))
    try:
        attack = make_attack(data["attack"], data.get("image_size", 32), data.get("seed", 0),
                             **params)
    except AttackError as e:
        raise AttackError(f"{f}: {e}") from None
    if data.get("tensors"):
        if not isinstance(data["tensors"], str):
            raise AttackError(f"{f}: tensors must be a file name")
        tf = _inside(f, data["tensors"], "tensors")
        if not tf.is_file():
            raise AttackError(f"{f} names tensors file {data['tensors']} but it is missing")
        try:
            attack.load_tensors(load_file(str(tf)))
        except AttackError:
            raise
        except Exception as e:  # noqa: BLE001 (not safetensors, wrong shapes)
            raise AttackError(f"{f}: tensors file {data['tensors']} cannot be loaded "
                              f"({type(e).__name__})") from None
    return attack, data


def _inside(attack_file: Path, name: str, field: str) -> Path:
    """``name`` (from attack.json) as a file beside ``attack_file``: relative, inside its directory."""
    base = attack_file.parent.resolve()
    target = (base / name).resolve()
    if Path(name).is_absolute() or "://" in name or (target != base and base not in target.parents):
        raise AttackError(f"{attack_file}: {field} {name!r} is not a file name inside {base}")
    return target


def scaled(pixels_at_224: float, image_size: int, minimum: int = 1) -> int:
    """A size given for 224 px images, scaled to ``image_size`` (papers state 224 px sizes)."""
    return max(minimum, round(pixels_at_224 * image_size / 224))
