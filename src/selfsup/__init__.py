"""selfsup: self-supervised visual representation learning (SimCLR, SimCLRv2, BYOL), paper-faithful.

Building blocks (plain torch): ``selfsup.losses``, ``selfsup.backbones``, ``selfsup.heads``,
``selfsup.augment``, ``selfsup.schedules``, ``selfsup.optim``, ``selfsup.methods``.
The training loop (``selfsup.train``) and the command line (``selfsup.cli``) sit on top.
"""
__version__ = "0.1.0"
