import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SELFSUP_TEST_THREADS", "1")))

# Tests that compare numbers run at one pinned precision, so the suite gives the same results on every
# CPU (precision=auto would pick bf16 on CPUs with AVX512-BF16/AMX and fp32 elsewhere). fp32 by default;
# `make test` runs the tests marked `precision` a second time with SELFSUP_TEST_PRECISION=bf16.
TEST_PRECISION = os.environ.get("SELFSUP_TEST_PRECISION", "fp32")
assert TEST_PRECISION in ("fp32", "bf16"), f"SELFSUP_TEST_PRECISION must be fp32 or bf16, not {TEST_PRECISION!r}"


def pytest_configure(config):
    config.addinivalue_line("markers", "precision: compares numerics; bounds per precision "
                            "(run again with SELFSUP_TEST_PRECISION=bf16)")


def pytest_collection_modifyitems(config, items):
    if TEST_PRECISION != "bf16":
        return
    from selfsup.training.devices import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        skip = pytest.mark.skip(reason="SELFSUP_TEST_PRECISION=bf16 but this CPU has no native bf16 (AVX512-BF16/AMX); "
                                "emulated bf16 is slow and not what users run")
        for item in items:
            if "precision" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    """A pre-training config that runs a few steps in about a second on a CPU."""
    from selfsup.methods import METHODS
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config

    def make(**kw):
        """Keys of the method's section may be given flat here (``base_tau=0.5``): they go under the method's name."""
        base = {"recipe": "cpu", "precision": TEST_PRECISION, "dataset": "embedded", "backbone": "resnet18", "backbone_width": 0.0625, "batch_size": 16,
                "steps": 6, "checkpoint_every": 3, "knn_monitor": False, "log_every": 1}
        base.update(kw)
        method = base.get("method", "simclr")
        own = METHODS[method].keys() if method in METHODS else ()
        section = {"proj_out_dim": 16} if "proj_out_dim" in own else {}
        section.update({k: base.pop(k) for k in list(base) if k in own})
        section.update(base.pop(method, {}))
        if section:
            base[method] = section
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
