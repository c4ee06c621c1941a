#!/usr/bin/env bash
# One call on a lent GPU machine: install, every CUDA op case, then the figures; logs and CSVs under $OUT
# (the device tool's output folder; results/gpu elsewhere). Each step has its own time limit so that a
# slow one cannot eat the call, and pytest prints its failures (-rf) before the figures start.
#   BENCH=0 bash benchmarks/gpu_session.sh                  # the CUDA tests and the causal probe
#   TESTS=0 bash benchmarks/gpu_session.sh                  # every figure
#   BENCH_ARGS="--tune --dtypes fp16" TESTS=0 bash benchmarks/gpu_session.sh
# (one call does both with no variable set, but the steps' limits then add up past a 10-minute device call)
#   PROFILE=1 TESTS=0 BENCH=0 bash benchmarks/gpu_session.sh    # Nsight Compute on benchmarks.gpu_profile
#   CPP=1 BENCH=0 bash benchmarks/gpu_session.sh            # also the CUDA C++ kernels (built during the tests)
# Env: TESTS (1: run the CUDA tests and benchmarks.gpu_causal_probe), BENCH (1: the figures), PROFILE (0: ncu),
# CPP (0: build adaptwin._C with its CUDA kernels beside the tests, then run test_cuda_cpp_backend), TEST_S /
# PROBE_S / BENCH_S / PROFILE_S / CPP_S (seconds), JOBS (pytest workers), BENCH_ARGS, PROFILE_CALLS (gpu_profile --calls).
set -u
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ADAPTWIN_NO_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 \
    || { tail -5 "$out/install.log"; exit 1; }
if [ "${CPP:-0}" = 1 ]; then
    # built outside the tree, so that the Triton tests never see a half-written adaptwin/_C*.so
    (MAX_JOBS=${CPP_JOBS:-6} timeout "${CPP_BUILD_S:-400}" python3 setup.py -q build_ext --build-lib /tmp/cpp_build \
        --build-temp /tmp/cpp_temp >"$out/cpp_build.log" 2>&1; echo "cpp build exit $?" >>"$out/cpp_build.log") &
    cpp_pid=$!
fi
if [ "${TESTS:-1}" = 1 ]; then
    # -v: a line per test as it ends, so a run cut short by TEST_S still says what passed and failed
    timeout "${TEST_S:-300}" python3 -m pytest -v -rfxX -n "${JOBS:-14}" -m gpu -p no:cacheprovider \
        tests/test_kernels_cuda.py tests/test_gpu_bench.py >"$out/pytest.log" 2>&1
    rc=$?
    echo "pytest exit $rc ($(grep -c ' PASSED ' "$out/pytest.log") PASSED, $(grep -c ' FAILED ' "$out/pytest.log") FAILED lines)"
    grep -E "^FAILED|^ERROR|^XFAIL|^XPASS|[0-9]+ (passed|failed)" "$out/pytest.log" | head -30
    grep -E "^\[gw[0-9]+\].* (FAILED|ERROR) " "$out/pytest.log" | head -20
    # the causal 16-bit calls routed to SDPA, on the kernel at the default pipeline depth and at one stage
    timeout "${PROBE_S:-200}" python3 -m benchmarks.gpu_causal_probe --sanitize --out "$out/causal_probe.csv" 2>&1 | tail -n 70
fi
if [ "${CPP:-0}" = 1 ]; then
    wait "$cpp_pid"
    tail -n 3 "$out/cpp_build.log"
    if cp /tmp/cpp_build/adaptwin/_C*.so adaptwin/; then
        # every CUDA case that goes through the dispatcher again, on the C++ kernels (what test_cuda_cpp_backend
        # runs in one child process; here over pytest workers, a line per test)
        ADAPTWIN_CUDA_BACKEND=cpp timeout "${CPP_S:-200}" python3 -m pytest -v -rf -n "${JOBS:-14}" -m gpu \
            -p no:cacheprovider tests/test_kernels_cuda.py -k "not decoded_in_tiles and not one_launch and not \
            routed_causal and not cuda_cpp_backend" >"$out/cpp.log" 2>&1
        echo "cpp tests exit $? ($(grep -c ' PASSED ' "$out/cpp.log") PASSED, $(grep -c ' FAILED ' "$out/cpp.log") FAILED lines)"
        grep -E "^FAILED|^ERROR|[0-9]+ (passed|failed)" "$out/cpp.log" | head -30
    fi
fi
if [ "${BENCH:-1}" = 1 ]; then
    # bitsandbytes' CUDA 13 library, staged in .device/site (see docs/kernels.md), is the peer in the GEMV rows
    PYTHONPATH=.device/site timeout "${BENCH_S:-300}" python3 -m benchmarks.gpu_kernels ${BENCH_ARGS:-} \
        --out "$out/gpu_kernels.csv" 2>"$out/progress.log" >"$out/gpu_kernels.log"
    rc=$?
    echo "gpu_kernels exit $rc"
    tail -n 80 "$out/gpu_kernels.log"
    # cut short (124: BENCH_S) or failed: the table never printed, but every finished part is in the CSV and
    # every timed row in the progress log
    if [ "$rc" = 0 ]; then tail -n 3 "$out/progress.log"; else tail -n 60 "$out/progress.log"; fi
fi
if [ "${PROFILE:-0}" = 1 ]; then
    timeout "${PROFILE_S:-400}" ncu --csv --page details --set detailed \
        -k regex:'_gemv|_fused|_dequant|_attention|_sum_rows|_gemm' \
        python3 -m benchmarks.gpu_profile --calls "${PROFILE_CALLS:-gemv,batched,attention}" \
        >"$out/ncu.csv" 2>"$out/ncu.log"
    echo "ncu exit $?"
    python3 -m benchmarks.gpu_profile --summarize "$out/ncu.csv" | tee "$out/ncu_summary.txt"
fi
