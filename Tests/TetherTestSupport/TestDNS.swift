#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers

/// A DNS server of the test's own on 127.0.0.1 (UDP, a port the kernel chose): it answers A
/// queries from a table the test changes as it goes, or fails them as told.
public final class TestDNS: @unchecked Sendable {
    public enum Reply: Sendable {
        case addresses([String], ttl: UInt32)
        case servfail
        case nxdomain
        /// No answer at all (the resolver's timeout runs out).
        case silence
    }

    public struct TestDNSError: Error {}
    public let port: Int
    private let fd: Int32
    private let table = NIOLockedValueBox<[String: Reply]>([:])
    private let queries = NIOLockedValueBox(0)
    private var thread: pthread_t?
    private let stopping = NIOLockedValueBox(false)

    public init() throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        self.fd = fd
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        a.sin_port = 0
        _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        port = Int(UInt16(bigEndian: a.sin_port))
        guard port != 0 else { throw TestDNSError() }
        // Reads wake every 50 ms to see whether the test is over.
        var tv = timeval(tv_sec: 0, tv_usec: 50_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let box = Unmanaged.passRetained(self)
        var t = pthread_t()
        pthread_create(&t, nil, { arg in
            let me = Unmanaged<TestDNS>.fromOpaque(arg!).takeRetainedValue()
            me.serve()
            return nil
        }, box.toOpaque())
        thread = t
    }

    /// What `name` answers from now on.
    public func set(_ name: String, _ reply: Reply) { table.withLockedValue { $0[name.lowercased()] = reply } }

    /// Queries received so far.
    public var queryCount: Int { queries.withLockedValue { $0 } }

    public func stop() {
        stopping.withLockedValue { $0 = true }
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        close(fd)
    }

    private func serve() {
        var buf = [UInt8](repeating: 0, count: 1500)
        while !stopping.withLockedValue({ $0 }) {
            var from = sockaddr_storage()
            var fromLen = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let n = buf.withUnsafeMutableBytes { b in
                withUnsafeMutablePointer(to: &from) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, b.baseAddress, b.count, 0, $0, &fromLen) } }
            }
            guard n >= 12 else { continue }
            queries.withLockedValue { $0 += 1 }
            let q = Array(buf[0..<n])
            // The question: labels up to the zero byte, then type and class.
            var at = 12
            var labels: [String] = []
            while at < q.count, q[at] != 0 {
                let l = Int(q[at])
                guard at + 1 + l <= q.count else { break }
                labels.append(String(decoding: q[(at + 1)..<(at + 1 + l)], as: UTF8.self))
                at += 1 + l
            }
            guard at + 5 <= q.count else { continue }
            let questionEnd = at + 5
            let qtype = UInt16(q[at + 1]) << 8 | UInt16(q[at + 2])
            let name = labels.joined(separator: ".").lowercased()
            let reply = table.withLockedValue { $0[name] } ?? .nxdomain
            var r = Array(q[0..<2])
            var rcode: UInt8 = 0
            var answers: [[UInt8]] = []
            switch reply {
            case .silence: continue
            case .servfail: rcode = 2
            case .nxdomain: rcode = 3
            case .addresses(let list, let ttl):
                guard qtype == 1 else { break }
                for a in list {
                    var addr = in_addr()
                    inet_pton(AF_INET, a, &addr)
                    var rr: [UInt8] = [0xC0, 12, 0, 1, 0, 1]
                    rr += [UInt8(ttl >> 24), UInt8(ttl >> 16 & 0xFF), UInt8(ttl >> 8 & 0xFF), UInt8(ttl & 0xFF), 0, 4]
                    rr += withUnsafeBytes(of: addr.s_addr) { Array($0) }
                    answers.append(rr)
                }
            }
            r += [0x81, 0x80 | rcode, 0, 1, 0, UInt8(answers.count), 0, 0, 0, 0]
            r += q[12..<questionEnd]
            for a in answers { r += a }
            _ = r.withUnsafeBytes { b in
                withUnsafePointer(to: &from) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, b.baseAddress, b.count, 0, $0, fromLen) } }
            }
        }
    }
}
