#!/usr/bin/env bash
# Benchmark: TLS on the client listener, nginx vs Portcullis with the same certificate and key,
# in one run.
#
#   bench/tls.sh [duration-seconds]       (default 5)
#   ROUNDS=3 bench/tls.sh 5                (rounds; default 2)
#   PORTCULLIS_BIN=path bench/tls.sh 5     (an already-built binary)
#   KEYS=ecdsa bench/tls.sh 5              (server keys: "ecdsa rsa", the default, or one of them)
#   RESUME_CONNS="64 256 512" bench/tls.sh  (connection counts of the resumption check; default "64 256")
#
# A throwaway PKI in bench/out/tls: per key type a CA and a server certificate for
# 127.0.0.1 / localhost (ECDSA P-256; RSA 2048), and an ECDSA client CA with one client
# certificate. The upstream is nginx answering a canned chat completion (`return 200`).
# Targets, per key type:
#   nginx          nginx as a TLS reverse proxy (`listen ... ssl`, TLSv1.2 TLSv1.3,
#                  `ssl_session_cache shared:...:10m` (a zone per server), session tickets
#                  on as by default, keepalive upstream, proxy_buffering off)
#   nginx-noresume the same with `ssl_session_cache off; ssl_session_tickets off`
#                  (every handshake a full one)
#   nginx-mtls     the same as nginx with `ssl_verify_client optional` and the client CA
#   portcullis     bench/run.sh's gateway with `[server.tls]` (the same files), client_auth off
#   portcullis-optional  the same with client_auth = "optional" and the client CA
# and, once, nginx-plain / portcullis-plain (no TLS) for what TLS adds.
# Every target is measured once per round (its measurements back to back), the rounds
# interleaved, and the report gives medians; a gateway runs only while it is measured.
#   (1) keep-alive: wrk -t2 -c64, POSTs (bench/run.sh's), req/s, p50/p99, proxy CPU per
#       request (user + system from /proc), TCP connections accepted per request (the
#       kernel's Tcp PassiveOpens counter: system-wide, so other work on the box adds to it)
#   (2) new connections: the same with `Connection: close`: wrk opens a new TLS connection
#       for every request; it keeps the OpenSSL session (SSL_clear) and offers it again, so
#       its reconnections resume when the server lets them. wrk's latency starts when the
#       request is written, after the handshake: p50/p99 leave the handshake out, req/s does
#       not. A check before the rounds counts, on the wire, the ServerHellos that accepted a
#       pre-shared key (resumed) and those that did not (full), for each target, at 64 and
#       256 connections; nginx and portcullis are also measured at 256 connections (a
#       server's session cache must hold a session per client for all of them to resume).
#   (3) handshakes: `openssl s_time`, one connection at a time, handshake only: `-new` (full
#       TLS 1.3 handshakes) and `-reuse -tls1_2` (resumed TLS 1.2 handshakes; under TLS 1.3
#       s_time never reads the session ticket, which comes after the handshake, so it has
#       nothing to resume), with the client certificate for nginx-mtls and
#       portcullis-optional; handshakes/s and server CPU per handshake.
# wrk cannot present a client certificate: there is no wrk row for client_auth = "optional".
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-5}"
ROUNDS="${ROUNDS:-2}"
KEYS="${KEYS:-ecdsa rsa}"
RESUME_CONNS="${RESUME_CONNS:-64 256}"
. bench/common.sh
bench_setup nginx:nginx-light wrk:wrk openssl:openssl
PKI="$OUT/tls"
rm -rf "$PKI"; mkdir -p "$PKI"

# A CA and a leaf signed by it in DIR: KIND (ecdsa = P-256, rsa = 2048 bits), DIR, the leaf's
# subject CN, extendedKeyUsage, subjectAltName.
pki() {
  local alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ku=digitalSignature d="$2"
  [ "$1" = rsa ] && alg=(-newkey rsa:2048) && ku=digitalSignature,keyEncipherment
  mkdir -p "$d"
  openssl req -x509 "${alg[@]}" -nodes -keyout "$d/ca.key" -out "$d/ca.pem" -days 7 \
    -subj "/CN=Portcullis bench $1 CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req "${alg[@]}" -nodes -keyout "$d/leaf.key" -out "$d/leaf.csr" -subj "/CN=$3" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,%s\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$ku" "$4" "$5" > "$d/leaf.ext"
  openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
    -days 7 -extfile "$d/leaf.ext" -out "$d/leaf.pem" 2>/dev/null
}
for k in $KEYS; do
  case "$k" in ecdsa | rsa) ;; *) echo "error: KEYS takes ecdsa and/or rsa, not $k"; exit 1 ;; esac
  pki "$k" "$PKI/$k" localhost serverAuth "IP:127.0.0.1,DNS:localhost"
  echo "==> $k: $(openssl x509 -in "$PKI/$k/leaf.pem" -noout -text | awk '/Public Key Algorithm|Public-Key:|NIST CURVE/ {$1=$1; printf "%s ", $0}')" \
    "server certificate (CN=localhost, SAN IP:127.0.0.1 DNS:localhost) from its own CA, in $PKI/$k"
