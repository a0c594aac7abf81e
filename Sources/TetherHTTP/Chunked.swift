/// Follows a chunked body (RFC 9112 §7.1) byte by byte, strictly: where its chunks start and end,
/// where their data is, and its trailer fields. Bodies are never passed on as received: the
/// consumer writes them out again in canonical form (`ChunkedDecoder.writeSize`), so that nothing
/// this parser tolerates reaches the other side in a form the other side might read differently.
///
/// - chunk-size is hex digits with any number of leading zeros, limited by value (2^60), not digits;
/// - `chunk-size [ BWS ";" chunk-ext ]`: white space only before a `;`; extensions are tokens,
///   `=` and quoted strings, and are dropped;
/// - trailer fields are `token ":" field-value` lines (no obs-fold), kept for the consumer
///   except those that must not appear in trailers (framing, routing, hop-by-hop).
public struct ChunkedDecoder {
    public enum State: Equatable {
        case size(digits: Int)
        /// White space after the size: only a `;` may follow.
        case sizeBWS
        case extensions
        case extensionQuoted
        case extensionQuotedEscape
        case sizeLF
        case data(remaining: Int64)
        case dataCR
        case dataLF
        case trailerStart
        case trailerLine
        case trailerLF
        case finalLF
        case done
    }

    /// What the body holds, in order.
    public enum Event: Equatable {
        /// A chunk of this many data bytes starts.
        case chunk(Int64)
        /// Data bytes at these offsets of the buffer being consumed.
        case data(Int, Int)
        /// The current chunk's data ended.
        case chunkEnd
        /// The last chunk and the trailer section were read: the body is complete.
        case end
    }

    public struct Failure: Error, Equatable {
        public var reason: String
        public init(reason: String) { self.reason = reason }
    }

    public private(set) var state = State.size(digits: 0)
    private var size: Int64 = 0
    /// Bytes of the current size line (for its bound).
    private var lineLength = 0
    /// Data bytes seen so far, and announced by the chunk sizes read so far.
    public private(set) var dataBytes: Int64 = 0
    public private(set) var announcedBytes: Int64 = 0
    /// The trailer line being read, and the kept trailer lines (CRLF-terminated) once read.
    private var trailerLine: [UInt8] = []
    public private(set) var trailers: [UInt8] = []
    private var trailerBytes = 0

    /// The longest size line (size and extensions), and all trailer lines together.
    public init() {}

    public static let sizeLineLimit = 4096
    public static let trailerLimit = 16 * 1024

    public var isDone: Bool { state == .done }

    /// Consumes bytes from the start of `p`, calling `data` with the offsets of each data run.
    /// Returns how many bytes belong to the body (all of `p`, unless the body ended inside it).
    public mutating func consume(_ p: UnsafeRawBufferPointer, data: (Int, Int) -> Void) throws(Failure) -> Int {
        try consume(p, events: { if case .data(let a, let b) = $0 { data(a, b) } })
    }

