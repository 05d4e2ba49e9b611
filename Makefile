# make demo: set up .venv and run the demo (SimCLR on Fashion-MNIST, pre-training and the evaluations in 9 minutes)
# make test: set up .venv with the test extras (requirements/test.txt) and run the test suite
# make install / make install-test: only set up .venv with the demo set / the test set (exact versions, nothing resolved)
# make install-docs: only set up .venv with the docs set (requirements/docs.txt: the demo set and the site's generator)
# make lock: regenerate requirements/demo.txt, test.txt and docs.txt from pyproject.toml (uv pip compile; needs PyPI)
# make docs: build the documentation site into site/ (MkDocs, strict: a warning fails the build)
# make docs-serve: preview the site at http://127.0.0.1:8000, rebuilt on every change
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
# requirements/demo.txt (the core + what the demo imports), requirements/test.txt (that + the test
# extras) and requirements/docs.txt (the demo set + the docs extra) lock every package at an exact version:
# installed with --no-deps, nothing is resolved here.
# pyproject.toml keeps ranges for users' own environments; `make lock` regenerates the three files from it.
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package selfsup

.PHONY: demo test install install-test install-docs lock clean docs docs-serve

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

$(VENV)/.selfsup-docs: pyproject.toml requirements/docs.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --no-compile -r requirements/docs.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@ $(VENV)/.selfsup-demo

install: $(VENV)/.selfsup-demo

install-test: $(VENV)/.selfsup-test

install-docs: $(VENV)/.selfsup-docs

demo: $(VENV)/.selfsup-demo
	$(VENV)/bin/selfsup demo

lock:
	test -x .lock-venv/bin/uv || (python3 -m venv .lock-venv && .lock-venv/bin/pip install -q uv==$(UV_VERSION))
	# constraints.txt holds torch and torchvision at the releases make installs; the demo lock is the test lock's
	# subset, and the docs lock agrees with the test lock on every package both hold (one .venv can hold both)
	.lock-venv/bin/uv pip compile -q pyproject.toml --extra demo --extra test -c constraints.txt $(LOCK_FLAGS) -o requirements/test.txt
	.lock-venv/bin/uv pip compile -q pyproject.toml --extra demo -c requirements/test.txt $(LOCK_FLAGS) -o requirements/demo.txt
	.lock-venv/bin/uv pip compile -q pyproject.toml --extra demo --extra docs -c requirements/test.txt $(LOCK_FLAGS) -o requirements/docs.txt

test: $(VENV)/.selfsup-test
	# the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml): an upward import fails here
	PYTHONPATH=src $(VENV)/bin/lint-imports
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} SELFSUP_REQUIRE_EXTRAS=1 $(PY) -m pytest -q
	# the precision-sensitive tests once more under bf16 (skipped, with the reason, on CPUs without native bf16)
	SELFSUP_TEST_PRECISION=bf16 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m precision

# mkdocs.yml says what the site holds; docs/gen/ writes the reference pages (command line, config keys, Python
# API) during the build, from the parser, the config dataclasses and the docstrings. --strict: any warning
# (a broken link, a page missing from the nav, a docstring mkdocstrings cannot read) fails the build.
docs: $(VENV)/.selfsup-docs
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.selfsup-docs
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) .lock-venv build site *.egg-info src/*.egg-info .pytest_cache
