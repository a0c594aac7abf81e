#!/usr/bin/env bash
# Tether against nginx and HAProxy as reverse proxies, in one run, in front of the same nginx backend.
#
#   bench/run.sh                 # 10 s per row
#   DURATION=5 bench/run.sh      # shorter
#
# Each proxy runs one event loop / worker pinned to core 0; the backend and wrk share core 1.
# Proxy CPU is utime+stime from /proc/PID/stat over each wrk run. Upstream connects are the
# backend's accepted-connection count (its stub_status) from 1 s into the run to its end. Idle memory is the RSS
# growth of the proxy while it holds IDLE keep-alive client connections; idle expiry is how long
# after its response each of IDLE connections is closed under a 3 s keep-alive timeout.
# Writes bench/out/results.md (a Markdown table with Tether/nginx and Tether/HAProxy ratios) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
IDLE=${IDLE:-5000}
OUT=bench/out
mkdir -p "$OUT"

source bench/lib.sh
if ! need wrk || ! need nginx || ! need taskset || ! need haproxy || ! need openssl; then
    install_packages wrk nginx-light haproxy util-linux openssl
fi
build_tether

BACKEND_PORT=18081; TETHER_PORT=18080; NGINX_PORT=18082; STATUS_PORT=18083
TETHER_TLS_PORT=18443; NGINX_TLS_PORT=18444
HAPROXY_PORT=18085; HAPROXY_TLS_PORT=18445
TETHER2_PORT=18086; NGINX2_PORT=18087
TETHER_EXPIRY_PORT=18090; NGINX_EXPIRY_PORT=18091; HAPROXY_EXPIRY_PORT=18092
make_work

# --- one ECDSA P-256 certificate for both proxies' TLS listeners
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null
cat "$WORK/tls.pem" "$WORK/tls.key" > "$WORK/tls-haproxy.pem"   # HAProxy wants both in one file

# --- the backend: nginx answering 12 bytes (and 4 KiB / 64 KiB files), with stub_status to count
# accepted connections
mkdir -p "$WORK/www/files"
head -c 4096 /dev/urandom > "$WORK/www/files/4k"
head -c 65536 /dev/urandom > "$WORK/www/files/64k"
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

# tether_conf and nginx_conf: the proxies' configurations, shared with bench/instructions.sh
source bench/proxies.sh
tether_conf tether 1 $TETHER_PORT $TETHER_TLS_PORT $TETHER_EXPIRY_PORT
taskset -c 0 "$TETHER" -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"

nginx_conf nginx 1 $NGINX_PORT $NGINX_TLS_PORT $NGINX_EXPIRY_PORT
taskset -c 0 nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & echo $! > "$WORK/nginx.pid"

# --- HAProxy, one thread (haproxy_conf, in bench/proxies.sh)
haproxy_conf haproxy $HAPROXY_PORT $HAPROXY_TLS_PORT $HAPROXY_EXPIRY_PORT
taskset -c 0 haproxy -db -f "$WORK/haproxy.cfg" 2> "$WORK/haproxy.err" & echo $! > "$WORK/haproxy.pid"

# --- for the scaling row: Tether with 2 event loops and nginx with 2 workers, not pinned
tether_conf tether2 2 $TETHER2_PORT
"$TETHER" -c "$WORK/tether2.conf" & echo $! > "$WORK/tether2.pid"
nginx_conf nginx2 2 $NGINX2_PORT
nginx -c "$WORK/nginx2.conf" -e "$WORK/nginx2.err" & echo $! > "$WORK/nginx2.pid"

for port in $BACKEND_PORT $TETHER_PORT $NGINX_PORT $STATUS_PORT $HAPROXY_PORT $TETHER2_PORT $NGINX2_PORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
for port in $TETHER_TLS_PORT $NGINX_TLS_PORT $HAPROXY_TLS_PORT; do
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
    # Warm-up: WARM seconds (2 by default; the rows that count upstream connects use 6, since at
    # 1000 connections a pool takes a few seconds to reach the most requests in flight at once).
    taskset -c 1 wrk -t1 -c"$c" -d"${WARM:-2}s" "${extra[@]}" "$scheme://127.0.0.1:$port$path" >/dev/null 2>&1
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

