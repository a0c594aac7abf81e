#if canImport(Glibc)
import Glibc
#endif
import TetherIO

/// DNS over UDP for `server … resolve` (RFC 1035): a query for the A or AAAA records of a name,
/// and the answer's addresses with their TTL. Every byte of an answer is treated as hostile: the
/// ID and the question must match, names are followed through compression pointers a bounded
/// number of times, and a record that runs past the message ends the parse.
enum DNS {
    enum RecordType: UInt16, Sendable { case a = 1, cname = 5, aaaa = 28 }

    enum Failure: Error, Equatable, CustomStringConvertible {
        /// RCODE 2, 3, 5, … as the server said it.
        case rcode(Int)
        /// Not an answer to our question (wrong ID, not a response, another question).
        case mismatch
        case malformed
        /// The answer was cut (TC): the rest would need TCP, which Tether does not speak here.
        case truncated
        case timeout
        case io(Int32)

        var description: String {
            switch self {
            case .rcode(2): "server failure (SERVFAIL)"
            case .rcode(3): "host not found (NXDOMAIN)"
            case .rcode(5): "query refused (REFUSED)"
            case .rcode(let r): "error code \(r)"
            case .mismatch: "an answer to another query"
            case .malformed: "a malformed answer"
            case .truncated: "a truncated answer (TCP is not tried)"
            case .timeout: "timed out"
            case .io(let e): "\(String(cString: strerror(e))) (\(e))"
            }
        }
    }

    struct Answer: Equatable {
        /// Numeric addresses, in the answer's order.
        var addresses: [String]
        /// The smallest TTL of the records used, in seconds.
        var ttl: UInt32
    }

    /// A query with recursion desired. Nil for a name that is not a valid DNS name.
    static func query(id: UInt16, name: String, type: RecordType) -> [UInt8]? {
        var m: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        guard let qname = encodeName(name) else { return nil }
        m += qname
        m += [UInt8(type.rawValue >> 8), UInt8(type.rawValue & 0xFF), 0, 1]
        return m
    }

    static func encodeName(_ name: String) -> [UInt8]? {
        var out: [UInt8] = []
        let trimmed = name.hasSuffix(".") ? String(name.dropLast()) : name
        guard !trimmed.isEmpty, trimmed.utf8.count <= 253 else { return nil }
        for label in trimmed.split(separator: ".", omittingEmptySubsequences: false) {
            let bytes = Array(label.utf8)
            guard (1...63).contains(bytes.count), bytes.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else { return nil }
            out.append(UInt8(bytes.count))
            out += bytes
        }
        out.append(0)
        return out
    }

