"""Typed configuration: dataclasses validated on construction, read from YAML and ``--set key=value`` (the reading,
writing and type checks are in :mod:`selfsup.training.config_io`), and resolved once.

A run's config is resolved in one place, :func:`resolve_config` (what ``build_config(PretrainConfig, ...)``
calls), from ordered layers: the defaults, then the recipe, then the file, the command line and ``--set``,
each later one winning; the derived values (the two views, the stem) are filled in there too, and the
result is validated. The training loop uses it as it is, and writes it into the run folder as
``config.yaml`` (checkpoints embed it too); ``--dry-run`` prints the same. Unknown keys (with the closest
valid key suggested), wrong types and impossible values raise ``ConfigError`` naming the key, before any
work starts.

Each method's own keys live in its section, named after the method (``byol.base_tau``,
``simclr.temperature``): the dataclass of its spec (:mod:`selfsup.methods`), held in
``PretrainConfig.section`` and read as ``cfg.section`` or ``cfg.byol``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from selfsup.data.containers import (
    DATASET_NAMES, IMAGEFOLDER_PREFIX, SMALL_IMAGE_MAX, canonical_dataset_name,
)
from selfsup.data.image_checks import BAD_IMAGE_POLICIES
from selfsup.errors import ConfigError, check_choice, check_field
from selfsup.methods import METHODS, MethodSpec, recipes
from selfsup.models.backbones import CPU_DEFAULT_BACKBONE, BACKBONES
from selfsup.training.config_io import build_config, from_dict, merge, to_dict
from selfsup.training.schedules import scaled_lr
from selfsup.views.config import MultiCropConfig, ViewConfig


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (SimCLR Sec. B.1: LARS, lr = base x B/256, warm-up + cosine)."""

    name: str = "lars"  # lars (the papers'), sgd (Nesterov momentum) or adamw
    lr: float = 0.3  # base learning rate, scaled by lr_scaling with the global batch size
    lr_scaling: str = "linear"  # linear: lr x B/256; sqrt: lr x sqrt(B); none
    weight_decay: float = 1e-6  # L2 penalty on weights (never on biases and norm parameters)
    momentum: float = 0.9  # LARS / SGD momentum (unused by adamw)
    warmup_fraction: float = 0.05  # share of the run spent in linear warm-up (paper: 10 of 100+ epochs)
    warmup_epochs: float | None = None  # warm-up in epochs (the papers' recipes: 10); wins over warmup_fraction
    final_lr_fraction: float = 0.0  # cosine decays to lr x this

    def validate(self, prefix: str = "optim.") -> None:
        check_choice(prefix + "name", self.name, ("lars", "sgd", "adamw"))
        check_choice(prefix + "lr_scaling", self.lr_scaling, ("linear", "sqrt", "none"))
        check_field(prefix + "lr", self.lr > 0, "must be > 0")
        check_field(prefix + "weight_decay", self.weight_decay >= 0, "must be >= 0")
        check_field(prefix + "momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        check_field(prefix + "warmup_fraction", 0 <= self.warmup_fraction < 1, "must be in [0, 1)")
        check_field(prefix + "warmup_epochs", self.warmup_epochs is None or self.warmup_epochs >= 0, "must be >= 0")
        check_field(prefix + "final_lr_fraction", 0 <= self.final_lr_fraction <= 1, "must be in [0, 1]")


@dataclass
class HFConfig:
    """Columns of a Hugging Face ``datasets`` data set (``dataset: hf:PATH``); None: found by feature type."""

    image_column: str | None = None  # None: the one Image feature (or a column named image / img)
    label_column: str | None = None  # None: the one ClassLabel feature (or label / labels), else unlabeled


TRACKERS = ("tensorboard", "csv", "wandb", "mlflow")  # --logger; metrics.jsonl is always written


@dataclass
class PretrainConfig:
    """Everything a pre-training run depends on. Defaults are the CPU default (Fashion-MNIST); the length
    (``epochs``, ``steps`` or ``minutes``) has no default: a run without one is refused (``check_length``).

    ``build_config(PretrainConfig, ...)`` resolves a config from layers (:func:`resolve_config`); constructing
    ``PretrainConfig(...)`` directly takes the values literally, and :func:`complete` fills only what is
    left open (the method's section, the views, the stem), as the loop does before its first step.
    """

    method: str = "simclr"
    # Named recipe (selfsup.methods.recipes.RECIPES) whose values fill the keys not given; resolve_config picks
    # one from the encoder and image size when this is None and writes the name here. None after direct
    # construction: the values are taken literally.
    recipe: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    backbone: str = CPU_DEFAULT_BACKBONE
    backbone_width: float | None = None  # width multiplier; None: the registered model's own
    image_size: int | None = None  # None: the data set's native size
    batch_size: int = 256  # global batch (all devices, all accumulation steps)
    epochs: float | None = None
    steps: int | None = None
    minutes: float | None = None
    # --minutes: time kept free at the end of the budget for work that follows in the same budget (the
    # demo's evaluations), in training steps at the measured pace, so it scales with the machine's speed
    minutes_reserve_steps: int = 0
    zero_init_residual: bool = False  # last BN scale of each residual block starts at 0 (official codes)
    small_stem: bool | None = None  # 3x3/1 stem, no max-pool; None: inputs of at most 32 px (official cut-off)
    # warn once when the method's collapse_std < this / sqrt(output dim) after warm-up (healthy ~0.85, BYOL
    # without predictor ~0.25, a constant output 0); 0: off. Used by methods whose failure mode is collapse.
    collapse_threshold: float = 0.4
    view: ViewConfig | None = None  # None: the method's preset for this image size
    view2: ViewConfig | None = None  # second view's distribution (BYOL is asymmetric); None: the preset
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)  # local crops besides the two views; 0: off
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "auto"  # auto: bf16 where the device computes it natively, else fp32
    channels_last: bool = True  # faster on CPUs (oneDNN) and on GPUs under bf16
    compile: bool = False  # torch.compile the model (slower start, faster steps on GPUs)
    accumulate: int = 1  # micro-batches per optimiser step (each micro-batch has its own negatives)
    sync_bn: bool = True  # under torchrun: batch-norm statistics over the global batch (SimCLR Sec. B.1)
    seed: int = 0  # weights, data order and views are functions of it (the same seed, the same run)
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps
    checkpoint_every: int = 500  # steps between checkpoints (a timed run also saves when it re-plans)
    keep_last: int = 2  # checkpoints kept in the run folder
    log_every: int = 10  # steps between lines of metrics.jsonl (and the trackers)
    knn_monitor: bool = True  # log a kNN accuracy once per epoch (10k bank, 2k queries) on labelled data
    knn_k: int = 200  # neighbours of the kNN monitor (Wu et al. 2018)
    knn_temperature: float = 0.1  # temperature of the kNN monitor's weighted vote
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    num_workers: int = 2  # DataLoader workers for data streamed from disk
    on_bad_image: str = "error"  # image folders: error (name the bad files, before training) or skip (count them)
    init: str | None = None  # start the encoder from weights: a .safetensors / .pt file or a run folder (init_weights.py)
    logger: str = "tensorboard"  # comma-separated experiment trackers (TRACKERS) besides metrics.jsonl; "" for none
    hf: HFConfig = field(default_factory=HFConfig)  # columns of an hf:PATH data set
    # The method's own keys: an instance of its spec's config dataclass, read and written as the section named
    # after the method (``byol: {base_tau: 0.996}``); None: the section's defaults (filled by complete()).
    section: Any = field(default=None, metadata={"section": True})

    def __post_init__(self) -> None:
        if self.section is None and isinstance(self.method, str) and self.method in METHODS:
            self.section = METHODS[self.method].config()

    def __getattr__(self, name: str):
        # Only called for names that are not fields: ``cfg.byol`` is the section of a BYOL run.
        if name != "method" and name in METHODS:
            if name == self.__dict__.get("method"):
                return self.__dict__.get("section")
            raise AttributeError(f"this config is for method {self.__dict__.get('method')!r}, not {name!r}")
        raise AttributeError(f"{type(self).__name__!s} has no key {name!r}")

    @property
    def spec(self) -> MethodSpec:
        """The method's spec (``selfsup.methods.METHODS``)."""
        return METHODS[self.method]

    # -- the hooks of config_io.from_dict / to_dict: the section is written under the method's name ---------
    @classmethod
    def split_section(cls, data: dict, prefix: str = "") -> tuple[dict, Any]:
        """``(data without the method's section, the section built from it)``, refusing keys that moved into
        a section (``base_tau`` -> ``byol.base_tau``) and other methods' sections, each with a one-line hint."""
        method = data.get("method", cls.method)
        if not isinstance(method, str) or method not in METHODS:
            return data, None  # validation names the bad method
        spec = METHODS[method]
        names = {f.name for f in dataclasses.fields(cls)}
        rest = {}
        for key, value in data.items():
            if key in names or key == method:
                rest[key] = value
                continue
            if key in spec.keys():
                raise ConfigError(f"{prefix}{key}: this key is in the method's section now: {prefix}{method}.{key} "
                                  f"(--set {method}.{key}=..., or under '{method}:' in a YAML file)")
            owners = [m for m, other in METHODS.items() if key in other.keys()]
            if key in METHODS:
                raise ConfigError(f"{prefix}{key}: the section of method {key!r}, but this run's method is {method!r}; "
                                  f"use --method {key}, or move these keys under '{method}:'")
            if owners:
                raise ConfigError(f"{prefix}{key}: a key of method {owners[0]!r} ({owners[0]}.{key}); this run's "
                                  f"method is {method!r}, whose keys are {', '.join(spec.keys()) or 'none'}")
            close = _closest(str(key), spec.keys())
            if close is not None and close[1] >= max(0.8, (_closest(str(key), names) or ("", 0.0))[1]):
                raise ConfigError(f"{prefix}{key}: unknown config key (did you mean '{prefix}{method}.{close[0]}'?)")
            rest[key] = value  # unknown: from_dict names it with its suggestion
        raw = rest.pop(method, None)
        if raw is None:
            return rest, None
        if dataclasses.is_dataclass(raw) and isinstance(raw, spec.config):
            return rest, raw
        return rest, from_dict(spec.config, raw, prefix=f"{prefix}{method}.")

    def section_items(self) -> dict:
        """``{method: the section as a dict}``, as config.yaml and ``--dry-run`` write it."""
        return {self.method: to_dict(self.section)} if self.section is not None else {}

    @staticmethod
    def resolve(data: dict) -> dict:
        """The layers' merged values with the recipe under them and the derived values filled (``resolve_layers``)."""
        try:
            return resolve_layers(data)
        except recipes.RecipeError as e:
            raise ConfigError(str(e)) from None

    def validate(self) -> None:
        check_choice("method", self.method, tuple(METHODS))
        if self.recipe is not None:
            check_choice("recipe", self.recipe, tuple(recipes.RECIPES))
            check_field("recipe", self.recipe in self.spec.accepts,
                        f"{self.recipe!r} is not defined for {self.method!r}; use one of {', '.join(self.spec.accepts)}")
        _check_names(self)
        check_field("batch_size", self.batch_size >= self.spec.min_batch,
                    f"{self.spec.title} needs at least {self.spec.min_batch} images per batch")
        lengths = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        check_field(lengths[1] if len(lengths) > 1 else "epochs", len(lengths) <= 1,
                    f"give at most one of epochs, steps, minutes (got {', '.join(lengths)})")
        for k in ("epochs", "minutes"):
            v = getattr(self, k)
            check_field(k, v is None or (v > 0 and math.isfinite(v)), "must be > 0")
        check_field("steps", self.steps is None or self.steps >= 1, "must be >= 1")
        check_field("minutes_reserve_steps", self.minutes_reserve_steps >= 0, "must be >= 0")
        check_field("backbone_width", self.backbone_width is None or (self.backbone_width > 0 and math.isfinite(self.backbone_width)),
                    "must be > 0")
        check_field("image_size", self.image_size is None or 8 <= self.image_size <= MAX_IMAGE_SIZE,
                    f"must be between 8 and {MAX_IMAGE_SIZE} pixels")
        check_field("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)")
        check_field("collapse_threshold", self.collapse_threshold >= 0, "must be >= 0 (0 turns the collapse warning off)")
        check_choice("precision", self.precision, ("auto", "bf16", "fp32"))
        check_field("accumulate", self.accumulate >= 1, "must be >= 1")
        check_field("accumulate", self.batch_size % self.accumulate == 0, "must divide batch_size")
        check_field("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1")
        check_field("keep_last", self.keep_last >= 1, "must be >= 1")
        check_field("log_every", self.log_every >= 1, "must be >= 1")
        check_field("knn_k", self.knn_k >= 1, "must be >= 1")
        check_field("knn_temperature", self.knn_temperature > 0, "must be > 0")
        check_field("max_bad_steps", self.max_bad_steps >= 1, "must be >= 1")
        check_field("num_workers", self.num_workers >= 0, "must be >= 0")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        self.optim.validate()
        if not isinstance(self.section, self.spec.config):
            raise ConfigError(f"{self.method}: the section must be a {self.spec.config.__name__}, got "
                              f"{type(self.section).__name__}")
        self.section.validate(f"{self.method}.")
        self.spec.check(self.section)
        try:
            self.multicrop.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_field("multicrop.num_local", self.multicrop.num_local == 0 or self.spec.multicrop,
                    f"{self.spec.title} has no multi-crop loss; leave multicrop.num_local at 0")
        for name in (t.strip() for t in self.logger.split(",")):
            if name and name != "none":
                check_choice("logger", name, TRACKERS)
        for key in ("view", "view2"):
            v = getattr(self, key)
            if v is not None:
                try:
                    v.validate()
                except ValueError as e:
                    raise ConfigError(f"{key}: {e}") from None


