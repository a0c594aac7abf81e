#!/usr/bin/env bash
# What scraping the admin endpoint costs the proxied traffic, Tether against nginx's stub_status.
#
#   bench/scrapes.sh                 # 10 s per run, 100 scrapers
#   DURATION=5 SCRAPERS=5 bench/scrapes.sh
#
# Each proxy runs one event loop / worker pinned to core 0; the backend and wrk on core 1. For each
# proxy: wrk with 50 connections through the proxy alone, then the same with a second wrk keeping
# SCRAPERS connections scraping a status page as fast as it is answered (a harsher load than any
# monitoring system). Reports proxied requests/s with and without the scrapers (the drop is what a
# scrape costs), scrapes answered per second and the scrapes' p99.
# Writes bench/out/scrapes.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
SCRAPERS=${SCRAPERS:-100}
OUT=bench/out
mkdir -p "$OUT"
source bench/lib.sh
if ! need wrk || ! need nginx || ! need taskset; then install_packages wrk nginx-light util-linux; fi
build_tether
make_work
BACKEND_PORT=18281; TETHER_PORT=18280; NGINX_PORT=18282; TETHER_ADMIN=18283; NGINX_ADMIN=18284

cat > "$WORK/backend.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/backend.nginxpid; error_log $WORK/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
    server { listen 127.0.0.1:$BACKEND_PORT backlog=4096; location / { return 200 "hello world\n"; } } }
CONF
taskset -c 1 nginx -c "$WORK/backend.conf" -e "$WORK/backend.err" & echo $! > "$WORK/backend.pid"

# The proxies of bench/run.sh, each with a status listener of its own added.
source bench/proxies.sh
tether_conf tether 1 $TETHER_PORT
sed -i "\$i server { listen 127.0.0.1:$TETHER_ADMIN; location = /status { stub_status; } location = /metrics { stats prometheus; } location = /stats { stats json; } }" "$WORK/tether.conf"
taskset -c 0 "$TETHER" -c "$WORK/tether.conf" & echo $! > "$WORK/tether.pid"
nginx_conf nginx 1 $NGINX_PORT
sed -i "\$i server { listen 127.0.0.1:$NGINX_ADMIN; location = /status { stub_status; } }" "$WORK/nginx.conf"
taskset -c 0 nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & echo $! > "$WORK/nginx.pid"
for port in $BACKEND_PORT $TETHER_PORT $NGINX_PORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
for url in "http://127.0.0.1:$TETHER_ADMIN/status" "http://127.0.0.1:$NGINX_ADMIN/status"; do
    curl -fs "$url" >/dev/null || { echo "bench: $url does not answer" >&2; exit 1; }
done

rps() { awk -v d="$DURATION" '/requests in/ {printf "%.0f", $1/d}' "$1"; }
p99() { awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$1"; }
errors() { if grep -q "Non-2xx\|Socket errors" "$1"; then echo "bench: errors in $1" >&2; exit 1; fi; }

# measure NAME PROXY-PORT [SCRAPE-URL] -> "proxied-rps [scrapes-per-s scrape-p99-ms]"
measure() {
    local name=$1 port=$2 scrape=${3:-}
    local tag; tag=$(echo "${scrape:-none}" | tr -c 'a-zA-Z0-9\n' _ | tail -c 12)
    taskset -c 1 wrk -t1 -c50 -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1
    local spid=""
    if [ -n "$scrape" ]; then
        taskset -c 1 wrk -t1 -c"$SCRAPERS" -d"$((DURATION + 1))s" --latency "$scrape" > "$OUT/scrape-$name-$tag.txt" 2>&1 & spid=$!
        sleep 0.5
    fi
    taskset -c 1 wrk -t1 -c50 -d"${DURATION}s" "http://127.0.0.1:$port/" > "$OUT/scrape-$name-$tag-proxied.txt" 2>&1
    errors "$OUT/scrape-$name-$tag-proxied.txt"
    if [ -n "$spid" ]; then
        wait "$spid"
        errors "$OUT/scrape-$name-$tag.txt"
        echo "$(rps "$OUT/scrape-$name-$tag-proxied.txt") $(awk -v d="$((DURATION + 1))" '/requests in/ {printf "%.0f", $1/d}' "$OUT/scrape-$name-$tag.txt") $(p99 "$OUT/scrape-$name-$tag.txt")"
    else
        rps "$OUT/scrape-$name-$tag-proxied.txt"
    fi
}

drop() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.0f %%", (1 - a/b) * 100}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "–"; else printf "%.2f", a/b }'; }

t0=$(measure tether $TETHER_PORT)
read -r ts tss tsp <<<"$(measure tether $TETHER_PORT "http://127.0.0.1:$TETHER_ADMIN/status")"
read -r tm tms tmp <<<"$(measure tether $TETHER_PORT "http://127.0.0.1:$TETHER_ADMIN/metrics")"
read -r tj tjs tjp <<<"$(measure tether $TETHER_PORT "http://127.0.0.1:$TETHER_ADMIN/stats")"
n0=$(measure nginx $NGINX_PORT)
read -r ns nss nsp <<<"$(measure nginx $NGINX_PORT "http://127.0.0.1:$NGINX_ADMIN/status")"
{
echo "Scrapes against proxied traffic, $(date -u +%Y-%m-%d), $(nproc) cores, ${DURATION}s per run: wrk -c50 through the proxy, with and without a second wrk keeping $SCRAPERS connections scraping a page back to back. One loop / worker pinned to core 0."
echo
echo "| proxy, page scraped | proxied requests/s | drop under scraping | scrapes/s | scrape p99 (ms) |"
echo "|---|---|---|---|---|"
echo "| Tether, none | $t0 | – | – | – |"
echo "| Tether, /status (stub_status) | $ts | $(drop "$ts" "$t0") | $tss | $tsp |"
echo "| Tether, /metrics (Prometheus) | $tm | $(drop "$tm" "$t0") | $tms | $tmp |"
echo "| Tether, /stats (JSON) | $tj | $(drop "$tj" "$t0") | $tjs | $tjp |"
echo "| nginx, none | $n0 | – | – | – |"
echo "| nginx, /status (stub_status) | $ns | $(drop "$ns" "$n0") | $nss | $nsp |"
echo
echo "Tether/nginx under stub_status scraping: proxied requests/s $(ratio "$ts" "$ns"), scrapes/s $(ratio "$tss" "$nss"), scrape p99 $(ratio "$tsp" "$nsp")."
} | tee "$OUT/scrapes.md"
