#if canImport(Glibc)
import Glibc
#endif

public struct TestError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A plain blocking HTTP/1.1 client over a real socket, with its own small parser, for tests
/// that must see exactly what went over the wire.
/// Unchecked: a test may send from one thread while it reads on another; sending touches only the socket.
public final class TestClient: @unchecked Sendable {
    public let fd: Int32
    private var buffer: [UInt8] = []
    private var start = 0
    /// The server ended the connection with a reset (RST) rather than a FIN.
    public private(set) var sawReset = false

    public struct Response {
        public var version: String
        public var status: Int
        public var headers: [(String, String)]
        public var body: [UInt8]
        public var bodySum = Checksum()
        public var bodyText: String { String(decoding: body, as: UTF8.self) }

        public func header(_ name: String) -> String? {
            headers.first { $0.0.lowercased() == name.lowercased() }?.1
        }
    }

    /// `host`: a numeric IPv4 address, or IPv6 (`::1`).
    public init(host: String = "127.0.0.1", port: Int, timeoutMs: Int = 10_000) throws {
        let rc: Int32
        if host.contains(":") {
            fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in6()
            addr.sin6_family = sa_family_t(AF_INET6)
            addr.sin6_port = in_port_t(UInt16(port).bigEndian)
            inet_pton(AF_INET6, host, &addr.sin6_addr)
            rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        } else {
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            addr.sin_addr.s_addr = inet_addr(host)
            rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
        // No close here: the object is fully initialized, so deinit closes the socket when the
        // error is thrown. Closing it twice would close whatever another thread (an event loop's
        // epoll descriptor, say) had opened under the same number in between.
        guard rc == 0 else { throw TestError("connect to \(port) failed: errno \(errno)") }
        setTimeout(ms: timeoutMs)
    }

    public func setTimeout(ms: Int) {
        var tv = timeval(tv_sec: ms / 1000, tv_usec: (ms % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    public func close() { shutdown(fd, Int32(SHUT_RDWR)) }

    public func send(_ s: String) throws { try send(Array(s.utf8)) }

    /// Sends the tests' usual request: `GET path HTTP/1.1` with `Host: t` and nothing else.
    public func sendGET(_ path: String = "/") throws { try send("GET \(path) HTTP/1.1\r\nHost: t\r\n\r\n") }

    /// `sendGET`, then its response.
    public func get(_ path: String = "/") throws -> Response {
        try sendGET(path)
        return try readResponse()
    }

    public func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try sendAll($0) }
    }

    func sendAll(_ p: UnsafeRawBufferPointer) throws {
        var off = 0
        while off < p.count {
            let n = Glibc.send(fd, p.baseAddress! + off, p.count - off, Int32(MSG_NOSIGNAL))
            if n < 0 { if errno == EINTR { continue }; throw TestError("send failed: errno \(errno)") }
            off += n
        }
    }

    /// Sends `count` pattern bytes (as the body of a request whose head was already sent).
    public func sendPattern(count: Int, chunked: Bool = false) throws {
        var buf = [UInt8](repeating: 0, count: 65536)
        var off = 0
        while off < count {
            let n = min(65536, count - off)
            buf.withUnsafeMutableBytes { Pattern.fill($0, offset: off, count: n) }
            if chunked { try send(String(n, radix: 16) + "\r\n") }
            try buf.withUnsafeBytes { try sendAll(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            if chunked { try send("\r\n") }
            off += n
        }
        if chunked { try send("0\r\n\r\n") }
    }

    /// Reads more bytes; false at end of stream.
    private func fill() throws -> Bool {
        if start > 0 && start == buffer.count { buffer.removeAll(keepingCapacity: true); start = 0 }
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, 65536, 0) }
            if n > 0 { buffer.append(contentsOf: chunk[0..<n]); return true }
            if n == 0 { return false }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { throw TestError("timed out reading") }
            if errno == ECONNRESET { sawReset = true; return false }
            throw TestError("recv failed: errno \(errno)")
        }
    }

    private func readLine() throws -> String? {
        while true {
            if let i = buffer[start...].firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[start..<i], as: UTF8.self)
                start = i + 1
                return line.hasSuffix("\r") ? String(line.dropLast()) : line
            }
            guard try fill() else { return nil }
        }
    }

    /// Reads one response. `head` says the request was HEAD (no body); `keepBody` false only checksums it.
    public func readResponse(head: Bool = false, keepBody: Bool = true) throws -> Response {
        guard let status = try readLine() else { throw TestError("connection closed before a response") }
        let parts = status.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, let code = Int(parts[1]) else { throw TestError("bad status line: \(status)") }
        var r = Response(version: String(parts[0]), status: code, headers: [], body: [])
        while let line = try readLine(), !line.isEmpty {
            let i = line.firstIndex(of: ":")!
            r.headers.append((String(line[..<i]), String(line[line.index(after: i)...]).trimmingCharacters(in: " ")))
        }
        if head || code == 204 || code == 304 || code < 200 { return r }
        func take(_ n: Int) {
            let slice = buffer[start..<(start + n)]
            slice.withUnsafeBytes { r.bodySum.add($0) }
            if keepBody { r.body.append(contentsOf: slice) }
            start += n
        }
        if r.header("transfer-encoding")?.lowercased() == "chunked" {
            while true {
                guard let sizeLine = try readLine() else { throw TestError("truncated chunked body") }
                guard let size = Int(sizeLine.split(separator: ";")[0], radix: 16) else { throw TestError("bad chunk size \(sizeLine)") }
                if size == 0 {
                    while let t = try readLine(), !t.isEmpty {}
                    break
                }
                var left = size
                while left > 0 {
                    if start == buffer.count { guard try fill() else { throw TestError("truncated chunk") } }
                    let n = min(left, buffer.count - start)
                    take(n)
                    left -= n
                }
                _ = try readLine()
            }
        } else if let cl = r.header("content-length").flatMap({ Int($0) }) {
            var left = cl
            while left > 0 {
                if start == buffer.count { guard try fill() else { throw TestError("truncated body: \(cl - left) of \(cl)") } }
                let n = min(left, buffer.count - start)
                take(n)
                left -= n
            }
        } else {
            while true {
                if start < buffer.count { take(buffer.count - start) }
                guard try fill() else { break }
            }
        }
        return r
    }

    /// Every byte not yet read, until the server closes the connection or `timeoutMs` passes
    /// without a byte; unparsed.
    public func readRawToClose(timeoutMs: Int = 5_000) -> [UInt8] {
        setTimeout(ms: timeoutMs)
        defer { setTimeout(ms: 10_000) }
        while (try? fill()) == true {}
        defer { start = buffer.count }
        return Array(buffer[start...])
    }

    /// Waits until the server closes the connection; true if it did within the timeout.
    public func waitForClose(timeoutMs: Int) -> Bool {
        setTimeout(ms: timeoutMs)
        defer { setTimeout(ms: 10_000) }
        while true {
            do {
                if !(try fill()) { return true }
            } catch {
                return false
            }
        }
    }
}

/// Resident memory of this process, in bytes.
public func residentBytes() -> Int {
    let fd = open("/proc/self/statm", O_RDONLY)
    defer { Glibc.close(fd) }
    var buf = [UInt8](repeating: 0, count: 256)
    let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, 256) }
    let fields = String(decoding: buf[0..<max(0, n)], as: UTF8.self).split(separator: " ")
    return (Int(fields[1]) ?? 0) * Int(sysconf(Int32(_SC_PAGESIZE)))
}
