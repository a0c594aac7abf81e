/// HTTP/1 head parsing: strict, allocation-free (offsets into the bytes given), and blind to the
/// buffer type that holds the bytes.

/// Headers the proxy acts on, recognised once while parsing.
public enum HeaderKind: UInt8, Sendable {
    case other
    case host
    case contentLength
    case transferEncoding
    case connection
    case keepAlive
    case proxyConnection
    case te
    case trailer
    case upgrade
    case expect
    case xForwardedFor
    /// `HTTP2-Settings`: only meaningful with `Upgrade: h2c`, which is never forwarded.
    case http2Settings

    /// Hop-by-hop headers: never forwarded as they are (RFC 9110 §7.6.1, plus the de-facto ones).
    @inlinable public var isHopByHop: Bool {
        switch self {
        case .connection, .keepAlive, .proxyConnection, .te, .trailer, .upgrade, .transferEncoding, .http2Settings: return true
        default: return false
        }
    }
}

/// One header line inside a parsed head, as offsets from the head's start.
public struct HeaderField: Sendable {
    public var lineStart: Int32
    public var nameEnd: Int32
    public var valueStart: Int32
    public var valueEnd: Int32
    /// Offset just past the line's CRLF.
    public var lineEnd: Int32
    public var kind: HeaderKind
    /// Set when a `Connection` header names this header: it is hop-by-hop for this message.
    public var droppedByConnection = false

    public init(lineStart: Int32, nameEnd: Int32, valueStart: Int32, valueEnd: Int32, lineEnd: Int32, kind: HeaderKind) {
        self.lineStart = lineStart
        self.nameEnd = nameEnd
        self.valueStart = valueStart
        self.valueEnd = valueEnd
        self.lineEnd = lineEnd
        self.kind = kind
    }
}

/// Why a head was refused; `status` is what the client gets (or 502 for an upstream).
public struct HeadError: Error, Equatable, Sendable {
    public var status: Int
    public var reason: String

    public init(status: Int, reason: String) {
        self.status = status
        self.reason = reason
    }
}

/// A request or response head, parsed and validated: where its parts are (offsets from the
/// head's first byte) and what its headers say. The bytes stay with whoever holds the buffer
/// they were read into (a loop buffer of TetherIO's), so the
/// parser copies nothing and depends on no buffer type.
public struct HeadLayout: Sendable {
    public var headers: [HeaderField] = []
    // Request line.
    public var methodEnd = 0
    public var targetStart = 0
    public var targetEnd = 0
    // Response line.
    public var status = 0
    /// The minor HTTP version: 0 or 1.
    public var minorVersion = 1
    // What the headers say about framing and the connection.
    public var contentLength: Int64?
    public var chunked = false
    public var connectionClose = false
    public var connectionKeepAlive = false
    public var connectionUpgrade = false
    public var expectContinue = false
    public var hostIndex: Int?
    /// The request target's form and parts.
    public var targetForm = RequestTarget.Form.origin
    public var pathStart = 0
    public var pathEnd = 0
    /// The host the request is for (without port): an absolute-form target's, else the Host
    /// field's; both validated. -1 when there is none (HTTP/1.0 without Host).
    public var hostStart = -1
    public var hostEnd = -1
    /// The normalised path (`$uri`, and what locations match).
    public var path = NormalizedPath()
    public var upgradeIndex: Int?
    /// A response's `Keep-Alive: timeout=, max=`.
    public var keepAliveTimeout: Int?
    public var keepAliveMax: Int?

    public init() {}

    /// Whether the method, in the head's bytes `p`, is `m`.
    @inlinable
    public func methodIs(_ m: StaticString, in p: UnsafeRawBufferPointer) -> Bool {
        guard m.utf8CodeUnitCount == methodEnd, p.count >= methodEnd else { return false }
        return m.withUTF8Buffer { mb in
            for k in 0..<methodEnd where p[k] != mb[k] { return false }
            return true
        }
    }