def _closest(key: str, options) -> tuple[str, float] | None:
    """The option most like ``key`` and how alike (difflib's ratio), or None without options."""
    scored = [(o, difflib.SequenceMatcher(None, key, o).ratio()) for o in options]
    return max(scored, key=lambda x: x[1]) if scored else None


# ------------------------------------------------------------------------------------------------
# Resolution: the one place a config's values are decided


def _view_dict(view: ViewConfig) -> dict:
    return {f.name: getattr(view, f.name) for f in dataclasses.fields(view)}


def _defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(PretrainConfig) if f.default is not dataclasses.MISSING}


def resolve_layers(data: dict) -> dict:
    """Put the recipe's layer under ``data`` (the user's layers, merged in order) and fill the derived values.

    The order, later winning: the config's defaults, the recipe (``recipe``, else chosen from the encoder),
    ``data``. Then, for keys ``data`` does not give: the image size of an image folder on a narrow CPU encoder
    (64 px), ``small_stem`` (images of at most 32 px), and the two views, the method's preset for the image
    size with any partial ``view``/``view2`` keys merged onto it (a symmetric method's view 2 follows view 1,
    one augmentation distribution, SimCLR Sec. 2.1). Returns the complete layer with ``recipe`` set.
    """
    defaults = _defaults()

    def get(key):
        return data.get(key, defaults.get(key))

    method, backbone = get("method"), get("backbone")
    if not isinstance(method, str) or not isinstance(backbone, str):
        return data  # validation names the bad key
    if data.get("recipe") is not None and not isinstance(data.get("recipe"), str):
        return data  # validation names the bad key
    recipes.check_names(method, data.get("recipe"))
    name = data.get("recipe") or recipes.auto_recipe(method, backbone)
    dataset = get("dataset")
    if "image_size" not in data and isinstance(dataset, str) and dataset.startswith(IMAGEFOLDER_PREFIX) \
            and backbone in recipes.CPU_BACKBONES:
        data = {**data, "image_size": recipes.CPU_IMAGEFOLDER_SIZE}  # written into config.yaml: a resume reads the same
    given = data.get("image_size")
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not 8 <= given <= MAX_IMAGE_SIZE \
            or given != int(given):
        given = None  # absent or invalid: validation names an invalid one
    size = recipes.native_image_size(dataset if isinstance(dataset, str) else "", given)
    batch = get("batch_size")
    batch = batch if isinstance(batch, int) and batch >= 1 else 256
    epochs, steps = data.get("epochs"), data.get("steps")
    epochs = recipes.run_epochs(dataset if isinstance(dataset, str) else "", batch,
                                epochs if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) else None,
                                steps if isinstance(steps, int) and not isinstance(steps, bool) else None)
    layer: dict = {}
    for part in recipes.recipe_layers(name, method, size, batch, epochs):
        layer = merge(layer, part)
    if backbone.startswith("timm:"):
        layer.pop("zero_init_residual", None)  # a selfsup ResNet option; timm models have their own init
    # A warm-up given as a fraction wins over the recipe's warm-up in epochs.
    if isinstance(data.get("optim"), dict) and "warmup_fraction" in data["optim"] and "warmup_epochs" not in data["optim"]:
        layer.get("optim", {}).pop("warmup_epochs", None)
    out = merge(layer, data)
    out["recipe"] = name
    if "small_stem" not in data and not backbone.startswith("timm:"):
        out["small_stem"] = size <= SMALL_IMAGE_MAX
    p1, p2 = METHODS[method].views(size)
    v1, v2 = data.get("view"), data.get("view2")
    if isinstance(v1, dict) or v1 is None:
        out["view"] = merge(_view_dict(p1), v1 or {})
    if isinstance(v2, dict) or v2 is None:
        base2 = out["view"] if p1 == p2 and isinstance(out.get("view"), dict) else _view_dict(p2)
        out["view2"] = merge(base2, v2 or {})
    return out


