/// The request target (RFC 9112 §3.2) and the authority (RFC 9110 §4.2, §7.2), parsed once per
/// request: the one place that knows where a target's path starts, which host it names, and what
/// path a location is matched against.
public enum RequestTarget {
    /// The forms a request target takes.
    public enum Form: Equatable, Sendable {
        /// `/path?query`
        case origin
        /// `http://authority/path?query`: the authority wins over the Host field.
        case absolute
        /// `*`, for `OPTIONS` only.
        case asterisk
        /// `host:port`, for `CONNECT` (which Tether refuses).
        case authority
    }

    /// Where the parts of a target lie, as offsets into the buffer it was parsed from.
    public struct Parts: Equatable {
        public var form: Form
        /// The path, without the query: empty for an absolute-form target without one (it means `/`).
        public var pathStart: Int
        public var pathEnd: Int
        /// The host of an absolute-form target's authority (without port or brackets' content
        /// changed), or -1 when the target has none.
        public var hostStart = -1
        public var hostEnd = -1
    }

    /// Parses the target in `p[start..<end]` (its bytes already known to be visible ASCII).
    /// `isOptions` / `isConnect` say which method it came with. Returns a reason on failure.
    public static func parse(_ p: UnsafeRawBufferPointer, _ start: Int, _ end: Int, isOptions: Bool, isConnect: Bool) -> Result<Parts, TargetError> {
        let first = p[start]
        if isConnect {
            guard let host = authorityHost(p, start, end) else { return .failure(.init("invalid authority in CONNECT target")) }
            return .success(Parts(form: .authority, pathStart: end, pathEnd: end, hostStart: host.0, hostEnd: host.1))
        }
        if first == UInt8(ascii: "/") {
            return .success(Parts(form: .origin, pathStart: start, pathEnd: queryStart(p, start, end)))
        }
        if first == UInt8(ascii: "*") {
            guard end - start == 1, isOptions else { return .failure(.init("invalid request target")) }
            return .success(Parts(form: .asterisk, pathStart: start, pathEnd: end))
        }
        // absolute-form: scheme "://" authority path-abempty [ "?" query ]
        var i = start
        while i < end, isSchemeByte(p[i], first: i == start) { i += 1 }
        guard i > start, end - i >= 3, p[i] == UInt8(ascii: ":"), p[i + 1] == UInt8(ascii: "/"), p[i + 2] == UInt8(ascii: "/") else {
            return .failure(.init("invalid request target"))
        }
        guard ASCII.equalsIgnoringCase(p, start, i, "http") || ASCII.equalsIgnoringCase(p, start, i, "https") else {
            return .failure(.init("unsupported scheme in request target"))
        }
        let authorityStart = i + 3
        var authorityEnd = authorityStart
        while authorityEnd < end, p[authorityEnd] != UInt8(ascii: "/"), p[authorityEnd] != UInt8(ascii: "?") { authorityEnd += 1 }
        guard let host = authorityHost(p, authorityStart, authorityEnd) else {
            return .failure(.init("invalid authority in request target"))
        }
        // "http://host?x" has an empty path (which means "/"), and the query is not part of it.
        let pathStart = authorityEnd
        let pathEnd = pathStart < end && p[pathStart] == UInt8(ascii: "?") ? pathStart : queryStart(p, pathStart, end)
        return .success(Parts(form: .absolute, pathStart: pathStart, pathEnd: pathEnd, hostStart: host.0, hostEnd: host.1))
    }

    public struct TargetError: Error, Equatable {
        public var reason: String
        public init(_ reason: String) { self.reason = reason }
    }

    @inline(__always) private static func queryStart(_ p: UnsafeRawBufferPointer, _ start: Int, _ end: Int) -> Int {
        var i = start
        while i < end, p[i] != UInt8(ascii: "?") { i += 1 }
        return i
    }

