import Foundation
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// A backend on a raw blocking socket that runs a script per connection: for tests that must see
/// the exact bytes Tether sends upstream, or answer with exact (often broken) bytes of their own,
/// end with a reset, or switch protocols. Each connection runs on a thread of its own.
public final class ScriptedBackend: @unchecked Sendable {
    /// One accepted connection, as the script sees it.
    public final class Connection: @unchecked Sendable {
        public let fd: Int32
        /// Every byte read so far.
        public private(set) var received: [UInt8] = []
        private var consumed = 0

        init(fd: Int32) {
            self.fd = fd
            var tv = timeval(tv_sec: 10, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }

        /// Reads until `received` holds `marker` past what earlier reads took; returns the bytes
        /// up to and including it, or nil at EOF or time-out.
        public func read(through marker: String) -> String? {
            let m = Array(marker.utf8)
            while true {
                if let r = find(m) {
                    let text = String(decoding: received[consumed..<r], as: UTF8.self)
                    consumed = r
                    return text
                }
                if !fill() { return nil }
            }
        }

        /// Reads exactly `n` more bytes (nil at EOF or time-out).
        public func read(count n: Int) -> [UInt8]? {
            while received.count - consumed < n { if !fill() { return nil } }
            defer { consumed += n }
            return Array(received[consumed..<consumed + n])
        }

        /// Waits for the peer to close; true when it did.
        public func readToEOF() -> Bool {
            while fill() {}
            return true
        }

        private func find(_ m: [UInt8]) -> Int? {
            guard received.count - consumed >= m.count else { return nil }
            var i = consumed
            while i + m.count <= received.count {
                if received[i] == m[0] && Array(received[i..<i + m.count]) == m { return i + m.count }
                i += 1
            }
            return nil
        }

        private func fill() -> Bool {
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, 65536) }
            guard n > 0 else { return false }
            received.append(contentsOf: chunk[0..<n])
            return true
        }

        public func send(_ s: String) { send(Array(s.utf8)) }

        public func send(_ bytes: [UInt8]) {
            var off = 0
            while off < bytes.count {
                let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                guard n > 0 else { return }
                off += n
            }
        }

        /// Ends the connection with a reset (RST) instead of a FIN.
        public func reset() {
            var l = linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
            Glibc.close(fd)
        }

        /// Ends the connection with a FIN.
        public func close() { Glibc.close(fd) }
    }

    public let port: Int
    private let listener: Int32
    private let connections = NIOLockedValueBox<[Connection]>([])
    private let stopped = NIOLockedValueBox(false)

    /// Listens on 127.0.0.1 and runs `script` for every connection; the script ends the
    /// connection itself (close or reset).
    public init(script: @escaping @Sendable (Connection) -> Void) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        listener = fd
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(fd, 128) == 0 else { Glibc.close(fd); throw TestError("scripted backend: bind/listen failed: errno \(errno)") }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        port = Int(UInt16(bigEndian: addr.sin_port))
        let list = connections
        let stopped = self.stopped
        let thread = Thread {
            while true {
                let c = accept(fd, nil, nil)
                if c < 0 {
                    if stopped.withLockedValue({ $0 }) { return }
                    if errno == EINTR { continue }
                    return
                }
                let conn = Connection(fd: c)
                list.withLockedValue { $0.append(conn) }
                Thread { script(conn) }.start()
            }
        }
        thread.start()
    }

    /// The connections accepted so far, in order.
    public var accepted: [Connection] { connections.withLockedValue { $0 } }

    public func stop() {
        stopped.withLockedValue { $0 = true }
        shutdown(listener, Int32(SHUT_RDWR))
        Glibc.close(listener)
    }
}
