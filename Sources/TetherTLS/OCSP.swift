#if canImport(Glibc)
import Glibc
#endif
import COpenSSL

/// What to ask an OCSP responder about a context's certificate (`ssl_stapling` without
/// `ssl_stapling_file`): the responder (`ssl_stapling_responder`, else the certificate's
/// Authority Information Access) and the DER request naming the certificate.
public struct OCSPQuery: Hashable, Sendable {
    public var url: String
    /// The responder's host as written (a name, or a numeric address without brackets).
    public var host: String
    public var port: UInt16
    public var path: String
    public var request: [UInt8]

    public init(url: String, host: String, port: UInt16, path: String, request: [UInt8]) {
        self.url = url
        self.host = host
        self.port = port
        self.path = path
        self.request = request
    }

    /// Parses `http://HOST[:PORT][/PATH]` (nginx fetches over plain HTTP only: an OCSP response
    /// is signed, and fetching it over TLS would need a staple of its own).
    public static func responder(_ url: String) -> (host: String, port: UInt16, path: String)? {
        var rest = Substring(url)
        guard rest.lowercased().hasPrefix("http://") else { return nil }
        rest = rest.dropFirst(7)
        let authorityEnd = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = rest[..<authorityEnd]
        let path = authorityEnd == rest.endIndex ? "/" : String(rest[authorityEnd...])
        var host = Substring(authority)
        var port: UInt16 = 80
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return nil }
            let after = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if !after.isEmpty {
                guard after.hasPrefix(":"), let p = UInt16(after.dropFirst()), p > 0 else { return nil }
                port = p
            }
        } else if let colon = host.lastIndex(of: ":") {
            guard let p = UInt16(host[host.index(after: colon)...]), p > 0 else { return nil }
            port = p
            host = host[..<colon]
        }
        guard !host.isEmpty, !host.contains(where: { $0 == "@" || $0 == " " || $0 == "?" || $0 == "#" }),
              !path.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) else { return nil }
        return (String(host), port, path)
    }

    /// The HTTP request for the responder, as nginx sends it: `GET` with the DER request in
    /// base64, URL-escaped, after the responder's path (RFC 6960 appendix A.1), HTTP/1.0 so that
    /// the responder closes when it has answered.
    public var httpRequest: [UInt8] {
        var target = path.hasSuffix("/") ? path : path + "/"
        for c in Self.base64(request).utf8 {
            switch c {
            case UInt8(ascii: "+"): target += "%2B"
            case UInt8(ascii: "/"): target += "%2F"
            case UInt8(ascii: "="): target += "%3D"
            default: target.unicodeScalars.append(Unicode.Scalar(c))
            }
        }
        let hostHeader = host.contains(":") ? "[\(host)]" : host
        let portPart = port == 80 ? "" : ":\(port)"
        return Array("GET \(target) HTTP/1.0\r\nHost: \(hostHeader)\(portPart)\r\n\r\n".utf8)
    }

    static func base64(_ bytes: [UInt8]) -> String {
        let table = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i + 2 < bytes.count {
            let n = Int(bytes[i]) << 16 | Int(bytes[i + 1]) << 8 | Int(bytes[i + 2])
            out += [table[n >> 18], table[n >> 12 & 63], table[n >> 6 & 63], table[n & 63]]
            i += 3
        }
        if bytes.count - i == 1 {
            let n = Int(bytes[i]) << 16
            out += [table[n >> 18], table[n >> 12 & 63], UInt8(ascii: "="), UInt8(ascii: "=")]
        } else if bytes.count - i == 2 {
            let n = Int(bytes[i]) << 16 | Int(bytes[i + 1]) << 8
            out += [table[n >> 18], table[n >> 12 & 63], table[n >> 6 & 63], UInt8(ascii: "=")]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The body of a responder's answer: a `200` with `Content-Type: application/ocsp-response`,
    /// framed by `Content-Length` or by the close. Anything else is refused with the reason.
    public static func responseBody(_ bytes: [UInt8]) -> Result<[UInt8], OCSPFailure> {
        guard let end = find([13, 10, 13, 10], in: bytes) else { return .failure(.http("the responder's answer has no complete header")) }
        let head = String(decoding: bytes[..<end], as: UTF8.self)
        let lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let status = lines.first?.split(separator: " ", maxSplits: 2) ?? []
        guard status.count >= 2, status[0].hasPrefix("HTTP/1."), let code = Int(status[1]) else {
            return .failure(.http("the responder's answer is not HTTP"))
        }
        guard code == 200 else { return .failure(.http("the responder answered \(code)")) }
        var length: Int?
        var type = ""
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingSpaces
            if name == "content-length" {
                guard let n = Int(value), n >= 0, length == nil || length == n else { return .failure(.http("the responder's Content-Length is invalid")) }
                length = n
            } else if name == "content-type" {
                type = value.lowercased()
            } else if name == "transfer-encoding" {
                return .failure(.http("the responder's answer is chunked (it was asked over HTTP/1.0)"))
            }
        }
        guard type == "application/ocsp-response" else { return .failure(.http("the responder's Content-Type is \"\(type)\", not \"application/ocsp-response\"")) }
        let body = Array(bytes[(end + 4)...])
        if let length {
            guard body.count >= length else { return .failure(.http("the responder's answer was cut short (\(body.count) of \(length) bytes)")) }
            return .success(Array(body[..<length]))
        }
        return .success(body)
    }

    /// Whether `bytes` hold a whole answer framed by `Content-Length` (one framed by the close
    /// is whole at the close).
    public static func isComplete(_ bytes: [UInt8]) -> Bool {
        guard let end = find([13, 10, 13, 10], in: bytes) else { return false }
        for line in String(decoding: bytes[..<end], as: UTF8.self).split(separator: "\r\n").dropFirst() {
            guard let colon = line.firstIndex(of: ":"), line[..<colon].lowercased() == "content-length" else { continue }
            guard let n = Int(line[line.index(after: colon)...].trimmingSpaces) else { return false }
            return bytes.count - (end + 4) >= n
        }
        return false
    }

    private static func find(_ needle: [UInt8], in bytes: [UInt8]) -> Int? {
        guard bytes.count >= needle.count else { return nil }
        for i in 0...(bytes.count - needle.count) where bytes[i] == needle[0] && Array(bytes[i..<i + needle.count]) == needle { return i }
        return nil
    }
}

