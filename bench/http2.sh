#!/usr/bin/env bash
# HTTP/2 to clients: Tether (`http2 on`) against nginx (`listen … ssl http2`, 1.22's spelling) and
# HAProxy (`alpn h2,http/1.1`), each one worker / event loop / thread pinned to core 0, in front of
# the same nginx backend (core 1, with h2load), upstreams HTTP/1.1 keep-alive.
#
#   bench/http2.sh                  # 100,000 requests per proxy, 10 connections x 32 streams
#   REQUESTS=20000 bench/http2.sh
#
# Per proxy: requests/s (h2load), proxy CPU microseconds per request (utime+stime from /proc over
# the run), p99 latency (h2load's per-request log), upstream connects after a warm-up (the
# backend's stub_status), errors; and memory per idle HTTP/2 connection (RSS growth while IDLE
# TLS connections that said their preface and SETTINGS are held open).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
REQUESTS=${REQUESTS:-100000}
IDLE=${IDLE:-2000}
if ! need h2load || ! need nginx || ! need haproxy || ! need taskset || ! need openssl; then
    install_packages nghttp2-client nginx-light haproxy util-linux openssl
fi
build_tether
make_work
BACKEND_PORT=18481; STATUS_PORT=18482; TETHER_PORT=18483; NGINX_PORT=18484; HAPROXY_PORT=18485

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null
cat "$WORK/tls.pem" "$WORK/tls.key" > "$WORK/tls-haproxy.pem"

# The backend: nginx answering 12 bytes, with stub_status to count accepted connections, on core 1.
source bench/proxies.sh
BACKEND_CPU=1 start_backend_12

# The proxies: bench/run.sh's configurations (bench/proxies.sh), their TLS listeners speaking
# HTTP/2, and more idle upstream connections kept (10 connections x 32 streams in flight).
# (Each also has a plain listener, 10 ports up, which is not used.)
export HTTP2=1 UPSTREAM_KEEPALIVE=512
tether_conf tether 1 $((TETHER_PORT + 10)) $TETHER_PORT
taskset -c 0 "$TETHER" -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"
nginx_conf nginx 1 $((NGINX_PORT + 10)) $NGINX_PORT
taskset -c 0 nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & echo $! > "$WORK/nginx.pid"

# HAProxy: bench/run.sh's configuration (haproxy_conf), its TLS listener offering h2 first.
HAPROXY_ALPN=h2,http/1.1 haproxy_conf haproxy $((HAPROXY_PORT + 10)) $HAPROXY_PORT
taskset -c 0 haproxy -f "$WORK/haproxy.cfg" & echo $! > "$WORK/haproxy.pid"
for port in $TETHER_PORT $NGINX_PORT $HAPROXY_PORT; do
    for _ in $(seq 100); do curl -sk --http2 -o /dev/null "https://127.0.0.1:$port/" && break; sleep 0.1; done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
accepts() { curl -s "http://127.0.0.1:$STATUS_PORT/" | awk 'NR==3 {print $1}'; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# run PID PORT -> "req/s cpu_us_per_req p99_ms upstream_connects errors"
run() {
    local pid=$1 port=$2
    taskset -c 1 h2load -n 20000 -c 10 -m 32 "https://127.0.0.1:$port/" >/dev/null 2>&1
    local t0 a0 t1 a1
    t0=$(cpu_ticks "$pid"); a0=$(accepts)
    taskset -c 1 h2load -n "$REQUESTS" -c 10 -m 32 --log-file "$WORK/log-$port" "https://127.0.0.1:$port/" > "$WORK/out-$port" 2>&1
    t1=$(cpu_ticks "$pid"); a1=$(accepts)
    local rps errs p99
    rps=$(awk '/^finished in/ {print int($4)}' "$WORK/out-$port")
    errs=$(awk '/^requests:/ {print $10 + $12 + $14}' "$WORK/out-$port")
    p99=$(sort -n -k3 "$WORK/log-$port" | awk '{v[NR]=$3} END {printf "%.2f", v[int(NR*0.99)]/1000}')
    echo "$rps $(awk -v t=$((t1 - t0)) -v hz="$HZ" -v r="$REQUESTS" 'BEGIN{printf "%.1f", t/hz*1e6/r}') $p99 $((a1 - a0 - 1)) $errs"
}

# idle PID PORT -> KiB per idle HTTP/2 connection (preface and SETTINGS said, nothing else)
idle() {
    local pid=$1 port=$2 before after
    before=$(rss_kb "$pid")
    python3 - "$port" "$IDLE" > "$WORK/idle-$port" <<'PY' &
import socket, ssl, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2"])
socks = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    assert s.selected_alpn_protocol() == "h2"
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    s.recv(4096)
    socks.append(s)
print("ready", flush=True)
time.sleep(4)
PY
    local py=$!
    for _ in $(seq 600); do grep -q ready "$WORK/idle-$port" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    after=$(rss_kb "$pid")
    wait $py || true
    awk -v a="$after" -v b="$before" -v n="$IDLE" 'BEGIN{printf "%.2f", (a-b)/n}'
}

TP=$(cat "$WORK/tether.pid"); NP=$(cat "$WORK/nginx.pid"); HP=$(cat "$WORK/haproxy.pid")
ti=$(idle "$TP" $TETHER_PORT); ni=$(idle "$NP" $NGINX_PORT); hi=$(idle "$HP" $HAPROXY_PORT)
read -r tr tc tp tu te <<< "$(run "$TP" $TETHER_PORT)"
read -r nr nc np nu ne <<< "$(run "$NP" $NGINX_PORT)"
read -r hr hc hp hu he <<< "$(run "$HP" $HAPROXY_PORT)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "–"; else printf "%.2f", a/b }'; }
echo "HTTP/2 over TLS, h2load -n $REQUESTS -c 10 -m 32, each proxy pinned to core 0; $(date -u +%Y-%m-%d)."
echo
echo "| | Tether | nginx | HAProxy | Tether/nginx | Tether/HAProxy |"
echo "|---|---|---|---|---|---|"
echo "| requests/s | $tr | $nr | $hr | $(ratio "$tr" "$nr") | $(ratio "$tr" "$hr") |"
echo "| proxy CPU µs per request | $tc | $nc | $hc | $(ratio "$tc" "$nc") | $(ratio "$tc" "$hc") |"
echo "| latency p99 (ms) | $tp | $np | $hp | $(ratio "$tp" "$np") | $(ratio "$tp" "$hp") |"
echo "| upstream connects after warm-up | $tu | $nu | $hu | – | – |"
echo "| failed or errored requests | $te | $ne | $he | – | – |"
echo "| memory per idle HTTP/2 connection (KiB, $IDLE held) | $ti | $ni | $hi | $(ratio "$ti" "$ni") | $(ratio "$ti" "$hi") |"
