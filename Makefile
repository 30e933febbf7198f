# Two commands (see README): `make run` (the main job) and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test bench frontier clean

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

# Two worker processes (pytest-xdist), a test file per worker at a time: a file's module fixtures (the torchrun
# runs of test_parallel, say) are built once. `pytest tests/test_x.py` alone runs in one process as usual.
test: install
	$(PY) -m pytest -n 2 --dist loadfile

# The accuracy-compute frontier of both shipped teachers (about an hour each on a 2-core CPU; resumable).
frontier: install
	$(PY) -m pip install -q -e '.[plot]'
	$(PY) experiments/frontier.py --arch qwen3_moe
	$(PY) experiments/frontier.py --arch glm4_moe_lite

bench: install
	$(PY) bench/convert_memory.py
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) runs
