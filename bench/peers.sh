#!/usr/bin/env bash
# Where the machine's time goes at 64 connections, nginx reverse proxy vs Portcullis.
#
#   bench/peers.sh                        (builds the release binary)
#   PORTCULLIS_BIN=path ROUNDS=3 DUR=5 bench/peers.sh
#
# On this harness wrk, the upstream and the proxy share the machine's cores, so a proxy's
# throughput depends on what it makes the others spend as well as on its own cost. For each
# proxy (rounds interleaved) this prints, per request: CPU time and context switches
# (voluntary / involuntary) of the proxy, of the upstream nginx's workers and of wrk, and
# the TCP segments sent on loopback. CPU and switches come from /proc/PID/task/*/stat and
# status (proxy and upstream) and getrusage of the finished wrk; segments from
# /proc/net/snmp. Figures are medians over the rounds.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${DUR:-5}"
ROUNDS="${ROUNDS:-3}"
. bench/common.sh
bench_setup nginx:nginx-light wrk:wrk
UP_PORT=$(free_port); NGX_PORT=$(free_port); PCL_PORT=$(free_port)
upstream_conf peers-upstream auto "$UP_PORT"
proxy_conf peers-proxy "$NGX_PORT" "$UP_PORT"
gateway_conf "$OUT/peers-portcullis.toml" "$PCL_PORT" "$UP_PORT" peers- ""
rm -f "$OUT/peers-keys.db"*
post_lua "$OUT/peers-post.lua"

PCL_PID=""
cleanup() {
  "$NGINX" -c "$OUT/peers-upstream.conf" -s stop 2>/dev/null || true
  "$NGINX" -c "$OUT/peers-proxy.conf" -s stop 2>/dev/null || true
  [ -n "$PCL_PID" ] && kill "$PCL_PID" 2>/dev/null || true
}
trap cleanup EXIT
"$NGINX" -c "$OUT/peers-upstream.conf"
"$NGINX" -c "$OUT/peers-proxy.conf"
"$BIN" serve --config "$OUT/peers-portcullis.toml" 2>"$OUT/peers-portcullis.log" &
PCL_PID=$!
wait_answering "$UP_PORT" "$NGX_PORT" "$PCL_PORT"

python3 - "$OUT" "$DUR" "$ROUNDS" "$PCL_PID" "$NGX_PORT" "$PCL_PORT" "$PATH_Q" <<'PY'
import os, re, resource, subprocess, sys
from statistics import median
out, dur, rounds, pcl, ngx_port, pcl_port, path = sys.argv[1:8]
dur, rounds = int(dur), int(rounds)
tick = 1e6 / os.sysconf("SC_CLK_TCK")
def workers(pidfile):
    master = open(f"{out}/{pidfile}").read().strip()
    return subprocess.run(["pgrep", "-P", master], capture_output=True, text=True).stdout.split()
def snap(pids):
    """CPU µs, voluntary and involuntary switches, summed over every thread of pids."""
    cpu = vol = inv = 0
    for pid in pids:
        for t in os.listdir(f"/proc/{pid}/task"):
            stat = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            cpu += (int(stat[11]) + int(stat[12])) * tick
            status = open(f"/proc/{pid}/task/{t}/status").read()
            vol += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
            inv += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
    return cpu, vol, inv
def segments():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutSegs")])
def wrk(port, seconds):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", f"{out}/peers-post.lua",
                        f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    use = ((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e6,
           after.ru_nvcsw - before.ru_nvcsw, after.ru_nivcsw - before.ru_nivcsw)
    reqs = int(re.search(r"(\d+) requests in", r.stdout).group(1))
    return reqs, use
upstream = workers("peers-upstream.pid")
proxies = {"nginx": (ngx_port, workers("peers-proxy.pid")), "portcullis": (pcl_port, [pcl])}
rows = {name: [] for name in proxies}
for k in range(rounds):
    for name, (port, pids) in proxies.items():
        wrk(port, 1)  # warm-up
        p0, u0, s0 = snap(pids), snap(upstream), segments()
        reqs, w = wrk(port, dur)
        p1, u1, s1 = snap(pids), snap(upstream), segments()
        per = lambda a, b: [(y - x) / reqs for x, y in zip(a, b)]
        rows[name].append({"rps": reqs / dur, "proxy": per(p0, p1), "upstream": per(u0, u1),
                           "wrk": [v / reqs for v in w], "segs": (s1 - s0) / reqs})
def m(name, f):
    return median(f(r) for r in rows[name])
print(f"\n## per request at 64 connections ({rounds} interleaved rounds of {dur}s, medians)\n")
print("| proxy | req/s | proxy CPU µs | proxy cs vol/inv | upstream CPU µs | upstream cs vol/inv "
      "| wrk CPU µs | wrk cs vol/inv | all three CPU µs | TCP segments |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in proxies:
    cell = lambda part: (f"{m(name, lambda r: r[part][0]):.1f}",
                         f"{m(name, lambda r: r[part][1]):.2f} / {m(name, lambda r: r[part][2]):.2f}")
    (pc, ps), (uc, us), (wc, ws) = cell("proxy"), cell("upstream"), cell("wrk")
    total = m(name, lambda r: r["proxy"][0] + r["upstream"][0] + r["wrk"][0])
    print(f"| {name} | {m(name, lambda r: r['rps']):,.0f} | {pc} | {ps} | {uc} | {us} | {wc} | {ws} "
          f"| {total:.1f} | {m(name, lambda r: r['segs']):.2f} |")
ratio = median(p["rps"] / n["rps"] for p, n in zip(rows["portcullis"], rows["nginx"]))
print(f"\n- throughput portcullis / nginx: {ratio:.2f}x (rounds: "
      + ", ".join(f"{p['rps'] / n['rps']:.2f}" for p, n in zip(rows["portcullis"], rows["nginx"])) + ")")
PY
