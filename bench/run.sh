#!/usr/bin/env bash
# Tether against nginx as a reverse proxy, in one run, in front of the same nginx backend.
#
#   bench/run.sh                 # 10 s per row
#   DURATION=5 bench/run.sh      # shorter
#
# Each proxy runs one event loop / worker pinned to core 0; the backend and wrk share core 1.
# Proxy CPU is utime+stime from /proc/PID/stat over each wrk run. Upstream connects are the
# backend's accepted-connection count (its stub_status) from 1 s into the run to its end. Idle memory is the RSS
# growth of the proxy while it holds IDLE keep-alive client connections.
# Writes bench/out/results.md (a Markdown table with Tether/nginx ratios) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
IDLE=${IDLE:-5000}
OUT=bench/out
mkdir -p "$OUT"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need taskset; then
    apt-get update -qq
    apt-get install -y -qq wrk nginx-light util-linux >/dev/null
fi
ulimit -n 65536 || true

swift build -c release --product tether >/dev/null
TETHER=$PWD/.build/release/tether
HZ=$(getconf CLK_TCK)

BACKEND_PORT=18081; TETHER_PORT=18080; NGINX_PORT=18082; STATUS_PORT=18083
TETHER_TLS_PORT=18443; NGINX_TLS_PORT=18444
WORK=$(mktemp -d)
cleanup() {
    for p in $(cat "$WORK"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- one ECDSA P-256 certificate for both proxies' TLS listeners
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null

# --- the backend: nginx answering 12 bytes (and 4 KiB / 64 KiB files), with stub_status to count
# accepted connections
chmod 755 "$WORK"   # nginx's workers do not run as root: they must be able to read the files
mkdir -p "$WORK/www/files"
head -c 4096 /dev/urandom > "$WORK/www/files/4k"
head -c 65536 /dev/urandom > "$WORK/www/files/64k"
cat > "$WORK/pipeline.lua" <<'LUA'
-- 8 requests written at once on each connection (pipelining depth 8)
init = function(args)
  local r = {}
  for i = 1, 8 do r[i] = wrk.format(nil, "/") end
  req = table.concat(r)
end
request = function() return req end
LUA
cat > "$WORK/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/backend.nginxpid;
error_log $WORK/backend.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location / { return 200 "hello world\n"; }
        location /files/ { root $WORK/www; }
    }
    server { listen 127.0.0.1:$STATUS_PORT; location / { stub_status; } }
}
CONF
taskset -c 1 nginx -c "$WORK/backend.conf" -e "$WORK/backend.err" & echo $! > "$WORK/backend.pid"

