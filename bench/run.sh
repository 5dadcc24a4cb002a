#!/usr/bin/env bash
# Benchmark: direct vs nginx reverse proxy vs Portcullis, on this machine, in one run.
#
#   bench/run.sh [duration-seconds]      (default 10)
#   PORTCULLIS_BIN=path bench/run.sh 5    (an already-built binary, e.g. a saved earlier build)
#   ROUNDS=5 bench/run.sh 5                 (rounds; default 3)
#
# Every target is measured once per round, the rounds interleaved, and the report gives
# medians — of each figure, and of each ratio taken within a round — so a host whose speed
# drifts during the run (shared VMs do, by 2x) skews neither side of a comparison.
#
# (1) direct: wrk → nginx "upstream" answering a canned chat completion (`return 200`)
# (2) nginx:  wrk → nginx reverse proxy (keepalive upstream, proxy_buffering off) → upstream
# (3) portcullis: wrk → portcullis (release build) → upstream, as an anonymous client
# (4) portcullis-key / portcullis-jwt: the same gateway, the caller identified by an API key
#     it issued / by an HS256 JWT (verified once, then from the verified-token cache)
# Each at 1 connection and at 64 connections. Prints throughput, p50/p99 latency, the
# ratios Portcullis/nginx and authenticated/unauthenticated, the latency each proxy adds
# over direct, and Portcullis's RSS.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-10}"
ROUNDS="${ROUNDS:-3}"
. bench/common.sh
bench_setup nginx:nginx-light wrk:wrk
UP_PORT=$(free_port); NGX_PORT=$(free_port); PCL_PORT=$(free_port); PCL1_PORT=$(free_port)

