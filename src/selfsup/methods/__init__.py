"""Methods: small nn.Modules composed of a backbone, heads and a loss, each declared by a :class:`MethodSpec`.

``METHODS`` maps a method's name (``--method NAME``, its config section) to its spec; everything else in
selfsup asks the spec (:mod:`selfsup.methods.spec`). Every method's ``forward(view1, view2)`` (``(view1,
view2, labels)`` where the spec ``needs_labels``) returns ``(loss, logs)``, ``logs`` a dict of detached scalars.
"""
from __future__ import annotations

from selfsup.methods import barlow_twins, byol, dino, moco, simclr, simclrv2, simsiam, supervised, vicreg
from selfsup.methods.byol import BYOL, BYOLConfig
from selfsup.methods.simclr import SimCLR, SimCLRConfig
from selfsup.methods.simclrv2 import SimCLRv2Config
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.methods.supervised import Supervised, SupervisedConfig

# The registry: one line per method module.
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    simclr.SPEC,
    simclrv2.SPEC,
    byol.SPEC,
    dino.SPEC,
    moco.SPEC,
    simsiam.SPEC,
    barlow_twins.SPEC,
    vicreg.SPEC,
    supervised.SPEC,  # the baseline: the same encoder trained with labels (the ceiling)
)}

__all__ = ["METHODS", "MethodSpec", "PaperRecipe", "RecipeLayer", "SimCLR", "BYOL", "Supervised", "SimCLRConfig",
           "SimCLRv2Config", "BYOLConfig", "SupervisedConfig"]
