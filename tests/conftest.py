import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SELFSUP_TEST_THREADS", "1")))


@pytest.fixture
def tiny_cfg():
    """A pre-training config that runs a few steps in about a second on a CPU."""
    from selfsup.config import PretrainConfig, build_config

    def make(**kw):
        base = {"dataset": "embedded", "backbone": "resnet18", "backbone_width": 0.0625, "batch_size": 16,
                "steps": 6, "checkpoint_every": 3, "knn_monitor": False, "log_every": 1, "proj_out_dim": 16}
        base.update(kw)
        return build_config(PretrainConfig, base)

    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``SELFSUP_REQUIRE_EXTRAS=1`` (``make test``) a test skipped for a missing import fails instead."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SELFSUP_REQUIRE_EXTRAS") == "1" and call.excinfo is not None:
        reason = str(call.excinfo.value)
        if "could not import" in reason:
            report.outcome = "failed"
            report.longrepr = f"SELFSUP_REQUIRE_EXTRAS=1 but an optional extra is missing: {reason}"