upstream_conf upstream auto "$UP_PORT"
proxy_conf proxy "$NGX_PORT" "$UP_PORT"
gateway_conf "$OUT/portcullis.toml" "$PCL_PORT" "$UP_PORT" "" ""
rm -f "$OUT/keys.db"
API_KEY=$("$BIN" keys create --config "$OUT/portcullis.toml" --client bench --name bench 2>/dev/null)
JWT=$(python3 - "$JWT_SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
now = int(time.time())
h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b64(json.dumps({"iss": "https://bench.idp.invalid", "aud": "api://bench", "azp": "bench-app",
                    "sub": "bench-user", "iat": now, "exp": now + 7200}).encode())
sig = hmac.new(sys.argv[1].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
print(f"{h}.{p}.{b64(sig)}")
PY
)
post_lua "$OUT/post.lua"
post_lua "$OUT/post-key.lua" api-key "$API_KEY"
post_lua "$OUT/post-jwt.lua" Authorization "Bearer $JWT"
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

wait_answering "$UP_PORT" "$NGX_PORT" "$PCL_PORT" "$PCL1_PORT"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
RSS_IDLE=$(rss "$PCL_PID")

run() { # name port conns [lua script]   (uses $ROUND)
  local threads=2; [ "$3" = 1 ] && threads=1
  local script="$OUT/${4:-post}.lua"
  wrk -t"$threads" -c"$3" -d1s -s "$script" "http://127.0.0.1:$2$PATH_Q" >/dev/null  # warm-up
  local before; before=$(cpu_ticks "$2")
  wrk -t"$threads" -c"$3" -d"${DUR}s" --latency -s "$script" "http://127.0.0.1:$2$PATH_Q" > "$OUT/$1-c$3-r$ROUND.txt"
  echo "$(( $(cpu_ticks "$2") - before ))" > "$OUT/$1-c$3-r$ROUND.cpu"
}
# CPU time (clock ticks, user + system) of the proxy serving PORT — the Portcullis process,
# or the nginx reverse proxy's master and workers; 0 for the direct upstream.
cpu_ticks() {
  local pids=""
  [ "$1" = "$PCL_PORT" ] && pids=$PCL_PID
  [ "$1" = "$PCL1_PORT" ] && pids=$PCL1_PID
  if [ "$1" = "$NGX_PORT" ]; then
    local master; master=$(cat "$OUT/proxy.pid")
    pids="$master $(pgrep -P "$master" | tr '\n' ' ')"
  fi
  local total=0 p
  for p in $pids; do total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done
  echo "$total"
}
rm -f "$OUT"/*-r[0-9]*.txt "$OUT"/*-r[0-9]*.cpu
for ROUND in $(seq 1 "$ROUNDS"); do
  echo "==> round $ROUND of $ROUNDS"
  for c in 1 64; do
    run direct "$UP_PORT" "$c"
    run nginx "$NGX_PORT" "$c"
    run portcullis "$PCL_PORT" "$c"
    run portcullis-key "$PCL_PORT" "$c" post-key
    run portcullis-jwt "$PCL_PORT" "$c" post-jwt
    run portcullis-w1 "$PCL1_PORT" "$c"
    [ "$c" = 64 ] && RSS_LOAD=$(rss "$PCL_PID")
  done
done
RSS_PEAK=$(awk '/^VmHWM/ {print $2}' "/proc/$PCL_PID/status")

python3 - "$OUT" "$RSS_IDLE" "$RSS_LOAD" "$RSS_PEAK" "$DUR" "$ROUNDS" <<'PY'
import os, re, sys, datetime
from statistics import median
out, idle, load, peak, dur, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
TARGETS = ("direct", "nginx", "portcullis", "portcullis-key", "portcullis-jwt", "portcullis-w1")
tick = 1e6 / os.sysconf("SC_CLK_TCK")
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
def parse(name, c, k):
    t = open(f"{out}/{name}-c{c}-r{k}.txt").read()
    p = {q: ms(v) for q, v in re.findall(r"^\s+(50|99)%\s+(\S+)", t, re.M)}
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    sock = re.search(r"Socket errors: (.*)", t)
    reqs = int(re.search(r"(\d+) requests in", t).group(1))
    cpu = int(open(f"{out}/{name}-c{c}-r{k}.cpu").read()) * tick / max(reqs, 1)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)), "p50": p["50"],
            "p99": p["99"], "errs": int(errs.group(1)) if errs else 0,
            "sock": sock.group(1) if sock else "", "cpu": cpu}
R = {(n, c, k): parse(n, c, k) for n in TARGETS for c in (1, 64) for k in range(1, rounds + 1)}
def med(n, c, f):
    return median(R[(n, c, k)][f] for k in range(1, rounds + 1))
def per_round(c, f):
    """Median over rounds of f(round)."""
    return median(f(k) for k in range(1, rounds + 1))
print(f"\n## {datetime.date.today()} — {rounds} interleaved rounds of {dur}s per target, wrk, "
      f"{os.cpu_count()}-core machine; medians\n")
print("| target | conns | req/s | p50 ms | p99 ms | proxy CPU µs/req | non-2xx |")
print("|---|---|---|---|---|---|---|")
for c in (1, 64):
    for n in TARGETS:
        errs = sum(R[(n, c, k)]["errs"] for k in range(1, rounds + 1))
        sock = "; ".join(s for k in range(1, rounds + 1) if (s := R[(n, c, k)]["sock"]))
        cpu = f"{med(n, c, 'cpu'):.1f}" if n != "direct" else "–"
        print(f"| {n} | {c} | {med(n, c, 'rps'):,.0f} | {med(n, c, 'p50'):.3f} | {med(n, c, 'p99'):.3f} "
              f"| {cpu} | {errs}{' ' + sock if sock else ''} |")
print()
def added(n, c, k):
    return R[(n, c, k)]["p50"] - R[("direct", c, k)]["p50"]
for c in (1, 64):
    for name in ("portcullis", "portcullis-w1"):
        tput = per_round(c, lambda k: R[(name, c, k)]["rps"] / R[("nginx", c, k)]["rps"])
        lat = per_round(c, lambda k: added(name, c, k) / added("nginx", c, k) if added("nginx", c, k) > 0 else float("inf"))
        p99 = per_round(c, lambda k: R[(name, c, k)]["p99"] / R[("nginx", c, k)]["p99"])
        cpu = per_round(c, lambda k: R[(name, c, k)]["cpu"] / max(R[("nginx", c, k)]["cpu"], 1e-9))
        each = ", ".join(f"{R[(name, c, k)]['rps'] / R[('nginx', c, k)]['rps']:.2f}" for k in range(1, rounds + 1))
        print(f"- {c} conn, {name}: throughput vs nginx = {tput:.2f}x (rounds: {each}); added p50 over direct: "
              f"nginx {per_round(c, lambda k: added('nginx', c, k)) * 1000:.0f} us, {name} "
              f"{per_round(c, lambda k: added(name, c, k)) * 1000:.0f} us (= {lat:.2f}x nginx's); "
              f"p99 vs nginx = {p99:.2f}x; proxy CPU per request vs nginx = {cpu:.2f}x")
for c in (1, 64):
    print(f"- {c} conn, authenticated throughput vs unauthenticated: API key "
          f"{per_round(c, lambda k: R[('portcullis-key', c, k)]['rps'] / R[('portcullis', c, k)]['rps']):.2f}x, JWT "
          f"{per_round(c, lambda k: R[('portcullis-jwt', c, k)]['rps'] / R[('portcullis', c, k)]['rps']):.2f}x")
print(f"- portcullis RSS: idle {idle/1024:.1f} MB, after load {load/1024:.1f} MB, peak {peak/1024:.1f} MB")
PY
