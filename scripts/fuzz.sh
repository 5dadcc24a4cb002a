#!/usr/bin/env bash
# Fuzz the gateway's parsers with cargo-fuzz (libFuzzer + AddressSanitizer, which also
# reports leaks). Installs cargo-fuzz from crates.io when missing.
#   scripts/fuzz.sh              every target for FUZZ_SECONDS (default 30) each: the CI smoke run
#   scripts/fuzz.sh route 600    one target for 600 s
# Each run starts from the committed seeds (fuzz/seeds/<target>) plus what earlier runs
# found (fuzz/corpus/<target>, not committed). A crash stops the script with the input
# saved under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(jwt route h1_response multipart json_model config forwarded)
seconds="${2:-${FUZZ_SECONDS:-30}}"
if [ $# -ge 1 ]; then TARGETS=("$1"); fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
# Sanitizers need a nightly compiler: the installed nightly if there is one, else the
# stable toolchain in bootstrap mode (the same flags, no download).
if rustup run nightly rustc --version >/dev/null 2>&1; then
  fuzz=(rustup run nightly cargo fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

echo "==> cargo fuzz build (${TARGETS[*]})"
for t in "${TARGETS[@]}"; do
  "${fuzz[@]}" build --fuzz-dir fuzz "$t"
done
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "==> fuzz $t for ${seconds}s"
  status=0
  "${fuzz[@]}" run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+ +DONE" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "error: fuzz target $t failed (exit $status); inputs in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
echo "fuzz: ${#TARGETS[@]} targets ran ${seconds}s each without a crash, leak or timeout"