done
pki ecdsa "$PKI/client" bench-client clientAuth "DNS:bench-client.internal"
echo "==> client certificate: ECDSA P-256, CN=bench-client, clientAuth, from its own CA (bench/out/tls/client)"

UP_PORT=$(free_port)
# Targets (name.key) in the order each round measures them, and what each is measured by:
# ka = keep-alive, new / new256 = a new connection per request at 64 / 256 connections,
# full / resumed = s_time handshakes.
declare -A PORT PID MODES
TARGETS="" TARGETS_KA="" TARGETS_NEW="" TARGETS_NEW256="" TARGETS_HS=""
for k in $KEYS; do
  for t in nginx portcullis nginx-noresume nginx-mtls portcullis-optional; do
    PORT[$t.$k]=$(free_port); TARGETS+=" $t.$k"
  done
  MODES[nginx.$k]="ka new new256 full resumed"; MODES[portcullis.$k]="ka new new256 full resumed"
  MODES[nginx-noresume.$k]="new"; MODES[nginx-mtls.$k]="full resumed"; MODES[portcullis-optional.$k]="full resumed"
  TARGETS_KA+=" nginx.$k portcullis.$k"
  TARGETS_NEW+=" nginx.$k nginx-noresume.$k portcullis.$k"
  TARGETS_NEW256+=" nginx.$k portcullis.$k"
  TARGETS_HS+=" nginx.$k portcullis.$k nginx-mtls.$k portcullis-optional.$k"
done
for t in nginx-plain portcullis-plain; do PORT[$t]=$(free_port); TARGETS+=" $t"; MODES[$t]=ka; done
TARGETS_KA+=" nginx-plain portcullis-plain"

upstream_conf tls-upstream auto "$UP_PORT"
# One nginx for every nginx target: a server block each, one upstream pool.
location='location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }'
blocks="  upstream backend { server 127.0.0.1:$UP_PORT; keepalive 128; }
  ssl_protocols TLSv1.2 TLSv1.3;
  server { listen 127.0.0.1:${PORT[nginx-plain]}; $location }"
# Each TLS server its own session cache zone, as if it were the only one.
for k in $KEYS; do
  cert="ssl_certificate $PKI/$k/leaf.pem; ssl_certificate_key $PKI/$k/leaf.key;"
  blocks+="
  server { listen 127.0.0.1:${PORT[nginx.$k]} ssl; $cert
    ssl_session_cache shared:SSL-$k:10m; $location }
  server { listen 127.0.0.1:${PORT[nginx-noresume.$k]} ssl; $cert
    ssl_session_cache off; ssl_session_tickets off; $location }
  server { listen 127.0.0.1:${PORT[nginx-mtls.$k]} ssl; $cert
    ssl_session_cache shared:SSL-mtls-$k:10m;
    ssl_verify_client optional; ssl_client_certificate $PKI/client/ca.pem; $location }"
done
nginx_conf tls-proxy auto "$blocks"

gateway_conf "$OUT/tls-portcullis-plain.toml" "${PORT[portcullis-plain]}" "$UP_PORT" tls-plain- ""
for k in $KEYS; do
  tls="[server.tls]
cert_file = \"$PKI/$k/leaf.pem\"
key_file = \"$PKI/$k/leaf.key\""
  gateway_conf "$OUT/tls-portcullis-$k.toml" "${PORT[portcullis.$k]}" "$UP_PORT" "tls-$k-" "$tls
client_auth = \"off\""
  gateway_conf "$OUT/tls-portcullis-optional-$k.toml" "${PORT[portcullis-optional.$k]}" "$UP_PORT" "tls-opt-$k-" "$tls
client_auth = \"optional\"
client_ca_file = \"$PKI/client/ca.pem\""
done
rm -f "$OUT"/tls-*keys.db* "$OUT"/tls-*audit.log
post_lua "$OUT/tls-post.lua"
post_lua "$OUT/tls-close.lua" Connection close

