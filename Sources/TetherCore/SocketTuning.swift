#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
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

    /// Sets the options on a channel's socket. A failure is logged (once per loop and option)
    /// and the connection goes on without it.
    func apply(to channel: Channel, loop: LoopContext, what: String) {
        guard !isEmpty, let options = channel.syncOptions else { return }
        func set(_ level: Int32, _ name: Int32, _ value: Int, _ label: String) {
            do {
                try options.setOption(ChannelOptions.socket(SocketOptionLevel(level), SocketOptionName(name)), value: SocketOptionValue(value))
            } catch {
                loop.warnOnce("setsockopt(\(label), \(value)) failed on \(what) sockets: \(error)")
            }
        }
        if let k = keepalive { set(SOL_SOCKET, SO_KEEPALIVE, k ? 1 : 0, "SO_KEEPALIVE") }
        if let v = idle { set(Int32(IPPROTO_TCP), TCP_KEEPIDLE, v, "TCP_KEEPIDLE") }
        if let v = interval { set(Int32(IPPROTO_TCP), TCP_KEEPINTVL, v, "TCP_KEEPINTVL") }
        if let v = count { set(Int32(IPPROTO_TCP), TCP_KEEPCNT, v, "TCP_KEEPCNT") }
        if let v = userTimeoutMs { set(Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, v, "TCP_USER_TIMEOUT") }
    }
}

/// Whether an error is the kernel giving up on a peer: keepalive probes or TCP_USER_TIMEOUT.
func isKernelTimeout(_ error: Error) -> Bool {
    (error as? IOError)?.errnoCode == ETIMEDOUT
}
