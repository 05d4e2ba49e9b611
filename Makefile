# make demo: set up .venv and run the demo (SimCLR on Fashion-MNIST, pre-training and the evaluations in 9 minutes)
# make test: set up .venv with the test extras (requirements/test.txt) and run the test suite
# make install / make install-test: only set up .venv with the demo set / the test set (exact versions, nothing resolved)
# make lock: regenerate requirements/demo.txt and requirements/test.txt from pyproject.toml (uv pip compile; needs PyPI)
# make docs: API reference from the docstrings into docs/api (pdoc)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
# requirements/demo.txt (the core + what the demo imports) and requirements/test.txt (that + the test
# extras) lock every package at an exact version: installed with --no-deps, nothing is resolved here.
# pyproject.toml keeps ranges for users' own environments; `make lock` regenerates both files from it.
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package selfsup

.PHONY: demo test install install-test lock clean docs

$(VENV)/.selfsup-demo: pyproject.toml requirements/demo.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --no-compile -r requirements/demo.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.selfsup-test: pyproject.toml requirements/test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --no-compile -r requirements/test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@ $(VENV)/.selfsup-demo

install: $(VENV)/.selfsup-demo

install-test: $(VENV)/.selfsup-test

demo: $(VENV)/.selfsup-demo
	$(VENV)/bin/selfsup demo

lock:
	test -x .lock-venv/bin/uv || (python3 -m venv .lock-venv && .lock-venv/bin/pip install -q uv==$(UV_VERSION))
	# constraints.txt holds torch and torchvision at the releases make installs; the demo lock is the test lock's subset
	.lock-venv/bin/uv pip compile -q pyproject.toml --extra demo --extra test -c constraints.txt $(LOCK_FLAGS) -o requirements/test.txt
	.lock-venv/bin/uv pip compile -q pyproject.toml --extra demo -c requirements/test.txt $(LOCK_FLAGS) -o requirements/demo.txt

test: $(VENV)/.selfsup-test
	# the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml): an upward import fails here
	PYTHONPATH=src $(VENV)/bin/lint-imports
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} SELFSUP_REQUIRE_EXTRAS=1 $(PY) -m pytest -q
	# the precision-sensitive tests once more under bf16 (skipped, with the reason, on CPUs without native bf16)
	SELFSUP_TEST_PRECISION=bf16 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m precision

docs: $(VENV)/.selfsup-demo
	$(PY) -c 'import pdoc' 2>/dev/null || $(PY) -m pip install -q 'pdoc>=14'
	$(PY) -m pdoc selfsup -o docs/api

clean:
	rm -rf $(VENV) .lock-venv build *.egg-info src/*.egg-info .pytest_cache
