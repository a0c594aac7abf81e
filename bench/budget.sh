#!/usr/bin/env bash
# The instruction budget CI holds Tether to (issue 15): user-space instructions per proxied
# keep-alive request and per new connection, counted by callgrind, which is deterministic where
# time is not. Fails when either exceeds its budget in bench/budget.txt by more than 5 %.
#
#   bench/budget.sh              # check
#   bench/budget.sh --print      # only print the figures
#
# Tether runs under callgrind with instrumentation off, in front of a second Tether (native)
# answering 12 bytes. After a warm-up, bench/loadgen.py sends exactly N and then 3N requests with
# counting on; (Ir[3N] - Ir[N]) / 2N is the figure, so start-up, the toggles and the dumps cancel
# out. Keep-alive: 10 connections, N = 2,000. New connection per request: 10 at a time, N = 300.
# Lower the budget when a change brings the figures down; it only goes down.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
if ! need valgrind || ! need callgrind_control || ! need python3 || ! need curl || ! need strip; then
    install_packages valgrind python3 curl binutils
fi
scripts/build >/dev/null
make_work
BACKEND_PORT=18381; TETHER_PORT=18380
# valgrind cannot read the DWARF 5 debug info Swift writes; the symbols are enough.
strip --strip-debug -o "$WORK/tether" .build/release/tether

cat > "$WORK/backend.conf" <<CONF
worker_processes 1;
error_log $WORK/backend.err error;
http { keepalive_requests 1000000; server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "hello world\n"; } } }
CONF
"$WORK/tether" -c "$WORK/backend.conf" & echo $! > "$WORK/backend.pid"
source bench/proxies.sh
tether_conf tether 1 $TETHER_PORT
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$BACKEND_PORT/" >/dev/null 2>&1 && break; sleep 0.2; done
LG="python3 bench/loadgen.py"
# start NAME PORT COMMAND...: runs COMMAND under callgrind with counting off, waits for PORT,
# warms it up; sets VP.
start() {
    local name=$1 port=$2; shift 2
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.$name" "$@" > "$WORK/$name.valgrind.log" 2>&1 &
    VP=$!; echo $VP > "$WORK/$name.pid"
    for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.2; done
    $LG keepalive "$port" 10 1000
    $LG close "$port" 10 100
}
counted() {  # NAME PORT DUMP MODE TOTAL: runs it with counting on, dumps (the DUMP-th), prints the instructions
    callgrind_control -i on "$VP" >/dev/null 2>&1
    $LG "$4" "$2" 10 "$5"
    callgrind_control -i off "$VP" >/dev/null 2>&1
    callgrind_control -d "$VP" >/dev/null 2>&1
    local t=0 f
    for f in "$WORK/cg.$1.$3" "$WORK/cg.$1.$3"-*; do
        [ -f "$f" ] && t=$((t + $(awk '/^totals:/ {print $2; exit}' "$f")))
    done
    echo "$t"
}
# measure NAME PORT: prints "keep-alive new-connection" instructions per request
measure() {
    local k1 k3 c1 c3
    k1=$(counted "$1" "$2" 1 keepalive 2000); k3=$(counted "$1" "$2" 2 keepalive 6000)
    c1=$(counted "$1" "$2" 3 close 300); c3=$(counted "$1" "$2" 4 close 900)
    kill "$VP" 2>/dev/null || true; wait "$VP" 2>/dev/null || true
    echo "$(( (k3 - k1) / 4000 )) $(( (c3 - c1) / 600 ))"
}
# Tether with the shipped kind of configuration (virtual host, location on the normalised path,
# a pooled upstream).
start tether $TETHER_PORT "$WORK/tether" -c "$WORK/tether.conf"
read -r ka nc <<< "$(measure tether $TETHER_PORT)"
echo "instructions per keep-alive request: $ka"
echo "instructions per new connection: $nc"
[ "${1:-}" = "--print" ] && exit 0
fail=0
check() {  # NAME MEASURED
    local budget; budget=$(awk -v k="$1" '$1 == k {print $2}' bench/budget.txt)
    [ -n "$budget" ] || { echo "budget: no $1 in bench/budget.txt" >&2; exit 1; }
    if [ "$2" -gt $((budget * 105 / 100)) ]; then
        echo "budget: $1 is $2, over its budget of $budget by more than 5 %" >&2
        fail=1
    else
        echo "budget: $1 $2 within $budget (+5 %)"
    fi
}
check keepalive_request "$ka"
check new_connection "$nc"
exit $fail
