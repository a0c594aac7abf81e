#if canImport(Glibc)
import Glibc
#endif

/// A numeric IPv4 or IPv6 address and port as the socket calls take it (`sockaddr_in` or
/// `sockaddr_in6` in a `sockaddr_storage`), parsed once, so a connect or a bind copies it and
/// formats nothing.
public struct InetAddress: Sendable {
    private var storage = sockaddr_storage()
    /// `AF_INET` or `AF_INET6`.
    public let family: Int32

    /// `host` is numeric: `127.0.0.1`, `::1` or `[::1]` (names are resolved before this). Nil
    /// for anything else.
    public init?(host: String, port: UInt16) {
        var h = Substring(host)
        if h.hasPrefix("[") && h.hasSuffix("]") { h = h.dropFirst().dropLast() }
        let text = String(h)
        var s = sockaddr_storage()
        let ok = withUnsafeMutableBytes(of: &s) { raw -> Int32? in
            if text.contains(":") {
                let a = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self)
                a.pointee.sin6_family = sa_family_t(AF_INET6)
                a.pointee.sin6_port = port.bigEndian
                return inet_pton(AF_INET6, text, &a.pointee.sin6_addr) == 1 ? AF_INET6 : nil
            }
            let a = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self)
            a.pointee.sin_family = sa_family_t(AF_INET)
            a.pointee.sin_port = port.bigEndian
            return inet_pton(AF_INET, text, &a.pointee.sin_addr) == 1 ? AF_INET : nil
        }
        guard let ok else { return nil }
        storage = s
        family = ok
    }

    /// The size the socket calls are told.
    public var length: socklen_t {
        socklen_t(family == AF_INET6 ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
    }

    /// Calls `body` with the address as a `sockaddr` and its length.
    public func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafeBytes(of: storage) { body($0.baseAddress!.assumingMemoryBound(to: sockaddr.self), length) }
    }

    /// A non-blocking, close-on-exec TCP socket of this address's family.
    public func tcpSocket() -> Int32 {
        socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    }

    /// The port of a socket's local address (either family).
    static func localPort(of fd: Int32) -> UInt16 {
        var s = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        return withUnsafeMutableBytes(of: &s) { raw -> UInt16 in
            let sa = raw.baseAddress!.assumingMemoryBound(to: sockaddr.self)
            guard getsockname(fd, sa, &len) == 0 else { return 0 }
            if Int32(sa.pointee.sa_family) == AF_INET6 {
                return UInt16(bigEndian: raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self).pointee.sin6_port)
            }
            return UInt16(bigEndian: raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self).pointee.sin_port)
        }
    }
}