    /// Whether the request method is one of those RFC 9110 calls idempotent.
    @inlinable
    public func isIdempotent(in p: UnsafeRawBufferPointer) -> Bool {
        switch methodEnd {
        case 3: return methodIs("GET", in: p) || methodIs("PUT", in: p)
        case 4: return methodIs("HEAD", in: p)
        case 5: return methodIs("TRACE", in: p)
        case 6: return methodIs("DELETE", in: p)
        case 7: return methodIs("OPTIONS", in: p)
        default: return false
        }
    }

    /// The index of the first header named `name` (lowercase ASCII), if any.
    public func index(named name: [UInt8], in p: UnsafeRawBufferPointer) -> Int? {
        headers.firstIndex { Self.field($0, isNamed: name, in: p) }
    }

    /// Whether `h`'s name is `name` (lowercase ASCII), in any case.
    @inline(__always)
    public static func field(_ h: HeaderField, isNamed name: [UInt8], in p: UnsafeRawBufferPointer) -> Bool {
        guard Int(h.nameEnd - h.lineStart) == name.count else { return false }
        for k in 0..<name.count where ASCII.lower(p[Int(h.lineStart) + k]) != name[k] { return false }
        return true
    }

    /// How this response's body is delimited (RFC 9112 6.3): none after HEAD, 204, 304 or an
    /// upgrade; chunked; a length; or the connection's close.
    public func responseFraming(requestIsHEAD: Bool, upgrading: Bool = false) -> BodyFraming {
        if requestIsHEAD || status == 204 || status == 304 || upgrading { return .none }
        if chunked { return .chunked }
        if let n = contentLength { return n == 0 ? .none : .length(n) }
        return .untilClose
    }

    /// Whether the sender lets the connection carry another message after this one, as far as
    /// its headers say (framing aside).
    public var keepsConnection: Bool { !connectionClose && (minorVersion == 1 || connectionKeepAlive) }

    /// Whether a client asks to keep the connection: HTTP/1.1 without `Connection: close`, or
    /// HTTP/1.0 with `Connection: keep-alive`.
    public var clientWantsKeepAlive: Bool { minorVersion == 1 ? !connectionClose : (connectionKeepAlive && !connectionClose) }
}

/// Parses HTTP/1 heads strictly: a request or response is refused rather than guessed at,
/// because a proxy and its backend must agree on where each message ends.
public enum HeadParser {
    public enum Kind: Sendable { case request, response }

    public enum Outcome: Equatable {
        case incomplete
        /// A complete head: where it starts in the bytes given (after empty lines a client may
        /// send before a request line) and how many bytes it took in all (those lines included).
        case complete(start: Int, consumed: Int)
        case error(HeadError)
    }

    public struct Limits: Sendable {
        /// The longest single line (request line or header line).
        public var lineLimit: Int
        /// The longest head in all.
        public var headLimit: Int
        /// `merge_slashes`: runs of slashes count as one when locations are matched.
        public var mergeSlashes: Bool

        public init(lineLimit: Int, headLimit: Int, mergeSlashes: Bool = true) {
            self.lineLimit = lineLimit
            self.headLimit = headLimit
            self.mergeSlashes = mergeSlashes
        }

        public static let response = Limits(lineLimit: 16 * 1024, headLimit: 64 * 1024)
    }

