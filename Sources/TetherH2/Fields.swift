/// Why a stream's request fields are malformed (RFC 9113 §8.1.1): the stream is reset with
/// PROTOCOL_ERROR, and the request never reaches routing.
public struct H2Malformed: Error, Equatable, CustomStringConvertible, Sendable {
    public var description: String
    init(_ d: String) { description = d }
}

/// A request as a stream's fields give it, checked by RFC 9113 §8.2-8.3, and written as the
/// HTTP/1.1 head the rest of Tether reads (so that the head parser's checks, the path
/// normalisation and routing are the same for both protocols). Bytes throughout: nothing is
/// turned into text on the way.
public struct H2Request: Equatable, Sendable {
    public var method: [UInt8]
    public var scheme: [UInt8]?
    public var authority: [UInt8]?
    public var path: [UInt8]?
    /// The regular fields in order, `cookie` crumbs joined into one at the end (§8.2.3).
    public var fields: [H2Field]

    static let contentLength = Array("content-length".utf8)
    static let pseudoMethod = Array(":method".utf8)
    static let pseudoScheme = Array(":scheme".utf8)
    static let pseudoAuthority = Array(":authority".utf8)
    static let pseudoPath = Array(":path".utf8)
    static let cookie = Array("cookie".utf8)
    static let host = Array("host".utf8)
    static let te = Array("te".utf8)
    static let trailers = Array("trailers".utf8)
    static let connect = Array("CONNECT".utf8)
    static let options = Array("OPTIONS".utf8)
    /// Fields HTTP/2 has no place for (§8.2.2).
    static let connectionSpecific: [[UInt8]] = ["connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"].map { Array($0.utf8) }

    static func text(_ b: [UInt8]) -> String { String(decoding: b, as: UTF8.self) }

    /// A content-length value: decimal digits only, at most 18 of them.
    static func decimal(_ b: [UInt8]) -> Int64? {
        guard !b.isEmpty, b.count <= 18, b.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return b.reduce(Int64(0)) { $0 * 10 + Int64($1 - 0x30) }
    }

    public static func parse(_ list: [H2Field]) -> Result<H2Request, H2Malformed> {
        var method: [UInt8]?, scheme: [UInt8]?, authority: [UInt8]?, path: [UInt8]?
        var fields: [H2Field] = []
        var cookies: [[UInt8]] = []
        var host: [UInt8]?
        var regularSeen = false
        for f in list {
            // Text is made of a name only for an error's message.
            var name: String { text(f.name) }
            guard !f.name.isEmpty else { return .failure(H2Malformed("an empty field name")) }
            guard validValue(f.value) else { return .failure(H2Malformed("field \"\(name)\" has a value with NUL, CR, LF or surrounding whitespace")) }
            if f.name[0] == UInt8(ascii: ":") {
                guard !regularSeen else { return .failure(H2Malformed("pseudo-header \(name) after a regular field")) }
                func set(_ slot: inout [UInt8]?) -> H2Malformed? {
                    guard slot == nil else { return H2Malformed("pseudo-header \(name) twice") }
                    slot = f.value
                    return nil
                }
                let problem: H2Malformed?
                if f.name == Self.pseudoMethod {
                    problem = set(&method)
                } else if f.name == Self.pseudoScheme {
                    problem = set(&scheme)
                } else if f.name == Self.pseudoAuthority {
                    problem = set(&authority)
                } else if f.name == Self.pseudoPath {
                    problem = set(&path)
                } else {
                    problem = H2Malformed("pseudo-header \(name) in a request")
                }
                if let problem { return .failure(problem) }
                continue
            }
            regularSeen = true
            guard validName(f.name) else { return .failure(H2Malformed("field name \"\(name)\" is not a lowercase token")) }
            guard !connectionSpecific.contains(f.name) else { return .failure(H2Malformed("connection-specific field \"\(name)\"")) }
            if f.name == Self.te && f.value != Self.trailers { return .failure(H2Malformed("\"te: \(text(f.value))\" (only \"trailers\" is allowed)")) }
            if f.name == Self.cookie { cookies.append(f.value); continue }
            if f.name == Self.host {
                guard host == nil else { return .failure(H2Malformed("two host fields")) }
                host = f.value
            }
            if f.name == Self.contentLength && decimal(f.value) == nil { return .failure(H2Malformed("content-length \"\(text(f.value))\" is not a number")) }
            fields.append(f)
        }
        guard let method, !method.isEmpty, validName(method.map { $0 | 0x20 }) else { return .failure(H2Malformed("no :method")) }
        if method == Self.connect {
            guard scheme == nil, path == nil, authority != nil else { return .failure(H2Malformed("CONNECT needs :authority and no :scheme or :path")) }
        } else {
            guard scheme != nil else { return .failure(H2Malformed("no :scheme")) }
            guard let p = path, !p.isEmpty else { return .failure(H2Malformed("no :path")) }
            guard p[0] == UInt8(ascii: "/") || (p == [UInt8(ascii: "*")] && method == Self.options) else {
                return .failure(H2Malformed(":path \"\(text(p))\" is not origin-form"))
            }
            guard !p.contains(where: { $0 <= 0x20 || $0 == 0x7f }) else { return .failure(H2Malformed(":path has spaces or control characters")) }
        }
        if let a = authority, a.contains(where: { $0 <= 0x20 || $0 == 0x7f || $0 == UInt8(ascii: "@") }) {
            return .failure(H2Malformed(":authority \"\(text(a))\" is not a host"))
        }
        // §8.3.1: Host and :authority must name the same.
        if let authority, let host, authority.map({ ASCIIFold.lower($0) }) != host.map({ ASCIIFold.lower($0) }) {
            return .failure(H2Malformed("host \"\(text(host))\" differs from :authority \"\(text(authority))\""))
        }
        if !cookies.isEmpty {
            var joined: [UInt8] = []
            for (i, c) in cookies.enumerated() {
                if i > 0 { joined += [UInt8(ascii: ";"), 0x20] }
                joined += c
            }
            fields.append(H2Field(name: Self.cookie, value: joined))
        }
        return .success(H2Request(method: method, scheme: scheme, authority: authority, path: path, fields: fields))
    }

