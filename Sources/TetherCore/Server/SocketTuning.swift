#if canImport(Glibc)
import Glibc
#endif
import TetherConfig

/// The host's keepalive timers, read once: what an empty `so_keepalive` field leaves in place.
struct HostKeepalive: Sendable {
    var idle = 7200
    var interval = 75
    var probes = 9

    static func read(from root: String = "/proc/sys/net/ipv4") -> HostKeepalive {
        var h = HostKeepalive()
        func value(_ name: String) -> Int? {
            guard let text = try? TetherConfig.Loader.readFile(root + "/" + name, includedAt: nil) else { return nil }
            return Int(text.split(separator: "\n").first ?? "")
        }
        h.idle = value("tcp_keepalive_time") ?? h.idle
        h.interval = value("tcp_keepalive_intvl") ?? h.interval
        h.probes = value("tcp_keepalive_probes") ?? h.probes
        return h
    }
}

/// The TCP keepalive and TCP_USER_TIMEOUT settings for one kind of socket, resolved against the
/// host's defaults, as the values `setsockopt` gets.
struct SocketTuning: Sendable, Equatable {
    /// nil leaves SO_KEEPALIVE as the kernel made it.
    var keepalive: Bool?
    var idle: Int?
    var interval: Int?
    var count: Int?
    /// Milliseconds; nil leaves TCP_USER_TIMEOUT alone.
    var userTimeoutMs: Int?

    init(keepalive k: TCPKeepalive?, userTimeout: UserTimeout, host: HostKeepalive) {
        keepalive = k?.enabled
        if let k, k.enabled {
            idle = k.idle
            interval = k.interval
            count = k.count
        }
        switch userTimeout {
        case .off:
            userTimeoutMs = nil
        case .milliseconds(let ms):
            userTimeoutMs = Int(ms)
        case .auto:
            // Unacknowledged data is given up on when an idle peer would be: IDLE + INTVL x CNT.
            if let k, k.enabled {
                userTimeoutMs = ((k.idle ?? host.idle) + (k.interval ?? host.interval) * (k.count ?? host.probes)) * 1000
            }
        }
    }

    var isEmpty: Bool { keepalive == nil && userTimeoutMs == nil }

    /// Each option to set, as `setsockopt` takes it, with its name for messages.
    func forEachOption(_ body: (_ level: Int32, _ name: Int32, _ value: Int, _ label: String) -> Void) {
        if let k = keepalive { body(SOL_SOCKET, SO_KEEPALIVE, k ? 1 : 0, "SO_KEEPALIVE") }
        if let v = idle { body(Int32(IPPROTO_TCP), TCP_KEEPIDLE, v, "TCP_KEEPIDLE") }
        if let v = interval { body(Int32(IPPROTO_TCP), TCP_KEEPINTVL, v, "TCP_KEEPINTVL") }
        if let v = count { body(Int32(IPPROTO_TCP), TCP_KEEPCNT, v, "TCP_KEEPCNT") }
        if let v = userTimeoutMs { body(Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, v, "TCP_USER_TIMEOUT") }
    }

    /// Sets the options on a socket (a listening socket, whose accepted
    /// sockets inherit them, or an upstream socket before its connect). Returns what failed.
    func apply(toSocket fd: Int32) -> [String] {
        var failed: [String] = []
        forEachOption { level, name, value, label in
            var v = Int32(clamping: value)
            if setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) != 0 {
                failed.append("setsockopt(\(label), \(value)) failed (\(errno): \(String(cString: strerror(errno))))")
            }
        }
        return failed
    }
}
