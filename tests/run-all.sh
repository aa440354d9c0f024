#!/usr/bin/env bash
# The test command (README and .ci/run): format check, warnings-as-errors
# build, unit + integration suites, the same suites under ASan+UBSan, and
# the libFuzzer harnesses (built with clang, each replaying its corpus).
# Exits non-zero on the first failure. Assumes deploy/install-deps.sh ran.
#
# Usage: tests/run-all.sh [--quick]   (--quick: skip the sanitizer and fuzz builds)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
jobs=$(nproc 2>/dev/null || echo 2)

step() { printf '\n==> %s\n' "$*"; }

step "Python test dependencies"
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

step "clang-format check"
files=$(git ls-files '*.c' '*.h' 2>/dev/null || find . -name '*.c' -o -name '*.h' | grep -v '^./build')
clang-format --dry-run --Werror $files

step "build (warnings are errors)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs"

step "unit and integration tests"
ctest --test-dir build --output-on-failure -j1

if [ "$quick" -eq 0 ]; then
  step "ASan+UBSan build and the whole suite again"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DZG_SANITIZE=ON >/dev/null
  cmake --build build-asan -j"$jobs"
  # quarantine_size_mb: ASan keeps freed memory resident (256 MB by
  # default) to catch use-after-free; the RSS-bound tests (test_edge_memory)
  # then measured the quarantine filling up, not the proxy's buffers (an
  # active node grew 25-66 MB in runs of the same test). 32 MB still
  # catches a use soon after a free.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:quarantine_size_mb=32 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ZG_TEST_SLOW=1 ctest --test-dir build-asan --output-on-failure -j1

  step "libFuzzer harnesses (clang)"
  cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DZG_FUZZ=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build build-fuzz -j"$jobs"
  ctest --test-dir build-fuzz --output-on-failure -L fuzz
fi

step "all tests passed"