    /// Parses the head at the start of `p` into `head`, a fresh `HeadLayout()` (written in place:
    /// a layout is large, and handing it back inside an enum cost two copies per request),
    /// reusing `headers`' storage:
    /// on success `head.headers` holds that storage and `headers` is left empty (swap it back
    /// when the head is done; what it holds then is cleared here, by the next parse).
    public static func parse(_ p: UnsafeRawBufferPointer, kind: Kind, limits: Limits, headers: inout [HeaderField],
                             into head: inout HeadLayout) -> Outcome {
        headers.removeAll(keepingCapacity: true)
        let bad = kind == .request ? 400 : 502
        let tooLarge = kind == .request ? 431 : 502
        // Header offsets are Int32s.
        let headLimit = min(limits.headLimit, Int(Int32.max) - 2)
        do {
            let n = p.count
            var skip = 0
            // A server ignores empty lines before a request line (RFC 9112 §2.2).
            while kind == .request, skip + 1 < n, p[skip] == 0x0D, p[skip + 1] == 0x0A, skip < 64 { skip += 2 }
            var i = skip

            // Finds the end of the line starting at `i`: the index of its CR, or nil if incomplete.
            func lineEnd(_ i: Int) -> Result<Int?, HeadError> {
                var j = i
                // Eight bytes at a time up to the first CR or LF (the masks are exact below it).
                while j + 8 <= n {
                    let w = p.loadUnaligned(fromByteOffset: j, as: UInt64.self)
                    let cr = w ^ 0x0D0D_0D0D_0D0D_0D0D, lf = w ^ 0x0A0A_0A0A_0A0A_0A0A
                    let flags = ((cr &- 0x0101_0101_0101_0101) & ~cr | (lf &- 0x0101_0101_0101_0101) & ~lf) & 0x8080_8080_8080_8080
                    if flags != 0 { j += flags.trailingZeroBitCount >> 3; break }
                    j += 8
                }
                while j < n {
                    let c = p[j]
                    if c == 0x0A { return .failure(HeadError(status: bad, reason: "bare LF in head")) }
                    if c == 0x0D {
                        if j + 1 >= n { return .success(nil) }
                        if p[j + 1] != 0x0A { return .failure(HeadError(status: bad, reason: "bare CR in head")) }
                        return .success(j)
                    }
                    j += 1
                }
                return .success(nil)
            }

            // First line.
            let firstEnd: Int
            switch lineEnd(i) {
            case .failure(let e): return .error(e)
            case .success(nil):
                if n - i > limits.lineLimit {
                    return .error(HeadError(status: kind == .request ? 414 : 502, reason: "first line too long"))
                }
                return .incomplete
            case .success(.some(let e)): firstEnd = e
            }
            if firstEnd - i > limits.lineLimit {
                return .error(HeadError(status: kind == .request ? 414 : 502, reason: "first line too long"))
            }
            assert(head.headers.isEmpty && head.methodEnd == 0 && head.status == 0 && head.hostIndex == nil, "parse into a fresh HeadLayout")
            switch kind {
            case .request:
                if let e = parseRequestLine(p, from: i, to: firstEnd, into: &head) { return .error(e) }
            case .response:
                if let e = parseStatusLine(p, from: i, to: firstEnd, into: &head) { return .error(e) }
            }
            i = firstEnd + 2

            // Header lines, up to the blank line.
            while true {
                guard i < n else { return i - skip > headLimit ? .error(HeadError(status: tooLarge, reason: "head too large")) : .incomplete }
                if p[i] == 0x0D {
                    guard i + 1 < n else { return .incomplete }
                    guard p[i + 1] == 0x0A else { return .error(HeadError(status: bad, reason: "bare CR in head")) }
                    i += 2
                    break
                }
                if p[i] == 0x20 || p[i] == 0x09 {
                    return .error(HeadError(status: bad, reason: "obsolete line folding"))
                }
                // The usual line in one pass; anything unusual (incomplete, too long, invalid)
                // takes the careful path below, which says what is wrong.
                if let f = scanHeaderLine(p, from: i), f.end - i <= limits.lineLimit, f.end + 2 - skip <= headLimit {
                    // Every offset is at most `headLimit`, which fits an Int32.
                    headers.append(HeaderField(lineStart: Int32(truncatingIfNeeded: i - skip), nameEnd: Int32(truncatingIfNeeded: f.nameEnd - skip),
                                               valueStart: Int32(truncatingIfNeeded: f.valueStart - skip), valueEnd: Int32(truncatingIfNeeded: f.valueEnd - skip),
                                               lineEnd: Int32(truncatingIfNeeded: f.end + 2 - skip), kind: classify(p, from: i, to: f.nameEnd)))
                    if headers.count > 1000 { return .error(HeadError(status: tooLarge, reason: "too many headers")) }
                    i = f.end + 2
                    continue
                }
                let end: Int
                switch lineEnd(i) {
                case .failure(let e): return .error(e)
                case .success(nil):
                    if n - i > limits.lineLimit || n - skip > headLimit {
                        return .error(HeadError(status: tooLarge, reason: "header line too long"))
                    }
                    return .incomplete
                case .success(.some(let e)): end = e
                }
                if end - i > limits.lineLimit { return .error(HeadError(status: tooLarge, reason: "header line too long")) }
                if end + 2 - skip > headLimit { return .error(HeadError(status: tooLarge, reason: "head too large")) }
                // name ":" OWS value OWS
                guard let (nameEnd, valueStart) = scanName(p, from: i, limit: end) else {
                    return .error(HeadError(status: bad, reason: "invalid header line"))
                }
                var j = valueStart
                var valueEnd = valueStart
                while j < end {
                    let c = p[j]
                    guard ASCII.isFieldByte(c) else { return .error(HeadError(status: bad, reason: "invalid byte in header value")) }
                    if c != 0x20 && c != 0x09 { valueEnd = j + 1 }
                    j += 1
                }
                let kindOfHeader = classify(p, from: i, to: nameEnd)
                headers.append(HeaderField(lineStart: Int32(i - skip), nameEnd: Int32(nameEnd - skip), valueStart: Int32(valueStart - skip),
                                           valueEnd: Int32(valueEnd - skip), lineEnd: Int32(end + 2 - skip), kind: kindOfHeader))
                if headers.count > 1000 { return .error(HeadError(status: tooLarge, reason: "too many headers")) }
                i = end + 2
            }
            // Offsets so far are relative to `skip`; the first line's too.
            head.methodEnd -= skip; head.targetStart -= skip; head.targetEnd -= skip
            head.pathStart -= skip; head.pathEnd -= skip
            if head.hostStart >= 0 { head.hostStart -= skip; head.hostEnd -= skip }
            swap(&head.headers, &headers)
            if let e = interpret(&head, p: UnsafeRawBufferPointer(rebasing: p[skip...]), kind: kind, mergeSlashes: limits.mergeSlashes) {
                swap(&head.headers, &headers)
                return .error(e)
            }
            return .complete(start: skip, consumed: i)
        }
    }

