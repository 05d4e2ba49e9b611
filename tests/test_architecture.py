"""The package layout holds: layers only point down (import-linter), and the public API resolves to its homes."""
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The public API named in README ("Public API"): (module, name) -> where it is defined.
PUBLIC = [
    ("selfsup.losses", "nt_xent", "selfsup.losses.nt_xent"),
    ("selfsup.losses", "byol_loss", "selfsup.losses.byol"),
    ("selfsup.losses", "distill_loss", "selfsup.losses.distill"),
    ("selfsup.models", "BACKBONES", "selfsup.models.backbones"),
    ("selfsup.models", "build_backbone", "selfsup.models.backbones"),
    ("selfsup.models", "ProjectionHead", "selfsup.models.heads"),
    ("selfsup.views", "ViewConfig", "selfsup.views.config"),
    ("selfsup.views", "BatchAugment", "selfsup.views.augment"),
    ("selfsup.training", "warmup_cosine", "selfsup.training.schedules"),
    ("selfsup.training", "LARS", "selfsup.training.optim"),
    ("selfsup.training", "PretrainConfig", "selfsup.training.config"),
    ("selfsup.training", "resolve_config", "selfsup.training.config"),
    ("selfsup.training", "pretrain", "selfsup.training.loop"),
    ("selfsup.training", "OptimStep", "selfsup.training.step"),
    ("selfsup.methods", "METHODS", "selfsup.methods"),
    ("selfsup.methods", "MethodSpec", "selfsup.methods.spec"),
    ("selfsup.methods", "SimCLR", "selfsup.methods.simclr"),
    ("selfsup.methods", "BYOL", "selfsup.methods.byol"),
    ("selfsup.methods.ema", "ema_update", "selfsup.methods.ema"),
    ("selfsup.data", "load_dataset", "selfsup.data.datasets"),
    ("selfsup.data", "DataNotFoundError", "selfsup.errors"),
    ("selfsup.evaluation", "linear_eval", "selfsup.evaluation.frozen"),
    ("selfsup.evaluation", "knn_eval", "selfsup.evaluation.frozen"),
    ("selfsup.protocols", "FinetuneConfig", "selfsup.protocols.finetune"),
    ("selfsup.protocols", "DistillConfig", "selfsup.protocols.distill"),
    ("selfsup.artifacts", "load_encoder", "selfsup.artifacts.hub"),
    ("selfsup.cli", "main", "selfsup.cli.app"),
    ("selfsup", "pretrain", "selfsup.training.loop"),
    ("selfsup", "PretrainConfig", "selfsup.training.config"),
    ("selfsup", "build_config", "selfsup.training.config_io"),
    ("selfsup", "load_encoder", "selfsup.artifacts.hub"),
    ("selfsup", "from_pretrained", "selfsup.artifacts.hub"),
]


@pytest.mark.parametrize("package", ["selfsup.losses", "selfsup.models", "selfsup.views", "selfsup.training",
                                     "selfsup.methods", "selfsup.data", "selfsup.evaluation", "selfsup.protocols",
                                     "selfsup.artifacts"])
def test_every_sub_package_export_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, (package, name)


def test_no_module_outside_methods_branches_on_a_method_name():
    """What a method is lives in its spec: no code outside methods/ (and the SimCLR/BYOL studies of analyze/)
    compares the method's name with a literal."""
    pattern = re.compile(r"""method\s*(==|!=|in|not in)\s*[("'\[]|["'](simclr|simclrv2|byol|supervised)["']\s*(==|!=|in)\s*\S*method""")
    offenders = []
    for path in (ROOT / "src" / "selfsup").rglob("*.py"):
        rel = path.relative_to(ROOT / "src" / "selfsup").as_posix()
        if rel.startswith(("methods/", "analyze/")):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("module,name,home", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_public_api_resolves_to_its_home(module, name, home):
    assert getattr(importlib.import_module(module), name) is getattr(importlib.import_module(home), name)


def test_the_layer_contract_holds():
    """``lint-imports`` ([tool.importlinter] in pyproject.toml): layers point down, no cycles."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.importorskip("importlinter")  # installed as a module without the script: skip with the reason
        pytest.skip("import-linter is installed without its lint-imports script")
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "0 broken" in out.stdout
