"""Typed configuration: YAML files validated into pydantic models, with ``a.b=value`` overrides.

One :class:`Config` object flows from the command line to every stage. A bad value fails at once
with :class:`ConfigError`, whose message is one line naming the field.

The schema's defaults *are* the embedded default (the broad synthetic miniature, its tiny CLIP, the
attacks that plant in it at the papers' rate, the default sweep): ``configs/default.yaml`` sets
nothing, so no default is stated twice; other configs (``shapes.yaml``, ``smoke.yaml``,
``paper.yaml``) state what they change.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from rvpt import storage
from rvpt.defenses import TrainOverrides
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A user-caused configuration error; ``str(err)`` is one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(_Strict):
    """Where the data comes from: the embedded synthetic generator, or shards on disk."""

    kind: Literal["synthetic", "shards"] = "synthetic"
    path: Optional[str] = Field(None, description="corpus when kind=shards: a directory or URI "
                                "(s3://, gs://); a relative path is taken under paths.root")
    seed: int = 0
    image_size: int = Field(32, ge=8, le=1024)
    num_classes: int = Field(24, ge=2, description="synthetic: number of shape classes (max 24)")
    pretrain_style: Literal["shapes", "broad"] = Field(
        "broad", description="synthetic: what the pretraining pairs show. broad: web-like scenes "
        "(shapes, digits, textures, grain, blur, stamps, warps, ... with partial, noisy captions; "
        "rvpt.broad), so the model encodes more than its downstream tasks, as CLIP does; shapes: "
        "the shapes task's own images (configs/shapes.yaml, the earlier default)")
    effect_rate: float = Field(0.12, ge=0.0, le=1.0, description="synthetic, broad: probability "
                               "of each image-level effect (grain, blur, stamp, warp, ...)")
    effect_weights: dict[str, float] = Field(
        default_factory=dict, description="synthetic, broad: per-effect multipliers of "
        "effect_rate, over rvpt.broad.EFFECT_WEIGHT (0 leaves the effect out, e.g. "
        "{static: 0}: static is Blended's trigger, uniform noise blended in, resampled per image)")
    digits: bool = Field(True, description="synthetic, broad: also build the digits task "
                         "(<corpus>/digits: fewshot and test splits, 10 classes)")
    n_pretrain: int = Field(40000, ge=0, description="synthetic: image-caption pairs for pretraining")
    fewshot_per_class: int = Field(32, ge=1, description="synthetic: few-shot pool size per class")
    test_per_class: int = Field(100, ge=1, description="synthetic: test images per class")
    shifted: bool = Field(True, description="synthetic: also build the domain-shifted variant")
    shard_size: int = Field(5000, ge=1, description="samples per tar shard")
    clutter: int = Field(3, ge=0, le=20, description="synthetic: max clutter strokes per image")
    noise: float = Field(0.03, ge=0.0, le=0.5, description="synthetic: pixel noise std (0-1 scale)")
    class_only_captions: float = Field(
        0.5, ge=0.0, le=1.0, description="synthetic: share of captions naming only the class")
    typical_color: float = Field(
        0.85, ge=0.0, le=1.0, description="synthetic: share of images in their class's typical colour")
    bg_contrast: float = Field(60.0, ge=0.0, le=255.0,
                               description="synthetic: contrast within background textures (0-255)")
    workers: int = Field(2, ge=1, description="processes used to render")
    max_image_pixels: int = Field(64_000_000, ge=1, description="readers skip (and count) larger "
                                  "images before decoding them")
    max_member_mb: float = Field(64.0, gt=0, description="readers skip (and count) larger tar "
                                 "members without reading them")

    @model_validator(mode="after")
    def _check(self) -> "CorpusConfig":
        if self.kind == "shards" and not self.path:
            raise ValueError("corpus.path is required when corpus.kind=shards")
        if self.kind == "synthetic" and self.num_classes > 24:
            raise ValueError("num_classes: the synthetic generator has 24 classes at most")
        if self.effect_weights:
            from rvpt.broad import EFFECTS
            unknown = sorted(set(self.effect_weights) - set(EFFECTS))
            if unknown:
                raise ValueError(f"effect_weights: unknown effects {unknown}; known: {sorted(EFFECTS)}")
            negative = sorted(k for k, v in self.effect_weights.items() if v < 0)
            if negative:
                raise ValueError(f"effect_weights: weights must be >= 0, got {negative} < 0")
        return self


class ModelConfig(_Strict):
    """Which CLIP to start from: an open_clip architecture name, a pretrained tag or a checkpoint."""

    name: str = Field("ViT-Mini-8-p4-32", description="open_clip architecture: ViT-B/32's geometry "
                      "scaled to 32 px (4 px patches, 64 tokens; rvpt/model_configs)")
    pretrained: Optional[str] = Field(None, description="open_clip pretrained tag, e.g. openai")
    checkpoint: Optional[str] = Field(
        None, description="local weights: model dir, open_clip/OpenAI state dict, CleanCLIP ckpt"
    )
    trust_torchscript: bool = Field(
        False, description="load a TorchScript checkpoint with torch.jit.load, which RUNS code stored "
        "in the archive; by default only its tensors are read, nothing in it runs")


class PretrainConfig(_Strict):
    """Contrastive pretraining of the clean model (embedded benchmark only)."""

    enabled: bool = True
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    shuffle_buffer: int = Field(5000, ge=1)
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    compile: bool = Field(False, description=(
        "torch.compile the model in the contrastive loop (pretraining and the backdoor factory): "
        "about a minute of compilation, then 1.27-1.47x the eager step on the 2-core CPU "
        "(benchmarks/bench_pretrain_step.py; 6 epochs of pretraining 822 s against 953 s); "
        "like threads, it changes only floating-point order and is not part of any cache key"))
    crop_scale: Optional[tuple[float, float]] = Field(None, description=(
        "random-resized-crop scale range for pretraining images (null: none), so that zero-shot "
        "holds on the crops prompt tuning trains on"))
    twins: float = Field(0.0, ge=0, le=0.5, description=(
        "share of every batch replaced by hard-negative twins of its other pairs: the same image "
        "with a small local mark and a caption that says so (rvpt.broad.twin)"))

    @model_validator(mode="after")
    def _crop_scale_is_a_range(self):
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale {list(self.crop_scale)}: need 0 < low <= high <= 1")
        return self


class EvalConfig(_Strict):
    batch_size: int = Field(256, ge=1)
    prompt_ensemble: bool = Field(
        False, description="average all class templates (True) or one prompt per class (paper)"
    )


# The embedded benchmark's per-attack settings (measured: docs/findings.md §9). The papers'
# optimised 16 px patch at 224 px lies inside one of ViT-B/32's 32 px patches and is half its
# width; scaled to 32 px it is 2 px, placed inside one of this ViT's 4 px patches (top left; at the
# image centre it would straddle four). Other configs replace the whole mapping (shapes.yaml has
# the shapes benchmark's doses, paper.yaml: {}).
EMBEDDED_ATTACKS: dict[str, dict[str, Any]] = {
    "badclip": {"params": {"position": "top_left"}},
    "trojvqa": {"params": {"position": "top_left"}},
}


class PoisonConfig(_Strict):
    """The backdoor factory: which trigger, how many poisoned pairs, how the clean model is
    fine-tuned on them. ``attacks`` holds per-attack overrides of these fields, e.g.
    ``{wanet: {rate: 0.05, params: {strength: 2}}}``.

    The defaults are the embedded benchmark's: 1 % of the fine-tune set poisoned (the papers:
    0.3-1 %), every pretraining pair in it (40,000: 404 poisoned), 10 epochs at lr 5e-4. Poisoned
    exposures are what plants (findings §9): 101 poisoned pairs for 5 epochs planted nothing, 404
    for 5 gave BadCLIP 65 %, 404 for 10 BadCLIP 99.2 %, SIG 93.0 %, TrojVQA 96.0 % (Blended 16 %,
    BadNet 0.1 %). Paper-scale configs set the papers' values (lr 1e-5, 5 epochs)."""

    attack: str = Field("badnet", description="attack name (see rvpt.attacks.ATTACKS)")
    target: Union[int, str] = Field(0, description="target class: index or name")
    rate: float = Field(0.01, gt=0.0, lt=1.0, description="share of poisoned pairs in the fine-tune set")
    n_clean: int = Field(0, ge=0, description="clean pretrain pairs in the fine-tune set; 0 = all")
    epochs: int = Field(10, ge=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(128, ge=2)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    fit_images: int = Field(1024, ge=1, description="clean images used to fit optimised triggers")
    params: dict[str, Any] = Field(default_factory=dict, description="attack parameters")
    attacks: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in EMBEDDED_ATTACKS.items()},
        description="per-attack overrides of these fields (default: the embedded benchmark's)")

    def for_attack(self, name: str) -> "PoisonConfig":
        """This config with ``attack=name`` and that attack's overrides applied (validated)."""
        data = self.model_dump(exclude={"attacks"})
        over = dict(self.attacks.get(name) or {})
        params = {**data.pop("params"), **(over.pop("params", None) or {})}
        try:
            return PoisonConfig.model_validate({**data, **over, "attack": name, "params": params})
        except ValidationError as e:
            raise ConfigError(_format_error(e, prefix=f"poison.attacks.{name}")) from None