# idle NAME PID PORT [COUNT tls] -> KiB per idle keep-alive connection (over TLS with "tls")
idle() {
    local pid=$2 port=$3 count=${4:-$IDLE} tls=${5:-}
    local before after
    before=$(rss_kb "$pid")
    python3 - "$port" "$count" "$tls" > "$OUT/idle-$1$tls.txt" <<'PY' &
import socket, ssl, sys, time
port, n, tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tls"
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
# One request at a time, so each proxy needs a single upstream connection: what is measured is
# the client side (concurrent requests would make either proxy open upstream connections too).
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if tls:
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    data = b""
    while not data.endswith(b"hello world\n"):
        data += s.recv(4096)
    socks.append(s)
print("ready", flush=True)
time.sleep(4)
PY
    local py=$!
    for _ in $(seq 600); do grep -q ready "$OUT/idle-$1$tls.txt" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    after=$(rss_kb "$pid")
    wait $py || true
    awk -v a="$after" -v b="$before" -v n="$count" 'BEGIN{printf "%.2f", (a-b)/n}'
}

# expiry NAME PORT -> "median last closed": seconds from each of IDLE connections' response to its
# close by the proxy (its listener on PORT has a 3 s keep-alive timeout), and how many closed.
expiry() {
    python3 - "$2" "$IDLE" 3 > "$OUT/expiry-$1.txt" <<'PY'
import selectors, socket, sys, time
# N keep-alive connections, one request on each; per connection, the time from its response
# to the proxy closing it. Prints "median last closed" (seconds, seconds, connections).
port, n, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
req = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
sel = selectors.DefaultSelector()
state = {}
for s in socks:
    s.setblocking(False)
    s.sendall(req)
    sel.register(s, selectors.EVENT_READ)
    state[s] = [b"", None]          # bytes so far, time the response was complete
after = []
end = time.monotonic() + limit * 3 + 10
while len(after) < n and time.monotonic() < end:
    for key, _ in sel.select(timeout=0.5):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        now = time.monotonic()
        st = state[s]
        if data:
            st[0] += data
            if st[1] is None and st[0].endswith(b"hello world\n"):
                st[1] = now
            continue
        if st[1] is not None:
            after.append(now - st[1])
        sel.unregister(s)
        s.close()
after.sort()
if not after:
    print("- - 0")
else:
    print(f"{after[len(after) // 2]:.2f} {after[-1]:.2f} {len(after)}")
PY
    cat "$OUT/expiry-$1.txt"
}

TP=$(cat "$WORK/tether.pid"); NP=$(cat "$WORK/nginx.pid"); HP=$(cat "$WORK/haproxy.pid")


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
ti=$(idle tether "$TP" $TETHER_PORT); ng=$(idle nginx "$NP" $NGINX_PORT); hi=$(idle haproxy "$HP" $HAPROXY_PORT)
ni=$(awk -v g="$ng" -v s="$NGINX_SLOT_KIB" 'BEGIN{printf "%.2f", g + s}')
# The same over TLS (TLS 1.3, a full handshake each: Python's client), fewer connections.
IDLE_TLS=${IDLE_TLS:-2000}
tis=$(idle tether "$TP" $TETHER_TLS_PORT $IDLE_TLS tls); ngs=$(idle nginx "$NP" $NGINX_TLS_PORT $IDLE_TLS tls)
his=$(idle haproxy "$HP" $HAPROXY_TLS_PORT $IDLE_TLS tls)
nis=$(awk -v g="$ngs" -v s="$NGINX_SLOT_KIB" 'BEGIN{printf "%.2f", g + s}')
read -r tem tel tec <<<"$(expiry tether $TETHER_EXPIRY_PORT)"
read -r nem nel nec <<<"$(expiry nginx $NGINX_EXPIRY_PORT)"
read -r hem hel hec <<<"$(expiry haproxy $HAPROXY_EXPIRY_PORT)"
for n in "$tec" "$nec" "$hec"; do
    [ "$n" = "$IDLE" ] || { echo "bench: only $n of $IDLE idle connections were closed by their keep-alive timeout" >&2; exit 1; }
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "–"; else printf "%.2f", a/b }'; }

