#!/usr/bin/env bash
# Instructions per request on the gateway's request path, counted by callgrind.
#
#   bench/callgrind.sh                        (builds the release binary)
#   PORTCULLIS_BIN=path bench/callgrind.sh    (an already-built binary)
#   REQUESTS=2000 WARMUP=300 bench/callgrind.sh
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
OUT="bench/out"
mkdir -p "$OUT/tmp"
OUT="$(cd "$OUT" && pwd)"

need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! need nginx || ! need valgrind; then
  echo "==> installing nginx and valgrind (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light valgrind >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
if [ -n "${PORTCULLIS_BIN:-}" ]; then
  BIN="$PORTCULLIS_BIN"
else
  echo "==> building portcullis (release)"
  cargo build --release --locked -q
  BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/portcullis"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port); PCL_PORT=$(free_port)
BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Portcullis benchmark answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}'
cat > "$OUT/cg-upstream.conf" <<NGX
worker_processes 1;
pid $OUT/cg-upstream.pid;
error_log $OUT/cg-upstream.err warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $OUT/tmp; proxy_temp_path $OUT/tmp; fastcgi_temp_path $OUT/tmp;
  uwsgi_temp_path $OUT/tmp; scgi_temp_path $OUT/tmp;
  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$BODY'; }
  }
}
NGX
cat > "$OUT/cg-portcullis.toml" <<TOML
[server]
listen = "127.0.0.1:$PCL_PORT"
workers = 1
[admin]
listen = ""
[audit]
path = "$OUT/cg-audit.log"
[store]
url = "sqlite://$OUT/cg-keys.db"
key_hmac_secret = "bench-store-secret-0123456789abcdef0123456789"
[[issuers]]
name = "bench"
issuer = "https://bench.idp.invalid"
audiences = ["api://bench"]
algorithms = ["HS256"]
hmac_secret = "bench-jwt-secret-0123456789abcdef0123456789"
[[clients]]
id = "anon"
anonymous = true
deployments = ["*"]
operations = ["*"]
[[backends]]
name = "upstream"
url = "http://127.0.0.1:$UP_PORT"
deployments = { "gpt-4o" = "gpt-4o" }
TOML
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

echo "instructions per request ($REQUESTS keep-alive POSTs, workers = 1):"
for f in "$OUT"/callgrind.out.*; do
  total=$(awk '/^totals:/ {print $2}' "$f")
  thread=$(awk -F'[ :]+' '/^thread:/ {print $2}' "$f")
  [ "${total:-0}" -gt $((REQUESTS * 100)) ] || continue
  # The worker thread runs the request path; the audit writer formats and writes the lines.
  role=other
  grep -q 'fn=.*Gateway.*pipeline' "$f" && role=worker
  grep -q 'fn=.*audit.*write_loop' "$f" && role=audit
  echo "  thread $thread ($role): $(( total / REQUESTS ))"
done
