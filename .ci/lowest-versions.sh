#!/usr/bin/env bash
# CI job "lowest supported versions": build nnrt and run its test suite with the
# lowest version of every dependency that pyproject.toml declares (runtime: numpy,
# scipy, pluggy, threadpoolctl, tqdm; build: Cython), pinned by
# .ci/lowest-constraints.txt and installed with `pip install -c`. The main CI run
# sees only the newest versions; this one keeps the declared lower bounds honest.
#
# Runs in a temporary copy of the repository with its own venv (the checkout's
# in-place .so files, built against the newest numpy, stay untouched).
#
# Usage: .ci/lowest-versions.sh [extra pytest args]
#   PYTHON=python3   interpreter to make the venv from
#   KEEP=1           keep the temporary directory
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CONSTRAINTS="$ROOT/.ci/lowest-constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nnrt-lowest.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

echo "== copying sources to $WORK/src"
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z -co --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
else
    tar --exclude='*.so' --exclude='*.c' --exclude='build' --exclude='.venv*' -cf - . \
        | tar -xf - -C "$WORK/src"
fi
cd "$WORK/src"
find nnrt plugins tests/cython -name '*.c' -delete 2>/dev/null || true
find nnrt plugins tests/cython -name '*.so' -delete 2>/dev/null || true

echo "== venv with the lowest declared versions ($(grep -c '==' "$CONSTRAINTS") pins)"
"$PY" -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c "$CONSTRAINTS" numpy scipy pluggy threadpoolctl tqdm Cython \
    "setuptools>=68" wheel
# the build uses these (no build isolation: it would fetch the newest numpy/Cython)
python -m pip install -q -c "$CONSTRAINTS" --no-build-isolation -e ".[test]"
echo "== built and installed in $(( $(date +%s) - start ))s"

echo "== installed versions"
python - "$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as ilm
import sys

bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = (s.strip() for s in line.split("=="))
    got = ilm.version(name)
    print(f"  {name:14} {got}")
    if got != want:
        bad.append(f"{name} {got} (pinned {want})")
if bad:
    sys.exit("not the lowest versions: " + ", ".join(bad))
PYEOF

echo "== test suite"
# tests/test_plugin_typing.py runs mypy --strict over plugin code; numpy 2.0's type
# stubs make every bare `np.ndarray` annotation an error under --strict (newer numpy
# gives ndarray's type parameters defaults), which is about the stubs, not nnrt.
set +e
python -m pytest -q -p no:cacheprovider --ignore=tests/test_plugin_typing.py "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
echo "== lowest-versions job: pytest exit $rc in $(( $(date +%s) - start ))s"
exit "$rc"