    @inline(__always) private static func isSchemeByte(_ c: UInt8, first: Bool) -> Bool {
        let alpha = (c | 0x20) >= UInt8(ascii: "a") && (c | 0x20) <= UInt8(ascii: "z")
        if first { return alpha }
        return alpha || (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") || c == UInt8(ascii: ".")
    }

    /// `uri-host [ ":" port ]` (RFC 9110 §4.2.3, §7.2) in `p[s..<e]`: the host's range, or nil when
    /// the value is not one. No userinfo (`@`), no whitespace, no path; an IP literal in brackets;
    /// a port of digits no larger than 65535. The host is never empty.
    public static func authorityHost(_ p: UnsafeRawBufferPointer, _ s: Int, _ e: Int) -> (Int, Int)? {
        guard e > s else { return nil }
        var i = s
        let hostEnd: Int
        if p[s] == UInt8(ascii: "[") {
            // IP-literal: IPv6address or IPvFuture; hex digits, ':' and '.' (and the future form's
            // unreserved and sub-delims) up to the ']'.
            i += 1
            while i < e, p[i] != UInt8(ascii: "]") {
                let c = p[i]
                guard isUnreserved(c) || isSubDelim(c) || c == UInt8(ascii: ":") else { return nil }
                i += 1
            }
            guard i < e, i > s + 1 else { return nil }
            i += 1
            hostEnd = i
        } else {
            // reg-name or IPv4address: unreserved, pct-encoded, sub-delims.
            while i < e {
                let c = p[i]
                if isRegNameByte(c) {
                    i += 1
                } else if c == UInt8(ascii: "%") {
                    guard i + 2 < e, ChunkedDecoder.hex(p[i + 1]) != nil, ChunkedDecoder.hex(p[i + 2]) != nil else { return nil }
                    i += 3
                } else if c == UInt8(ascii: ":") {
                    break
                } else {
                    return nil
                }
            }
            guard i > s else { return nil }
            hostEnd = i
        }
        if i < e {
            guard p[i] == UInt8(ascii: ":") else { return nil }
            i += 1
            var port = 0
            var digits = 0
            while i < e {
                let c = p[i]
                guard c >= 0x30, c <= 0x39 else { return nil }
                port = port * 10 + Int(c - 0x30)
                digits += 1
                guard digits <= 5, port <= 65535 else { return nil }
                i += 1
            }
        }
        return (s, hostEnd)
    }

    /// Unreserved or a sub-delim (a reg-name's bytes but "%"): one load per byte of every Host
    /// value, from a table of 256 flags that is a string literal's bytes (as `ASCII.isToken`).
    @inline(__always) public static func isRegNameByte(_ c: UInt8) -> Bool {
        regNameTable.utf8Start[Int(c)] == UInt8(ascii: "1")
    }

    static var regNameTable: StaticString {
        """
        0000000000000000000000000000000001001011111111101111111111010100\
        0111111111111111111111111110000101111111111111111111111111100010\
        0000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000
        """
    }

    @inline(__always) public static func isUnreserved(_ c: UInt8) -> Bool {
        let l = c | 0x20
        return (l >= UInt8(ascii: "a") && l <= UInt8(ascii: "z")) || (c >= 0x30 && c <= 0x39)
            || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "~")
    }

    @inline(__always) public static func isSubDelim(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "!"), UInt8(ascii: "$"), UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "("), UInt8(ascii: ")"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: ","), UInt8(ascii: ";"), UInt8(ascii: "="):
            return true
        default:
            return false
        }
    }
}

/// The path a request is routed by, as nginx makes `$uri`: percent-decoded (an encoded `/`
/// too), dot segments removed (RFC 3986 §5.2.4), runs of slashes merged (`merge_slashes on`).
/// A path that climbs above the root, an invalid escape or an encoded NUL is refused.
///
/// Stricter than nginx: a segment's `;parameters` do not hide a dot segment (`/..;x/` climbs, as
/// servlet containers read it), and locations are matched with every segment's parameters left
/// out (`/admin;x/` matches `location /admin/`), so that a backend that strips them cannot be
/// reached past a location's rules.
public struct NormalizedPath: Equatable, Sendable {
    /// `$uri`: what a `proxy_pass` URI replaces the location prefix of. nil: the raw path is
    /// already normal (the usual case; nothing is allocated).
    public var uri: [UInt8]?
    /// What locations are matched against, when it differs from `uri` (parameters left out).
    public var match: [UInt8]?

    public init(uri: [UInt8]? = nil, match: [UInt8]? = nil) {
        self.uri = uri
        self.match = match
    }

    public struct Invalid: Error, Equatable {
        public var reason: String
        public init(reason: String) { self.reason = reason }
    }

