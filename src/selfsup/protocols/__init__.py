"""Protocols that train on top of a pre-trained run: evaluating a run, the SGD linear protocol, fine-tuning, distillation, and the labelled loop they share (also the supervised baseline)."""
from selfsup.lazy import lazy_exports

# name -> the module that defines it, imported on first use (PEP 562) so importing one module stays light.
_HOMES = {
    "evaluate": "selfsup.protocols.eval_run",
    "FinetuneConfig": "selfsup.protocols.finetune",
    "DistillConfig": "selfsup.protocols.distill",
}
__all__ = list(_HOMES)

__getattr__ = lazy_exports(__name__, _HOMES)
