# link-kernel: `make demo` and `make test` do everything on a fresh machine.
# One virtual environment: `make demo` installs the package and the demo's few
# libraries only; `make test` (and `make install`) adds the test suite's extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# the package with what examples/quickstart.ipynb needs, and the kernelspec
$(VENV)/.demo: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[demo]'
	$(VENV)/bin/link-kernel install --sys-prefix >/dev/null
	touch $@

# everything the test suite needs (torch, JupyterLab, playwright...)
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[demo,test]'
	$(VENV)/bin/link-kernel install --sys-prefix >/dev/null
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.demo
	$(PY) examples/run_notebook.py examples/quickstart.ipynb

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/roundtrip.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
