"""Training: the config (resolved once: ``resolve_config``), the pre-training loop (``pretrain``) and its phases, the
optimisation step shared with the Lightning modules, checkpoints and run folders, optimisers (LARS), schedules, timed
runs, trackers, ``--init``, dry runs."""
from selfsup.lazy import lazy_exports

# name -> the module that defines it, imported on first use (PEP 562) so importing one module stays light.
_HOMES = {
    "PretrainConfig": "selfsup.training.config",
    "OptimConfig": "selfsup.training.config",
    "resolve_config": "selfsup.training.config",
    "build_config": "selfsup.training.config_io",
    "pretrain": "selfsup.training.loop",
    "Schedule": "selfsup.training.step",
    "OptimStep": "selfsup.training.step",
    "LARS": "selfsup.training.optim",
    "build_optimizer": "selfsup.training.optim",
    "warmup_cosine": "selfsup.training.schedules",
    "scaled_lr": "selfsup.training.schedules",
}
__all__ = list(_HOMES)

__getattr__ = lazy_exports(__name__, _HOMES)
