#!/usr/bin/env bash
# Many concurrent SSE streams through the gateway, and the gateway's resident set.
#
#   bench/streams.sh                  (10,000 streams)
#   STREAMS=2000 RATE=500 WORDS=40 bench/streams.sh
#   PORTCULLIS_BIN=path bench/streams.sh   (an already-built gateway, e.g. an earlier build)
#   STREAMS_PEERS=path bench/streams.sh    (an already-built bench/streams example)
#   WRAP="heaptrack -o FILE" bench/streams.sh  (the gateway run under a tool)
#
# Three processes on 127.0.0.1: the project's simulator answering every streamed chat with
# WORDS words, one event per LATENCY_MS (bench/streams/main.rs `sim`); the gateway (release
# build, `workers` = WORKERS, default one per core) in front of it; and the load client
# (`load`), which opens STREAMS connections at RATE per second, each one streaming chat, and
# reads them all at once. The client samples the gateway's VmRSS and prints it before any
# stream, when all are open, once each has received KIB KiB of events, at the peak and after
# all ended, with the growth per stream; and the stalls (a stream with no byte for > 3 s) and
# failures. Exit status 1 when a stream stalled or failed.
#
# File descriptors: the gateway needs two per stream (client and backend), the simulator and
# the client one each. The soft limit is raised to the hard one; when that is still too low
# for STREAMS and this shell may raise the hard limit (root), it does; otherwise the bound
# is printed and STREAMS lowered to fit.
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS="${STREAMS:-10000}"
RATE="${RATE:-500}"
WORDS="${WORDS:-40}"
LATENCY_MS="${LATENCY_MS:-1000}"
KIB="${KIB:-4}"
WORKERS="${WORKERS:-0}"
. bench/common.sh

need=$((2 * STREAMS + 256))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$need" ]; then
  ulimit -Hn "$need" 2>/dev/null || true
  hard=$(ulimit -Hn)
fi
ulimit -Sn "$hard"
soft=$(ulimit -n)
if [ "$soft" != unlimited ] && [ "$soft" -lt "$need" ]; then
  fit=$(((soft - 256) / 2))
  echo "==> file descriptor limit $soft bounds the run: $fit streams (of $STREAMS asked)"
  STREAMS=$fit
fi
echo "==> file descriptor limit $soft (gateway needs $((2 * STREAMS + 256)))"

# Two builds: an example turns on the dev-dependencies' features (tokio's test-util), which
# the gateway under test must not have.
if [ -n "${PORTCULLIS_BIN:-}" ]; then
  BIN="$PORTCULLIS_BIN"
else
  echo "==> building portcullis (release)"
  cargo build --release --locked -q --bin portcullis
  BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/portcullis"
fi
if [ -n "${STREAMS_PEERS:-}" ]; then
  PEERS="$STREAMS_PEERS"
else
  echo "==> building the bench peers (release)"
  cargo build --release --locked -q --example streams
  PEERS="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/streams"
fi

SIM_PID=""; PCL_PID=""
cleanup() {
  [ -n "$PCL_PID" ] && kill "$PCL_PID" 2>/dev/null || true
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
}
trap cleanup EXIT

"$PEERS" sim --words "$WORDS" --latency-ms "$LATENCY_MS" > "$OUT/streams-sim.out" 2>&1 &
SIM_PID=$!
for _ in $(seq 1 100); do
  grep -q '^listening ' "$OUT/streams-sim.out" && break
  sleep 0.1
done
SIM_URL=$(awk '/^listening / {print $2}' "$OUT/streams-sim.out")
[ -n "$SIM_URL" ] || { echo "the simulator did not start"; cat "$OUT/streams-sim.out"; exit 1; }

PCL_PORT=$(free_port)
cat > "$OUT/streams-portcullis.toml" <<TOML
[server]
listen = "127.0.0.1:$PCL_PORT"
workers = $WORKERS
header_timeout = "60s"
[admin]
listen = ""
[audit]
path = "$OUT/streams-audit.log"
[[clients]]
id = "anon"
anonymous = true
deployments = ["*"]
operations = ["*"]
[[backends]]
name = "sim"
url = "$SIM_URL"
deployments = { "gpt-4o" = "gpt-4o" }
# The simulator shares the two cores and accepts thousands of connections a second: a SYN
# it could not take at once is retried after 1 s, which the default 2 s connect timeout
# does not always cover.
timeouts = { connect = "10s", first_byte = "60s", idle = "30s" }
TOML
rm -f "$OUT/streams-audit.log"
${WRAP:-} "$BIN" serve --config "$OUT/streams-portcullis.toml" 2>"$OUT/streams-portcullis.log" &
PCL_PID=$!
if [ -n "${WRAP:-}" ]; then
  # The gateway is a child of the wrapper: find it.
  for _ in $(seq 1 100); do
    child=$(pgrep -P "$PCL_PID" -f "serve --config" || true)
    [ -n "$child" ] && break
    sleep 0.1
  done
  [ -n "$child" ] && PCL_PID=$child
fi
wait_answering "$PCL_PORT"
sleep 1

echo "==> $STREAMS streams, $RATE/s, $WORDS events each, one per $LATENCY_MS ms; gateway pid $PCL_PID"
"$PEERS" load --addr "127.0.0.1:$PCL_PORT" --streams "$STREAMS" --rate "$RATE" --pid "$PCL_PID" --kib "$KIB"