    /// Normalises the raw path in `p[s..<e]` (an origin-form path, or an absolute-form one
    /// without its authority; empty means `/`).
    public static func make(_ p: UnsafeRawBufferPointer, _ s: Int, _ e: Int, mergeSlashes: Bool) -> Result<NormalizedPath, Invalid> {
        if s == e { return .success(NormalizedPath(uri: [UInt8(ascii: "/")])) }
        guard p[s] == UInt8(ascii: "/") else { return .success(NormalizedPath()) }  // "*"
        if isNormal(p, s, e, mergeSlashes: mergeSlashes) { return .success(NormalizedPath()) }
        // Decode first, so that encoded dots and slashes count as what they decode to.
        var decoded: [UInt8] = []
        decoded.reserveCapacity(e - s)
        var i = s
        while i < e {
            let c = p[i]
            if c == UInt8(ascii: "%") {
                guard i + 2 < e, let h = ChunkedDecoder.hex(p[i + 1]), let l = ChunkedDecoder.hex(p[i + 2]) else {
                    return .failure(Invalid(reason: "invalid percent-encoding in the path"))
                }
                let v = h << 4 | l
                guard v != 0 else { return .failure(Invalid(reason: "encoded NUL in the path")) }
                decoded.append(v)
                i += 3
            } else {
                decoded.append(c)
                i += 1
            }
        }
        var uri: [UInt8] = [UInt8(ascii: "/")]
        var match: [UInt8] = [UInt8(ascii: "/")]
        uri.reserveCapacity(decoded.count)
        var starts: [(uri: Int, match: Int)] = []
        var hasParameters = false
        let n = decoded.count
        var k = 1
        while k <= n {
            var j = k
            while j < n, decoded[j] != UInt8(ascii: "/") { j += 1 }
            let last = j >= n
            var nameEnd = k
            while nameEnd < j, decoded[nameEnd] != UInt8(ascii: ";") { nameEnd += 1 }
            let nameLength = nameEnd - k
            if nameEnd < j { hasParameters = true }
            defer { k = j + 1 }
            if nameLength == 1 && decoded[k] == UInt8(ascii: ".") { continue }
            if nameLength == 2 && decoded[k] == UInt8(ascii: ".") && decoded[k + 1] == UInt8(ascii: ".") {
                guard let top = starts.popLast() else { return .failure(Invalid(reason: "the path climbs above the root")) }
                uri.removeSubrange(top.uri...)
                match.removeSubrange(top.match...)
                continue
            }
            if j == k {
                // An empty segment: "//" (merged unless merge_slashes is off), or the trailing one.
                if last || mergeSlashes { continue }
                starts.append((uri.count, match.count))
                uri.append(UInt8(ascii: "/"))
                match.append(UInt8(ascii: "/"))
                continue
            }
            starts.append((uri.count, match.count))
            uri.append(contentsOf: decoded[k..<j])
            match.append(contentsOf: decoded[k..<nameEnd])
            if !last {
                uri.append(UInt8(ascii: "/"))
                match.append(UInt8(ascii: "/"))
            }
        }
        return .success(NormalizedPath(uri: uri, match: hasParameters && match != uri ? match : nil))
    }

    /// Whether the raw path needs no work: no escape, no parameter, no dot segment, no slash run.
    @inline(__always)
    public static func isNormal(_ p: UnsafeRawBufferPointer, _ s: Int, _ e: Int, mergeSlashes: Bool) -> Bool {
        var i = s
        while i < e {
            let c = p[i]
            if c == UInt8(ascii: "%") || c == UInt8(ascii: ";") { return false }
            if c == UInt8(ascii: "/") && i + 1 < e {
                let d = p[i + 1]
                if d == UInt8(ascii: "/") && mergeSlashes { return false }
                if d == UInt8(ascii: ".") {
                    // "/." or "/.." as a whole segment.
                    if i + 2 == e || p[i + 2] == UInt8(ascii: "/") { return false }
                    if p[i + 2] == UInt8(ascii: ".") && (i + 3 == e || p[i + 3] == UInt8(ascii: "/")) { return false }
                }
            }
            i += 1
        }
        return true
    }

    /// Writes a decoded path back as a request target's path: bytes that may not stand in one
    /// as they are (controls, space, `#`, `?`, `%`, non-ASCII and the like) percent-encoded.
    public static func escape(_ path: UnsafeRawBufferPointer, into out: inout [UInt8]) {
        let hex: [UInt8] = Array("0123456789ABCDEF".utf8)
        for c in path {
            if RequestTarget.isUnreserved(c) || RequestTarget.isSubDelim(c) || c == UInt8(ascii: "/") || c == UInt8(ascii: ":") || c == UInt8(ascii: "@") {
                out.append(c)
            } else {
                out.append(UInt8(ascii: "%"))
                out.append(hex[Int(c >> 4)])
                out.append(hex[Int(c & 15)])
            }
        }
    }
}
