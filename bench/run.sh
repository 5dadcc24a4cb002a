#!/usr/bin/env bash
# Benchmark: direct vs nginx reverse proxy vs Portcullis, on this machine, in one run.
#
#   bench/run.sh [duration-seconds]      (default 10)
#
# (1) direct: wrk → nginx "upstream" answering a canned chat completion (`return 200`)
# (2) nginx:  wrk → nginx reverse proxy (keepalive upstream, proxy_buffering off) → upstream
# (3) portcullis: wrk → portcullis (release build) → upstream
# Each at 1 connection and at 64 connections. Prints throughput, p50/p99 latency, the
# ratios Portcullis/nginx, the latency each proxy adds over direct, and Portcullis's RSS.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-10}"
OUT="bench/out"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! need nginx || ! need wrk; then
  echo "==> installing nginx and wrk (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

echo "==> building portcullis (release)"
cargo build --release --locked -q
BIN="$PWD/target/release/portcullis"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port); NGX_PORT=$(free_port); PCL_PORT=$(free_port); PCL1_PORT=$(free_port)

BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Portcullis benchmark answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}'

# An nginx config: NAME, then the http-block body. Both nginx instances share the rest.
nginx_conf() {
  cat > "$OUT/$1.conf" <<NGX
worker_processes auto;
pid $OUT/$1.pid;
error_log $OUT/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $OUT/tmp; proxy_temp_path $OUT/tmp; fastcgi_temp_path $OUT/tmp;
  uwsgi_temp_path $OUT/tmp; scgi_temp_path $OUT/tmp;
$2
}
NGX
}
nginx_conf upstream "  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$BODY'; }
  }"
nginx_conf proxy "  upstream backend { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }
  }"
cat > "$OUT/portcullis.toml" <<TOML
[server]
listen = "127.0.0.1:$PCL_PORT"
[admin]
listen = ""
[audit]
path = "$OUT/audit.log"
[[backends]]
name = "upstream"
url = "http://127.0.0.1:$UP_PORT"
deployments = { "gpt-4o" = "gpt-4o" }
TOML
cat > "$OUT/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "bench-client-key"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"Say something short."}],"max_tokens":16}'
LUA
# The same gateway with one worker thread: on this 2-core box the load generator and the
# upstream share the cores, so fewer, busier threads batch more work per wake-up.
sed -e "s/127.0.0.1:$PCL_PORT/127.0.0.1:$PCL1_PORT/" -e 's/^\[server\]$/[server]\nworkers = 1/' \
  "$OUT/portcullis.toml" > "$OUT/portcullis-w1.toml"
mkdir -p "$OUT/tmp"; : > "$OUT/audit.log"

PIDS=()
cleanup() {
  "$NGINX" -c "$OUT/upstream.conf" -s stop 2>/dev/null || true
  "$NGINX" -c "$OUT/proxy.conf" -s stop 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

"$NGINX" -c "$OUT/upstream.conf"
"$NGINX" -c "$OUT/proxy.conf"
"$BIN" serve --config "$OUT/portcullis.toml" 2>"$OUT/portcullis.log" &
PCL_PID=$!; PIDS+=("$PCL_PID")
"$BIN" serve --config "$OUT/portcullis-w1.toml" 2>"$OUT/portcullis-w1.log" &
PCL1_PID=$!; PIDS+=("$PCL1_PID")

PATH_Q="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
for port in $UP_PORT $NGX_PORT $PCL_PORT $PCL1_PORT; do
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null -X POST "http://127.0.0.1:$port$PATH_Q" -d '{"model":"gpt-4o"}' && break
    sleep 0.1
  done
done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
RSS_IDLE=$(rss "$PCL_PID")

run() { # name port conns
  local threads=2; [ "$3" = 1 ] && threads=1
  wrk -t"$threads" -c"$3" -d2s -s "$OUT/post.lua" "http://127.0.0.1:$2$PATH_Q" >/dev/null  # warm-up
  wrk -t"$threads" -c"$3" -d"${DUR}s" --latency -s "$OUT/post.lua" "http://127.0.0.1:$2$PATH_Q" > "$OUT/$1-c$3.txt"
}
for c in 1 64; do
  run direct "$UP_PORT" "$c"
  run nginx "$NGX_PORT" "$c"
  run portcullis "$PCL_PORT" "$c"
  run portcullis-w1 "$PCL1_PORT" "$c"
  [ "$c" = 64 ] && RSS_LOAD=$(rss "$PCL_PID")
done
RSS_PEAK=$(awk '/^VmHWM/ {print $2}' "/proc/$PCL_PID/status")

python3 - "$OUT" "$RSS_IDLE" "$RSS_LOAD" "$RSS_PEAK" "$DUR" <<'PY'
import re, sys, datetime
out, idle, load, peak, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
def parse(name, c):
    t = open(f"{out}/{name}-c{c}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    p = {k: ms(v) for k, v in re.findall(r"^\s+(50|99)%\s+(\S+)", t, re.M)}
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    sock = re.search(r"Socket errors: (.*)", t)
    return rps, p["50"], p["99"], int(errs.group(1)) if errs else 0, sock.group(1) if sock else ""
print(f"\n## {datetime.date.today()} — {dur}s per run, wrk, 2-core machine\n")
print("| target | conns | req/s | p50 ms | p99 ms | non-2xx |")
print("|---|---|---|---|---|---|")
r = {}
for c in (1, 64):
    for n in ("direct", "nginx", "portcullis", "portcullis-w1"):
        r[(n, c)] = parse(n, c)
        rps, p50, p99, e, s = r[(n, c)]
        print(f"| {n} | {c} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {e}{' ' + s if s else ''} |")
print()
for c in (1, 64):
    d, n = r[("direct", c)], r[("nginx", c)]
    add_n = n[1] - d[1]
    for name in ("portcullis", "portcullis-w1"):
        p = r[(name, c)]
        add_p = p[1] - d[1]
        ratio = add_p / add_n if add_n > 0 else float("inf")
        print(f"- {c} conn, {name}: throughput vs nginx = {p[0]/n[0]:.2f}x; "
              f"added p50 over direct: nginx {add_n*1000:.0f} us, {name} {add_p*1000:.0f} us "
              f"(= {ratio:.2f}x nginx's); p99 vs nginx = {p[2]/n[2]:.2f}x")
print(f"- portcullis RSS: idle {idle/1024:.1f} MB, after load {load/1024:.1f} MB, peak {peak/1024:.1f} MB")
PY
