#!/usr/bin/env bash
# Instructions per request on the gateway's request path, counted by callgrind.
#
#   bench/callgrind.sh                        (builds the release binary)
#   PORTCULLIS_BIN=path bench/callgrind.sh    (an already-built binary)
#   REQUESTS=2000 WARMUP=300 bench/callgrind.sh
#   TELEMETRY=1 bench/callgrind.sh            (traces on, 100% sampled, exported over OTLP/HTTP
#                                              to an nginx sink answering 200; the default
#                                              batch_delay and max_queue)
#
# The gateway runs under `valgrind --tool=callgrind` with `workers = 1`, configured as
# bench/run.sh configures it (anonymous client, a `[store]`, one issuer), in front of an nginx
# `return 200` upstream. After WARMUP keep-alive POSTs on one connection, instrumentation is
# switched on for exactly REQUESTS more, then off. Instruction counts do not depend on how busy
# the host is (wall-clock figures here vary by 10% and more), so they are the figures to compare
# two builds by. Prints instructions per request for each thread, and keeps the profile in
# bench/out/callgrind.out.* for callgrind_annotate.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${REQUESTS:-2000}"
WARMUP="${WARMUP:-300}"
. bench/common.sh
bench_setup nginx:nginx-light valgrind:valgrind
UP_PORT=$(free_port); PCL_PORT=$(free_port)
TELEMETRY_TOML=""
if [ -n "${TELEMETRY:-}" ]; then
  # The collector: an empty 200 is an empty ExportTraceServiceResponse (full success).
  SINK_PORT=$(free_port)
  nginx_conf cg-upstream 1 "  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$BODY'; }
  }
  server {
    listen 127.0.0.1:$SINK_PORT;
    location / { default_type application/x-protobuf; return 200 ''; }
  }"
  TELEMETRY_TOML="[telemetry]
otlp_endpoint = \"http://127.0.0.1:$SINK_PORT\"
sampling_ratio = 1.0"
else
  upstream_conf cg-upstream 1 "$UP_PORT"
fi
gateway_conf "$OUT/cg-portcullis.toml" "$PCL_PORT" "$UP_PORT" cg- "workers = 1" "" "$TELEMETRY_TOML"
rm -f "$OUT"/callgrind.out.* "$OUT/cg-keys.db"*

PCL_PID=""
cleanup() {
  "$NGINX" -c "$OUT/cg-upstream.conf" -s stop 2>/dev/null || true
  [ -n "$PCL_PID" ] && kill "$PCL_PID" 2>/dev/null || true
}
trap cleanup EXIT
"$NGINX" -c "$OUT/cg-upstream.conf"
valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
  --callgrind-out-file="$OUT/callgrind.out.%p" \
  "$BIN" serve --config "$OUT/cg-portcullis.toml" 2>"$OUT/cg-portcullis.log" &
PCL_PID=$!

python3 - "$PCL_PORT" "$WARMUP" "$REQUESTS" "$PCL_PID" <<'PY'
import http.client, subprocess, sys, time
port, warmup, requests, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say something short."}],"max_tokens":16}'
deadline = time.monotonic() + 120
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/health"); c.getresponse().read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the gateway did not start under valgrind within 120 s")
        time.sleep(0.5)
def post(n):
    for _ in range(n):
        c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"unexpected status {r.status}")
post(warmup)
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, stdout=subprocess.DEVNULL)
post(requests)
subprocess.run(["callgrind_control", "-i", "off", pid], check=True, stdout=subprocess.DEVNULL)
PY
kill -TERM "$PCL_PID"; wait "$PCL_PID" || true; PCL_PID=""

echo "instructions per request ($REQUESTS keep-alive POSTs, workers = 1${TELEMETRY:+, traces on at 100%}):"
all=0
for f in "$OUT"/callgrind.out.*; do
  total=$(awk '/^totals:/ {print $2}' "$f")
  thread=$(awk -F'[ :]+' '/^thread:/ {print $2}' "$f")
  [ "${total:-0}" -gt $((REQUESTS * 100)) ] || continue
  # The worker thread runs the request path; the audit writer formats and writes the lines.
  role=other
  grep -q 'fn=.*Gateway.*pipeline' "$f" && role=worker
  grep -q 'fn=.*portcullis::audit::\(write_loop\|AuditSink::start\)' "$f" && role=audit
  # The trace exporter's thread (batches of encoded spans, the OTLP/HTTP client).
  grep -q 'fn=.*portcullis::telemetry::export::run' "$f" && [ "$role" = other ] && role=telemetry
  all=$(( all + total ))
  echo "  thread $thread ($role): $(( total / REQUESTS ))"
done
echo "  all threads: $(( all / REQUESTS ))"