    /// `name ":" OWS` starting at `i`, before `limit`: where the name ends and the value starts,
    /// or nil when there is no token name followed by a colon.
    @inline(__always)
    private static func scanName(_ p: UnsafeRawBufferPointer, from i: Int, limit: Int) -> (nameEnd: Int, valueStart: Int)? {
        var j = i
        while j < limit, ASCII.isToken(p[j]) { j += 1 }
        guard j > i, j < limit, p[j] == UInt8(ascii: ":") else { return nil }
        let nameEnd = j
        j += 1
        while j < limit, p[j] == 0x20 || p[j] == 0x09 { j += 1 }
        return (nameEnd, j)
    }

    /// One well-formed header line starting at `i`: `name ":" OWS value OWS CRLF`, with the
    /// value's bytes valid. nil when the line is incomplete or anything in it is not as expected.
    @inline(__always)
    private static func scanHeaderLine(_ p: UnsafeRawBufferPointer, from i: Int) -> (nameEnd: Int, valueStart: Int, valueEnd: Int, end: Int)? {
        let n = p.count
        guard let (nameEnd, valueStart) = scanName(p, from: i, limit: n) else { return nil }
        var j = valueStart
        var valueEnd = j
        while j < n {
            // Eight bytes at a time: a word with no control byte or DEL (spaces and obs-text are
            // fine) is the usual run of a value; in the one that has, the first such byte is
            // found at once (below it the masks are exact) and is the line's CR as a rule.
            if j + 8 <= n {
                let w = p.loadUnaligned(fromByteOffset: j, as: UInt64.self)
                let ctl = (w &- 0x2020_2020_2020_2020) & ~w & 0x8080_8080_8080_8080
                let x = w ^ 0x7F7F_7F7F_7F7F_7F7F
                let del = (x &- 0x0101_0101_0101_0101) & ~x & 0x8080_8080_8080_8080
                let flags = ctl | del
                let stop = flags == 0 ? j + 8 : j + flags.trailingZeroBitCount >> 3
                var k = stop - 1
                while k >= j && p[k] == 0x20 { k -= 1 }
                if k >= j { valueEnd = k + 1 }
                j = stop
                if flags == 0 { continue }
                let c = p[j]
                if c == 0x0D {
                    guard j + 1 < n, p[j + 1] == 0x0A else { return nil }
                    return (nameEnd, valueStart, valueEnd, j)
                }
                guard c == 0x09 else { return nil }
                j += 1
                continue
            }
            // The last few bytes, one at a time.
            let c = p[j]
            if c > 0x20 && c != 0x7F {
                valueEnd = j + 1
            } else if c == 0x0D {
                guard j + 1 < n, p[j + 1] == 0x0A else { return nil }
                return (nameEnd, valueStart, valueEnd, j)
            } else if c != 0x20 && c != 0x09 {
                return nil
            }
            j += 1
        }
        return nil
    }

