# Two commands: `make demo` (set up, then run the main job on the embedded digits data) and `make test`.
# Also: `make docs` (the documentation site into site/) and `make dist` (build, check and install-test the wheel).
# TORCH_SPEC picks the torch wheel: any torch >= 2.2 by default; CI on our build machines pins the local CPU
# wheel with TORCH_SPEC=torch==2.13.0.
PYTHON ?= python3
TORCH_SPEC ?= torch>=2.2
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
TEST_DATA_DIR := $(if $(LIFTKIT_DATA_DIR),$(LIFTKIT_DATA_DIR),$(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),))

.PHONY: demo test lint unit gpu-check setup clean docs dist

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/liftkit bench --config configs/demo.json --out demo-out

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/mypy

unit: setup
	LIFTKIT_DATA_DIR="$(TEST_DATA_DIR)" $(BIN)/python -m pytest -q

test: lint unit

# The tests that take a `device` argument, on CUDA (they skip without a GPU), then a short bench of every method
# on the GPU with profile tables; on a machine without CUDA the bench is skipped with a note.
gpu-check: setup
	LIFTKIT_DATA_DIR="$(TEST_DATA_DIR)" $(BIN)/python -m pytest -q -m cuda
	@if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(BIN)/liftkit bench --config configs/demo.json --device cuda --epochs 3 --profile --out gpu-check-out; \
	else \
		echo "gpu-check: no CUDA device here; the CUDA tests were skipped and the GPU bench is not run"; \
	fi

# The documentation site (MkDocs + Material + mkdocstrings) into site/; --strict turns a broken link, a missing
# page or an unresolved API reference into a failure.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Release check: sdist + wheel, twine's metadata check, then the wheel installed into a fresh venv and run.
dist: setup
	rm -rf dist
	$(BIN)/python -m build --quiet --outdir dist .
	$(BIN)/twine check --strict dist/*.whl dist/*.tar.gz
	$(BIN)/python scripts/check_wheel.py dist

clean:
	rm -rf $(VENV) demo-out bench-out runs gpu-check-out site dist build
