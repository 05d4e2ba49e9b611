# make demo: set up .venv and run the demo (SimCLR on Fashion-MNIST, ~10 minutes on 2 CPU cores)
# make test: set up .venv and run the test suite
# make docs: API reference from the docstrings into docs/api (pdoc)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selfsup-installed

.PHONY: demo test install clean docs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned (see pyproject.toml); pip finds these releases on this kind of machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/selfsup demo

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} SELFSUP_REQUIRE_EXTRAS=1 $(PY) -m pytest -q

docs: $(STAMP)
	$(PY) -c 'import pdoc' 2>/dev/null || $(PY) -m pip install -q 'pdoc>=14'
	$(PY) -m pdoc selfsup -o docs/api

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
