# Two commands set up a fresh clone: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU wheel of torch lies on the CPU machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check smoltrain tests bench
	$(PY) -m pytest -q -rs tests

# The 15 minutes a user is promised are the command's: the start is read when make parses this file,
# before the install, and the demo plans its stages from what is left.
demo: DEMO_STARTED := $(shell date +%s)
demo: venv
	$(VENV)/bin/smoltrain demo --started $(DEMO_STARTED)

clean:
	rm -rf $(VENV) runs .pytest_cache
