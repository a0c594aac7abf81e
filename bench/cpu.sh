#!/usr/bin/env bash
# Proxy CPU per keep-alive request, Tether against nginx and HAProxy, in interleaved rounds: the
# wall-clock figure of issue 15, measured so that one noisy minute on a shared machine does not
# decide it.
#
#   bench/cpu.sh                          # 5 rounds of 5 s per proxy and row
#   ROUNDS=3 DURATION=10 bench/cpu.sh
#   BASELINE=/tmp/tether-before bench/cpu.sh   # also a second Tether binary, to see what a change did
#   ROWS="50" ROUNDS=9 BASELINE=... bench/cpu.sh   # one row, more rounds
#   FLOOR=1 bench/cpu.sh                  # also bench/relay: the kernel's floor, epoll and io_uring
#
# The setup is bench/run.sh's (the same configurations, from bench/proxies.sh): each proxy with
# one event loop / worker / thread pinned to core 0, the nginx backend (12-byte answers) and wrk on
# core 1. Each round runs the rows (50, 256 and 1000 client connections) on all three proxies,
# the proxies in a different order each round; each run is preceded by a warm-up (6 s the first
# time a proxy sees a row, 2 s after). CPU is utime and stime from /proc/PID/stat over the run,
# reported apart: user space is the proxy's own code, system time the kernel's work for its
# sockets. A row's figure is the median over the rounds, and its ratio the median of the rounds'
# ratios (each round's proxies ran within a minute of each other).
# FLOOR=1 adds two runs of bench/relay/relay.c, a relay that gives each client connection an
# upstream connection of its own and passes bytes without parsing them: what a keep-alive request
# costs a proxy that does nothing else, on epoll with Tether's calls, and on io_uring with the
# receives and sends of a pass submitted together.
# Writes bench/out/cpu.md (and every run in bench/out/cpu-runs.txt) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
OUT=bench/out
mkdir -p "$OUT"
source bench/lib.sh
if ! need wrk || ! need nginx || ! need haproxy || ! need taskset; then
    install_packages wrk nginx-light haproxy util-linux
fi
if [ -n "${FLOOR:-}" ] && { ! need gcc || [ ! -e /usr/include/liburing.h ]; }; then
    install_packages gcc liburing-dev
fi
build_tether
make_work
BACKEND_PORT=18281; TETHER_PORT=18280; NGINX_PORT=18282; HAPROXY_PORT=18285

source bench/proxies.sh
BACKEND_CPU=1 start_backend_12
tether_conf tether 1 $TETHER_PORT
taskset -c 0 "$TETHER" -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"
nginx_conf nginx 1 $NGINX_PORT
taskset -c 0 nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & echo $! > "$WORK/nginx.pid"
haproxy_conf haproxy $HAPROXY_PORT
taskset -c 0 haproxy -db -f "$WORK/haproxy.cfg" 2> "$WORK/haproxy.err" & echo $! > "$WORK/haproxy.pid"
PROXIES=(tether nginx haproxy)
declare -A PORT=([tether]=$TETHER_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT)
if [ -n "${BASELINE:-}" ]; then
    BASELINE_PORT=18286
    tether_conf baseline 1 $BASELINE_PORT
    taskset -c 0 "$BASELINE" -c "$WORK/baseline.conf" & echo $! > "$WORK/baseline.pid"
    PROXIES+=(baseline); PORT[baseline]=$BASELINE_PORT
fi
if [ -n "${FLOOR:-}" ]; then
    gcc -O2 -Wall -o "$WORK/relay" bench/relay/relay.c -luring
    PORT[relay-epoll]=18287; PORT[relay-uring]=18288
    for mode in epoll uring; do
        taskset -c 0 "$WORK/relay" $mode "${PORT[relay-$mode]}" $BACKEND_PORT & echo $! > "$WORK/relay-$mode.pid"
        PROXIES+=(relay-$mode)
    done
fi
for port in "${PORT[@]}" $BACKEND_PORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
declare -A PID=()
for p in "${PROXIES[@]}"; do PID[$p]=$(cat "$WORK/$p.pid"); done