def resolve_config(*layers: dict) -> PretrainConfig:
    """The validated config of the merged ``layers`` (file, command line, ``--set``, ...) over the recipe and the
    defaults: the one place a run's values are decided."""
    return build_config(PretrainConfig, *layers)


def saved_config(data: dict) -> PretrainConfig:
    """The config of a saved run (``config.yaml``, a checkpoint's or a Lightning checkpoint's), as written
    (``migrate_saved`` first)."""
    return from_dict(PretrainConfig, migrate_saved(data))


def migrate_saved(data: dict) -> dict:
    """A saved run's config layer with the method keys of selfsup 0.1 in their section.

    Runs written by selfsup 0.1 kept the methods' keys at the top level (``temperature``, ``base_tau``, ...);
    those move into the method's section here, and the other methods' keys they carried are dropped, so
    their folders stay readable (evaluation, export, resume). A layer that has the section is returned as is.
    """
    if not isinstance(data, dict):
        return data
    method = data.get("method", PretrainConfig.method)
    if isinstance(method, str) and method in METHODS and method not in data:
        own = METHODS[method].keys()
        others = {k for spec in METHODS.values() for k in spec.keys()}
        data = dict(data)
        section = {k: data.pop(k) for k in list(data) if k in own}
        for k in others & set(data):
            data.pop(k)
        if section:
            data[method] = section
    return data


