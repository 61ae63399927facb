#!/usr/bin/env bash
# Debug build: compile nnrt with NNRT_DEBUG_BUILD=1 (Cython boundscheck, wraparound and
# initializedcheck on, -O0 -g) plus AddressSanitizer, in a temporary copy of the
# repository (never in place: the checkout's own .so files stay untouched), and run the
# fuzz suites (tests/test_fuzz_api.py and the stateful tests/test_fuzz_stateful.py), the
# reliability regression tests and the core kernel tests against it.
#
# Cython's boundscheck covers memoryview/buffer indexing (an out-of-bounds index raises
# IndexError); the kernels index raw pointers, which only AddressSanitizer sees: an
# out-of-bounds read or write aborts the process with a report, and the fuzz suite's
# worker process (tests/_subproc.py) turns that into a failed test.
#
# Usage: tests/debug_build.sh [extra pytest args]
#   PYTHON=python3   interpreter with nnrt's build and test dependencies
#   NNRT_ASAN=0      skip AddressSanitizer (Cython checks only)
#   KEEP=1           keep the temporary build directory
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
start=$(date +%s)
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/nnrt-debug-build.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $BUILD"; else rm -rf "$BUILD"; fi; }
trap cleanup EXIT

"$PY" -c "import Cython, setuptools, numpy, scipy" 2>/dev/null || {
    echo "$PY lacks the build requirements: pip install 'Cython>=3.0' setuptools wheel"
    exit 1
}
echo "== copying sources to $BUILD"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    # tracked and untracked-but-not-ignored files: no .c/.so build products
    git -C "$ROOT" ls-files -z -co --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$BUILD"
else
    tar --exclude='*.so' --exclude='*.c' --exclude='build' --exclude='.venv*' -cf - . \
        | tar -xf - -C "$BUILD"
fi
cd "$BUILD"
find nnrt plugins tests/cython -name '*.c' -delete 2>/dev/null || true

ASAN_LIB=""
if [ "${NNRT_ASAN:-1}" != 0 ] && command -v gcc >/dev/null; then
    candidate=$(gcc -print-file-name=libasan.so 2>/dev/null || true)
    if [ -n "$candidate" ] && [ -e "$candidate" ]; then ASAN_LIB=$candidate; fi
fi

echo "== building with NNRT_DEBUG_BUILD=1${ASAN_LIB:+ and AddressSanitizer}"
if [ -n "$ASAN_LIB" ]; then
    export CFLAGS="${CFLAGS:-} -fsanitize=address -fno-omit-frame-pointer"
    export LDFLAGS="${LDFLAGS:-} -fsanitize=address"
fi
NNRT_DEBUG_BUILD=1 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || {
    tail -40 build.log
    echo "debug build failed"
    exit 1
}
# the compiled test modules are not part of the package: built for the tests, same flags
PYTHONPATH="$BUILD" "$PY" tests/_cytests.py >>build.log 2>&1 || { tail -40 build.log; echo "test-module build failed"; exit 1; }
unset CFLAGS LDFLAGS
# the import packages nnrt_plugins / nnrt_cytests live in plugins/ and tests/cython/
ln -s plugins nnrt_plugins
ln -s tests/cython nnrt_cytests
export PYTHONPATH="$BUILD${PYTHONPATH:+:$PYTHONPATH}"
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
# every qualifying GEMM through nnrt's own kernel (nnrt/_blas.pyx): the fuzz suites
# exercise its strided reads and scratch copies under AddressSanitizer
export NNRT_GEMM_KERNEL=${NNRT_GEMM_KERNEL:-on}
if [ -n "$ASAN_LIB" ]; then
    export LD_PRELOAD="$ASAN_LIB"
    # CPython and numpy are not instrumented: leak reports would be theirs
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
fi
echo "== built in $(($(date +%s) - start))s; checking that the debug build is the one imported"
"$PY" - "$BUILD" <<'EOF'
import os, sys
build = os.path.realpath(sys.argv[1])
import nnrt, nnrt.layer, nnrt.dense, nnrt_plugins._batchnorm, nnrt_plugins._sigmoid
import nnrt_plugins._dense_nobias, nnrt_cytests._cy_layer_tests
for mod in (nnrt.layer, nnrt.dense, nnrt_plugins._batchnorm, nnrt_plugins._sigmoid,
            nnrt_plugins._dense_nobias, nnrt_cytests._cy_layer_tests):
    path = os.path.realpath(mod.__file__)
    assert path.startswith(build), f"{mod.__name__} imported from {path}, not the debug build"
assert nnrt.layer.DEBUG_BUILD, "nnrt.layer.DEBUG_BUILD is False: NNRT_DEBUG_BUILD was not applied"
from nnrt._build_info import BUILD_INFO
assert BUILD_INFO["debug_build"] and "-O0" in BUILD_INFO["compile_args"], BUILD_INFO
# Cython's boundscheck really is on: indexing a memoryview out of range raises
import numpy as np
try:
    nnrt.layer._bounds_probe(np.zeros(3), 3)
except IndexError:
    pass
else:
    raise AssertionError("out-of-bounds memoryview index did not raise: boundscheck is off")
print("debug build OK:", nnrt.__file__, "| asan:", bool(os.environ.get("LD_PRELOAD")))
EOF

echo "== fuzz suites (API and stateful) and core kernel tests against the debug build"
"$PY" -m pytest -q -p no:cacheprovider --hypothesis-profile="${HYPOTHESIS_PROFILE:-ci}" \
    tests/test_fuzz_api.py tests/test_fuzz_stateful.py tests/test_layers.py \
    tests/test_inputs.py tests/test_sequential.py tests/test_cython_suite.py tests/test_blas.py \
    tests/test_threads.py tests/test_parallel.py tests/test_plugin_faults.py tests/test_reliability_state.py \
    tests/test_reliability_files.py tests/test_reliability_concurrency.py \
    tests/test_serve.py tests/test_serve_session.py tests/test_fused.py \
    tests/test_sync_batchnorm.py "$@"
echo "== debug build suite passed in $(($(date +%s) - start))s"