# run NAME CONNECTIONS WARM -> "requests user_ticks system_ticks"
run() {
    local pid=${PID[$1]} port=${PORT[$1]} out="$WORK/wrk.txt"
    taskset -c 1 wrk -t1 -c"$2" -d"$3s" "http://127.0.0.1:$port/" >/dev/null 2>&1
    local u0 s0 u1 s1
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    taskset -c 1 wrk -t1 -c"$2" -d"${DURATION}s" "http://127.0.0.1:$port/" > "$out" 2>&1
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    if grep -q "Non-2xx" "$out"; then
        echo "bench: $1 answered with errors:" >&2; cat "$out" >&2
        exit 1
    fi
    echo "$(awk '/requests in/ {print $1}' "$out") $((u1 - u0)) $((s1 - s0))"
}

read -r -a ROWS <<< "${ROWS:-50 256 1000}"   # client connections per row
: > "$OUT/cpu-runs.txt"
declare -A SEEN=()
for round in $(seq "$ROUNDS"); do
    for c in "${ROWS[@]}"; do
        # rotate the order: tether nginx haproxy, nginx haproxy tether, ...
        for i in "${!PROXIES[@]}"; do
            p=${PROXIES[$(( (i + round - 1) % ${#PROXIES[@]} ))]}
            warm=2; [ -n "${SEEN[$p$c]:-}" ] || warm=6
            SEEN[$p$c]=1
            read -r reqs ut st <<<"$(run "$p" "$c" "$warm")"
            # (run's own exit leaves only its subshell: a failed run shows as no figures here)
            [ -n "${st:-}" ] || { echo "bench: no figures from $p at $c connections" >&2; exit 1; }
            echo "$round $c $p $reqs $ut $st" >> "$OUT/cpu-runs.txt"
        done
    done
done

# Per row: medians of each proxy's µs/request (total, user, system) and of the rounds' ratios.
python3 - "$OUT/cpu-runs.txt" "$HZ" "$DURATION" "$ROUNDS" <<'PY' | tee "$OUT/cpu.md"
import statistics as st, subprocess, sys, datetime, os
path, hz, duration, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = {}
for line in open(path):
    r, c, p, reqs, ut, stime = line.split()
    us = lambda ticks: int(ticks) / hz * 1e6 / int(reqs)
    runs[(int(r), int(c), p)] = (us(ut) + us(stime), us(ut), us(stime), int(reqs) / float(duration))
def med(xs): return st.median(xs)
print(f"Proxy CPU per keep-alive request (µs, utime+stime), {datetime.date.today()}, "
      f"{os.cpu_count()} cores, median of {rounds} interleaved rounds of {duration} s per proxy and row; "
      f"each proxy pinned to core 0, wrk and the nginx backend on core 1 (bench/cpu.sh).")
print()
print("| clients | Tether µs (user + system) | nginx µs (user + system) | HAProxy µs (user + system) | Tether/nginx (rounds' range) | Tether/HAProxy (rounds' range) | requests/s Tether / nginx / HAProxy |")
print("|---|---|---|---|---|---|---|")
def cell(c, p):
    v = [runs[(r, c, p)] for r in rounds_of(c)]
    return f"{med([x[0] for x in v]):.1f} ({med([x[1] for x in v]):.1f} + {med([x[2] for x in v]):.1f})"
def rps(c, p): return f"{med([runs[(r, c, p)][3] for r in rounds_of(c)]):.0f}"
def rounds_of(c): return sorted({k[0] for k in runs if k[1] == c})
def ratio(c, a, b):
    xs = [runs[(r, c, a)][0] / runs[(r, c, b)][0] for r in rounds_of(c)]
    return f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
rows = sorted({k[1] for k in runs})
for c in rows:
    print(f"| {c} | {cell(c, 'tether')} | {cell(c, 'nginx')} | {cell(c, 'haproxy')} | {ratio(c, 'tether', 'nginx')} | {ratio(c, 'tether', 'haproxy')} | {rps(c, 'tether')} / {rps(c, 'nginx')} / {rps(c, 'haproxy')} |")
# A second Tether (BASELINE) and the relays (FLOOR), against the same rounds.
others = [p for p in ("baseline", "relay-epoll", "relay-uring") if any(k[2] == p for k in runs)]
if others:
    print()
    print("| clients | proxy | µs (user + system) | it/nginx (rounds' range) | Tether/it (rounds' range) | requests/s |")
    print("|---|---|---|---|---|---|")
    for c in rows:
        for p in others:
            print(f"| {c} | {p} | {cell(c, p)} | {ratio(c, p, 'nginx')} | {ratio(c, 'tether', p)} | {rps(c, p)} |")
PY