def complete(cfg: PretrainConfig, image_size: int) -> PretrainConfig:
    """A directly constructed config with what it leaves open filled for ``image_size``: the two views (the
    method's preset; view 2 follows a given view 1) and ``small_stem`` (images of at most 32 px). A config
    from :func:`resolve_config` has them already and is returned unchanged."""
    if cfg.view is not None and cfg.view2 is not None and (cfg.small_stem is not None or cfg.backbone.startswith("timm:")):
        return cfg
    p1, p2 = cfg.spec.views(image_size)
    view = cfg.view if cfg.view is not None else p1
    view2 = cfg.view2 if cfg.view2 is not None else (view if cfg.view is not None else p2)
    small_stem = cfg.small_stem
    if small_stem is None and not cfg.backbone.startswith("timm:"):
        small_stem = image_size <= SMALL_IMAGE_MAX
    return dataclasses.replace(cfg, view=view, view2=view2, small_stem=small_stem, section=copy.deepcopy(cfg.section))


def effective_lr(cfg: PretrainConfig) -> float:
    """The learning rate at the end of warm-up: ``optim.lr`` scaled by ``optim.lr_scaling`` with the batch size."""
    return scaled_lr(cfg.optim.lr, cfg.batch_size, cfg.optim.lr_scaling)