cleanup() {
  "$NGINX" -c "$OUT/tls-upstream.conf" -s stop 2>/dev/null || true
  "$NGINX" -c "$OUT/tls-proxy.conf" -s stop 2>/dev/null || true
  local p; for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
"$NGINX" -c "$OUT/tls-upstream.conf"
"$NGINX" -c "$OUT/tls-proxy.conf"

url() { # target: its URL
  case "$1" in *-plain) echo "http://127.0.0.1:${PORT[$1]}$PATH_Q" ;; *) echo "https://127.0.0.1:${PORT[$1]}$PATH_Q" ;; esac
}
# Wait (up to 10 s) until TARGET answers a POST, over TLS checked against its key type's CA.
answering() {
  local k=${1##*.} ca=()
  [ "$k" != "$1" ] && ca=(--cacert "$PKI/$k/ca.pem")
  for _ in $(seq 1 100); do
    curl -fsS "${ca[@]}" -o /dev/null -X POST "$(url "$1")" -d '{"model":"gpt-4o"}' 2>/dev/null && return 0
    sleep 0.1
  done
  echo "error: $1 does not answer on $(url "$1")"; exit 1
}
# A gateway runs only while it is measured, so that no idle gateway's timers share the two
# cores with the target under test (nginx, idle, wakes for nothing). Its session cache starts
# empty each time: the warm-up fills it.
start() { # target
  case "$1" in nginx*) return 0 ;; esac
  local conf="$OUT/tls-${1%.*}.toml"
  case "$1" in *.*) conf="$OUT/tls-${1%.*}-${1##*.}.toml" ;; esac
  "$BIN" serve --config "$conf" 2>>"$OUT/tls-$1.log" &
  PID[$1]=$!
  answering "$1"
}
stop() { # target
  [ -n "${PID[$1]:-}" ] || return 0
  kill "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; unset "PID[$1]"
}
rm -f "$OUT"/tls-*.log
# Every target answers, and the TLS ones with their key type's certificate.
for t in $TARGETS; do
  start "$t"; answering "$t"
  k=${t##*.}
  if [ "$k" != "$t" ]; then
    served=$(openssl s_client -connect "127.0.0.1:${PORT[$t]}" </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256)
    [ "$served" = "$(openssl x509 -in "$PKI/$k/leaf.pem" -noout -fingerprint -sha256)" ] ||
      { echo "error: $t serves another certificate: $served"; exit 1; }
  fi
  if [ "${t%.*}" = portcullis-optional ]; then
    # A client certificate is asked for and verified: bound by no client, it is refused
    # with 403 client_not_allowed (a handshake-only s_time run never gets that far). HTTP/1.1:
    # over h2 the refusal comes before the body is read, with RST_STREAM(NO_ERROR) after the
    # answer, which curl 7.88 sometimes reports as error 92 instead of the 403.
    code=$(curl -sS --http1.1 -o /dev/null -w '%{http_code}' --cacert "$PKI/$k/ca.pem" --cert "$PKI/client/leaf.pem" \
      --key "$PKI/client/leaf.key" -X POST "$(url "$t")" -d '{"model":"gpt-4o"}' || true)
    [ "$code" = 403 ] || { echo "error: $t answered $code to a request with the client certificate, not 403"; exit 1; }
  fi
  stop "$t"
done
echo "==> every target answers; the TLS ones serve their key type's certificate (same SHA-256 on nginx and portcullis);"
echo "    portcullis-optional verifies the client certificate (403 client_not_allowed: verified, bound by no client)"

tree() { local p; echo "$1"; for p in $(pgrep -P "$1"); do tree "$p"; done; }
# CPU time (clock ticks, user + system) of the process serving TARGET: the Portcullis
# process, or the nginx proxy's master and workers (one nginx serves every nginx target).
cpu_ticks() {
  local pids p total=0
  case "$1" in
    nginx*) pids=$(tree "$(cat "$OUT/tls-proxy.pid")") ;;
    *) pids=${PID[$1]:-} ;;
  esac
  for p in $pids; do total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) )); done
  echo "$total"
}
passive_opens() { awk '/^Tcp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "PassiveOpens") c = i; h = 1 } else print $c }' /proc/net/snmp; }

