"""What the rest of selfsup knows about a method, declared in one place: :class:`MethodSpec`.

Each method module (``selfsup.methods.simclr``, ``byol``, ...) ends with a ``SPEC``; the registry
``selfsup.methods.METHODS`` is built from them, and the training loop, the Lightning modules, the
recipes, ``--dry-run``, the Hub card and the command line ask the spec instead of testing a method's
name. Adding a method is a new module here (plus its loss in ``selfsup.losses`` and its head in
``selfsup.models`` where they are new) and its line in the registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from selfsup.views.config import ViewConfig


@dataclass(frozen=True)
class RecipeLayer:
    """A recipe's values for one run: ``shared`` keys of the whole config (``optim``, ``zero_init_residual``, ...)
    and ``section`` keys of the method's own section. A recipe lies under everything the user gives."""

    shared: dict = field(default_factory=dict)
    section: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PaperRecipe:
    """A method's paper recipe: ``values(image_size, batch_size) -> RecipeLayer`` and the line a run prints.

    ``by_length(epochs) -> RecipeLayer``, where the paper's values depend on the run's length (BYOL's
    official configs choose lr, weight decay and base tau by the number of epochs), goes over ``values``;
    ``epochs`` is None where the length is not known before the run (``--minutes``, an image folder given
    in steps), and the function then gives the paper's main setting.
    """

    name: str
    summary: str
    values: Callable[[int, int], RecipeLayer]
    by_length: Callable[[float | None], RecipeLayer] | None = None


def _no_target(section: Any, step: int, total_steps: int) -> float | None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    """Everything selfsup needs to know about one method.

    - ``name``: the ``--method`` name and the config section's name (``byol.base_tau``).
    - ``title``, ``paper``: how the model card and the docs cite it (``"BYOL"``, ``"Grill et al. 2020, ..."``).
    - ``config``: the dataclass of the method's own keys, its section of the config.
    - ``build(section, backbone, num_classes)``: the ``nn.Module`` around a fresh backbone; its
      ``forward(view1, view2[, labels])`` returns ``(loss, logs)`` (``logs``: detached scalars).
    - ``views(image_size)``: the default distributions of the two views.
    - ``cpu``: the ``cpu`` recipe's layer (the narrow CPU encoders, measured on Fashion-MNIST).
    - ``recipes``: the paper recipes this method defines; ``paper_recipe``: the one a full-size encoder
      gets (it may be another method's, e.g. the supervised baseline takes SimCLR's); ``accepts``: every
      recipe name ``--recipe`` may give for this method.
    - ``paper_lr(batch_size)``: the paper's effective learning rate at that batch (warns at 3x).
    - ``needs_labels``: the batches are ``(images, labels)`` and ``build`` takes ``num_classes``.
    - ``target_tau(section, step, total_steps)``: the target network's EMA rate after optimiser step
      ``step`` (the model has ``update_target(tau)``), or None for methods without one.
    - ``collapse_dim(section)``: the dimension of the outputs the collapse monitor watches (its
      ``collapse_std`` log), or None where collapse is not the failure mode.
    - ``collapse_hint``: what the collapse warning advises changing (e.g. BYOL's predictor and target rate).
    - ``min_batch``: the fewest images per batch the loss is defined for (contrastive: 2).
    - ``check(section)``: cross-key validation beyond the section's own (raise ``ConfigError``).
    - ``describe(section)``: the method's key values for the first line of a run and the model card.
    - ``multicrop``: ``forward`` takes local crops after the two global views (``forward(g1, g2, *locals)``)
      and its loss defines how they are used; ``--set multicrop.num_local=N`` is refused for other methods.
    - ``before_step(model, step, schedule)``: called before the forward pass of every optimiser step
      (a schedule of the method's own, e.g. DINO's teacher temperature), or None.
    - ``before_optimizer_step(model, step, schedule)``: called after the backward pass, before the optimiser
      steps (e.g. DINO's frozen last layer in the first epoch), or None.
    """

    name: str
    title: str
    paper: str
    config: type
    build: Callable[..., nn.Module]
    views: Callable[[int], tuple[ViewConfig, ViewConfig]]
    cpu: RecipeLayer
    paper_recipe: str
    accepts: tuple[str, ...]
    paper_lr: Callable[[int], float]
    describe: Callable[[Any], str]
    recipes: tuple[PaperRecipe, ...] = ()
    needs_labels: bool = False
    target_tau: Callable[[Any, int, int], float | None] = _no_target
    collapse_dim: Callable[[Any], int | None] = lambda section: None
    collapse_hint: str = "lower optim.lr"
    min_batch: int = 1
    check: Callable[[Any], None] = lambda section: None
    multicrop: bool = False
    before_step: Callable[[nn.Module, int, Any], None] | None = None
    before_optimizer_step: Callable[[nn.Module, int, Any], None] | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"MethodSpec {self.name!r}: config must be a dataclass, got {self.config!r}")
        if "cpu" not in self.accepts or self.paper_recipe not in self.accepts:
            raise ValueError(f"MethodSpec {self.name!r}: accepts must hold 'cpu' and its paper recipe")

    def keys(self) -> tuple[str, ...]:
        """The names of the keys of the method's section."""
        return tuple(f.name for f in dataclasses.fields(self.config))