    private static func parseRequestLine(_ p: UnsafeRawBufferPointer, from: Int, to: Int, into head: inout HeadLayout) -> HeadError? {
        var j = from
        while j < to, ASCII.isToken(p[j]) { j += 1 }
        guard j > from, j < to, p[j] == 0x20 else { return HeadError(status: 400, reason: "invalid method") }
        head.methodEnd = j
        j += 1
        let targetStart = j
        // Visible ASCII only (raw bytes above 0x7F are not a URI's), and no fragment, which a
        // client never sends (RFC 9112 §3.2).
        var fragment = false
        while j < to, p[j] > 0x20, p[j] < 0x7F { fragment = fragment || p[j] == UInt8(ascii: "#"); j += 1 }
        guard j > targetStart, j < to, p[j] == 0x20 else {
            return HeadError(status: 400, reason: j < to && p[j] >= 0x7F ? "invalid byte in request target" : "invalid request target")
        }
        guard !fragment else { return HeadError(status: 400, reason: "fragment in request target") }
        head.targetStart = targetStart
        head.targetEnd = j
        j += 1
        // "HTTP/1.1"
        guard to - j == 8, p[j] == UInt8(ascii: "H"), p[j + 1] == UInt8(ascii: "T"), p[j + 2] == UInt8(ascii: "T"),
              p[j + 3] == UInt8(ascii: "P"), p[j + 4] == UInt8(ascii: "/"), p[j + 6] == UInt8(ascii: "."),
              (0x30...0x39).contains(p[j + 5]), (0x30...0x39).contains(p[j + 7]) else {
            return HeadError(status: 400, reason: "invalid HTTP version")
        }
        guard p[j + 5] == UInt8(ascii: "1"), p[j + 7] <= UInt8(ascii: "1") else {
            return HeadError(status: 505, reason: "unsupported HTTP version")
        }
        head.minorVersion = Int(p[j + 7] - 0x30)
        let isConnect = equals(p, from, head.methodEnd, "CONNECT")
        let isOptions = equals(p, from, head.methodEnd, "OPTIONS")
        switch RequestTarget.parse(p, targetStart, head.targetEnd, isOptions: isOptions, isConnect: isConnect) {
        case .failure(let e):
            return HeadError(status: 400, reason: e.reason)
        case .success(let parts):
            head.targetForm = parts.form
            head.pathStart = parts.pathStart
            head.pathEnd = parts.pathEnd
            head.hostStart = parts.hostStart
            head.hostEnd = parts.hostEnd
        }
        return nil
    }

    private static func parseStatusLine(_ p: UnsafeRawBufferPointer, from: Int, to: Int, into head: inout HeadLayout) -> HeadError? {
        let j = from
        guard to - j >= 12, p[j] == UInt8(ascii: "H"), p[j + 1] == UInt8(ascii: "T"), p[j + 2] == UInt8(ascii: "T"),
              p[j + 3] == UInt8(ascii: "P"), p[j + 4] == UInt8(ascii: "/"), p[j + 5] == UInt8(ascii: "1"),
              p[j + 6] == UInt8(ascii: "."), p[j + 7] == UInt8(ascii: "0") || p[j + 7] == UInt8(ascii: "1"), p[j + 8] == 0x20
        else { return HeadError(status: 502, reason: "invalid status line") }
        head.minorVersion = Int(p[j + 7] - 0x30)
        var status = 0
        for k in 9..<12 {
            let c = p[j + k]
            guard c >= 0x30, c <= 0x39 else { return HeadError(status: 502, reason: "invalid status code") }
            status = status * 10 + Int(c - 0x30)
        }
        guard status >= 100, to - j == 12 || p[j + 12] == 0x20 else { return HeadError(status: 502, reason: "invalid status code") }
        for k in (j + 12)..<to where !ASCII.isFieldByte(p[k]) { return HeadError(status: 502, reason: "invalid reason phrase") }
        head.status = status
        return nil
    }