# Resumption check: ServerHellos on the wire from PORT for SECONDS (AF_PACKET on lo; root).
SNIFF=$(cat <<'PY'
import socket, struct, sys, time
port, dur = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 25)
s.bind(("lo", 0)); s.settimeout(0.2)
seen = {"full": 0, "resumed": 0, "tls12": 0}; suites = {}; groups = {}
end = time.time() + dur
while time.time() < end:
    try:
        pkt, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or pkt[12:14] != b"\x08\x00" or pkt[23] != 6:
        continue  # lo shows each packet twice; IPv4 TCP only
    tcp = pkt[14 + (pkt[14] & 15) * 4:]
    if struct.unpack("!H", tcp[0:2])[0] != port:
        continue
    p = tcp[(tcp[12] >> 4) * 4:]
    if len(p) < 50 or p[0] != 0x16 or p[5] != 0x02:
        continue  # not a record starting with a ServerHello
    i = 9 + 2 + 32; i += 1 + p[i]
    suite = struct.unpack("!H", p[i:i + 2])[0]; i += 3
    end_ext = i + 2 + struct.unpack("!H", p[i:i + 2])[0]; i += 2
    exts = set()
    while i + 4 <= min(end_ext, len(p)):
        t, n = struct.unpack("!HH", p[i:i + 4]); exts.add(t)
        if t == 51 and i + 6 <= len(p):
            g = struct.unpack("!H", p[i + 4:i + 6])[0]; groups[g] = groups.get(g, 0) + 1
        i += 4 + n
    kind = "tls12" if 43 not in exts else "resumed" if 41 in exts else "full"
    seen[kind] += 1; suites[suite] = suites.get(suite, 0) + 1
names = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384", 0x1303: "TLS_CHACHA20_POLY1305_SHA256",
         0x1d: "X25519", 0x17: "P-256", 0x18: "P-384"}
print(seen["full"], seen["resumed"], seen["tls12"],
      ",".join(names.get(k, hex(k)) for k in list(suites) + list(groups)))
PY
)
SNIFFING=0
if [ "$(id -u)" = 0 ]; then SNIFFING=1; else echo "==> resumption check skipped: capturing on lo needs root"; fi
: > "$OUT/tls-resumption.txt"
if [ "$SNIFFING" = 1 ]; then
  echo "==> resumption check: wrk with Connection: close for 2 s per target, at $RESUME_CONNS connections; ServerHellos counted on lo"
  for c in $RESUME_CONNS; do
    for t in $TARGETS_NEW; do
      start "$t"
      python3 -c "$SNIFF" "${PORT[$t]}" 3 > "$OUT/tls-sniff.out" &
      sniffer=$!
      sleep 0.5
      o=$(passive_opens)
      reqs=$(wrk -t2 -c"$c" -d2s -s "$OUT/tls-close.lua" "$(url "$t")" | awk '/requests in/ {print $1}')
      opens=$(( $(passive_opens) - o ))
      wait "$sniffer"
      stop "$t"
      read -r full resumed tls12 suites < "$OUT/tls-sniff.out"
      echo "$t $c $reqs $opens $full $resumed $tls12 $suites" >> "$OUT/tls-resumption.txt"
      echo "    $t -c$c: $reqs requests, $opens TCP connections accepted; ServerHellos seen: $full full, $resumed resumed (TLS 1.3), $tls12 TLS 1.2; $suites"
    done
  done
fi

run_wrk() { # target mode(ka|new|new256)   (uses $ROUND)
  local script="$OUT/tls-post.lua" f="$OUT/tls-$1.$2-r$ROUND" c=64
  [ "$2" != ka ] && script="$OUT/tls-close.lua"
  [ "$2" = new256 ] && c=256
  wrk -t2 -c"$c" -d1s -s "$script" "$(url "$1")" > "$f.warm"
  local before o; before=$(cpu_ticks "$1"); o=$(passive_opens)
  wrk -t2 -c"$c" -d"${DUR}s" --latency -s "$script" "$(url "$1")" > "$f.txt"
  echo "$(( $(cpu_ticks "$1") - before )) $(( $(passive_opens) - o ))" > "$f.cpu"
}
run_stime() { # target mode(full|resumed)   (uses $ROUND)
  local f="$OUT/tls-$1.$2-r$ROUND" args=(-new)
  [ "$2" = resumed ] && args=(-reuse -tls1_2)
  case "$1" in *-mtls.* | *-optional.*) args+=(-cert "$PKI/client/leaf.pem" -key "$PKI/client/leaf.key") ;; esac
  local before t0 t1; before=$(cpu_ticks "$1"); t0=$(date +%s.%N)
  openssl s_time -connect "127.0.0.1:${PORT[$1]}" -time "$DUR" "${args[@]}" > "$f.stime" 2>&1 || true
  t1=$(date +%s.%N)
  echo "$(( $(cpu_ticks "$1") - before )) $t0 $t1" > "$f.cpu"
}
rm -f "$OUT"/tls-*-r[0-9]*.*
for ROUND in $(seq 1 "$ROUNDS"); do
  echo "==> round $ROUND of $ROUNDS"
  for t in $TARGETS; do
    start "$t"
    for m in ${MODES[$t]}; do
      case "$m" in ka | new | new256) run_wrk "$t" "$m" ;; *) run_stime "$t" "$m" ;; esac
    done
    stop "$t"
  done
