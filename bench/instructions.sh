#!/usr/bin/env bash
# User-space instructions per proxied request, Tether against nginx, counted by valgrind's
# callgrind: repeatable where CPU time is noisy, so it shows what a code change did.
#
#   bench/instructions.sh            # keep-alive, pipelined x8, new connection per request
#
# Each proxy runs under callgrind with instrumentation off; after a 3 s wrk warm-up (10
# connections) it is switched on for an 8 s wrk run, and the instructions counted (all threads of
# the proxy, user space only: the kernel's work is not in these figures) are divided by the
# requests wrk completed; so are the calls to malloc in the same window (callgrind's call counts).
# The backend is an nginx answering 12 bytes, outside valgrind.
# Writes bench/out/instructions.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
mkdir -p "$OUT"
source bench/lib.sh
if ! need wrk || ! need nginx || ! need valgrind || ! need callgrind_control; then
    install_packages wrk nginx-light valgrind
fi
scripts/build >/dev/null
make_work
BACKEND_PORT=18181; TETHER_PORT=18180; NGINX_PORT=18182

# valgrind cannot read the DWARF 5 debug info Swift writes; the symbols are enough.
strip --strip-debug -o "$WORK/tether" .build/release/tether

# The same proxy configurations as bench/run.sh.
source bench/proxies.sh
tether_conf tether 1 $TETHER_PORT
nginx_conf nginx 1 $NGINX_PORT
start_backend_12

# mallocs FILE...: the calls to malloc callgrind counted in its output files
mallocs() {
    python3 - "$@" <<'PY'
import re, sys
total = 0
for path in sys.argv[1:]:
    names, into_malloc = {}, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if m.group(1):
                into_malloc = names.get(m.group(2), "").split("'")[0] == "malloc"
            continue
        if line.startswith("calls=") and into_malloc:
            total += int(line[6:].split()[0])
            into_malloc = False
print(total)
PY
}

# count NAME PORT [WRK-ARGS...] -- COMMAND...: prints "instructions mallocs" per request
count() {
    local name=$1 port=$2; shift 2
    local args=()
    while [ "$1" != "--" ]; do args+=("$1"); shift; done
    shift
    local cg="$WORK/cg.$name.out"
    valgrind --tool=callgrind --callgrind-out-file="$cg" --instr-atstart=no "$@" > "$WORK/$name.valgrind.log" 2>&1 &
    local vp=$!
    for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.2; done
    wrk -t1 -c10 -d3s "${args[@]}" "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -i on "$vp" >/dev/null 2>&1
    local out; out=$(wrk -t1 -c10 -d8s "${args[@]}" "http://127.0.0.1:$port/")
    callgrind_control -i off "$vp" >/dev/null 2>&1
    callgrind_control -d "$vp" >/dev/null 2>&1
    sleep 1
    kill "$vp"; wait "$vp" 2>/dev/null || true
    if echo "$out" | grep -q "Non-2xx"; then echo "bench: $name answered with errors" >&2; exit 1; fi
    local reqs ir=0 f calls
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    for f in "$cg"*; do
        # The dump taken after the run; the file written at exit has nothing counted (".").
        ir=$((ir + $(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print ($1 ~ /^[0-9]+$/) ? $1 : 0}')))
    done
    calls=$(mallocs "$cg"*)
    rm -f "$cg"*
    echo "$((ir / reqs)) $(awk -v c="$calls" -v r="$reqs" 'BEGIN{printf "%.2f", c/r}')"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
row() {
    local label=$1; shift
    local t tm n nm
    read -r t tm <<< "$(count "tether" $TETHER_PORT "$@" -- "$WORK/tether" -c "$WORK/tether.conf")"
    read -r n nm <<< "$(count "nginx" $NGINX_PORT "$@" -- nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err")"
    echo "| $label | $t | $n | $(ratio "$t" "$n") | $tm | $nm |"
}
{
echo "User-space instructions per proxied request (callgrind, 10 connections, 12-byte responses), $(date -u +%Y-%m-%d)."
echo
echo "| workload | Tether | $(nginx -v 2>&1 | sed 's/.*: //') | Tether/nginx | Tether mallocs/request | nginx mallocs/request |"
echo "|---|---|---|---|---|---|"
row "keep-alive"
row "pipelined x8" -s bench/pipeline.lua
row "new connection per request" -H "Connection: close"
} | tee "$OUT/instructions.md"
