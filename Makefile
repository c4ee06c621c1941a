# adaptwin: `make demo` and `make test` are the quickstart; `make install` is what both run first.
PYTHON ?= python
PIP := $(PYTHON) -m pip
# Benchmarks: every runnable script in benchmarks/ (helpers without a __main__ block and the plot_*
# scripts, which only read the CSVs, are left out), run as modules: python -m benchmarks.NAME.
BENCHMARKS := $(filter-out benchmarks/plot_%.py,$(shell grep -l '__name__ == "__main__"' benchmarks/*.py 2>/dev/null))
BENCH_ARGS ?=

.PHONY: install demo test lint bench

# torch is installed only where none is importable: GPU machines come with their own CUDA build,
# which a CPU wheel must never replace. --no-build-isolation builds against that installed torch.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q --no-build-isolation -e ".[dev]"

demo: install
	$(PYTHON) -m adaptwin.demo

test: install
	$(PYTHON) -m pytest -q -m "not slow and not gpu"

lint:
	$(PYTHON) -m ruff check .

# the plots need the `bench` extra (matplotlib); installed here, not for `make test`
bench: install
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PIP) install -q matplotlib
	@if [ -z "$(BENCHMARKS)" ]; then echo "no benchmarks in benchmarks/ yet"; exit 0; fi; \
	for script in $(BENCHMARKS); do \
		name=$$(basename $$script .py); echo "== benchmarks.$$name $(BENCH_ARGS)"; \
		$(PYTHON) -m benchmarks.$$name $(BENCH_ARGS) || exit 1; \
	done