done
# nginx's complaints, by target (e.g. a full session cache zone).
: > "$OUT/tls-nginx-alerts.txt"
for t in $TARGETS; do
  case "$t" in nginx*)
    n=$(grep -c "server: 127.0.0.1:${PORT[$t]}\$" "$OUT/tls-proxy.err" || true)
    if [ "$n" != 0 ]; then echo "$t $n $(grep "server: 127.0.0.1:${PORT[$t]}\$" "$OUT/tls-proxy.err" | sed -E 's/^.*\] [0-9#]+: (\*[0-9]+ )?//; s/, client:.*//' | sort | uniq -c | sort -rn | head -1 | sed -E 's/^ *[0-9]+ //')" >> "$OUT/tls-nginx-alerts.txt"; fi
  esac
done

export TARGETS_KA TARGETS_NEW TARGETS_NEW256 TARGETS_HS KEYS
python3 - "$OUT" "$DUR" "$ROUNDS" <<'PY'
import os, re, sys, datetime
from statistics import median
out, dur, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
tick = 1e6 / os.sysconf("SC_CLK_TCK")
KA, NEW, NEW256, HS = (tuple(os.environ[v].split()) for v in ("TARGETS_KA", "TARGETS_NEW", "TARGETS_NEW256", "TARGETS_HS"))
MODES = (("ka", KA, "keep-alive", 64), ("new", NEW, "new per request", 64), ("new256", NEW256, "new per request", 256))
KEYS = os.environ["KEYS"].split()
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
def wrk(t, mode, k):
    f = f"{out}/tls-{t}.{mode}-r{k}"
    txt = open(f"{f}.txt").read()
    cpu, opens = map(int, open(f"{f}.cpu").read().split())
    p = {q: ms(v) for q, v in re.findall(r"^\s+(50|99)%\s+(\S+)", txt, re.M)}
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
    sock = re.search(r"Socket errors: (.*)", txt)
    reqs = int(re.search(r"(\d+) requests in", txt).group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", txt).group(1)), "p50": p["50"], "p99": p["99"],
            "cpu": cpu * tick / max(reqs, 1), "opens": opens / max(reqs, 1), "errs": int(errs.group(1)) if errs else 0,
            "sock": sock.group(1) if sock else ""}
def stime(t, mode, k):
    f = f"{out}/tls-{t}.{mode}-r{k}"
    txt = open(f"{f}.stime").read()
    cpu, t0, t1 = open(f"{f}.cpu").read().split()
    m = re.search(r"(\d+) connections in [\d.]+ real seconds", txt)
    n = int(m.group(1)) if m else 0
    marks = "".join(re.findall(r"^[r*]+$", txt, re.M))
    return {"hps": n / (float(t1) - float(t0)), "cpu": int(cpu) * tick / max(n, 1), "n": n,
            "reused": marks.count("r") / max(len(marks), 1)}
W = {(t, m, k): wrk(t, m, k) for m, ts, _, _ in MODES for t in ts for k in range(1, rounds + 1)}
S = {(t, m, k): stime(t, m, k) for t in HS for m in ("full", "resumed") for k in range(1, rounds + 1)}
rs = range(1, rounds + 1)
med = lambda D, t, m, f: median(D[(t, m, k)][f] for k in rs)
print(f"\n## {datetime.date.today()} — TLS: {rounds} interleaved rounds of {dur}s per target, wrk -t2 / openssl s_time, "
      f"{os.cpu_count()}-core machine; medians\n")