# row LABEL CONNECTIONS PATH SCHEME TETHER-PORT NGINX-PORT HAPROXY-PORT [WRK-ARGS...]: prints the rows
# of one workload measured on the three proxies, one after the other.
row() {
    local label=$1 c=$2 path=$3 scheme=$4 tport=$5 nport=$6 hport=$7
    local args=("${@:8}")
    local trps tcpu tp99 tcx nrps ncpu np99 ncx hrps hcpu hp99 hcx
    local WARM=2
    case "$label" in *new*|*TLS*|*KiB*|*pipelined*) ;; *) WARM=6 ;; esac
    read -r trps tcpu tp99 tcx <<<"$(SCHEME=$scheme run tether "$TP" "$tport" "$c" "$path" "${args[@]}")"
    read -r nrps ncpu np99 ncx <<<"$(SCHEME=$scheme run nginx "$NP" "$nport" "$c" "$path" "${args[@]}")"
    read -r hrps hcpu hp99 hcx <<<"$(SCHEME=$scheme run haproxy "$HP" "$hport" "$c" "$path" "${args[@]}")"
    echo "| $label | requests/s | $trps | $nrps | $hrps | $(ratio "$trps" "$nrps") | $(ratio "$trps" "$hrps") |"
    echo "| $label | proxy CPU µs/request | $tcpu | $ncpu | $hcpu | $(ratio "$tcpu" "$ncpu") | $(ratio "$tcpu" "$hcpu") |"
    # wrk does not time pipelined requests (it reports 0).
    case "${args[*]}" in *pipeline*) ;; *) echo "| $label | latency p99 (ms) | $tp99 | $np99 | $hp99 | $(ratio "$tp99" "$np99") | $(ratio "$tp99" "$hp99") |" ;; esac
    case "$label" in *new*|*TLS*|*KiB*|*pipelined*) ;; *) echo "| $label | upstream connects after warm-up | $tcx | $ncx | $hcx | – | – |" ;; esac
}

{
echo "Tether $(${TETHER} -v | awk '{print $3}') vs $(nginx -v 2>&1 | sed 's/.*: //') and HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), $(date -u +%Y-%m-%d), $(nproc) cores, ${DURATION}s per row, keep-alive both sides."
echo "Each proxy pinned to core 0 (one event loop / worker / thread); wrk and the nginx backend on core 1."
echo "Rows: client connections, then response size, pipelining depth, new connections or TLS where it says so (12-byte responses otherwise)."
echo
echo "| workload | metric | Tether | nginx | HAProxy | Tether/nginx | Tether/HAProxy |"
echo "|---|---|---|---|---|---|---|"
row "50" 50 / http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT
row "256" 256 / http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT
row "1000" 1000 / http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT
row "50, 4 KiB" 50 /files/4k http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT
row "50, 64 KiB" 50 /files/64k http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT
row "50, pipelined x8" 50 / http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT -s bench/pipeline.lua
row "50, new connection per request" 50 / http $TETHER_PORT $NGINX_PORT $HAPROXY_PORT -H "Connection: close"
# TLS: ECDSA P-256; all three offer TLS 1.2 and 1.3 and negotiate 1.3 with wrk, which resumes
# sessions with tickets on new connections.
row "50, TLS keep-alive" 50 / https $TETHER_TLS_PORT $NGINX_TLS_PORT $HAPROXY_TLS_PORT
row "50, TLS, new connection per request" 50 / https $TETHER_TLS_PORT $NGINX_TLS_PORT $HAPROXY_TLS_PORT -H "Connection: close"
echo "| $IDLE idle, keepalive_timeout 3s | seconds from response to close: median / last | $tem / $tel | $nem / $nel | $hem / $hel | $(ratio "$tel" "$nel") | $(ratio "$tel" "$hel") |"
echo "| $IDLE idle | memory per idle client connection (KiB; nginx: growth $ng + preallocated slot $NGINX_SLOT_KIB) | $ti | $ni | $hi | $(ratio "$ti" "$ni") | $(ratio "$ti" "$hi") |"
echo "| $IDLE_TLS idle, TLS | memory per idle client connection over TLS (KiB; nginx: growth $ngs + preallocated slot $NGINX_SLOT_KIB) | $tis | $nis | $his | $(ratio "$tis" "$nis") | $(ratio "$tis" "$his") |"
echo
# Scaling: the same proxies with 2 event loops / workers on both cores (sharing them with wrk and the
# backend, so this shows how much a second loop adds on this machine, not linear scaling).
read -r t2 _ _ _ <<<"$(run tether2 "$(cat "$WORK/tether2.pid")" $TETHER2_PORT 256)"
read -r n2 _ _ _ <<<"$(run nginx2 "$(cat "$WORK/nginx2.pid")" $NGINX2_PORT 256)"
read -r t1 _ _ _ <<<"$(run tether "$TP" $TETHER_PORT 256)"
read -r n1 _ _ _ <<<"$(run nginx "$NP" $NGINX_PORT 256)"
echo "Scaling at 256 connections, 2 event loops / workers unpinned against 1 pinned: Tether $t2 vs $t1 requests/s ($(ratio "$t2" "$t1")×), nginx $n2 vs $n1 ($(ratio "$n2" "$n1")×). wrk and the backend share the 2 cores."
} | tee "$OUT/results.md"
