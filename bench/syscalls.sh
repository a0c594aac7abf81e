#!/usr/bin/env bash
# System calls per proxied request, Tether against nginx, counted by strace.
#
#   bench/syscalls.sh                  # Tether on its own event loop (issue 15)
#
# Each proxy runs in front of the same nginx backend (12-byte answers, pooled keep-alive
# upstream connections). After a warm-up, strace -c is attached to every thread of the proxy
# while bench/loadgen.py sends an exact number of requests (10 keep-alive connections, then a
# new connection per request, 10 at a time); the calls it counted, divided by the requests, are
# the figure. Under strace the proxy is slow, so an event carries less work than without it and
# epoll_wait is called more often than it would be: the counts are an upper bound for both.
# Writes bench/out/syscalls.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
mkdir -p "$OUT"
source bench/lib.sh
if ! need nginx || ! need strace || ! need curl; then
    install_packages nginx-light strace curl
fi
scripts/build >/dev/null
make_work
BACKEND_PORT=18191; TETHER_PORT=18190; NGINX_PORT=18192
N=${REQUESTS:-4000}
LG="python3 bench/loadgen.py"

source bench/proxies.sh
tether_conf tether 1 $TETHER_PORT
nginx_conf nginx 1 $NGINX_PORT
start_backend_12

# count PID PORT MODE: prints "calls-per-request top-calls"
count() {
    local pid=$1 port=$2 mode=$3 log="$WORK/strace.$1.$3"
    $LG "$mode" "$port" 10 1000 >/dev/null
    local args=()
    for t in /proc/"$pid"/task/*; do args+=(-p "${t##*/}"); done
    strace -c -o "$log" "${args[@]}" 2>/dev/null & local sp=$!
    # strace prints "Process N attached" only to its log; wait until it has attached.
    sleep 1
    $LG "$mode" "$port" 10 "$N" >/dev/null
    kill -INT "$sp"; wait "$sp" 2>/dev/null || true
    awk -v n="$N" '
        $NF == "total" { total = $4 }
        $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" && $4 / n >= 0.005 { calls[$NF] = $4 }
        END {
            top = ""
            for (c in calls) top = top sprintf("%s %.2f, ", c, calls[c] / n)
            printf "%.2f|%s\n", total / n, substr(top, 1, length(top) - 2)
        }' "$log"
}

wait_up() { for _ in $(seq 100); do curl -fs "http://127.0.0.1:$1/" >/dev/null 2>&1 && return; sleep 0.1; done; echo "bench: port $1 did not answer" >&2; exit 1; }

.build/release/tether -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & echo $! > "$WORK/nginx.pid"
wait_up $TETHER_PORT; wait_up $NGINX_PORT

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
{
echo "System calls per proxied request (strace -c, $N requests, 10 connections, 12-byte responses), $(date -u +%Y-%m-%d)."
echo
echo "| workload | Tether | $(nginx -v 2>&1 | sed 's/.*: //') | Tether/nginx | Tether's calls | nginx's calls |"
echo "|---|---|---|---|---|---|"
for mode in keepalive close; do
    t=$(count "$(cat "$WORK/tether.pid")" $TETHER_PORT $mode)
    n=$(count "$(cat "$WORK/nginx.pid")" $NGINX_PORT $mode)
    label="keep-alive"; [ $mode = close ] && label="new connection per request"
    echo "| $label | ${t%%|*} | ${n%%|*} | $(ratio "${t%%|*}" "${n%%|*}") | ${t#*|} | ${n#*|} |"
done
} | tee "$OUT/syscalls.md"
