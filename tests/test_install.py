"""Installing selfsup keeps an environment's own torch: pyproject declares ranges, constraints.txt the pins."""
import json
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# A CUDA build of another in-range release, as a user's environment would hold.
USER_TORCH = {"torch": "2.13.0+cu126", "torchvision": "0.28.0+cu126"}


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def test_torch_is_a_range_and_the_pins_live_in_constraints():
    reqs = {r.name: r for r in _requirements()}
    for name, version in USER_TORCH.items():
        assert not any(s.operator in ("==", "===") for s in reqs[name].specifier), reqs[name]
        assert reqs[name].specifier.contains(Version(version), prereleases=True), (name, version)
    pins = [l.split("==") for l in (ROOT / "constraints.txt").read_text().splitlines() if "==" in l and not l.startswith("#")]
    assert {n for n, _ in pins} == {"torch", "torchvision"}
    for name, version in pins:
        assert reqs[name].specifier.contains(Version(version)), (name, version)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "torch==" not in makefile


def _fake_dist(site: Path, name: str, version: str) -> None:
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "INSTALLER").write_text("pip\n")
    (d / "RECORD").write_text("")


def test_install_into_an_environment_with_another_torch_keeps_it(tmp_path):
    # An empty venv holding only (fake) metadata of the user's torch and of our other dependencies; pip
    # resolves our requirements against it without an index, so nothing can be downloaded. With an
    # exact pin on another torch, the resolver would have to fetch that torch and fails here.
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode != 0:
        pytest.skip("pip is not available in this environment, so the install cannot be checked")
    env = tmp_path / "user-env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # every other dependency present at its lowest allowed version (the user has it already)
    others = {r.name: next((s.version for s in r.specifier if s.operator == ">="), "1.0")
              for r in _requirements() if r.name not in USER_TORCH}
    for name, version in {**USER_TORCH, **others}.items():
        _fake_dist(site, name, version)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index",
           "--quiet", "--report", str(report),
           *[str(r) for r in _requirements()]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == [], f"pip would install {installs} over the user's environment"
