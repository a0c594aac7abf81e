#if canImport(Glibc)
import Glibc
#endif

/// A client's address as something in front of Tether told it (the PROXY protocol, or a header
/// that `real_ip_header` names): 4 or 16 bytes and a port, held inline (no allocation).
public struct ForwardedAddress: Equatable, Sendable {
    /// `AF_INET` or `AF_INET6`.
    public var family: Int32
    var high: UInt64 = 0
    var low: UInt64 = 0
    public var port: UInt16

    /// From 4 or 16 address bytes.
    public init?(bytes: UnsafeRawBufferPointer, port: UInt16) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        family = bytes.count == 4 ? AF_INET : AF_INET6
        self.port = port
        withUnsafeMutableBytes(of: &high) { h in
            withUnsafeMutableBytes(of: &low) { l in
                for i in 0..<bytes.count { if i < 8 { h[i] = bytes[i] } else { l[i - 8] = bytes[i] } }
            }
        }
    }

    /// From a numeric address's text (`192.0.2.1`, `2001:db8::1`; no brackets, no port).
    public init?(text: UnsafeRawBufferPointer, port: UInt16 = 0) {
        guard text.count > 0, text.count < 46, !text.contains(0) else { return nil }
        let parsed = withUnsafeTemporaryAllocation(of: CChar.self, capacity: 48) { c -> ForwardedAddress? in
            for i in 0..<text.count { c[i] = CChar(bitPattern: text[i]) }
            c[text.count] = 0
            var v4 = in_addr()
            if inet_pton(AF_INET, c.baseAddress, &v4) == 1 {
                return withUnsafeBytes(of: &v4) { ForwardedAddress(bytes: $0, port: port) }
            }
            var v6 = in6_addr()
            guard inet_pton(AF_INET6, c.baseAddress, &v6) == 1 else { return nil }
            return withUnsafeBytes(of: &v6) { ForwardedAddress(bytes: $0, port: port) }
        }
        guard let parsed else { return nil }
        self = parsed
    }

    /// The address bytes (4 or 16), for `allow`/`deny` and `set_real_ip_from`.
    public func withBytes<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        let pair = (high, low)
        return withUnsafeBytes(of: pair) { body(UnsafeRawBufferPointer(rebasing: $0[0..<(family == AF_INET ? 4 : 16)])) }
    }

    public var bytes: [UInt8] { withBytes { Array($0) } }

    /// The address as text (`inet_ntop`), written into `out`.
    public func writeText<S: HeadSink & ~Copyable>(into out: inout S) {
        withBytes { b in
            withUnsafeTemporaryAllocation(of: CChar.self, capacity: 64) { text in
                guard inet_ntop(family, b.baseAddress, text.baseAddress, 64) != nil else { return }
                out.put(UnsafeRawBufferPointer(start: text.baseAddress, count: strlen(text.baseAddress!)))
            }
        }
    }
}

/// The PROXY protocol (HAProxy's, versions 1 and 2), read before TLS and HTTP on a `listen …
/// proxy_protocol` address: the client's address as the load balancer in front saw it. Strict:
/// anything but a whole, well-formed header of at most `maximumLength` bytes is refused, and the
/// connection never reaches HTTP.
public enum ProxyProtocol {
    /// nginx's limit (NGX_PROXY_PROTOCOL_MAX_HEADER): a v2 header's TLVs included.
    public static let maximumLength = 4096
    /// A v1 line's limit, CRLF included (the specification's 107).
    public static let v1MaximumLength = 107
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    public struct Header: Equatable, Sendable {
        /// The client and the address it connected to; nil for `UNKNOWN` (v1), `LOCAL` (v2) and
        /// families other than TCP over IPv4 or IPv6: the connection's own addresses stand.
        public var source: ForwardedAddress?
        public var destination: ForwardedAddress?
        /// Bytes the header took: what follows is TLS or HTTP.
        public var length: Int
        public var version: Int
    }

    public enum Outcome: Equatable, Sendable {
        /// A prefix of a valid header: wait for more bytes.
        case incomplete
        case complete(Header)
        /// Why it is refused (for the error log).
        case invalid(String)
    }

    public static func parse(_ p: UnsafeRawBufferPointer) -> Outcome {
        guard !p.isEmpty else { return .incomplete }
        if p[0] == 0x0D { return parseV2(p) }
        if p[0] == UInt8(ascii: "P") { return parseV1(p) }
        return .invalid("no PROXY protocol header")
    }

    // MARK: Version 1: "PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n"

