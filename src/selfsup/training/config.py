"""Typed configuration: dataclasses validated on construction, read from YAML and ``--set key=value`` (the reading,
writing and type checks are in :mod:`selfsup.training.config_io`).

Every run folder holds the resolved config as ``config.yaml``; checkpoints embed it too. Unknown keys
(with the closest valid key suggested), wrong types and impossible values raise ``ConfigError``
naming the key, before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from selfsup.data.containers import DATASET_NAMES, IMAGEFOLDER_PREFIX, canonical_dataset_name
from selfsup.data.image_checks import BAD_IMAGE_POLICIES
from selfsup.errors import ConfigError  # noqa: F401 (re-exported: defined here before)
from selfsup.methods import recipes, METHOD_DEFAULTS, METHODS
from selfsup.models.backbones import CPU_DEFAULT_BACKBONE, BACKBONES
from selfsup.training.config_io import check_choice, check_field
from selfsup.training.config_io import (  # noqa: F401 (re-exported: defined here before)
    build_config, from_dict, load_yaml, merge, parse_overrides, save_yaml, to_dict,
)
from selfsup.views.config import ViewConfig


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (SimCLR Sec. B.1: LARS, lr = base x B/256, warm-up + cosine)."""

    name: str = "lars"
    lr: float = 0.3  # base learning rate, scaled by lr_scaling with the global batch size
    lr_scaling: str = "linear"  # linear: lr x B/256; sqrt: lr x sqrt(B); none
    weight_decay: float = 1e-6
    momentum: float = 0.9
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

    ``build_config`` puts a named recipe (``selfsup.methods.recipes``: ``cpu`` for the narrow CPU encoders, the
    method's paper recipe for others) under the keys given, and records its name in ``recipe``.

    Where the defaults differ from the paper's ImageNet recipe it is because of the budget: see
    docs/benchmarks.md for the measurements behind them.
    """

    method: str = "simclr"
    # Named recipe (selfsup.methods.recipes.RECIPES) whose values fill the keys not given; build_config picks one
    # from the encoder and image size when this is None and writes the name here. None after direct
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
    temperature: float = 0.2
    proj_hidden_dim: int | None = None  # None: the backbone's num_features
    proj_out_dim: int = 128
    proj_layers: int = 2  # 0: no head, z = h (SimCLR only; Figure 8 ablation); 1: linear head
    proj_last_bn: bool = False  # head ends in BN with a scale and no bias (official SimCLR/SimCLRv2 code)
    proj_last_bias: bool = True  # bias of the head's (and BYOL predictor's) last Linear (official BYOL code: false)
    zero_init_residual: bool = False  # last BN scale of each residual block starts at 0 (official codes)
    small_stem: bool | None = None  # 3x3/1 stem, no max-pool; None: inputs of at most 32 px (official cut-off)
    # BYOL (Grill et al. 2020). Method defaults (selfsup.methods.METHOD_DEFAULTS) replace the generic
    # defaults above for keys the user did not give; see build_config.
    predictor: bool = True  # false: BYOL without predictor (Table 5b ablation)
    pred_hidden_dim: int | None = None  # predictor proj_out_dim -> this -> proj_out_dim; None: proj_hidden_dim
    base_tau: float = 0.996  # target EMA rate at step 0, cosine-annealed to 1; 1: fixed target; 0: no EMA
    # warn once when collapse_std < this / sqrt(proj_out_dim) after warm-up (healthy ~0.85, BYOL without
    # predictor ~0.25, a constant output 0; docs/benchmarks.md); 0: off
    collapse_threshold: float = 0.4
    view: ViewConfig | None = None  # None: the method's preset for this image size, resolved at start
    view2: ViewConfig | None = None  # second view's distribution (BYOL is asymmetric); None: same as view
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "auto"  # auto: bf16 where the device computes it natively, else fp32
    channels_last: bool = True  # faster on CPUs (oneDNN) and on GPUs under bf16
    compile: bool = False
    accumulate: int = 1  # micro-batches per optimiser step (each micro-batch has its own negatives)
    sync_bn: bool = True  # under torchrun: batch-norm statistics over the global batch (SimCLR Sec. B.1)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    knn_monitor: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    num_workers: int = 2  # DataLoader workers for data streamed from disk
    on_bad_image: str = "error"  # image folders: error (name the bad files, before training) or skip (count them)
    init: str | None = None  # start the encoder from weights: a .safetensors / .pt file or a run folder (init_weights.py)
    logger: str = "tensorboard"  # comma-separated experiment trackers (TRACKERS) besides metrics.jsonl; "" for none
    hf: HFConfig = field(default_factory=HFConfig)  # columns of an hf:PATH data set

    @staticmethod
    def method_defaults(data: dict) -> dict:
        """Defaults of ``data``'s method for keys it does not set (e.g. BYOL's lr): the ``cpu`` recipe's layer.

        ``build_config`` now applies a whole recipe (``resolve``, ``selfsup.methods.recipes``), of which these
        are the ``cpu`` recipe's values; kept for callers of this function. Constructing
        ``PretrainConfig(...)`` directly takes the generic defaults literally.
        """
        method = data.get("method", PretrainConfig.method) if isinstance(data, dict) else None
        return METHOD_DEFAULTS.get(method, {}) if isinstance(method, str) else {}

    @staticmethod
    def resolve(data: dict) -> dict:
        """The recipe's values under ``data`` and partial view overrides merged onto the presets (selfsup.methods.recipes)."""
        defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)
                    if f.default is not dataclasses.MISSING}
        try:
            return recipes.resolve(data, defaults)
        except recipes.RecipeError as e:
            raise ConfigError(str(e)) from None

    def validate(self) -> None:
        check_choice("method", self.method, tuple(METHODS))
        if self.recipe is not None:
            check_choice("recipe", self.recipe, tuple(recipes.RECIPES))
        _check_names(self)
        check_field("batch_size", self.batch_size >= 1, "must be >= 1")
        if self.method in ("simclr", "simclrv2"):
            check_field("batch_size", self.batch_size >= 2, "SimCLR needs at least 2 images per batch (negatives)")
        lengths = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        check_field(lengths[1] if len(lengths) > 1 else "epochs", len(lengths) <= 1,
                    f"give at most one of epochs, steps, minutes (got {', '.join(lengths)})")
        for k in ("epochs", "minutes"):
            v = getattr(self, k)
            check_field(k, v is None or (v > 0 and math.isfinite(v)), "must be > 0")
        check_field("steps", self.steps is None or self.steps >= 1, "must be >= 1")
        check_field("minutes_reserve_steps", self.minutes_reserve_steps >= 0, "must be >= 0")
        check_field("temperature", self.temperature > 0 and math.isfinite(self.temperature), "must be > 0")
        check_field("backbone_width", self.backbone_width is None or (self.backbone_width > 0 and math.isfinite(self.backbone_width)),
                    "must be > 0")
        check_field("image_size", self.image_size is None or 8 <= self.image_size <= MAX_IMAGE_SIZE,
                    f"must be between 8 and {MAX_IMAGE_SIZE} pixels")
        for k in ("proj_out_dim", "proj_hidden_dim", "pred_hidden_dim"):
            check_field(k, (getattr(self, k) or 0) <= MAX_DIM, f"must be <= {MAX_DIM}")
        check_field("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)")
        check_field("proj_out_dim", self.proj_out_dim >= 1, "must be >= 1")
        check_field("proj_hidden_dim", self.proj_hidden_dim is None or self.proj_hidden_dim >= 1, "must be >= 1")
        check_field("proj_layers", self.proj_layers >= 0, "must be >= 0 (0: no projection head, z = h)")
        check_field("proj_layers", self.proj_layers >= 1 or self.method == "simclr",
                    "0 (no projection head) is only defined for simclr (SimCLR Figure 8 ablation)")
        check_field("pred_hidden_dim", self.pred_hidden_dim is None or self.pred_hidden_dim >= 1, "must be >= 1")
        check_field("base_tau", 0 <= self.base_tau <= 1, "must be in [0, 1] (paper: 0.996; 1 = fixed target, 0 = no EMA)")
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


def check_length(cfg: PretrainConfig) -> None:
    """``ConfigError`` unless the run's length is given: one of epochs, steps, minutes (no length is guessed)."""
    if cfg.epochs is None and cfg.steps is None and cfg.minutes is None:
        raise ConfigError("the run's length is not set: give one of --steps N, --epochs N or --minutes M "
                          "(config keys steps, epochs, minutes)")


MAX_IMAGE_SIZE = 4096  # larger values cannot be trained (memory), so they are refused before any work
MAX_DIM = 65536


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
