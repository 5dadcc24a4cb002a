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
# (5) portcullis-limits: a second gateway whose JWT client also has requests_per_minute,
#     tokens_per_minute (both far above the load, so nothing is refused) and a daily budget
#     priced from [prices], in-memory counters; usage records on (as in every target).
#     portcullis-redis: the same with `[limits] backend = "redis"`, when Redis answers on
#     BENCH_REDIS_URL (default redis://127.0.0.1:6379; loopback only), under a unique prefix.
# (6) litellm: LiteLLM's proxy (bench/litellm.sh; a venv in bench/out, from PyPI) with its
#     master key and router rpm/tpm limits; BENCH_SKIP_LITELLM=1 skips it.
# Each at 1 connection and at 64 connections. Prints throughput, p50/p99 latency, the
# ratios Portcullis/nginx, authenticated/unauthenticated, limits/JWT and Portcullis/LiteLLM,
# the latency each proxy adds over direct, the proxy's CPU time per request, and
# Portcullis's RSS.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-10}"
ROUNDS="${ROUNDS:-3}"
. bench/common.sh
. bench/litellm.sh
bench_setup nginx:nginx-light wrk:wrk
UP_PORT=$(free_port); NGX_PORT=$(free_port); PCL_PORT=$(free_port); PCL1_PORT=$(free_port)
PCLL_PORT=$(free_port); PCLL_ADMIN=$(free_port); PCLR_PORT=$(free_port); LLM_PORT=$(free_port)

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
# The limited gateway: the JWT client "bench" with limits that never refuse at this load.
LIMITS='requests_per_minute = 100000000
tokens_per_minute = 100000000
budget = { usd = 1000000.0, period = "day" }'
PRICES='[prices."gpt-4o"]
input = 2.5
output = 10.0'
rm -f "$OUT"/limits-keys.db* "$OUT"/redis-keys.db*
gateway_conf "$OUT/portcullis-limits.toml" "$PCLL_PORT" "$UP_PORT" limits- "" "$LIMITS" \
  "$PRICES