    public static func validName(_ name: [UInt8]) -> Bool {
        name.allSatisfy { c in
            switch c {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"): return true
            default: return "!#$%&'*+-.^_`|~".utf8.contains(c)
            }
        }
    }

    public static func validValue(_ u: [UInt8]) -> Bool {
        if let f = u.first, f == 0x20 || f == 0x09 { return false }
        if let l = u.last, l == 0x20 || l == 0x09 { return false }
        return !u.contains { $0 == 0 || $0 == 0x0a || $0 == 0x0d }
    }

    /// Whether a content-length field gives the body's size.
    public var hasContentLength: Bool { fields.contains { $0.name == Self.contentLength } }

    /// The HTTP/1.1 head of this request: the request line, `host` from :authority (else the
    /// host field), the fields, `transfer-encoding: chunked` when a body of unknown length
    /// follows (`bodyFollows` without content-length), so that it can be framed as HTTP/1.1, and
    /// `connection: close` (one request per stream).
    public func http1Head(bodyFollows: Bool, into out: inout [UInt8]) {
        out += method
        out.append(0x20)
        out += path ?? authority ?? []
        out += Array(" HTTP/1.1\r\n".utf8)
        if let authority {
            out += Array("host: ".utf8)
            out += authority
            out += [13, 10]
        }
        for f in fields {
            if f.name == Self.host && authority != nil { continue }
            out += f.name
            out += [UInt8(ascii: ":"), 0x20]
            out += f.value
            out += [13, 10]
        }
        if bodyFollows && !hasContentLength { out += Array("transfer-encoding: chunked\r\n".utf8) }
        out += Array("connection: close\r\n\r\n".utf8)
    }
}

enum ASCIIFold {
    static func lower(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5a ? c | 0x20 : c }
}

/// A response's header block (RFC 7541), written without a dynamic table or Huffman coding, so
/// that the encoder keeps no state per connection: `:status` (indexed for the statuses of the
/// static table), then each field as a literal not indexed, its name lowercased. Fields HTTP/2
/// has no place for, and those a `Connection` field names, are left out (§8.2.2).
public enum H2ResponseBlock {
    /// `status` nil: a trailer block (no pseudo-header).
    public static func encode(status: Int?, fields: [(name: String, value: String)], into out: inout [UInt8]) {
        if let status { Self.status(status, into: &out) }
        var named = Set<String>()
        for f in fields where f.name.lowercased() == "connection" {
            for token in f.value.split(separator: ",") { named.insert(token.trimmingCharacters().lowercased()) }
        }
        for f in fields {
            let name = f.name.lowercased()
            let nameBytes = Array(name.utf8)
            guard !H2Request.connectionSpecific.contains(nameBytes), !named.contains(name) else { continue }
            nameBytes.withUnsafeBytes { n in Array(f.value.utf8).withUnsafeBytes { v in field(name: n, value: v, into: &out) } }
        }
    }

    /// The `:status` of a response block.
    public static func status(_ status: Int, into out: inout [UInt8]) {
        switch status {
        case 200: out.append(0x88)
        case 204: out.append(0x89)
        case 206: out.append(0x8a)
        case 304: out.append(0x8b)
        case 400: out.append(0x8c)
        case 404: out.append(0x8d)
        case 500: out.append(0x8e)
        default:
            out.append(0x08)
            out.append(3)
            out.append(UInt8(ascii: "0") + UInt8(status / 100 % 10))
            out.append(UInt8(ascii: "0") + UInt8(status / 10 % 10))
            out.append(UInt8(ascii: "0") + UInt8(status % 10))
        }
    }

    /// One field, a literal not indexed, its name lowercased as it is copied (no text made).
    public static func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer, into out: inout [UInt8]) {
        out.append(0x00)
        integer(name.count, prefixBits: 7, into: &out)
        for c in name { out.append(c >= 0x41 && c <= 0x5a ? c | 0x20 : c) }
        integer(value.count, prefixBits: 7, into: &out)
        out.append(contentsOf: value)
    }

    /// RFC 7541 §5.1, the first byte's high bits left 0.
    static func integer(_ value: Int, prefixBits: Int, into out: inout [UInt8]) {
        let max = (1 << prefixBits) - 1
        if value < max {
            out.append(UInt8(value))
            return
        }
        out.append(UInt8(max))
        var v = value - max
        while v >= 128 {
            out.append(UInt8(v & 0x7f | 0x80))
            v >>= 7
        }
        out.append(UInt8(v))
    }
}

private extension Substring {
    func trimmingCharacters() -> String {
        var s = self
        while s.first == " " || s.first == "\t" { s = s.dropFirst() }
        while s.last == " " || s.last == "\t" { s = s.dropLast() }
        return String(s)
    }
}