    private static func classify(_ p: UnsafeRawBufferPointer, from: Int, to: Int) -> HeaderKind {
        // A name is made of tokens (scanName saw to it), and for a token byte `b | 0x20` equals a
        // lowercase letter, digit or "-" exactly when `ASCII.lower(b)` does: the names below are
        // compared a word at a time (overlapping words at the end), not byte by byte.
        @inline(__always) func eq(_ s: StaticString) -> Bool {
            let length = to - from
            guard s.utf8CodeUnitCount == length else { return false }
            return s.withUTF8Buffer { b in
                let lit = UnsafeRawBufferPointer(b)
                @inline(__always) func same<T: FixedWidthInteger>(_ off: Int, _: T.Type) -> Bool {
                    p.loadUnaligned(fromByteOffset: from + off, as: T.self) | T(truncatingIfNeeded: 0x2020_2020_2020_2020 as UInt64)
                        == lit.loadUnaligned(fromByteOffset: off, as: T.self)
                }
                switch length {
                case 2: return same(0, UInt16.self)
                case 4: return same(0, UInt32.self)
                case 6: return same(0, UInt32.self) && same(4, UInt16.self)
                case 7: return same(0, UInt32.self) && same(3, UInt32.self)
                default:
                    precondition(length >= 8, "a header name of \(length) bytes")
                    var off = 0
                    while off + 8 < length {
                        if !same(off, UInt64.self) { return false }
                        off += 8
                    }
                    return same(length - 8, UInt64.self)
                }
            }
        }
        switch to - from {
        case 2: return eq("te") ? .te : .other
        case 4: return eq("host") ? .host : .other
        case 6: return eq("expect") ? .expect : .other
        case 7: return eq("upgrade") ? .upgrade : eq("trailer") ? .trailer : .other
        case 10: return eq("connection") ? .connection : eq("keep-alive") ? .keepAlive : .other
        case 14: return eq("content-length") ? .contentLength : eq("http2-settings") ? .http2Settings : .other
        case 15: return eq("x-forwarded-for") ? .xForwardedFor : .other
        case 16: return eq("proxy-connection") ? .proxyConnection : .other
        case 17: return eq("transfer-encoding") ? .transferEncoding : .other
        default: return .other
        }
    }