# --- Tether, one event loop
cat > "$WORK/tether.conf" <<CONF
worker_processes 1;
error_log $WORK/tether.err error;
events { worker_connections 65536; }
http {
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$TETHER_PORT backlog=4096;
        location / { proxy_pass http://backend; }
    }
    server {
        listen 127.0.0.1:$TETHER_TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/tls.pem;
        ssl_certificate_key $WORK/tls.key;
        location / { proxy_pass http://backend; }
    }
}
CONF
taskset -c 0 "$TETHER" -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"

# --- nginx as a proxy, one worker, the keep-alive upstream setup its docs recommend, and
# proxy_buffering off so that it streams as Tether does (with buffering on, nginx reads whole
# responses into larger buffers and would do better on the 64 KiB row)
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/proxy.nginxpid;
error_log $WORK/nginx.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/tls.pem;
        ssl_certificate_key $WORK/tls.key;
        # nginx 1.22's default stops at TLS 1.2, whose resumed handshakes skip the key exchange;
        # both proxies offer the same protocols, so both negotiate TLS 1.3 with wrk.
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
CONF
taskset -c 0 nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & echo $! > "$WORK/nginx.pid"

for port in $BACKEND_PORT $TETHER_PORT $NGINX_PORT $STATUS_PORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
for port in $TETHER_TLS_PORT $NGINX_TLS_PORT; do
    for _ in $(seq 100); do curl -kfs "https://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
accepts() { curl -fs "http://127.0.0.1:$STATUS_PORT/" | awk 'NR==3 {print $1}'; }

# run NAME PID PORT CONNECTIONS [PATH [WRK-ARGS...]] -> "rps cpu_us_per_req p99_ms connects"
# (SCHEME=https for the TLS listeners)
run() {
    local pid=$2 port=$3 c=$4 path=${5:-/}
    local extra=("${@:6}")
    local scheme=${SCHEME:-http}
    local out="$OUT/wrk-$1-$scheme-c$c$(echo "$path${extra[*]:+-${extra[*]}}" | tr -c 'a-zA-Z0-9-\n' _ | cut -c1-40).txt"
    taskset -c 1 wrk -t1 -c"$c" -d2s "${extra[@]}" "$scheme://127.0.0.1:$port$path" >/dev/null 2>&1   # warm-up
    local a0 t0; t0=$(cpu_ticks "$pid")
    taskset -c 1 wrk -t1 -c"$c" -d"${DURATION}s" --latency "${extra[@]}" "$scheme://127.0.0.1:$port$path" > "$out" 2>&1 &
    local wrkpid=$!
    # Upstream connects are counted from 1 s into the run: the warm-up's wrk closed client
    # connections mid-request, and a proxy replaces the upstream connections those left unclean.
    sleep 1; a0=$(accepts)
    wait $wrkpid
    local a1 t1; a1=$(accepts); t1=$(cpu_ticks "$pid")
    if grep -q "Non-2xx" "$out"; then
        echo "bench: $1 answered with errors, see $out" >&2
        exit 1
    fi
    local reqs p99
    reqs=$(awk '/requests in/ {print $1}' "$out")
    p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$out")
    echo "$(awk -v r="$reqs" -v d="$DURATION" 'BEGIN{printf "%.0f", r/d}') $(awk -v t=$((t1 - t0)) -v hz="$HZ" -v r="$reqs" 'BEGIN{printf "%.1f", t/hz*1e6/r}') $p99 $((a1 - a0 - 1))"
}

# idle NAME PID PORT -> KiB per idle keep-alive connection
idle() {
    local pid=$2 port=$3
    local before after
    before=$(rss_kb "$pid")
    python3 - "$port" "$IDLE" > "$OUT/idle-$1.txt" <<'PY' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
# One request at a time, so each proxy needs a single upstream connection: what is measured is
# the client side (concurrent requests would make either proxy open upstream connections too).
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    data = b""
    while not data.endswith(b"hello world\n"):
        data += s.recv(4096)
    socks.append(s)
print("ready", flush=True)
time.sleep(4)
PY
    local py=$!
    for _ in $(seq 200); do grep -q ready "$OUT/idle-$1.txt" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    after=$(rss_kb "$pid")
    wait $py || true
    awk -v a="$after" -v b="$before" -v n="$IDLE" 'BEGIN{printf "%.2f", (a-b)/n}'
}

TP=$(cat "$WORK/tether.pid"); NP=$(cat "$WORK/nginx.pid")


# nginx allocates its connection table for all worker_connections at start, so its RSS barely
# grows per connection. What a slot costs is measured from a second nginx that differs only in
# worker_connections, and added to nginx's growth; Tether allocates per connection as it goes.
cat > "$WORK/nginx-small.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/small.nginxpid;
error_log $WORK/small.err;
worker_rlimit_nofile 65536;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18084; location / { return 200; } } }
CONF
nginx -c "$WORK/nginx-small.conf" -e "$WORK/small.err" & echo $! > "$WORK/small.pid"
sleep 1
NGINX_SLOT_KIB=$(awk -v big="$(rss_kb "$NP")" -v small="$(rss_kb "$(cat "$WORK/small.pid")")" 'BEGIN{printf "%.3f", (big - small) / (65536 - 1024)}')
# Idle memory first, while both proxies are fresh: after the load rows their heaps hold freed
# memory that new connections would reuse, hiding what a connection costs.
ti=$(idle tether "$TP" $TETHER_PORT); ng=$(idle nginx "$NP" $NGINX_PORT)
ni=$(awk -v g="$ng" -v s="$NGINX_SLOT_KIB" 'BEGIN{printf "%.2f", g + s}')
{
echo "Tether $(${TETHER} -v | awk '{print $3}') vs $(nginx -v 2>&1 | sed 's/.*: //'), $(date -u +%Y-%m-%d), $(nproc) cores, ${DURATION}s per row, 12-byte responses, keep-alive both sides."
echo "Proxy pinned to core 0 (one event loop / one worker); wrk and the nginx backend on core 1."
echo "Rows: connections (and response size or pipelining depth; 12-byte responses otherwise)."
echo
echo "| connections | metric | Tether | nginx | Tether/nginx |"
echo "|---|---|---|---|---|"
for c in 50 256; do
    read -r trps tcpu tp99 tcx <<<"$(run tether "$TP" $TETHER_PORT $c)"
    read -r nrps ncpu np99 ncx <<<"$(run nginx "$NP" $NGINX_PORT $c)"
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "–"; else printf "%.2f", a/b }'; }
    echo "| $c | requests/s | $trps | $nrps | $(ratio "$trps" "$nrps") |"
    echo "| $c | proxy CPU µs/request | $tcpu | $ncpu | $(ratio "$tcpu" "$ncpu") |"
    echo "| $c | latency p99 (ms) | $tp99 | $np99 | $(ratio "$tp99" "$np99") |"
    echo "| $c | upstream connects after the first second | $tcx | $ncx | – |"
