#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them.
#   - a Python venv (.venv) with the official `openai` SDK and `h2` (HTTP/2 for its httpx),
#     for tests/sdk.rs and tests/tls.rs; schemathesis, which tests/console.rs runs against
#     the live admin API and its OpenAPI document; the LiteLLM SDK, which tests/sidecar.rs
#     runs (with `openai`) as the applications beside a sidecar; opentelemetry-proto, which
#     tests/otlp/receiver.py (the OTLP/HTTP receiver of tests/telemetry.rs) decodes spans
#     with; and kubernetes-validate (pinned: its schemas are the Kubernetes releases it
#     knows), which tests/deploy.rs runs on every rendered manifest
#   - kubectl (its built-in kustomize renders deploy/kubernetes/ for tests/deploy.rs): the
#     machine's, or Debian's package when there is none
#   - the test OpenID provider's npm packages (tests/idp/node_modules, from the committed
#     lock file), for the tests that use tests/common/idp.rs
#   - the admin console's browser test: playwright-core (tests/browser/node_modules, from the
#     committed lock file) and Chromium (Debian package `chromium`, /usr/bin/chromium), for
#     tests/console_browser.rs; PORTCULLIS_REQUIRE_BROWSER=1 makes that test fail instead of
#     skipping when either is missing
#   - redis-server (Debian package), which tests/limits.rs starts on ports of its own to
#     stop it mid-test (the shared Redis at PORTCULLIS_TEST_REDIS_URL, default
#     127.0.0.1:6379, and PostgreSQL at PORTCULLIS_TEST_POSTGRES_URL are expected to run)
#   - cargo test (unit, end-to-end, binary-level and SDK tests)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, h2, schemathesis, litellm, kubernetes_validate, opentelemetry.proto.collector.trace.v1.trace_service_pb2' 2>/dev/null; then
  echo "==> creating .venv with the openai and LiteLLM SDKs, h2, schemathesis, kubernetes-validate and opentelemetry-proto"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check 'openai>=1.40' h2 'schemathesis>=4.1,<5' \
    'litellm>=1.60,<2' 'kubernetes-validate==1.37.0' 'opentelemetry-proto>=1.27,<2'
fi
# LiteLLM would fetch its model price map from the internet on import.
export LITELLM_LOCAL_MODEL_COST_MAP=True
export PORTCULLIS_PYTHON="$PWD/.venv/bin/python"

# `npm ci` only when node_modules was not installed from this exact lock file.
if ! command -v "${PORTCULLIS_TEST_NODE:-node}" >/dev/null || ! command -v npm >/dev/null; then
  echo "error: node and npm are needed for the test IdP (tests/idp) and the browser test (tests/browser)" >&2
  exit 1
fi
for dir in tests/idp tests/browser; do
  if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json" 2>/dev/null; then
    echo "==> npm ci ($dir)"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
    cp "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json"
  fi
done

if ! command -v redis-server >/dev/null; then
  echo "==> installing redis-server (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# tests/deploy.rs renders the overlays with `kubectl kustomize`, which needs the kustomize
# v4 or later built into kubectl 1.21 and later. The machines have one; otherwise the
# `kubectl` package where apt has it, else Debian's `kubernetes-client` (Debian 12's is
# 1.20, too old: then the check below says so).
if ! command -v kubectl >/dev/null; then
  echo "==> installing kubectl (Debian package)"
  apt-get update -qq
  if apt-cache policy kubectl | grep -q 'Candidate: [0-9]'; then pkg=kubectl; else pkg=kubernetes-client; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
fi
if ! kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])\.'; then
  echo "error: tests/deploy.rs needs kubectl 1.21 or later (kustomize v4+); found: $(kubectl version --client 2>&1 | head -1)" >&2
  exit 1
fi

# Debian's Chromium for tests/console_browser.rs (playwright-core drives it; it downloads no
# browser of its own).
if [ ! -x /usr/bin/chromium ]; then
  echo "==> installing chromium (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export PORTCULLIS_REQUIRE_BROWSER=1

echo "==> cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