    /// Reads framing and connection semantics from the headers, refusing what is ambiguous.
    private static func interpret(_ head: inout HeadLayout, p: UnsafeRawBufferPointer, kind: Kind, mergeSlashes: Bool = true) -> HeadError? {
        let bad = kind == .request ? 400 : 502
        var sawTE = false
        for idx in head.headers.indices {
            let h = head.headers[idx]
            let vs = Int(h.valueStart), ve = Int(h.valueEnd)
            switch h.kind {
            case .contentLength:
                guard head.contentLength == nil else { return HeadError(status: bad, reason: "duplicate Content-Length") }
                guard ve > vs, ve - vs <= 18 else { return HeadError(status: bad, reason: "invalid Content-Length") }
                var v: Int64 = 0
                for k in vs..<ve {
                    let c = p[k]
                    guard c >= 0x30, c <= 0x39 else { return HeadError(status: bad, reason: "invalid Content-Length") }
                    v = v * 10 + Int64(c - 0x30)
                }
                head.contentLength = v
            case .transferEncoding:
                guard !sawTE else { return HeadError(status: bad, reason: "duplicate Transfer-Encoding") }
                sawTE = true
                guard equalsIgnoringCase(p, vs, ve, "chunked") else {
                    return HeadError(status: kind == .request ? 501 : 502, reason: "unsupported Transfer-Encoding")
                }
                head.chunked = true
            case .host:
                guard head.hostIndex == nil else { return HeadError(status: bad, reason: "duplicate Host") }
                head.hostIndex = idx
            case .connection:
                var k = vs
                while k < ve {
                    while k < ve, p[k] == 0x20 || p[k] == 0x09 || p[k] == UInt8(ascii: ",") { k += 1 }
                    let ts = k
                    while k < ve, p[k] != UInt8(ascii: ","), p[k] != 0x20, p[k] != 0x09 { k += 1 }
                    guard k > ts else { continue }
                    if equalsIgnoringCase(p, ts, k, "close") { head.connectionClose = true }
                    else if equalsIgnoringCase(p, ts, k, "keep-alive") { head.connectionKeepAlive = true }
                    else if equalsIgnoringCase(p, ts, k, "upgrade") { head.connectionUpgrade = true }
                    else {
                        // Any other header it names is hop-by-hop for this message.
                        for m in head.headers.indices where Int(head.headers[m].nameEnd - head.headers[m].lineStart) == k - ts {
                            let ls = Int(head.headers[m].lineStart)
                            if (0..<(k - ts)).allSatisfy({ ASCII.lower(p[ls + $0]) == ASCII.lower(p[ts + $0]) }) {
                                head.headers[m].droppedByConnection = true
                            }
                        }
                    }
                }
            case .expect:
                if equalsIgnoringCase(p, vs, ve, "100-continue") { head.expectContinue = true }
            case .upgrade:
                head.upgradeIndex = idx
            case .keepAlive where kind == .response:
                // timeout=N, max=M
                var k = vs
                while k < ve {
                    while k < ve, p[k] == 0x20 || p[k] == UInt8(ascii: ",") { k += 1 }
                    let ks = k
                    while k < ve, p[k] != UInt8(ascii: "="), p[k] != UInt8(ascii: ",") { k += 1 }
                    let ke = k
                    var num: Int?
                    if k < ve, p[k] == UInt8(ascii: "=") {
                        k += 1
                        var v = 0
                        var digits = 0
                        while k < ve, p[k] >= 0x30, p[k] <= 0x39, digits < 9 { v = v * 10 + Int(p[k] - 0x30); k += 1; digits += 1 }
                        if digits > 0 { num = v }
                        while k < ve, p[k] != UInt8(ascii: ",") { k += 1 }
                    }
                    if equalsIgnoringCase(p, ks, ke, "timeout") { head.keepAliveTimeout = num }
                    else if equalsIgnoringCase(p, ks, ke, "max") { head.keepAliveMax = num }
                }
            default:
                break
            }
        }
        if head.chunked && head.contentLength != nil {
            return HeadError(status: bad, reason: "both Content-Length and Transfer-Encoding")
        }
        if kind == .request {
            if head.chunked && head.minorVersion == 0 {
                return HeadError(status: 400, reason: "Transfer-Encoding in an HTTP/1.0 request")
            }
            if head.minorVersion == 1 && head.hostIndex == nil {
                return HeadError(status: 400, reason: "missing Host header")
            }
            if let hi = head.hostIndex {
                // Validated even when an absolute-form target names the authority: a client
                // whose Host field is not one is not to be guessed at.
                let h = head.headers[hi]
                guard let host = RequestTarget.authorityHost(p, Int(h.valueStart), Int(h.valueEnd)) else {
                    return HeadError(status: 400, reason: "invalid Host header")
                }
                if head.hostStart < 0 { (head.hostStart, head.hostEnd) = host }
            }
            switch NormalizedPath.make(p, head.pathStart, head.pathEnd, mergeSlashes: mergeSlashes) {
            case .success(let path): head.path = path
            case .failure(let e): return HeadError(status: 400, reason: e.reason)
            }
        }
        return nil
    }

    @inline(__always)
    static func equals(_ p: UnsafeRawBufferPointer, _ s: Int, _ e: Int, _ lit: StaticString) -> Bool {
        guard e - s == lit.utf8CodeUnitCount else { return false }
        return lit.withUTF8Buffer { b in
            for k in 0..<b.count where p[s + k] != b[k] { return false }
            return true
        }
    }

    @inline(__always)
    static func equalsIgnoringCase(_ p: UnsafeRawBufferPointer, _ s: Int, _ e: Int, _ lit: StaticString) -> Bool {
        ASCII.equalsIgnoringCase(p, s, e, lit)
    }
}