    static func parseV1(_ p: UnsafeRawBufferPointer) -> Outcome {
        let prefix = Array("PROXY ".utf8)
        for i in 0..<min(p.count, prefix.count) where p[i] != prefix[i] { return .invalid("not a PROXY protocol header") }
        // The line ends at the first CR, which must be followed by LF.
        var end = -1
        for i in 0..<min(p.count, v1MaximumLength) where p[i] == 0x0D || p[i] == 0x0A {
            end = i
            break
        }
        if end < 0 { return p.count >= v1MaximumLength ? .invalid("a PROXY protocol v1 header longer than 107 bytes") : .incomplete }
        guard p[end] == 0x0D else { return .invalid("a bare LF in the PROXY protocol v1 header") }
        guard end + 1 < p.count else { return .incomplete }
        guard p[end + 1] == 0x0A else { return .invalid("a CR without LF in the PROXY protocol v1 header") }
        let line = UnsafeRawBufferPointer(rebasing: p[prefix.count..<end])
        let fields = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        let length = end + 2
        guard let proto = fields.first else { return .invalid("an empty PROXY protocol v1 header") }
        if proto.elementsEqual("UNKNOWN".utf8) {
            // The sender does not know the client (a health check of its own): anything may follow.
            return .complete(Header(source: nil, destination: nil, length: length, version: 1))
        }
        let v6: Bool
        if proto.elementsEqual("TCP4".utf8) { v6 = false } else if proto.elementsEqual("TCP6".utf8) { v6 = true } else {
            return .invalid("an unknown protocol in the PROXY protocol v1 header")
        }
        guard fields.count == 5 else { return .invalid("a PROXY protocol v1 header without its four fields") }
        guard let src = address(fields[1], v6: v6), let dst = address(fields[2], v6: v6),
              let sport = port(fields[3]), let dport = port(fields[4]) else {
            return .invalid("a bad address or port in the PROXY protocol v1 header")
        }
        var s = src, d = dst
        s.port = sport
        d.port = dport
        return .complete(Header(source: s, destination: d, length: length, version: 1))
    }

    static func address(_ text: Slice<UnsafeRawBufferPointer>, v6: Bool) -> ForwardedAddress? {
        guard let a = ForwardedAddress(text: UnsafeRawBufferPointer(rebasing: text)), (a.family == AF_INET6) == v6 else { return nil }
        return a
    }

    /// 0-65535 in decimal, without a sign or a leading zero.
    static func port(_ text: Slice<UnsafeRawBufferPointer>) -> UInt16? {
        guard (1...5).contains(text.count), text.first != UInt8(ascii: "0") || text.count == 1 else { return nil }
        var v = 0
        for c in text {
            guard c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") else { return nil }
            v = v * 10 + Int(c - UInt8(ascii: "0"))
        }
        return v <= 65535 ? UInt16(v) : nil
    }

    // MARK: Version 2: the signature, version and command, family, length, addresses, TLVs

    static func parseV2(_ p: UnsafeRawBufferPointer) -> Outcome {
        for i in 0..<min(p.count, 12) where p[i] != v2Signature[i] { return .invalid("not a PROXY protocol header") }
        guard p.count >= 16 else { return .incomplete }
        guard p[12] >> 4 == 2 else { return .invalid("PROXY protocol version \(p[12] >> 4)") }
        let command = p[12] & 0x0F
        guard command <= 1 else { return .invalid("an unknown PROXY protocol v2 command \(command)") }
        let bodyLength = Int(p[14]) << 8 | Int(p[15])
        let length = 16 + bodyLength
        guard length <= maximumLength else { return .invalid("a PROXY protocol v2 header of \(length) bytes, over the limit of \(maximumLength)") }
        guard p.count >= length else { return .incomplete }
        let body = UnsafeRawBufferPointer(rebasing: p[16..<length])
        let family = p[13]
        var addressLength = 0
        var header = Header(source: nil, destination: nil, length: length, version: 2)
        // LOCAL: the sender's own connection (a health check); the block is discarded whole (its
        // addresses are not the client's), as the specification says.
        if command == 0 {
            addressLength = body.count
        } else {
            switch family {
            case 0x11, 0x21:  // TCP over IPv4, IPv6: source, destination, their ports
                let n = family == 0x11 ? 4 : 16
                addressLength = 2 * n + 4
                guard body.count >= addressLength else {
                    return .invalid("a PROXY protocol v2 \(n == 4 ? "TCP4" : "TCP6") header without its addresses")
                }
                let sport = UInt16(body[2 * n]) << 8 | UInt16(body[2 * n + 1]), dport = UInt16(body[2 * n + 2]) << 8 | UInt16(body[2 * n + 3])
                header.source = ForwardedAddress(bytes: UnsafeRawBufferPointer(rebasing: body[0..<n]), port: sport)
                header.destination = ForwardedAddress(bytes: UnsafeRawBufferPointer(rebasing: body[n..<(2 * n)]), port: dport)
            default:
                // UNSPEC, UDP, UNIX: not a TCP client's address; the connection's own stands.
                addressLength = family == 0x00 ? 0 : min(body.count, family >> 4 == 3 ? 216 : family >> 4 == 1 ? 12 : 36)
            }
        }
        // TLVs (type, 16-bit length, value) are skipped, but each must fit.
        var at = addressLength
        while at < body.count {
            guard at + 3 <= body.count else { return .invalid("a cut TLV in the PROXY protocol v2 header") }
            let n = Int(body[at + 1]) << 8 | Int(body[at + 2])
            guard at + 3 + n <= body.count else { return .invalid("a TLV longer than the PROXY protocol v2 header") }
            at += 3 + n
        }
        return .complete(header)
    }

