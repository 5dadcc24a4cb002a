#!/usr/bin/env bash
# Interleaved A/B runs at 64 connections: nginx and any number of gateway variants, each a
# build and/or a configuration change, measured round by round in one run (req/s and the
# process's CPU per request, user + system, the system part in brackets).
#
#   bench/ab.sh ROUNDS SECONDS NAME=BINARY[:EDITS] ...
#   bench/ab.sh 3 5 before=/tmp/pcl-old after=target/release/portcullis \
#       norecord=target/release/portcullis:bench/experiments/no-usage-records.txt
#
# Every variant gets bench/run.sh's gateway configuration (`gateway_conf`); EDITS is a file of
# lines `SECTION|key = value` (inserted after `[SECTION]`) or `REPLACE|regex|replacement`;
# `$UP_PORT` in them is the upstream nginx's port (bench/experiments/telemetry-on.txt exports
# traces to it: it answers any POST with 200).
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=$1; DUR=$2; shift 2
PORTCULLIS_BIN="${PORTCULLIS_BIN:-/bin/true}"  # the variants name their own binaries
. bench/common.sh
bench_setup nginx:nginx-light wrk:wrk
UP_PORT=$(free_port); NGX_PORT=$(free_port)
export UP_PORT
upstream_conf ab-upstream 1 "$UP_PORT"
proxy_conf ab-proxy "$NGX_PORT" "$UP_PORT"
post_lua "$OUT/ab-post.lua"
PIDS=(); NAMES=(); PORTS=()
cleanup() { "$NGINX" -c "$OUT/ab-upstream.conf" -s stop 2>/dev/null || true; "$NGINX" -c "$OUT/ab-proxy.conf" -s stop 2>/dev/null || true; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
"$NGINX" -c "$OUT/ab-upstream.conf"; "$NGINX" -c "$OUT/ab-proxy.conf"
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}; bin=${rest%%:*}; extra=${rest#*:}
  port=$(free_port)
  rm -f "$OUT/ab-$name-keys.db"*
  gateway_conf "$OUT/ab-$name.toml" "$port" "$UP_PORT" "ab-$name-" ""
  [ -n "$extra" ] && [ "$extra" != "$rest" ] && python3 - "$OUT/ab-$name.toml" "$extra" <<'PY'
import os, sys
p, extra = sys.argv[1], os.path.expandvars(open(sys.argv[2]).read())
t = open(p).read()
# extra: lines "SECTION|line" inserted after [SECTION]
for l in extra.splitlines():
    if not l.strip(): continue
    sec, line = l.split("|", 1)
    if sec == "REPLACE":
        old, new = line.split("|", 1); import re; t = re.sub(old, new, t, count=1); continue
    t = t.replace(f"[{sec}]\n", f"[{sec}]\n{line}\n", 1)
open(p, "w").write(t)
PY
  "$bin" serve --config "$OUT/ab-$name.toml" 2>"$OUT/ab-$name.log" &
  PIDS+=($!); NAMES+=("$name"); PORTS+=("$port")
done
wait_answering "$UP_PORT" "$NGX_PORT" "${PORTS[@]}"
ngx_pids() { local m; m=$(cat "$OUT/ab-proxy.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }
ticks() { local t=0 p; for p in $1; do t=$(( t + $(awk '{print $14 + $15}' /proc/$p/stat) )); done; echo $t; }
sticks() { local t=0 p; for p in $1; do t=$(( t + $(awk '{print $15}' /proc/$p/stat) )); done; echo $t; }
one() { # name port pids
  wrk -t2 -c64 -d1s -s "$OUT/ab-post.lua" "http://127.0.0.1:$2$PATH_Q" >/dev/null
  local b; b=$(ticks "$3"); local sb; sb=$(sticks "$3")
  local r; r=$(wrk -t2 -c64 -d"${DUR}s" -s "$OUT/ab-post.lua" "http://127.0.0.1:$2$PATH_Q" | awk '/Requests\/sec/ {print $2}')
  local a; a=$(ticks "$3"); local sa; sa=$(sticks "$3")
  python3 -c "import sys; r=float('$r'); print(f'$1 r$ROUND {r:9.0f} req/s  cpu {($a-$b)*10000/(r*$DUR):6.1f} us/req (sys {($sa-$sb)*10000/(r*$DUR):5.1f})')"
}
for ROUND in $(seq 1 "$ROUNDS"); do
  one nginx "$NGX_PORT" "$(ngx_pids)"
  for i in "${!NAMES[@]}"; do one "${NAMES[$i]}" "${PORTS[$i]}" "${PIDS[$i]}"; done
done
for i in "${!NAMES[@]}"; do echo "${NAMES[$i]} rss $(awk '/^VmRSS/ {print $2}' /proc/${PIDS[$i]}/status) kB"; done
