# Two commands (see README): `make run` (the main job) and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test bench clean

install: $(VENV)/.installed

# torch is pinned explicitly: a bare `torch` would pull a multi-GB CUDA build; 2.13.0 has a CPU wheel here.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(PY) pipeline.py

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/convert_memory.py
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) runs