    /// The addresses an answer gives for `name`: its A (or AAAA) records, directly or through the
    /// CNAME chain the answer carries.
    static func parse(_ m: [UInt8], id: UInt16, name: String, type: RecordType) -> Result<Answer, Failure> {
        guard m.count >= 12 else { return .failure(.malformed) }
        guard UInt16(m[0]) << 8 | UInt16(m[1]) == id, m[2] & 0x80 != 0 else { return .failure(.mismatch) }
        if m[2] & 0x02 != 0 { return .failure(.truncated) }
        let rcode = Int(m[3] & 0x0F)
        guard rcode == 0 else { return .failure(.rcode(rcode)) }
        let qd = Int(m[4]) << 8 | Int(m[5]), an = Int(m[6]) << 8 | Int(m[7])
        guard qd == 1 else { return .failure(.mismatch) }
        var at = 12
        guard let (qname, afterName) = readName(m, at), afterName + 4 <= m.count else { return .failure(.malformed) }
        let qtype = UInt16(m[afterName]) << 8 | UInt16(m[afterName + 1])
        guard qname == canonical(name), qtype == type.rawValue else { return .failure(.mismatch) }
        at = afterName + 4
        var records: [(owner: String, type: UInt16, ttl: UInt32, data: ArraySlice<UInt8>, dataAt: Int)] = []
        for _ in 0..<an {
            guard let (owner, next) = readName(m, at), next + 10 <= m.count else { return .failure(.malformed) }
            let rtype = UInt16(m[next]) << 8 | UInt16(m[next + 1])
            let ttl = UInt32(m[next + 4]) << 24 | UInt32(m[next + 5]) << 16 | UInt32(m[next + 6]) << 8 | UInt32(m[next + 7])
            let length = Int(m[next + 8]) << 8 | Int(m[next + 9])
            let start = next + 10
            guard start + length <= m.count else { return .failure(.malformed) }
            records.append((owner, rtype, ttl, m[start..<(start + length)], start))
            at = start + length
        }
        // The names that stand for `name`: itself and the CNAME targets reached from it.
        var names: Set<String> = [qname]
        var ttl = UInt32.max
        var grew = true
        while grew {
            grew = false
            for r in records where r.type == RecordType.cname.rawValue && names.contains(r.owner) {
                guard let (target, _) = readName(m, r.dataAt) else { return .failure(.malformed) }
                if names.insert(target).inserted {
                    grew = true
                    ttl = min(ttl, r.ttl)
                }
            }
        }
        var addresses: [String] = []
        for r in records where r.type == type.rawValue && names.contains(r.owner) {
            let expected = type == .a ? 4 : 16
            guard r.data.count == expected else { return .failure(.malformed) }
            var text = [CChar](repeating: 0, count: 64)
            let ok = Array(r.data).withUnsafeBytes { raw in
                inet_ntop(type == .a ? AF_INET : AF_INET6, raw.baseAddress, &text, 64) != nil
            }
            guard ok else { return .failure(.malformed) }
            addresses.append(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
            ttl = min(ttl, r.ttl)
        }
        return .success(Answer(addresses: addresses, ttl: addresses.isEmpty ? 0 : ttl))
    }

    static func canonical(_ name: String) -> String {
        (name.hasSuffix(".") ? String(name.dropLast()) : name).lowercased()
    }

    /// A name at `at` (lowercased, dotted), following compression pointers at most 16 times;
    /// returns where the name ends in the message (after the first pointer, if any).
    static func readName(_ m: [UInt8], _ start: Int) -> (String, Int)? {
        var labels: [String] = []
        var at = start
        var end: Int?
        var jumps = 0
        var length = 0
        while true {
            guard at < m.count else { return nil }
            let b = m[at]
            if b == 0 {
                if end == nil { end = at + 1 }
                break
            }
            if b & 0xC0 == 0xC0 {
                guard at + 1 < m.count, jumps < 16 else { return nil }
                if end == nil { end = at + 2 }
                at = Int(b & 0x3F) << 8 | Int(m[at + 1])
                jumps += 1
                continue
            }
            guard b & 0xC0 == 0 else { return nil }
            let n = Int(b)
            guard at + 1 + n <= m.count else { return nil }
            length += n + 1
            guard length <= 255 else { return nil }
            labels.append(String(decoding: m[(at + 1)...(at + n)], as: UTF8.self).lowercased())
            at += 1 + n
        }
        return (labels.joined(separator: "."), end!)
    }

    /// Asks `servers` in turn (each `timeoutMs`) for `name`'s addresses of `type`, over UDP from a
    /// random port with a random ID; only an answer from the server asked counts. Blocks the
    /// calling thread (the resolver's own, never a loop).
    static func lookup(_ name: String, type: RecordType, servers: [InetAddress], timeoutMs: Int) -> Result<Answer, Failure> {
        var last = Failure.timeout
        for server in servers {
            let id = UInt16.random(in: 0...UInt16.max)
            guard let q = query(id: id, name: name, type: type) else { return .failure(.malformed) }
            switch exchange(q, with: server, timeoutMs: timeoutMs, id: id, name: name, type: type) {
            case .success(let a): return .success(a)
            // An authoritative "no such name" is the answer; other failures try the next server.
            case .failure(.rcode(3)): return .failure(.rcode(3))
            case .failure(let f): last = f
            }
        }
        return .failure(last)
    }

    private static func exchange(_ q: [UInt8], with server: InetAddress, timeoutMs: Int, id: UInt16, name: String, type: RecordType) -> Result<Answer, Failure> {
        let fd = socket(server.family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(.io(errno)) }
        defer { close(fd) }
        // connect(): the kernel then passes up only datagrams from the server asked.
        let rc = server.withSockaddr { sa, len in connect(fd, sa, len) }
        guard rc == 0 else { return .failure(.io(errno)) }
        guard q.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, 0) }) == q.count else { return .failure(.io(errno)) }
        let deadline = IOLoop.monotonicNanoseconds() + UInt64(timeoutMs) * 1_000_000
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let now = IOLoop.monotonicNanoseconds()
            guard now < deadline else { return .failure(.timeout) }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(max(1, (deadline - now) / 1_000_000)))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                return .failure(.io(errno))
            }
            switch parse(Array(buffer[0..<n]), id: id, name: name, type: type) {
            // A stray or forged datagram is dropped; the real answer may still come.
            case .failure(.mismatch): continue
            case let r: return r
            }
        }
    }
}
