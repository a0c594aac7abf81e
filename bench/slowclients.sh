#!/usr/bin/env bash
# Slow clients against Tether and against nginx as a proxy (issue 17, part 2), both with their
# defaults (request and response buffering on), each in front of a backend of its own (nginx), so
# that what each backend sees is that proxy's doing:
#   2. UPLOADERS clients send a 1 MB body's first bytes and then nothing for a while: the backend
#      connections each proxy holds meanwhile (the backend's stub_status), then whether every
#      upload is answered once the bodies are complete.
#   1. One client downloads 20 MB reading 300 kB/s: when the backend has finished (its
#      stub_status), a probe request through the same proxy tells whether the slow reader's
#      upstream connection was back in the pool (the backend accepted no new connection); for
#      Tether, the admin page also gives when the connection went idle and what was spooled.
#
#   bench/slowclients.sh
#   UPLOADERS=200 bench/slowclients.sh
#   BUFFERING=off bench/slowclients.sh     # both proxies streaming, for contrast
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
if ! need nginx || ! need curl || ! need python3; then
    install_packages nginx-light curl python3
fi
build_tether
UPLOADERS=${UPLOADERS:-500}
BUFFERING=${BUFFERING:-on}
BUF="proxy_buffering $BUFFERING; proxy_request_buffering $BUFFERING;"
make_work
head -c 20000000 /dev/urandom > "$WORK/big"
# backend NAME PORT STATUS-PORT
backend() {
    cat > "$WORK/$1.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/$1.nginxpid; error_log $WORK/$1.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
    access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$2 backlog=4096;
        client_max_body_size 0; client_body_buffer_size 2m;
        location = /big { alias $WORK/big; }
        location = /probe { return 200 "ok\n"; }
        # An upload is read whole (nginx buffers it) before it is passed on and answered.
        location / { proxy_pass http://127.0.0.1:$3; }
    }
    server { listen 127.0.0.1:$3; location = /status { stub_status; } location / { return 200 "ok\n"; } }
}
CONF
    nginx -c "$WORK/$1.conf" -e "$WORK/$1.err" & echo $! > "$WORK/$1.pid"
}
backend tether-backend 18681 18682
backend nginx-backend 18683 18684
cat > "$WORK/tether.conf" <<CONF
worker_processes 1;
error_log $WORK/tether.err error;
events { worker_connections 65536; }
http {
    client_max_body_size 0; $BUF
    upstream backend { server 127.0.0.1:18681; keepalive 64; }
    server { listen 127.0.0.1:18680 backlog=4096; location / { proxy_pass http://backend; } }
    server { listen 127.0.0.1:18689; location / { stats prometheus; } }
}
CONF
cat > "$WORK/nginx-proxy.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx-proxy.nginxpid; error_log $WORK/nginx-proxy.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
    access_log off; client_max_body_size 0; $BUF
    client_body_temp_path $WORK/ncb; proxy_temp_path $WORK/npt;
    upstream backend { server 127.0.0.1:18683; keepalive 64; }
    server {
        listen 127.0.0.1:18685 backlog=4096;
        location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
"$TETHER" -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"
nginx -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy.err" & echo $! > "$WORK/nginx-proxy.pid"
for port in 18682 18684 18680 18685 18689; do
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
cat > "$WORK/slow.py" <<'PY'
import socket, sys, time, urllib.request, re
mode, port, status_port, admin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
calls = 0
def status():
    global calls
    calls += 1   # each is a connection the backend's nginx accepts too
    t = urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status").read().decode()
    n = [int(x) for x in re.findall(r"\d+", t)]
    # Active, accepts, handled, requests, Reading, Writing, Waiting (this request is one of each)
    return {"active": n[0] - 1, "accepts": n[1], "writing": n[5] - 1}
def admin_value(name):
    if admin == "-": return None
    t = urllib.request.urlopen(admin).read().decode()
    m = re.search(r"^" + re.escape(name) + r"(?:\{[^}]*\})? (\S+)$", t, re.M)
    return float(m.group(1)) if m else None
def answered(s):
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk: break
        data += chunk
    return data.startswith(b"HTTP/1.1 200")
if mode == "upload":
    n = int(sys.argv[5]); size = 1 << 20
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /up HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % size + b"x" * 1000)
        socks.append(s)
    time.sleep(3)  # the scenario: every client stops mid-body for a while
    held = status()["active"]
    for s in socks: s.sendall(b"x" * (size - 1000))
    ok = sum(1 for s in socks if answered(s))
    print(held, ok)
else:
    before = status()["accepts"]; calls = 0
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n")
    start = time.monotonic(); got = 0; backend_done = None; idle_at = None; spooled = 0
    while got < 20_000_000 and time.monotonic() - start < 30:
        got += len(s.recv(30000))   # 300 kB/s: 30 kB every 100 ms
        now = time.monotonic() - start
        if backend_done is None and now > 0.3 and status()["writing"] == 0: backend_done = now
        if admin != "-" and idle_at is None:
            spooled = max(spooled, admin_value('tether_buffered_bytes{where="file"}') or 0)
            if now > 0.1 and admin_value("tether_upstream_cx_active") == 0: idle_at = now
        if backend_done is not None and (admin == "-" or idle_at is not None): break
        time.sleep(0.1)
    # The probe: another request through the same proxy while the slow reader still reads.
    p = socket.create_connection(("127.0.0.1", port))
    p.sendall(b"GET /probe HTTP/1.1\r\nHost: b\r\n\r\n")
    ok = answered(p)
    after = status()["accepts"]
    new = after - before - calls
    print(f"{backend_done if backend_done is not None else -1:.2f} {idle_at if idle_at is not None else -1:.2f} {new} {got} {int(spooled)} {int(ok)}")
PY
echo "Slow clients, $(date -u +%Y-%m-%d): Tether and nginx $(nginx -v 2>&1 | sed 's/.*\///') as proxies with proxy_buffering and proxy_request_buffering $BUFFERING, keepalive 64, each in front of an nginx backend of its own."
echo
echo "| proxy | backend connections held by $UPLOADERS stalled uploads | uploads answered | slow reader: backend done after (s) | its connection idle after (s) | new backend connections for a probe request meanwhile | read by the client by then |"
echo "|---|---|---|---|---|---|---|"
for p in tether nginx; do
    if [ $p = tether ]; then port=18680; sport=18682; admin="http://127.0.0.1:18689/"; else port=18685; sport=18684; admin="-"; fi
    # The download first, while each pool holds the one connection the start-up check left.
    read -r done idle new got spooled probe <<< "$(python3 "$WORK/slow.py" download $port $sport "$admin")"
    [ "$probe" = 1 ] || { echo "bench: the probe through $p was not answered" >&2; exit 1; }
    read -r held ok <<< "$(python3 "$WORK/slow.py" upload $port $sport - "$UPLOADERS")"
    [ "$idle" = "-1.00" ] && idle="–"
    [ "$done" = "-1.00" ] && done="not within 30 s"
    echo "| $p | $held | $ok of $UPLOADERS | $done | $idle | $new | $((got / 1000)) kB |"
done