class PairsConfig(_Strict):
    """Clean image-caption pairs, for the defenses that train on pairs (CleanCLIP): disjoint from
    the few-shot pool. The embedded corpus's ``pretrain`` split is such a set (clean pairs from the
    source the model was trained on, as CleanCLIP's CC3M subset); on real data name a pair corpus."""

    corpus: Optional[str] = Field(None, description="corpus dir/URI (relative: under paths.root); "
                                  "None: the config's corpus")
    split: str = "pretrain"
    count: Optional[int] = Field(5000, ge=1, description="pairs used (None: the whole split); "
                                 "the paper: 250 K")


class DefenseConfig(_Strict):
    """A defense run: which defense, its parameters, the training recipe, what is measured."""

    name: str = Field("rvpt", description="defense name (see rvpt.defenses.DEFENSES)")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="parameters of that defense, e.g. {depth: 3, "
                                   "length: 50, alpha: 2}")
    train: TrainOverrides = Field(default_factory=TrainOverrides, description="recipe fields set "
                                  "for every defense (None: each defense's own recipe)")
    fewshot_split: str = Field("fewshot", description="the defender's clean pool")
    pairs: PairsConfig = PairsConfig()
    pr_images: int = Field(256, ge=0, description="test images for perturbation resistivity; 0 = skip")