    /// Consumes bytes from the start of `p`, reporting what they hold. Returns how many bytes
    /// belong to the body (all of `p`, unless the body ended inside it).
    public mutating func consume(_ p: UnsafeRawBufferPointer, events: (Event) -> Void) throws(Failure) -> Int {
        var i = 0
        let n = p.count
        while i < n {
            switch state {
            case .size(let digits):
                let c = p[i]
                if let v = ChunkedDecoder.hex(c) {
                    guard size < 1 << 56 else { throw Failure(reason: "chunk size too large") }
                    size = size << 4 | Int64(v)
                    state = .size(digits: digits + 1)
                } else if digits > 0 && c == UInt8(ascii: ";") {
                    state = .extensions
                } else if digits > 0 && (c == 0x20 || c == 0x09) {
                    state = .sizeBWS
                } else if digits > 0 && c == 0x0D {
                    state = .sizeLF
                } else {
                    throw Failure(reason: "invalid chunk size")
                }
                try countLine()
                i += 1
            case .sizeBWS:
                let c = p[i]
                if c == UInt8(ascii: ";") { state = .extensions } else if c != 0x20 && c != 0x09 {
                    throw Failure(reason: "invalid chunk size")
                }
                try countLine()
                i += 1
            case .extensions:
                // chunk-ext: *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ),
                // checked by its characters: tokens, ";", "=", white space, quoted strings.
                let c = p[i]
                if c == 0x0D {
                    state = .sizeLF
                } else if c == UInt8(ascii: "\"") {
                    state = .extensionQuoted
                } else if !(ASCII.isToken(c) || c == UInt8(ascii: ";") || c == UInt8(ascii: "=") || c == 0x20 || c == 0x09) {
                    throw Failure(reason: "invalid chunk extension")
                }
                try countLine()
                i += 1
            case .extensionQuoted:
                let c = p[i]
                if c == UInt8(ascii: "\"") { state = .extensions } else if c == UInt8(ascii: "\\") { state = .extensionQuotedEscape } else if !ASCII.isFieldByte(c) {
                    throw Failure(reason: "invalid chunk extension")
                }
                try countLine()
                i += 1
            case .extensionQuotedEscape:
                guard ASCII.isFieldByte(p[i]) else { throw Failure(reason: "invalid chunk extension") }
                state = .extensionQuoted
                try countLine()
                i += 1
            case .sizeLF:
                guard p[i] == 0x0A else { throw Failure(reason: "bare CR in chunk size line") }
                i += 1
                lineLength = 0
                if size == 0 {
                    state = .trailerStart
                } else {
                    announcedBytes += size
                    events(.chunk(size))
                    state = .data(remaining: size)
                }
                size = 0
            case .data(let remaining):
                let take = Int(min(remaining, Int64(n - i)))
                events(.data(i, i + take))
                dataBytes += Int64(take)
                i += take
                state = remaining == Int64(take) ? .dataCR : .data(remaining: remaining - Int64(take))
            case .dataCR:
                guard p[i] == 0x0D else { throw Failure(reason: "chunk data not followed by CRLF") }
                state = .dataLF; i += 1
            case .dataLF:
                guard p[i] == 0x0A else { throw Failure(reason: "chunk data not followed by CRLF") }
                events(.chunkEnd)
                state = .size(digits: 0); i += 1
            case .trailerStart:
                let c = p[i]
                if c == 0x0D {
                    state = .finalLF
                } else if c == 0x20 || c == 0x09 {
                    throw Failure(reason: "obsolete line folding in trailer")
                } else if c == 0x0A {
                    throw Failure(reason: "bare LF in trailer")
                } else {
                    trailerLine.removeAll(keepingCapacity: true)
                    trailerLine.append(c)
                    state = .trailerLine
                }
                try countTrailer()
                i += 1
            case .trailerLine:
                let c = p[i]
                if c == 0x0D {
                    state = .trailerLF
                } else {
                    guard c == 0x09 || (c >= 0x20 && c != 0x7F) else { throw Failure(reason: "invalid byte in trailer") }
                    trailerLine.append(c)
                }
                try countTrailer()
                i += 1
            case .trailerLF:
                guard p[i] == 0x0A else { throw Failure(reason: "bare CR in trailer") }
                try keepTrailerLine()
                state = .trailerStart; i += 1
            case .finalLF:
                guard p[i] == 0x0A else { throw Failure(reason: "bare CR after last chunk") }
                state = .done; i += 1
                events(.end)
                return i
            case .done:
                return i
            }
        }
        return i
    }

    private mutating func countLine() throws(Failure) {
        lineLength += 1
        if lineLength > Self.sizeLineLimit { throw Failure(reason: "chunk size line too long") }
    }

    private mutating func countTrailer() throws(Failure) {
        trailerBytes += 1
        if trailerBytes > Self.trailerLimit { throw Failure(reason: "trailer section too large") }
    }

    /// A trailer line must be a field line; those that must not stand in a trailer are dropped.
    private mutating func keepTrailerLine() throws(Failure) {
        let ok = trailerLine.withUnsafeBytes { p -> Bool in
            var j = 0
            while j < p.count, ASCII.isToken(p[j]) { j += 1 }
            guard j > 0, j < p.count, p[j] == UInt8(ascii: ":") else { return false }
            return true
        }
        guard ok else { throw Failure(reason: "invalid trailer field") }
        let name = String(decoding: trailerLine.prefix { $0 != UInt8(ascii: ":") }, as: UTF8.self).lowercased()
        if !ChunkedDecoder.notInTrailers.contains(name) {
            trailers.append(contentsOf: trailerLine)
            trailers.append(0x0D)
            trailers.append(0x0A)
        }
    }

    /// Fields that frame, route or control the connection: meaningless or dangerous in a trailer
    /// (RFC 9110 §6.5.1), never passed on.
    public static let notInTrailers: Set<String> = [
        "content-length", "transfer-encoding", "host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "upgrade", "content-type", "content-encoding", "content-range", "expect", "authorization", "cookie", "set-cookie",
    ]

    @inline(__always) public static func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x61...0x66: return c - 0x61 + 10
        case 0x41...0x46: return c - 0x41 + 10
        default: return nil
        }
    }
}

/// How a message body is delimited on the wire.
public enum BodyFraming: Equatable, Sendable {
    case none
    case length(Int64)
    case chunked
    /// Until the connection closes (responses only).
    case untilClose
}
