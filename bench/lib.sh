# Sourced by the bench scripts: installing what is missing, and a work folder whose processes
# (every WORK/*.pid) are stopped and which is removed at exit (kept with KEEP_WORK=1).

need() { command -v "$1" >/dev/null 2>&1; }

# install_packages PACKAGE... : apt-get install, as root or through sudo.
install_packages() {
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Builds Tether (scripts/build) and sets TETHER to its binary and HZ to the clock's ticks per
# second (for utime and stime from /proc/PID/stat); raises the descriptor limit for the rows with
# thousands of connections, where the host allows it.
build_tether() {
    ulimit -n 65536 2>/dev/null || true
    scripts/build >/dev/null
    TETHER=$PWD/.build/release/tether
    HZ=$(getconf CLK_TCK)
}

# Sets WORK (readable by nginx's unprivileged workers) and the cleanup at exit.
make_work() {
    WORK=$(mktemp -d)
    chmod 755 "$WORK"
    trap cleanup_work EXIT
}

cleanup_work() {
    for p in $(cat "$WORK"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
