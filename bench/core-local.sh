#!/usr/bin/env bash
# Tether against nginx, like for like: user-space instructions per request (callgrind,
# bench/loadgen.py's exact request counts, (Ir[3N] - Ir[N]) / 2N as in bench/budget.sh), first
# answering 12 bytes locally (nginx's `return 200`), then proxying to an nginx backend over pooled
# keep-alive connections. Each twice: `tether -c` as users run it, and `tether bench-core`, a
# measuring mode that shows the floor of the loop (TetherIO, TetherHTTP's parser and the
# connections of Sources/TetherCore/Loop, without routing; its proxying relays heads unchanged).
# About 40 seconds.
#
#   bench/core-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
if ! need valgrind || ! need callgrind_control || ! need python3 || ! need curl || ! need strip || ! need nginx; then
    install_packages valgrind python3 curl binutils nginx-light
fi
scripts/build >/dev/null
make_work
strip --strip-debug -o "$WORK/tether" .build/release/tether
LG="python3 bench/loadgen.py"

cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $WORK/nginx.pid.file;
error_log $WORK/nginx.err error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:18481 backlog=4096; location / { return 200 "hello world\n"; } } }
CONF
cat > "$WORK/backend.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $WORK/backend.pid.file;
error_log $WORK/backend.err error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:18490 backlog=4096; location / { return 200 "hello world\n"; } } }
CONF
cat > "$WORK/nginx-proxy.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $WORK/nginx-proxy.pid.file;
error_log $WORK/nginx-proxy.err error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  upstream b { server 127.0.0.1:18490; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18491 backlog=4096;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$WORK/tether-proxy.conf" <<CONF
worker_processes 1;
error_log $WORK/tether-proxy.err error;
http { keepalive_requests 1000000; keepalive_timeout 300s;
  upstream b { server 127.0.0.1:18490; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18492 backlog=4096; location / { proxy_pass http://b; } } }
CONF
"$(command -v nginx)" -c "$WORK/backend.conf" -p "$WORK" & echo $! > "$WORK/backend.pid"
cat > "$WORK/tether.conf" <<CONF
worker_processes 1;
error_log $WORK/tether.err error;
http { keepalive_requests 1000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:18482 backlog=4096; location / { return 200 "hello world\n"; } } }
CONF

# measure NAME PORT COMMAND...: prints "NAME keep-alive new-connection"
measure() {
    local name=$1 port=$2; shift 2
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.$name" "$@" > "$WORK/$name.valgrind.log" 2>&1 &
    local vp=$!; echo $vp > "$WORK/$name.pid"
    for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.2; done
    $LG keepalive "$port" 10 1000; $LG close "$port" 10 100
    local i=0 mode n t f
    local -a v=()
    for run in "keepalive 2000" "keepalive 6000" "close 300" "close 900"; do
        i=$((i + 1)); mode=${run% *}; n=${run#* }
        callgrind_control -i on "$vp" >/dev/null 2>&1
        $LG "$mode" "$port" 10 "$n"
        callgrind_control -i off "$vp" >/dev/null 2>&1
        callgrind_control -d "$vp" >/dev/null 2>&1
        t=0
        for f in "$WORK/cg.$name.$i" "$WORK/cg.$name.$i"-*; do
            [ -f "$f" ] && t=$((t + $(awk '/^totals:/ {print $2; exit}' "$f")))
        done
        v+=("$t")
    done
    kill "$vp" 2>/dev/null || true; wait "$vp" 2>/dev/null || true
    echo "$name $(( (v[1] - v[0]) / 4000 )) $(( (v[3] - v[2]) / 600 ))"
}

results=$(
    measure nginx 18481 "$(command -v nginx)" -c "$WORK/nginx.conf" -p "$WORK"
    measure tether 18482 "$WORK/tether" -c "$WORK/tether.conf"
    measure bench-core 18483 "$WORK/tether" bench-core --bench-port 18483
    measure nginx-proxy 18491 "$(command -v nginx)" -c "$WORK/nginx-proxy.conf" -p "$WORK"
    measure tether-proxy 18492 "$WORK/tether" -c "$WORK/tether-proxy.conf"
    measure bench-core-proxy 18493 "$WORK/tether" bench-core --bench-port 18493 --bench-upstream 18490
)
echo "$results" | awk '
    { ka[$1] = $2; nc[$1] = $3; order[NR] = $1 }
    END {
        print "User-space instructions per request (callgrind), " strftime("%Y-%m-%d") "; *-proxy rows against nginx-proxy."
        print ""
        print "| server | keep-alive | vs nginx | new connection per request | vs nginx |"
        print "|---|---|---|---|---|"
        for (i = 1; i <= NR; i++) {
            n = order[i]; base = (n ~ /proxy/) ? "nginx-proxy" : "nginx"
            printf "| %s | %d | %.2f | %d | %.2f |\n", n, ka[n], ka[n] / ka[base], nc[n], nc[n] / nc[base]
        }
    }'