print("| target | key | conns | connections | req/s | p50 ms | p99 ms | proxy CPU µs/req | TCP conns/req | non-2xx |")
print("|---|---|---|---|---|---|---|---|---|---|")
for m, ts, what, conns in MODES:
    for t in ts:
        name, _, key = t.partition(".")
        errs = sum(W[(t, m, k)]["errs"] for k in rs)
        sock = "; ".join(s for k in rs if (s := W[(t, m, k)]["sock"]))
        print(f"| {name} | {key or 'plain'} | {conns} | {what} | {med(W, t, m, 'rps'):,.0f} "
              f"| {med(W, t, m, 'p50'):.3f} | {med(W, t, m, 'p99'):.3f} | {med(W, t, m, 'cpu'):.1f} "
              f"| {med(W, t, m, 'opens'):.3f} | {errs}{' ' + sock if sock else ''} |")
print()
print("| target | key | handshake (s_time, 1 at a time) | client cert | handshakes/s | server CPU µs/handshake | resumed |")
print("|---|---|---|---|---|---|---|")
for m in ("full", "resumed"):
    for t in HS:
        name, _, key = t.partition(".")
        cert = "yes" if name in ("nginx-mtls", "portcullis-optional") else "–"
        print(f"| {name} | {key} | {'full, TLS 1.3 (-new)' if m == 'full' else 'resumed, TLS 1.2 (-reuse)'} | {cert} "
              f"| {med(S, t, m, 'hps'):,.0f} | {med(S, t, m, 'cpu'):.1f} | {med(S, t, m, 'reused') * 100:.0f}% |")
print()
def ratio(D, a, b, m, f):
    each = [D[(a, m, k)][f] / D[(b, m, k)][f] for k in rs]
    return f"{median(each):.2f}x (rounds: {', '.join(f'{e:.2f}' for e in each)})"
for key in KEYS:
    p, n = f"portcullis.{key}", f"nginx.{key}"
    print(f"- {key}, keep-alive: portcullis vs nginx throughput {ratio(W, p, n, 'ka', 'rps')}, "
          f"proxy CPU per request {ratio(W, p, n, 'ka', 'cpu')}")
    print(f"- {key}, new connection per request (both resuming): portcullis vs nginx throughput {ratio(W, p, n, 'new', 'rps')}, "
          f"proxy CPU per request {ratio(W, p, n, 'new', 'cpu')}; nginx without resumption vs nginx "
          f"{ratio(W, f'nginx-noresume.{key}', n, 'new', 'rps')}")
    print(f"- {key}, new connection per request at 256 connections: portcullis vs nginx throughput "
          f"{ratio(W, p, n, 'new256', 'rps')}, proxy CPU per request {ratio(W, p, n, 'new256', 'cpu')}")
    for m, what in (("full", "full TLS 1.3 handshakes"), ("resumed", "resumed TLS 1.2 handshakes")):
        print(f"- {key}, {what} (s_time): portcullis vs nginx {ratio(S, p, n, m, 'hps')} per second, "
              f"server CPU per handshake {ratio(S, p, n, m, 'cpu')}; with a client certificate "
              f"(portcullis-optional vs nginx-mtls) {ratio(S, f'portcullis-optional.{key}', f'nginx-mtls.{key}', m, 'hps')}, "
              f"CPU {ratio(S, f'portcullis-optional.{key}', f'nginx-mtls.{key}', m, 'cpu')}")
for key in KEYS:
    for name in ("nginx", "portcullis"):
        tls = med(W, f"{name}.{key}", "ka", "cpu"); plain = med(W, f"{name}-plain", "ka", "cpu")
        new = med(W, f"{name}.{key}", "new", "cpu")
        print(f"- {key}, {name}: CPU per request plain {plain:.1f} µs, TLS keep-alive {tls:.1f} µs (+{tls - plain:.1f}), "
              f"TLS new connection {new:.1f} µs (+{new - plain:.1f})")
res = [l.split() for l in open(f"{out}/tls-resumption.txt")]
if res:
    print("- resumption check (wrk, Connection: close, 2 s; ServerHellos counted on lo): " + "; ".join(
        f"{r[0]} -c{r[1]} {int(r[5]) / max(int(r[4]) + int(r[5]) + int(r[6]), 1) * 100:.0f}% resumed "
        f"({r[5]} of {int(r[4]) + int(r[5]) + int(r[6])}, {int(r[3]) / max(int(r[2]), 1):.2f} TCP conns/req"
        f"{', ' + r[7] if len(r) > 7 else ''})" for r in res))
for l in open(f"{out}/tls-nginx-alerts.txt"):
    t, n, what = l.rstrip("\n").split(" ", 2)
    print(f"- nginx error log, {t}: {int(n):,} lines, mostly: {what}")
print("- wrk cannot present a client certificate: client_auth = \"optional\" is measured by s_time only")
PY