    /// A version 2 header for `source` → `destination` (TCP; `PROXY` command), as `proxy_protocol
    /// on` sends it to a backend. Both must be of one family.
    public static func v2Header(source: ForwardedAddress, destination: ForwardedAddress) -> [UInt8] {
        var h = v2Signature
        let v4 = source.family == AF_INET && destination.family == AF_INET
        h += [0x21, v4 ? 0x11 : 0x21, 0, v4 ? 12 : 36]
        func put(_ a: ForwardedAddress) {
            if v4 || a.family == AF_INET6 {
                a.withBytes { h += $0 }
            } else {
                // An IPv4 address beside an IPv6 one goes as ::ffff:a.b.c.d.
                h += [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]
                a.withBytes { h += $0 }
            }
        }
        put(source)
        put(destination)
        h += [UInt8(source.port >> 8), UInt8(source.port & 0xFF), UInt8(destination.port >> 8), UInt8(destination.port & 0xFF)]
        return h
    }
}

/// nginx's realip rules (`real_ip_header`, `real_ip_recursive`) over a request's head: the client
/// address a trusted peer says the request is from. Pure: the caller checks the peer is trusted
/// (`set_real_ip_from`) and applies the answer.
public enum RealIP {
    /// From the header `name` (lowercased): a single address (`X-Real-IP` and any other
    /// header; the first line), or with `forwardedFor` an `X-Forwarded-For` list, read from the
    /// right over every line of it: the last address, or with `recursive` the last one that is
    /// not `trusted` (the first of the list when all are). Nil when the header is missing or an
    /// address in the way is not one: the peer's own address stands, as in nginx.
    public static func fromHeader(_ head: HeadLayout, _ p: UnsafeRawBufferPointer, name: [UInt8], forwardedFor: Bool,
                                  recursive: Bool, trusted: (ForwardedAddress) -> Bool) -> ForwardedAddress? {
        func named(_ h: HeaderField) -> Bool { HeadLayout.field(h, isNamed: name, in: p) }
        guard forwardedFor else {
            guard let h = head.headers.first(where: named) else { return nil }
            return ForwardedAddress(text: trimmed(UnsafeRawBufferPointer(rebasing: p[Int(h.valueStart)..<Int(h.valueEnd)])))
        }
        var found: ForwardedAddress?
        for h in head.headers.reversed() where named(h) {
            var end = Int(h.valueEnd)
            let start = Int(h.valueStart)
            while end >= start {
                var comma = end - 1
                while comma >= start && p[comma] != UInt8(ascii: ",") { comma -= 1 }
                let item = trimmed(UnsafeRawBufferPointer(rebasing: p[(comma + 1)..<end]))
                end = comma
                if item.isEmpty { continue }
                guard let a = ForwardedAddress(text: item) else { return nil }
                found = a
                if !recursive || !trusted(a) { return a }
            }
        }
        return found
    }

    static func trimmed(_ b: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        var s = 0, e = b.count
        while s < e && (b[s] == 0x20 || b[s] == 0x09) { s += 1 }
        while e > s && (b[e - 1] == 0x20 || b[e - 1] == 0x09) { e -= 1 }
        return UnsafeRawBufferPointer(rebasing: b[s..<e])
    }
}