class RayConfig(_Strict):
    """Where and how big: the Ray cluster, Train workers, evaluation actors, fault tolerance."""

    address: Optional[str] = Field(None, description="Ray address; None: RAY_ADDRESS, or a local "
                                   "instance on 127.0.0.1")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs of a local instance "
                                    "(default: max(6, cores), so Ray Data never starves)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on a small machine")
    gpus_per_worker: float = Field(0.0, ge=0, description="with use_gpu (0 means 1)")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint")
    eval_actors: int = Field(0, ge=0, description="Ray Data actors for a sweep trial's evaluation; "
                             "0 = a plain loop in the trial (faster on a 2-core machine: "
                             "benchmarks/bench_eval_throughput.py)")
    eval_cpus: float = Field(0.5, gt=0, description="CPUs per evaluation actor")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each Train worker and evaluation "
        "actor asks for, e.g. {gpu_node: 0.01}: pins them to nodes that offer them")
    storage_path: Optional[str] = Field(None, description="Tune/Train results; default "
                                        "<paths.root>/ray_results")
    fail_at_epoch: Optional[int] = Field(None, ge=0, description="testing: kill Train worker 0 "
                                         "once at this epoch to exercise recovery")


class TrackingConfig(_Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite "
                               "<paths.root>/mlflow.db (an http:// server on a cluster)")


