import NIOHPACK

/// Why a stream's request fields are malformed (RFC 9113 §8.1.1): the stream is reset with
/// PROTOCOL_ERROR, and the request never reaches routing.
public struct H2Malformed: Error, Equatable, CustomStringConvertible, Sendable {
    public var description: String
    init(_ d: String) { description = d }
}

/// A request as a stream's fields give it, checked by RFC 9113 §8.2-8.3, and written as the
/// HTTP/1.1 head the rest of Tether reads (so that the head parser's checks, the path
/// normalisation and routing are the same for both protocols).
public struct H2Request: Equatable, Sendable {
    public var method: String
    public var scheme: String?
    public var authority: String?
    public var path: String?
    /// The regular fields in order, `cookie` crumbs joined into one (§8.2.3).
    public var fields: [(name: String, value: String)]

    public static func == (a: H2Request, b: H2Request) -> Bool {
        a.method == b.method && a.scheme == b.scheme && a.authority == b.authority && a.path == b.path
            && a.fields.elementsEqual(b.fields) { $0.name == $1.name && $0.value == $1.value }
    }

    /// Fields HTTP/2 has no place for (§8.2.2).
    static let connectionSpecific: Set<String> = ["connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"]

    public static func parse(_ headers: HPACKHeaders) -> Result<H2Request, H2Malformed> {
        var method: String?, scheme: String?, authority: String?, path: String?
        var fields: [(name: String, value: String)] = []
        var cookies: [String] = []
        var host: String?
        var regularSeen = false
        for (name, value, _) in headers {
            guard !name.isEmpty else { return .failure(H2Malformed("an empty field name")) }
            guard Self.validValue(value) else { return .failure(H2Malformed("field \"\(name)\" has a value with NUL, CR, LF or surrounding whitespace")) }
            if name.utf8.first == UInt8(ascii: ":") {
                guard !regularSeen else { return .failure(H2Malformed("pseudo-header \(name) after a regular field")) }
                func set(_ slot: inout String?) -> H2Malformed? {
                    guard slot == nil else { return H2Malformed("pseudo-header \(name) twice") }
                    slot = value
                    return nil
                }
                let problem: H2Malformed?
                switch name {
                case ":method": problem = set(&method)
                case ":scheme": problem = set(&scheme)
                case ":authority": problem = set(&authority)
                case ":path": problem = set(&path)
                default: problem = H2Malformed("pseudo-header \(name) in a request")
                }
                if let problem { return .failure(problem) }
                continue
            }
            regularSeen = true
            guard Self.validName(name) else { return .failure(H2Malformed("field name \"\(name)\" is not a lowercase token")) }
            guard !connectionSpecific.contains(name) else { return .failure(H2Malformed("connection-specific field \"\(name)\"")) }
            if name == "te" && value != "trailers" { return .failure(H2Malformed("\"te: \(value)\" (only \"trailers\" is allowed)")) }
            if name == "cookie" { cookies.append(value); continue }
            if name == "host" {
                guard host == nil else { return .failure(H2Malformed("two host fields")) }
                host = value
            }
            fields.append((name, value))
        }
        guard let method else { return .failure(H2Malformed("no :method")) }
        if method == "CONNECT" {
            guard scheme == nil, path == nil, authority != nil else { return .failure(H2Malformed("CONNECT needs :authority and no :scheme or :path")) }
        } else {
            guard scheme != nil else { return .failure(H2Malformed("no :scheme")) }
            guard let p = path, !p.isEmpty else { return .failure(H2Malformed("no :path")) }
            guard p.utf8.first == UInt8(ascii: "/") || (p == "*" && method == "OPTIONS") else { return .failure(H2Malformed(":path \"\(p)\" is not origin-form")) }
        }
        // §8.3.1: Host and :authority must name the same.
        if let authority, let host, authority.lowercased() != host.lowercased() {
            return .failure(H2Malformed("host \"\(host)\" differs from :authority \"\(authority)\""))
        }
        if !cookies.isEmpty { fields.append(("cookie", cookies.joined(separator: "; "))) }
        return .success(H2Request(method: method, scheme: scheme, authority: authority, path: path, fields: fields))
    }

    static func validName(_ name: String) -> Bool {
        name.utf8.allSatisfy { c in
            switch c {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"): return true
            default: return "!#$%&'*+-.^_`|~".utf8.contains(c)
            }
        }
    }

    static func validValue(_ value: String) -> Bool {
        let u = value.utf8
        if let f = u.first, f == 0x20 || f == 0x09 { return false }
        if let l = u.last, l == 0x20 || l == 0x09 { return false }
        return !u.contains { $0 == 0 || $0 == 0x0a || $0 == 0x0d }
    }

    /// The HTTP/1.1 head of this request: the request line, `host` from :authority (else the
    /// host field), the fields, and `transfer-encoding: chunked` when a body of unknown length
    /// follows (`bodyFollows` without content-length), so that it can be framed as HTTP/1.1.
    public func http1Head(bodyFollows: Bool, into out: inout [UInt8]) {
        out.append(contentsOf: method.utf8)
        out.append(0x20)
        out.append(contentsOf: (path ?? authority ?? "").utf8)
        out.append(contentsOf: " HTTP/1.1\r\n".utf8)
        if let authority {
            out.append(contentsOf: "host: ".utf8)
            out.append(contentsOf: authority.utf8)
            out.append(contentsOf: "\r\n".utf8)
        }
        var length = false
        for f in fields {
            if f.name == "host" && authority != nil { continue }
            if f.name == "content-length" { length = true }
            out.append(contentsOf: f.name.utf8)
            out.append(contentsOf: ": ".utf8)
            out.append(contentsOf: f.value.utf8)
            out.append(contentsOf: "\r\n".utf8)
        }
        if bodyFollows && !length { out.append(contentsOf: "transfer-encoding: chunked\r\n".utf8) }
        out.append(contentsOf: "\r\n".utf8)
    }
}

/// A response's header block (RFC 7541), written without a dynamic table or Huffman coding, so
/// that the encoder keeps no state per connection: `:status` (indexed for the statuses of the
/// static table), then each field as a literal not indexed, its name lowercased. Fields HTTP/2
/// has no place for, and those a `Connection` field names, are left out (§8.2.2).
public enum H2ResponseBlock {
    public static func encode(status: Int, fields: [(name: String, value: String)], into out: inout [UInt8]) {
        let indexed: [Int: UInt8] = [200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14]
        if let i = indexed[status] {
            out.append(0x80 | i)
        } else {
            // Literal without indexing, name index 8 (:status).
            out.append(0x08)
            string(Array(String(status).utf8), into: &out)
        }
        var named = Set<String>()
        for f in fields where f.name.lowercased() == "connection" {
            for token in f.value.split(separator: ",") { named.insert(token.trimmingCharacters().lowercased()) }
        }
        for f in fields {
            let name = f.name.lowercased()
            guard !H2Request.connectionSpecific.contains(name), !named.contains(name) else { continue }
            out.append(0x00)
            string(Array(name.utf8), into: &out)
            string(Array(f.value.utf8), into: &out)
        }
    }

    /// A string literal without Huffman coding: its length on a 7-bit prefix, then the bytes.
    static func string(_ bytes: [UInt8], into out: inout [UInt8]) {
        integer(bytes.count, prefixBits: 7, into: &out)
        out.append(contentsOf: bytes)
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