WARN_LR_FACTOR = 3.0  # warn when the effective lr is more than this times the paper's


def lr_warning(cfg: PretrainConfig) -> str | None:
    """The warning for an effective LARS lr more than 3x the paper's at this method and batch size, or None.

    Not given for the CPU recipe's own lr on a CPU encoder at batch <= 512, the setting it was measured in.
    """
    if cfg.optim.name != "lars":
        return None
    eff = effective_lr(cfg)
    ref = cfg.spec.paper_lr(cfg.batch_size)
    if eff <= WARN_LR_FACTOR * ref:
        return None
    recipe = cfg.recipe or "none"
    if recipe == "cpu" and cfg.backbone in recipes.CPU_BACKBONES and cfg.batch_size <= 512 \
            and cfg.optim.lr == cfg.spec.cpu.shared.get("optim", {}).get("lr"):
        return None
    return (f"effective learning rate {eff:.3g} (optim.lr {cfg.optim.lr:g}, {cfg.optim.lr_scaling} scaling, batch "
            f"{cfg.batch_size}) is {eff / ref:.1f}x the {cfg.method} paper's {ref:.3g} at this batch size (recipe "
            f"{recipe}); lower optim.lr (--set optim.lr=...) or use --recipe {cfg.spec.paper_recipe}")


