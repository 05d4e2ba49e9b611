import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SELFSUP_TEST_THREADS", "1")))


@pytest.fixture
def tiny_cfg():
    """A pre-training config that runs a few steps in about a second on a CPU."""
    from selfsup.config import PretrainConfig, build_config

    def make(**kw):
        base = {"recipe": "cpu", "dataset": "embedded", "backbone": "resnet18", "backbone_width": 0.0625, "batch_size": 16,
                "steps": 6, "checkpoint_every": 3, "knn_monitor": False, "log_every": 1, "proj_out_dim": 16}
        base.update(kw)
        return build_config(PretrainConfig, base)

    return make