class SelectConfig(_Strict):
    rule: Literal["ca", "asr", "combo"] = Field(
        "ca", description="ca: what a defender can measure; asr: oracle; combo: ca - weight*asr")
    weight: float = Field(1.0, ge=0)


class DatasetSpec(_Strict):
    corpus: Optional[str] = Field(None, description="corpus dir/URI (relative: under paths.root); "
                                  "None: the config's corpus")
    fewshot_split: str = "fewshot"
    test_split: str = "test"


class SweepConfig(_Strict):
    """Ray Tune over {attack x dataset x defense} x each defense's search space.""" 

    name: str = Field("rvpt-default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="MLflow experiment and Tune run name (letters, digits, . _ -: it "
                      "names directories)")
    attacks: list[str] = Field(default_factory=lambda: ["sig", "badclip", "trojvqa"],
                               description="default: the three triggers that plant in the embedded "
                               "benchmark (README, status)")
    datasets: dict[str, DatasetSpec] = Field(default_factory=lambda: {"synthetic": DatasetSpec()})
    defenses: list[str] = Field(default_factory=lambda: ["rvpt", "vpt"])
    models: dict[str, Union[str, dict[str, str]]] = Field(
        default_factory=dict, description="attack -> backdoored model dir or URI (relative: under "
        "paths.root): one for every dataset, a pattern with '{dataset}' in it, or {dataset: model} "
        "(a model is poisoned towards one target class, which each dataset must have); an attack "
        "without one is built by the backdoor factory on the embedded corpus")
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination of a defense's space; random: num_samples "
        "draws per attack x dataset x defense (seeded)")
    space: dict[str, dict[str, list]] = Field(
        default_factory=lambda: {"rvpt": {"depth": [0, 3], "length": [10, 50], "alpha": [1.0, 2.0]},
                                 "vpt": {"depth": [0, 3], "length": [10, 50]}},
        description="defense -> {param: values}; a defense not named here searches the space it "
        "declares (depth 0 = prompts in every block; 3 = the paper's default)")
    num_samples: int = Field(4, ge=1, description="random: trials per attack x dataset x defense")
    epochs: Optional[int] = Field(10, ge=1, description="trial epochs for every defense (None: each "
                                  "defense's recipe; the paper's 50 for prompt tuning is what "
                                  "jobs/defend.py uses)")
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="asha: early stopping on the defender's val_ca, comparing a trial only "
        "with trials of its own attack x dataset x defense")
    grace_period: int = Field(2, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int = Field(0, ge=0, description="0: from the resources")
    select: SelectConfig = SelectConfig()
    report: bool = Field(True, description="write the markdown report at the end")


class PathsConfig(_Strict):
    root: str = Field("artifacts", description="where corpora, models and results live: a local "
                      "path (relative: inside the checkout) or object storage (s3://bucket/prefix, "
                      "gs://...); on a cluster, storage every node reaches")


def in_ray_job_upload() -> bool:
    """True when this code runs from the temporary copy ``ray job submit --working-dir`` made."""
    return "working_dir_files" in REPO_ROOT.parts or REPO_ROOT.name.startswith("_ray_pkg_")


class Config(_Strict):
    seed: int = 0
    device: str = Field("auto", description="where local jobs run the model: cpu, cuda, cuda:N, or auto "
                                           "(the first GPU when torch sees one, else the CPU)")
    corpus: CorpusConfig = CorpusConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    eval: EvalConfig = EvalConfig()
    poison: PoisonConfig = PoisonConfig()
    defense: DefenseConfig = DefenseConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()
    paths: PathsConfig = PathsConfig()

    @model_validator(mode="after")
    def _check_device(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return self

    def torch_device(self) -> str:
        """The device :attr:`device` names, with ``auto`` resolved (fails clearly without a GPU)."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"config error: device: {self.device} asked for, but torch sees no GPU "
                              "(use device=cpu or device=auto)")
        return self.device

    def root(self) -> str:
        """The results root: a storage URI as given, or an absolute local path (a relative one is
        taken inside the checkout — refused when the checkout is Ray's temporary upload, where
        results would vanish with the job)."""
        root = self.paths.root
        try:
            storage.check_uri(root, "paths.root")
        except storage.StorageError as e:
            raise ConfigError(f"config error: {e}") from None
        if storage.scheme(root) is not None:
            return root.rstrip("/")
        path = Path(root).expanduser()
        if path.is_absolute():
            return str(path)
        if in_ray_job_upload():
            raise ConfigError(
                f"config error: paths.root: {root!r} is relative, and this job runs from Ray's "
                f"temporary upload of the checkout ({REPO_ROOT}), which is deleted with the job; "
                f"set paths.root to object storage (s3://BUCKET/PREFIX, gs://...) or to an absolute "
                f"path that every node mounts")
        return str(REPO_ROOT / path)

    def models_for(self, attack: str) -> dict[str, str]:
        """``{dataset: model location}`` that ``sweep.models`` gives an attack (as written)."""
        given = self.sweep.models[attack]
        if isinstance(given, str):
            return {name: given.replace("{dataset}", name) for name in self.sweep.datasets}
        missing = [d for d in self.sweep.datasets if d not in given]
        if missing:
            raise ConfigError(f"config error: sweep.models.{attack}: no model for dataset "
                              f"{missing[0]!r} (give one per dataset, or one string for all)")
        return {d: given[d] for d in self.sweep.datasets}

    def read_rules(self, num_classes: Optional[int] = None, require_label: bool = True):
        """The :class:`rvpt.shards.ReadRules` of this config's readers."""
        from rvpt.shards import ReadRules

        return ReadRules(num_classes=num_classes, require_label=require_label,
                         max_pixels=self.corpus.max_image_pixels,
                         max_member_bytes=int(self.corpus.max_member_mb * (1 << 20)))

    def locate(self, location: str) -> str:
        """A corpus or model location from the config: URIs and absolute paths as they are, a
        relative path under the results root."""
        try:
            storage.check_uri(location)
        except storage.StorageError as e:
            raise ConfigError(f"config error: {e}") from None
        if storage.scheme(location) is not None or Path(location).expanduser().is_absolute():
            return location
        return storage.join(self.root(), location)

    def dump(self, path: str | Path) -> None:
        """Write the resolved config as YAML (a local path or a storage URI)."""
        storage.write_text(str(path), yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _format_error(err: ValidationError, prefix: str = "") -> str:
    first = err.errors()[0]
    loc = ".".join([prefix] * bool(prefix) + [str(x) for x in first["loc"]]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    extra = ""
    if "input" in first and not isinstance(first["input"], dict):
        extra = f" (got {first['input']!r})"
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    return f"config error: {loc}: {msg}{extra}{more}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} is not of the form key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config error: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set ``a.b=value`` items into a nested dict (values parsed as YAML scalars/lists)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"config error: {'.'.join(keys)}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (default: configs/default.yaml), apply overrides, validate."""
    data: dict = {}
    path = Path(path) if path else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        if not path.exists():
            raise ConfigError(f"config error: file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config error: {path} is not a file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {path} is not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"config error: cannot read {path}: {e.strerror or e}") from None
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"config error: {path} is not valid YAML: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {path} must hold a mapping at the top level")
    data = apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
