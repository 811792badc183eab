# link-kernel: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/link-kernel install --sys-prefix >/dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/run_notebook.py examples/quickstart.ipynb

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/roundtrip.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
