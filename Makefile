# adaptwin: `make demo` and `make test` are the quickstart; `make install` is what both run first.
PYTHON ?= python
PIP := $(PYTHON) -m pip
# Benchmarks: every runnable script in benchmarks/ (helpers without a __main__ block and the plot_*
# scripts, which only read the CSVs, are left out), run as modules: python -m benchmarks.NAME.
BENCHMARKS := $(filter-out benchmarks/plot_%.py,$(shell grep -l '__name__ == "__main__"' benchmarks/*.py 2>/dev/null))
BENCH_ARGS ?=

.PHONY: install demo test lint bench sanitize

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

# The native ops under AddressSanitizer + UndefinedBehaviorSanitizer (about 30 min on 2 cores; not part of
# `make test`): the last commit is cloned to SANITIZE_DIR and built instrumented there, then the op tests and
# tests/fuzz_native_ops.py run under each CPU cap (SANITIZE_CAPS) with the sanitizer runtimes preloaded.
SANITIZE_DIR ?= /tmp/adaptwin-sanitize
SANITIZE_CAPS ?= native avx2 portable
SANITIZE_TESTS ?= tests/test_kernels_cpu.py tests/test_ops_bad_input.py tests/test_kept_calls.py \
	tests/test_fast_calls.py tests/test_gemv_linears.py tests/test_attend_padding.py tests/test_native_gelu.py
SANITIZE_FUZZ ?= 500 500 100 0
sanitize:
	rm -rf $(SANITIZE_DIR) && git clone -q . $(SANITIZE_DIR)
	cd $(SANITIZE_DIR) && ADAPTWIN_SANITIZE=1 MAX_JOBS=2 $(PYTHON) setup.py -q build_ext --inplace
	cd $(SANITIZE_DIR) && for cap in $(SANITIZE_CAPS); do echo "== cap $$cap"; \
		env $$( [ $$cap = native ] || echo ADAPTWIN_CPU_CAP=$$cap ) \
		LD_PRELOAD=$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so) \
		ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 sh -c '$(PYTHON) -m pytest -q -p no:xdist -p no:cacheprovider \
		$(SANITIZE_TESTS) && $(PYTHON) tests/fuzz_native_ops.py $(SANITIZE_FUZZ)' || exit 1; done
