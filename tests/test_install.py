"""Installing selfsup keeps an environment's own torch: pyproject declares ranges, requirements/*.txt lock\nthe exact versions make and CI install, and must agree with those ranges."""
import json
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# A CUDA build of another in-range release, as a user's environment would hold.
USER_TORCH = {"torch": "2.13.0+cu126", "torchvision": "0.28.0+cu126"}


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def _lock(name: str) -> dict[str, Version]:
    """requirements/<name>.txt as {package: exact version}; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}.txt: {line} is not an exact pin"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _declared(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _requirements() + [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]


@pytest.mark.parametrize("lock, extras", [("demo", ["demo"]), ("test", ["demo", "test"]), ("docs", ["demo", "docs"])])
def test_the_lock_satisfies_pyproject(lock, extras):
    # A range in pyproject.toml that excludes a locked version, or a declared dependency the lock lacks,
    # means the lock is stale: `make lock` regenerates it.
    pins = _lock(lock)
    for req in _declared(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml declares {req} but requirements/{lock}.txt has no {name}; run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements/{lock}.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}; run make lock"


def test_the_demo_lock_is_the_test_locks_subset_and_torch_is_a_range():
    demo, test, docs = _lock("demo"), _lock("test"), _lock("docs")
    assert {n: v for n, v in demo.items() if test.get(n) != v} == {}
    # make docs installs the docs lock into the .venv that make test filled: the two agree where they overlap
    assert {n: (v, test[n]) for n, v in docs.items() if n in test and test[n] != v} == {}
    assert {n: v for n, v in demo.items() if docs.get(n) != v} == {}
    reqs = {r.name: r for r in _requirements()}
    for name, version in USER_TORCH.items():
        assert not any(s.operator in ("==", "===") for s in reqs[name].specifier), reqs[name]
        assert reqs[name].specifier.contains(Version(version), prereleases=True), (name, version)
    # make installs the locks without resolving anything
    makefile = (ROOT / "Makefile").read_text()
    assert "requirements/demo.txt" in makefile and "requirements/test.txt" in makefile and "--no-deps" in makefile
    assert "-o requirements/docs.txt" in makefile and "-r requirements/docs.txt" in makefile


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