[limits]
backend = \"memory\"" "127.0.0.1:$PCLL_ADMIN"
REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
REDIS_PREFIX="pclbench-$$-$(date +%s)"
REDIS=0
if [[ "$REDIS_URL" =~ ^redis://(127\.0\.0\.1|localhost)(:[0-9]+)?(/[0-9]+)?$ ]] && command -v redis-cli >/dev/null &&
   [ "$(redis-cli -u "$REDIS_URL" ping 2>/dev/null)" = PONG ]; then
  REDIS=1
  gateway_conf "$OUT/portcullis-redis.toml" "$PCLR_PORT" "$UP_PORT" redis- "" "$LIMITS" \
    "$PRICES
[limits]
backend = \"redis\"
redis_url = \"$REDIS_URL\"
redis_prefix = \"$REDIS_PREFIX\""
  REDIS_PID=$(redis-cli -u "$REDIS_URL" info server | awk -F: '/^process_id:/ {print $2}' | tr -d '\r')
  [ -r "/proc/$REDIS_PID/stat" ] || REDIS_PID=""
else
  echo "==> portcullis-redis skipped: no Redis answering on $REDIS_URL (loopback only)"
fi
LITELLM=0
if litellm_setup; then
  LITELLM=1
  litellm_conf "$OUT/litellm.yaml" "$UP_PORT"
  post_lua "$OUT/post-litellm.lua" Authorization "Bearer $LITELLM_KEY"
  : > "$OUT/litellm-db.log"
  if LLM_DB=$(litellm_try_db "$OUT/litellm-db.log"); then
    LLM_DB="Prisma engines available, but this harness does not run the virtual-key target yet"
  fi
  echo "==> LiteLLM virtual keys (database layer): $LLM_DB"
fi
mkdir -p "$OUT/tmp"; : > "$OUT/audit.log"; : > "$OUT/limits-audit.log"; : > "$OUT/redis-audit.log"

PIDS=()
cleanup() {
  "$NGINX" -c "$OUT/upstream.conf" -s stop 2>/dev/null || true
  "$NGINX" -c "$OUT/proxy.conf" -s stop 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$REDIS" = 1 ]; then  # only this run's keys
    redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX*" | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null || true
  fi
}
trap cleanup EXIT

"$NGINX" -c "$OUT/upstream.conf"
"$NGINX" -c "$OUT/proxy.conf"
"$BIN" serve --config "$OUT/portcullis.toml" 2>"$OUT/portcullis.log" &
PCL_PID=$!; PIDS+=("$PCL_PID")
"$BIN" serve --config "$OUT/portcullis-w1.toml" 2>"$OUT/portcullis-w1.log" &
PCL1_PID=$!; PIDS+=("$PCL1_PID")
"$BIN" serve --config "$OUT/portcullis-limits.toml" 2>"$OUT/portcullis-limits.log" &
PCLL_PID=$!; PIDS+=("$PCLL_PID")
PCLR_PID=""
if [ "$REDIS" = 1 ]; then
  "$BIN" serve --config "$OUT/portcullis-redis.toml" 2>"$OUT/portcullis-redis.log" &
  PCLR_PID=$!; PIDS+=("$PCLR_PID")
fi
LITELLM_PID=""
if [ "$LITELLM" = 1 ]; then
  echo "==> starting LiteLLM $LITELLM_VERSION ($LITELLM_WORKERS workers)"
  litellm_start "$OUT/litellm.yaml" "$LLM_PORT" "$OUT/litellm.log" || LITELLM=0
  [ -n "$LITELLM_PID" ] && PIDS+=("$LITELLM_PID")
fi

wait_answering "$UP_PORT" "$NGX_PORT" "$PCL_PORT" "$PCL1_PORT" "$PCLL_PORT"
[ "$REDIS" = 1 ] && wait_answering "$PCLR_PORT"
# The limited gateways must really be limiting: their answers carry x-ratelimit-* headers.
check_limited() { # port name
  local h; h=$(curl -sS -D - -o /dev/null -X POST -H "Authorization: Bearer $JWT" \
    -H 'Content-Type: application/json' "http://127.0.0.1:$1$PATH_Q" \
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":16}')
  if ! grep -qi '^x-ratelimit-remaining-requests:' <<<"$h" || ! grep -q '^HTTP/1.1 200' <<<"$h"; then
    echo "error: $2 answered without x-ratelimit-* headers or not 200:"; echo "$h"; exit 1
  fi
  echo "==> $2: $(grep -i '^x-ratelimit-limit-requests:' <<<"$h" | tr -d '\r')"
}
check_limited "$PCLL_PORT" portcullis-limits
[ "$REDIS" = 1 ] && check_limited "$PCLR_PORT" portcullis-redis
if [ "$LITELLM" = 1 ]; then
  code=$(curl -sS -o "$OUT/litellm-answer.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $LITELLM_KEY" \
    -H 'Content-Type: application/json' "http://127.0.0.1:$LLM_PORT/v1/chat/completions" \
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' || true)
  if [ "$code" != 200 ]; then
    echo "==> LiteLLM skipped: its answer was $code: $(head -c 400 "$OUT/litellm-answer.json")"; LITELLM=0
  fi
fi
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
RSS_IDLE=$(rss "$PCL_PID")

run() { # name port conns [lua script]   (uses $ROUND)
  local threads=2; [ "$3" = 1 ] && threads=1
  local script="$OUT/${4:-post}.lua" path="$PATH_Q"
  [ "$2" = "$LLM_PORT" ] && path=/v1/chat/completions
  wrk -t"$threads" -c"$3" -d1s -s "$script" "http://127.0.0.1:$2$path" > "$OUT/$1-c$3-r$ROUND.warm"  # warm-up
  local before redis_before=0; before=$(cpu_ticks "$2")
  [ "$2" = "$PCLR_PORT" ] && [ -n "$REDIS_PID" ] && redis_before=$(ticks_of "$REDIS_PID")
  wrk -t"$threads" -c"$3" -d"${DUR}s" --latency -s "$script" "http://127.0.0.1:$2$path" > "$OUT/$1-c$3-r$ROUND.txt"
  echo "$(( $(cpu_ticks "$2") - before ))" > "$OUT/$1-c$3-r$ROUND.cpu"
  [ "$2" = "$PCLR_PORT" ] && [ -n "$REDIS_PID" ] && echo "$(( $(ticks_of "$REDIS_PID") - redis_before ))" > "$OUT/$1-c$3-r$ROUND.rcpu"
  return 0
}
ticks_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# A process and all its descendants (LiteLLM's uvicorn workers).
tree() { local p; echo "$1"; for p in $(pgrep -P "$1"); do tree "$p"; done; }
# CPU time (clock ticks, user + system) of the proxy serving PORT — the Portcullis process,
# or the nginx reverse proxy's master and workers; 0 for the direct upstream.
cpu_ticks() {
  local pids=""
  [ "$1" = "$PCL_PORT" ] && pids=$PCL_PID
  [ "$1" = "$PCL1_PORT" ] && pids=$PCL1_PID
  [ "$1" = "$PCLL_PORT" ] && pids=$PCLL_PID
  [ "$1" = "$PCLR_PORT" ] && pids=$PCLR_PID
  [ "$1" = "$LLM_PORT" ] && pids=$(tree "$LITELLM_PID" | tr '\n' ' ')
  if [ "$1" = "$NGX_PORT" ]; then
    local master; master=$(cat "$OUT/proxy.pid")
    pids="$master $(pgrep -P "$master" | tr '\n' ' ')"
  fi
  local total=0 p
  for p in $pids; do total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) )); done
  echo "$total"
}
rm -f "$OUT"/*-r[0-9]*.txt "$OUT"/*-r[0-9]*.cpu "$OUT"/*-r[0-9]*.rcpu "$OUT"/*-r[0-9]*.warm
for ROUND in $(seq 1 "$ROUNDS"); do
  echo "==> round $ROUND of $ROUNDS"
  for c in 1 64; do
    run direct "$UP_PORT" "$c"
    run nginx "$NGX_PORT" "$c"
    run portcullis "$PCL_PORT" "$c"
    run portcullis-key "$PCL_PORT" "$c" post-key
    run portcullis-jwt "$PCL_PORT" "$c" post-jwt
    run portcullis-limits "$PCLL_PORT" "$c" post-jwt
    [ "$REDIS" = 1 ] && run portcullis-redis "$PCLR_PORT" "$c" post-jwt
    [ "$LITELLM" = 1 ] && run litellm "$LLM_PORT" "$c" post-litellm
    run portcullis-w1 "$PCL1_PORT" "$c"
    [ "$c" = 64 ] && RSS_LOAD=$(rss "$PCL_PID")
  done
done
RSS_PEAK=$(awk '/^VmHWM/ {print $2}' "/proc/$PCL_PID/status")
# Usage records of the limited gateway: every request's record written, none dropped?
sleep 2.5  # the writer's next 1 s tick
USAGE_ROWS=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from usage_records").fetchone()[0])' "$OUT/limits-keys.db")
USAGE_DROPPED=$(curl -fsS "http://127.0.0.1:$PCLL_ADMIN/metrics" | awk '/^portcullis_usage_records_dropped_total/ {s += $2} END {print s + 0}')
TARGETS="direct nginx portcullis portcullis-key portcullis-jwt portcullis-w1 portcullis-limits"
[ "$REDIS" = 1 ] && TARGETS="$TARGETS portcullis-redis"
[ "$LITELLM" = 1 ] && TARGETS="$TARGETS litellm"
export TARGETS USAGE_ROWS USAGE_DROPPED LITELLM_VERSION LITELLM_WORKERS LLM_DB="${LLM_DB:-not tried}"

python3 - "$OUT" "$RSS_IDLE" "$RSS_LOAD" "$RSS_PEAK" "$DUR" "$ROUNDS" <<'PY'
import os, re, sys, datetime
from statistics import median
out, idle, load, peak, dur, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
TARGETS = tuple(os.environ["TARGETS"].split())
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
            "sock": sock.group(1) if sock else "", "cpu": cpu, "reqs": reqs}
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
def ratio(a, b, c, f):
    return per_round(c, lambda k: R[(a, c, k)][f] / R[(b, c, k)][f])
for c in (1, 64):
    each = ", ".join(f"{R[('portcullis-limits', c, k)]['rps'] / R[('portcullis-jwt', c, k)]['rps']:.2f}"
                     for k in range(1, rounds + 1))
    line = (f"- {c} conn, limits vs JWT without limits: throughput {ratio('portcullis-limits', 'portcullis-jwt', c, 'rps'):.2f}x "
            f"(rounds: {each}), p50 {ratio('portcullis-limits', 'portcullis-jwt', c, 'p50'):.2f}x; gateway CPU per request "
            f"JWT {med('portcullis-jwt', c, 'cpu'):.1f} us, limits {med('portcullis-limits', c, 'cpu'):.1f} us "
            f"= {ratio('portcullis-limits', 'portcullis-jwt', c, 'cpu'):.2f}x")
    if "portcullis-redis" in TARGETS:
        line += (f"; redis backend: throughput {ratio('portcullis-redis', 'portcullis-jwt', c, 'rps'):.2f}x, "
                 f"gateway CPU {med('portcullis-redis', c, 'cpu'):.1f} us "
                 f"= {ratio('portcullis-redis', 'portcullis-jwt', c, 'cpu'):.2f}x")
        rc = [int(open(f"{out}/portcullis-redis-c{c}-r{k}.rcpu").read()) * tick / max(R[("portcullis-redis", c, k)]["reqs"], 1)
              for k in range(1, rounds + 1) if os.path.exists(f"{out}/portcullis-redis-c{c}-r{k}.rcpu")]
        if rc:
            line += f" (+ redis-server {median(rc):.1f} us)"
    print(line)
warm = sum(int(m.group(1)) for n in ("portcullis-limits",) for c in (1, 64) for k in range(1, rounds + 1)
           if (m := re.search(r"(\d+) requests in", open(f"{out}/{n}-c{c}-r{k}.warm").read())))
sent = warm + sum(R[("portcullis-limits", c, k)]["reqs"] for c in (1, 64) for k in range(1, rounds + 1))
print(f"- portcullis-limits usage records: {int(os.environ['USAGE_ROWS']):,} stored for ~{sent + 1:,} requests "
      f"(wrk's count, plus the header check; a request wrk cut off at the end may be missing), "
      f"{os.environ['USAGE_DROPPED']} dropped")
if "litellm" in TARGETS:
    for c in (1, 64):
        for name in ("portcullis-limits", "portcullis-jwt"):
            tput = ratio(name, "litellm", c, "rps")
            lat = per_round(c, lambda k: added(name, c, k) / added("litellm", c, k))
            print(f"- {c} conn, {name} vs LiteLLM: throughput {tput:.1f}x; added p50 over direct "
                  f"{per_round(c, lambda k: added(name, c, k)) * 1000:.0f} us vs LiteLLM's "
                  f"{per_round(c, lambda k: added('litellm', c, k)) * 1000:.0f} us (= {lat:.3f}x); proxy CPU per request "
                  f"{med(name, c, 'cpu'):.1f} us vs {med('litellm', c, 'cpu'):.0f} us")
    print(f"- LiteLLM {os.environ['LITELLM_VERSION']}, {os.environ['LITELLM_WORKERS']} workers, master key, router "
          f"rpm/tpm per deployment (usage-based-routing-v2); virtual keys: {os.environ['LLM_DB']}")
print(f"- portcullis RSS: idle {idle/1024:.1f} MB, after load {load/1024:.1f} MB, peak {peak/1024:.1f} MB")
PY
