# LiteLLM's proxy as the peer bench/run.sh compares Portcullis with (sourced, from the
# repository root, after bench/common.sh). Everything stays on 127.0.0.1.
#
# litellm_setup: a bench-only venv in $OUT/litellm-venv with `litellm[proxy]` from PyPI
#   (created on first use; BENCH_SKIP_LITELLM=1 skips LiteLLM). Returns non-zero, with a
#   message, when LiteLLM cannot be used.
# litellm_conf FILE UP_PORT: its config — one deployment `openai/gpt-4o` whose api_base is the
#   bench upstream, with router rpm/tpm limits (large enough never to refuse) enforced by the
#   usage-based-v2 routing strategy, and a master key.
# litellm_start CONFIG PORT LOG: start it (LITELLM_PID), wait until it answers.
# litellm_try_db LOG: whether its database layer (virtual keys: Prisma + PostgreSQL) can be
#   set up here; prints why not.

LITELLM_VENV="$OUT/litellm-venv"
LITELLM_KEY="sk-litellm-bench-master-0123456789"
LITELLM_WORKERS="${BENCH_LITELLM_WORKERS:-2}"
# No model-cost-map download at start, quiet logs (uvicorn's access log off).
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR

litellm_setup() {
  if [ "${BENCH_SKIP_LITELLM:-0}" = 1 ]; then
    echo "==> LiteLLM skipped (BENCH_SKIP_LITELLM=1)"; return 1
  fi
  if [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    echo "==> installing LiteLLM's proxy into $LITELLM_VENV (PyPI)"
    if ! { python3 -m venv "$LITELLM_VENV" && "$LITELLM_VENV/bin/pip" install -q --upgrade pip &&
           "$LITELLM_VENV/bin/pip" install -q 'litellm[proxy]'; } > "$OUT/litellm-install.log" 2>&1; then
      echo "==> LiteLLM skipped: install failed (see $OUT/litellm-install.log)"; return 1
    fi
  fi
  LITELLM_VERSION=$("$LITELLM_VENV/bin/pip" show litellm 2>/dev/null | awk '/^Version:/ {print $2}')
}

litellm_conf() {
  cat > "$1" <<YAML
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: http://127.0.0.1:$2/v1
      api_key: sk-upstream-bench
      rpm: 100000000
      tpm: 100000000
router_settings:
  routing_strategy: usage-based-routing-v2
general_settings:
  master_key: $LITELLM_KEY
litellm_settings:
  telemetry: false
YAML
}

litellm_start() {
  "$LITELLM_VENV/bin/litellm" --config "$1" --host 127.0.0.1 --port "$2" \
    --num_workers "$LITELLM_WORKERS" > "$3" 2>&1 &
  LITELLM_PID=$!
  local _
  for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$2/health/liveliness" 2>/dev/null && return 0
    kill -0 "$LITELLM_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "==> LiteLLM skipped: it did not start (see $3)"; return 1
}

# Virtual keys need LiteLLM's database layer: the `prisma` Python package, whose CLI
# npm-installs Prisma and then downloads Prisma's engine binaries from Prisma's own server.
# That server is not reachable here, so the download is pointed at a closed loopback port
# (no traffic leaves the machine): if the engines are not already cached, this fails.
litellm_try_db() {
  local home="$OUT/prisma-home"
  mkdir -p "$home"
  if ! "$LITELLM_VENV/bin/python" -c 'import prisma' 2>/dev/null; then
    "$LITELLM_VENV/bin/pip" install -q prisma >> "$1" 2>&1 || { echo "pip install prisma failed"; return 1; }
  fi
  if PRISMA_ENGINES_MIRROR=http://127.0.0.1:9 PRISMA_HOME_DIR="$home" \
     PRISMA_BINARY_CACHE_DIR="$home/binaries" timeout 300 "$LITELLM_VENV/bin/prisma" --version >> "$1" 2>&1; then
    return 0
  fi
  echo "Prisma's engine binaries cannot be fetched offline ($(grep -m1 -o 'request to [^ ]*engine[^ ]*' "$1" | sed 's#http://127.0.0.1:9#<engines mirror>#' || echo 'see log'))"
  return 1
}