done
for row in "50 4 KiB:/files/4k" "50 64 KiB:/files/64k" "50 pipelined x8:/:-s:$WORK/pipeline.lua"; do
    IFS=: read -r label path opt optval <<<"$row"
    args=(); [ -n "${opt:-}" ] && args=("$opt" "$optval")
    read -r trps tcpu tp99 _ <<<"$(run tether "$TP" $TETHER_PORT 50 "$path" "${args[@]}")"
    read -r nrps ncpu np99 _ <<<"$(run nginx "$NP" $NGINX_PORT 50 "$path" "${args[@]}")"
    echo "| $label | requests/s | $trps | $nrps | $(ratio "$trps" "$nrps") |"
    echo "| $label | proxy CPU µs/request | $tcpu | $ncpu | $(ratio "$tcpu" "$ncpu") |"
    # wrk does not time pipelined requests (it reports 0).
    [ -n "${opt:-}" ] || echo "| $label | latency p99 (ms) | $tp99 | $np99 | $(ratio "$tp99" "$np99") |"
done
# New connections: a connection per request (Connection: close), plain and with TLS (ECDSA P-256,
# TLS 1.3 as wrk negotiates it with both; wrk resumes sessions with tickets), and keep-alive
# requests over TLS.
for row in "50 new connection per request (plain):-H:Connection: close:http:$TETHER_PORT:$NGINX_PORT" \
           "50 TLS keep-alive:::https:$TETHER_TLS_PORT:$NGINX_TLS_PORT" \
           "50 TLS new connection per request:-H:Connection: close:https:$TETHER_TLS_PORT:$NGINX_TLS_PORT"; do
    IFS=: read -r label opt optval scheme tport nport <<<"$row"
    args=(); [ -n "${opt:-}" ] && args=("$opt" "$optval")
    read -r trps tcpu tp99 _ <<<"$(SCHEME=$scheme run tether "$TP" "$tport" 50 / "${args[@]}")"
    read -r nrps ncpu np99 _ <<<"$(SCHEME=$scheme run nginx "$NP" "$nport" 50 / "${args[@]}")"
    echo "| $label | requests/s | $trps | $nrps | $(ratio "$trps" "$nrps") |"
    echo "| $label | proxy CPU µs/request | $tcpu | $ncpu | $(ratio "$tcpu" "$ncpu") |"
    echo "| $label | latency p99 (ms) | $tp99 | $np99 | $(ratio "$tp99" "$np99") |"
done
echo "| $IDLE idle | memory per idle client connection (KiB; nginx: growth $ng + preallocated slot $NGINX_SLOT_KIB) | $ti | $ni | $(awk -v a="$ti" -v b="$ni" 'BEGIN{ if (b <= 0) print "–"; else printf "%.2f", a/b }') |"
} | tee "$OUT/results.md"
