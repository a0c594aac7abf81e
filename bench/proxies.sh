# Sourced by the bench scripts (run.sh, cpu.sh, instructions.sh, syscalls.sh, budget.sh): the configurations of Tether, nginx and HAProxy as
# a proxy, the same in each. They expect WORK (a directory) and BACKEND_PORT to be set.
# UPSTREAM_KEEPALIVE: the idle upstream connections kept (64); HTTP2=1: the TLS listeners of
# Tether and nginx speak HTTP/2 too.

# --- The backend of the instruction and syscall counts: one nginx worker answering 12 bytes on
# BACKEND_PORT, started here (its pid in $WORK/backend.pid).
# With STATUS_PORT set, a stub_status server there too (to count accepted connections); with
# BACKEND_CPU set, pinned to that core.
start_backend_12() {
    local status=""
    [ -n "${STATUS_PORT:-}" ] && status="server { listen 127.0.0.1:$STATUS_PORT; location / { stub_status; } }"
    cat > "$WORK/backend.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/backend.nginxpid; error_log $WORK/backend.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
    server { listen 127.0.0.1:$BACKEND_PORT backlog=4096; location / { return 200 "hello world\n"; } }
    $status }
CONF
    ${BACKEND_CPU:+taskset -c $BACKEND_CPU} nginx -c "$WORK/backend.conf" -e "$WORK/backend.err" & echo $! > "$WORK/backend.pid"
}

# --- Tether: tether_conf NAME LOOPS PORT [TLS-PORT [EXPIRY-PORT]] writes $WORK/NAME.conf
tether_conf() {
    local tls="" expiry=""
    [ -n "${5:-}" ] && expiry="server {
        listen 127.0.0.1:$5 backlog=4096;
        keepalive_timeout 3s;
        location / { proxy_pass http://backend; }
    }"
    [ -n "${4:-}" ] && tls="server {
        listen 127.0.0.1:$4 ssl backlog=4096;
        ${HTTP2:+http2 on;}
        ssl_certificate $WORK/tls.pem;
        ssl_certificate_key $WORK/tls.key;
        location / { proxy_pass http://backend; }
    }"
    cat > "$WORK/$1.conf" <<CONF
worker_processes $2;
error_log $WORK/$1.err error;
events { worker_connections 65536; }
http {
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    # Both proxies stream responses (nginx is given proxy_buffering off too), the comparison these
    # figures have always made; bench/slowclients.sh measures what buffering is for.
    proxy_buffering off;
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive ${UPSTREAM_KEEPALIVE:-64}; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$3 backlog=4096;
        location / { proxy_pass http://backend; }
    }
    $tls
    $expiry
}
CONF
}

# --- nginx as a proxy, one worker, the keep-alive upstream setup its docs recommend, and
# proxy_buffering off, as Tether is given here: both stream (with buffering on, nginx reads whole
# responses into larger buffers and would do better on the 64 KiB row).
# nginx_conf NAME WORKERS PORT [TLS-PORT [EXPIRY-PORT]] writes $WORK/NAME.conf
nginx_conf() {
    local proxy='proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off;'
    local tls="" expiry=""
    [ -n "${5:-}" ] && expiry="server {
        listen 127.0.0.1:$5 backlog=4096;
        keepalive_timeout 3s;
        location / { $proxy }
    }"
    # nginx 1.22's default stops at TLS 1.2, whose resumed handshakes skip the key exchange;
    # all proxies offer the same protocols, so all negotiate TLS 1.3 with wrk.
    [ -n "${4:-}" ] && tls="server {
        listen 127.0.0.1:$4 ssl${HTTP2:+ http2} backlog=4096;
        ssl_certificate $WORK/tls.pem;
        ssl_certificate_key $WORK/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / { $proxy }
    }"
    cat > "$WORK/$1.conf" <<CONF
worker_processes $2;
daemon off;
$([ "$2" = 1 ] && echo "master_process off;")
pid $WORK/$1.nginxpid;
error_log $WORK/$1.err;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive ${UPSTREAM_KEEPALIVE:-64}; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$3 backlog=4096 reuseport;
        location / { $proxy }
    }
    $tls
    $expiry
}
CONF
}

# --- HAProxy, one thread, keep-alive both sides and "http-reuse always", the setting that keeps
# upstream connections shared across client connections.
# haproxy_conf NAME PORT [TLS-PORT [EXPIRY-PORT]] writes $WORK/NAME.cfg (TLS with
# $WORK/tls-haproxy.pem: certificate and key in one file; the protocols it offers are
# HAPROXY_ALPN, http/1.1 unless set)
haproxy_conf() {
    local tls="" expiry=""
    [ -n "${3:-}" ] && tls="frontend tls
    bind 127.0.0.1:$3 ssl crt $WORK/tls-haproxy.pem alpn ${HAPROXY_ALPN:-http/1.1} ssl-min-ver TLSv1.2
    default_backend backend"
    [ -n "${4:-}" ] && expiry="frontend expiry
    bind 127.0.0.1:$4
    timeout http-keep-alive 3s
    default_backend backend"
    cat > "$WORK/$1.cfg" <<CONF
global
    nbthread 1
    maxconn 9000   # its FD check needs 2 × maxconn + spare under this machine's 20,000 limit
    tune.ssl.default-dh-param 2048
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive
    http-reuse always
frontend plain
    bind 127.0.0.1:$2
    default_backend backend
$tls
$expiry
backend backend
    server b1 127.0.0.1:$BACKEND_PORT
CONF
}
