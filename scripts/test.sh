#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them.
#   - a Python venv (.venv) with the official `openai` SDK, for tests/sdk.rs
#   - cargo test (unit, end-to-end, binary-level and SDK tests)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai' 2>/dev/null; then
  echo "==> creating .venv with the openai SDK"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check 'openai>=1.40'
fi
export PORTCULLIS_PYTHON="$PWD/.venv/bin/python"

echo "==> cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
