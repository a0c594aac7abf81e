import CTether
#if canImport(Glibc)
import Glibc
#endif

/// A listening socket on a loop: accepts until `EAGAIN` on each readiness edge, hands each new
/// descriptor (non-blocking, close-on-exec) to `accepted`, and when the process or system is out
/// of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) reports it and backs off:
/// no accept for `backoff`, then it tries again (connections wait in the kernel's backlog
/// meanwhile). With an edge-triggered registration nothing else would wake it for the
/// connections already queued, so the retry is a timer; nginx disables its accept events for
/// `accept_mutex_delay` in the same case. A level-triggered loop that retries at once (SwiftNIO's)
/// spins a core for as long as descriptors are short.
public final class Listener: IOHandler {
    public typealias Accept = (_ listenFD: Int32) -> (fd: Int32, errno: Int32)

    public let fd: Int32
    public private(set) var handle: Handle?
    public static let defaultBackoffNanoseconds: UInt64 = 100_000_000
    public let backoff: UInt64
    /// Whether accepting is paused after running out of descriptors.
    public private(set) var backingOff = false
    /// accept4() calls made, successful or not.
    public private(set) var acceptCalls = 0
    let accept: Accept
    let accepted: (Int32, IOLoop) -> Void
    let failed: (IOError, IOLoop) -> Void

    /// `failed` is told of each back-off (the caller counts and rate-limits its log line).
    public init(fd: Int32, backoffNanoseconds: UInt64 = Listener.defaultBackoffNanoseconds,
                accept: @escaping Accept = { fd in let c = tether_accept(fd); return (c, c < 0 ? tether_errno() : 0) },
                accepted: @escaping (Int32, IOLoop) -> Void, failed: @escaping (IOError, IOLoop) -> Void) {
        self.fd = fd
        self.backoff = backoffNanoseconds
        self.accept = accept
        self.accepted = accepted
        self.failed = failed
    }

    /// Registers the listening socket on `loop`; it then accepts on its own.
    public func start(on loop: IOLoop) throws(IOError) {
        handle = try loop.register(fd, handler: self)
    }

    /// Stops accepting: the socket is closed (and leaves epoll), a back-off timer with it.
    /// Connections still in its backlog are reset by the kernel, as nginx's are at shutdown.
    public func stop(on loop: IOLoop) {
        guard let h = handle else { return }
        handle = nil
        loop.close(h)
    }

    public func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {
        guard events.contains(.readable), !backingOff else { return }
        acceptAll(handle: handle, loop: loop)
    }

    public func timerFired(handle: Handle, loop: IOLoop) {
        backingOff = false
        acceptAll(handle: handle, loop: loop)
    }

    private func acceptAll(handle: Handle, loop: IOLoop) {
        while true {
            acceptCalls += 1
            let (c, e) = accept(fd)
            if c >= 0 {
                accepted(c, loop)
                // The handler may have closed the listener (a reload, a drain).
                guard loop.fd(handle) != nil else { return }
                continue
            }
            switch e {
            case EAGAIN, EWOULDBLOCK:
                return
            case ECONNABORTED, EPROTO, EPERM, EINTR:
                // That one connection went away (or a firewall refused it): the next may be fine.
                continue
            default:
                // EMFILE, ENFILE, ENOBUFS, ENOMEM, and anything unexpected: pause, then retry.
                backingOff = true
                loop.arm(handle, afterNanoseconds: backoff)
                failed(IOError("accept4", errno: e), loop)
                return
            }
        }
    }
}

/// Non-blocking TCP sockets.
public enum Sockets {
    /// A listening socket on `address:port` (numeric IPv4 or IPv6; port 0: the kernel picks),
    /// non-blocking, with `SO_REUSEADDR` and, for one socket per loop, `SO_REUSEPORT`; an IPv6
    /// one takes only IPv6 (`IPV6_V6ONLY`, nginx's `ipv6only=on`). Returns it and its port.
    public static func listenTCP(address: String = "127.0.0.1", port: UInt16 = 0, backlog: Int32 = 511, reusePort: Bool = true) throws(IOError) -> (fd: Int32, port: UInt16) {
        guard let sa = InetAddress(host: address, port: port) else { throw IOError("inet_pton", errno: EINVAL) }
        let fd = sa.tcpSocket()
        guard fd >= 0 else { throw IOError("socket", errno: errno) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if reusePort { setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, socklen_t(MemoryLayout<Int32>.size)) }
        if sa.family == AF_INET6 { setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size)) }
        let bound = sa.withSockaddr { bind(fd, $0, $1) }
        guard bound == 0 else { let e = errno; Glibc.close(fd); throw IOError("bind", errno: e) }
        guard listen(fd, backlog) == 0 else { let e = errno; Glibc.close(fd); throw IOError("listen", errno: e) }
        return (fd, InetAddress.localPort(of: fd))
    }

    /// Turns off Nagle's algorithm on a TCP socket (nginx's `tcp_nodelay on`, its default for
    /// kept-alive connections): otherwise a second small write waits for the peer's delayed ACK
    /// of the first, some 40 ms, as pipelined answers do. Harmless on other sockets.
    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Makes `fd` non-blocking.
    public static func setNonBlocking(_ fd: Int32) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    }
}