def describe(cfg: PretrainConfig) -> str:
    """One line for the start of a run: the recipe and what it resolved to."""
    name = cfg.recipe or "none (values as given)"
    summary = recipes.RECIPES[cfg.recipe].summary if cfg.recipe in recipes.RECIPES else ""
    return (f"[selfsup] recipe {name}{': ' + summary if summary else ''}; {cfg.method}, {cfg.backbone}, batch "
            f"{cfg.batch_size}, {cfg.optim.name} lr {effective_lr(cfg):.4g}, weight decay {cfg.optim.weight_decay:g}, "
            f"{cfg.spec.describe(cfg.section)}")


def check_length(cfg: PretrainConfig) -> None:
    """``ConfigError`` unless the run's length is given: one of epochs, steps, minutes (no length is guessed)."""
    if cfg.epochs is None and cfg.steps is None and cfg.minutes is None:
        raise ConfigError("the run's length is not set: give one of --steps N, --epochs N or --minutes M "
                          "(config keys steps, epochs, minutes)")


MAX_IMAGE_SIZE = 4096  # larger values cannot be trained (memory), so they are refused before any work


def _check_names(cfg: PretrainConfig) -> None:
    """Data set and backbone names resolve, so a typo fails before any data is read."""
    if not cfg.dataset.startswith((IMAGEFOLDER_PREFIX, "hf:", "store:")):
        name = canonical_dataset_name(cfg.dataset)
        if name not in DATASET_NAMES and not (name.startswith("stl10") and "stl10" in DATASET_NAMES):
            close = difflib.get_close_matches(name, DATASET_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"dataset: {cfg.dataset!r} is not one of {', '.join(DATASET_NAMES)} or "
                              f"imagefolder:PATH, store:PATH or hf:PATH{hint}")
    if not cfg.backbone.startswith("timm:"):
        check_choice("backbone", cfg.backbone, tuple(BACKBONES))
    check_choice("on_bad_image", cfg.on_bad_image, BAD_IMAGE_POLICIES)