/// Why an OCSP fetch gave no response to check.
public enum OCSPFailure: Error, Equatable, CustomStringConvertible, Sendable {
    case http(String)
    case io(String)
    public var description: String {
        switch self {
        case .http(let s), .io(let s): return s
        }
    }
}

/// What a response from the responder did to the staple.
public enum StapleOutcome: Equatable, Sendable {
    /// It says the certificate is good and is current: stapled until `validUntil` (seconds since
    /// the epoch; `.max` when it names no nextUpdate).
    case stapled(validUntil: Int)
    /// It says the certificate is revoked (or unknown): nothing is stapled any more.
    case revoked(String)
    /// It could not be used (not OCSP, not about this certificate, stale, signature): what was
    /// stapled stays until its own nextUpdate.
    case refused(String)

    /// When to ask the responder again (seconds since the epoch), as nginx does: a good
    /// response five minutes before its nextUpdate, but at least every hour and no sooner than
    /// five minutes; anything else after five minutes.
    public func nextFetch(now: Int) -> Int {
        switch self {
        case .stapled(let valid):
            let before = valid == .max ? Int.max : valid - 300
            return max(min(before, now + 3600), now + 300)
        case .revoked, .refused:
            return now + 300
        }
    }
}

private extension Substring {
    var trimmingSpaces: String {
        var s = self
        while s.first == " " || s.first == "\t" { s = s.dropFirst() }
        while s.last == " " || s.last == "\t" { s = s.dropLast() }
        return String(s)
    }
}
