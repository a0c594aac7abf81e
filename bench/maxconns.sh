#!/usr/bin/env bash
# max_conns with a queue at 1,000 clients (issue 17): Tether in front of one nginx backend, once
# without a cap and once with `max_conns=64` and `queue 2048`, one event loop pinned to core 0,
# wrk and the backend on core 1. Per run: requests/s, proxy CPU per request, p99, the upstream
# connections the backend accepted after a 6 s warm-up, and the most connections the backend had
# open at once (its stub_status, sampled every 100 ms, less the sampling request itself).
#
#   bench/maxconns.sh                      # 3 runs of 10 s each way
#   RUNS=1 DURATION=5 bench/maxconns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
if ! need wrk || ! need nginx || ! need taskset || ! need curl; then
    install_packages wrk nginx-light util-linux curl
fi
build_tether
DURATION=${DURATION:-10}; RUNS=${RUNS:-3}; CLIENTS=${CLIENTS:-1000}; CAP=${CAP:-64}
PLAIN_PORT=18580; CAPPED_PORT=18582
make_work
# A backend per Tether, so that each one's counts are its own: backend NAME PORT STATUS-PORT
backend() {
    cat > "$WORK/$1.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/$1.nginxpid; error_log $WORK/$1.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
    access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
    server { listen 127.0.0.1:$2 backlog=4096; location / { return 200 "hello world\n"; } }
    server { listen 127.0.0.1:$3; location / { stub_status; } }
}
CONF
    taskset -c 1 nginx -c "$WORK/$1.conf" -e "$WORK/$1.err" & echo $! > "$WORK/$1.pid"
}
backend plain-backend 18581 18583
backend capped-backend 18584 18585
# tconf NAME PORT BACKEND-PORT SERVER-PARAMETERS UPSTREAM-LINES
tconf() {
    cat > "$WORK/$1.conf" <<CONF
worker_processes 1;
error_log $WORK/$1.err error;
events { worker_connections 65536; }
http {
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream backend { server 127.0.0.1:$3 $4; keepalive 64; keepalive_requests 1000000; $5 }
    server { listen 127.0.0.1:$2 backlog=4096; location / { proxy_pass http://backend; } }
}
CONF
}
tconf plain $PLAIN_PORT 18581 "" ""
tconf capped $CAPPED_PORT 18584 "max_conns=$CAP" "queue 2048 timeout=60s;"
taskset -c 0 "$TETHER" -c "$WORK/plain.conf" & echo $! > "$WORK/plain.pid"
taskset -c 0 "$TETHER" -c "$WORK/capped.conf" & echo $! > "$WORK/capped.pid"
for port in 18581 18583 18584 18585 $PLAIN_PORT $CAPPED_PORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
status() { curl -fs "http://127.0.0.1:$SP/"; }
# measure NAME PORT STATUS-PORT -> "rps cpu_us p99_ms connects peak"
measure() {
    local pid; pid=$(cat "$WORK/$1.pid")
    SP=$3
    taskset -c 1 wrk -t1 -c"$CLIENTS" -d6s "http://127.0.0.1:$2/" >/dev/null 2>&1
    local t0 a0 peak=0 n k=0
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    taskset -c 1 wrk -t1 -c"$CLIENTS" -d"${DURATION}s" --latency "http://127.0.0.1:$2/" > "$WORK/wrk-$1.txt" 2>&1 &
    local w=$!
    sleep 1; a0=$(status | awk 'NR==3 {print $1}')
    while kill -0 $w 2>/dev/null; do
        n=$(status | awk 'NR==1 {print $3}'); n=$((n - 1)); k=$((k + 1))
        [ "$n" -gt "$peak" ] && peak=$n
        sleep 0.1
    done
    wait $w
    local a1 t1 reqs p99
    a1=$(status | awk 'NR==3 {print $1}'); t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    grep -q "Non-2xx" "$WORK/wrk-$1.txt" && { echo "bench: $1 answered with errors" >&2; cat "$WORK/wrk-$1.txt" >&2; exit 1; }
    reqs=$(awk '/requests in/ {print $1}' "$WORK/wrk-$1.txt")
    p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$WORK/wrk-$1.txt")
    # The samples are connections the backend accepted too (k of them, and the last read's).
    echo "$(awk -v r="$reqs" -v d="$DURATION" 'BEGIN{printf "%.0f", r/d}') $(awk -v t=$((t1 - t0)) -v hz="$HZ" -v r="$reqs" 'BEGIN{printf "%.1f", t/hz*1e6/r}') $p99 $((a1 - a0 - k - 1)) $peak"
}
echo "Tether at $CLIENTS clients, without a cap and with max_conns=$CAP + queue 2048, $(date -u +%Y-%m-%d), ${DURATION}s per run, one event loop on core 0."
echo
echo "| run | upstream | requests/s | proxy CPU µs/request | p99 (ms) | upstream connects after warm-up | most backend connections open at once |"
echo "|---|---|---|---|---|---|---|"
for r in $(seq "$RUNS"); do
    for name in plain capped; do
        port=$PLAIN_PORT; sport=18583; [ $name = capped ] && { port=$CAPPED_PORT; sport=18585; }
        read -r rps cpu p99 connects peak <<< "$(measure $name $port $sport)"
        label="no cap"; [ $name = capped ] && label="max_conns=$CAP"
        echo "| $r | $label | $rps | $cpu | $p99 | $connects | $peak |"
    done
done
