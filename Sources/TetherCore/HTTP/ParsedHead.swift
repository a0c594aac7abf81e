import NIOCore
import TetherHTTP
import TetherPool

/// A parsed head together with its bytes, on the NIO path: the bytes are a slice of the buffer
/// the head was read into (no copy), the layout says where everything is in them.
struct ParsedHead {
    /// The head's bytes, from the first line to the blank line's CRLF inclusive.
    var bytes: ByteBuffer
    var layout: HeadLayout

    // The layout's parts, read through (explicit: a key-path member lookup was not free).
    var methodEnd: Int { layout.methodEnd }
    var targetStart: Int { layout.targetStart }
    var targetEnd: Int { layout.targetEnd }
    var status: Int { layout.status }
    var minorVersion: Int { layout.minorVersion }
    var contentLength: Int64? { layout.contentLength }
    var chunked: Bool { layout.chunked }
    var connectionClose: Bool { layout.connectionClose }
    var connectionKeepAlive: Bool { layout.connectionKeepAlive }
    var connectionUpgrade: Bool { layout.connectionUpgrade }
    var expectContinue: Bool { layout.expectContinue }
    var hostIndex: Int? { layout.hostIndex }
    var targetForm: RequestTarget.Form { layout.targetForm }
    var pathStart: Int { layout.pathStart }
    var pathEnd: Int { layout.pathEnd }
    var hostStart: Int { layout.hostStart }
    var hostEnd: Int { layout.hostEnd }
    var path: NormalizedPath { layout.path }
    var upgradeIndex: Int? { layout.upgradeIndex }
    var keepAliveTimeout: Int? { layout.keepAliveTimeout }
    var keepAliveMax: Int? { layout.keepAliveMax }
    var keepsConnection: Bool { layout.keepsConnection }
    var clientWantsKeepAlive: Bool { layout.clientWantsKeepAlive }

    /// The header lines; mutable in place, so that their storage can be swapped back to the loop.
    var headers: [HeaderField] {
        get { layout.headers }
        _modify { yield &layout.headers }
    }

    func string(_ start: Int, _ end: Int) -> String {
        bytes.getString(at: bytes.readerIndex + start, length: end - start) ?? ""
    }

    var method: String { string(0, layout.methodEnd) }
    var target: String { string(layout.targetStart, layout.targetEnd) }

    func value(_ h: HeaderField) -> String { string(Int(h.valueStart), Int(h.valueEnd)) }

    /// The value of the first header named `name` (lowercase), if any.
    func value(named name: String) -> String? {
        let i = bytes.withUnsafeReadableBytes { p in layout.index(named: Array(name.utf8), in: p) }
        return i.map { value(layout.headers[$0]) }
    }

    var isIdempotent: Bool { bytes.withUnsafeReadableBytes { layout.isIdempotent(in: $0) } }
    var isHEAD: Bool { layout.methodEnd == 4 && methodIs("HEAD") }
    func methodIs(_ m: StaticString) -> Bool { bytes.withUnsafeReadableBytes { layout.methodIs(m, in: $0) } }

    func responseFraming(requestIsHEAD: Bool, upgrading: Bool = false) -> BodyFraming {
        layout.responseFraming(requestIsHEAD: requestIsHEAD, upgrading: upgrading)
    }

    /// The response's `Keep-Alive: timeout=, max=`, for the pool.
    var backendKeepAlive: ConnectionPool<ObjectIdentifier>.BackendKeepAlive? {
        layout.keepAliveTimeout == nil && layout.keepAliveMax == nil ? nil : .init(timeoutSeconds: layout.keepAliveTimeout, max: layout.keepAliveMax)
    }
}

enum ParsedHeadOutcome {
    case incomplete
    /// The head, and how many bytes of the buffer it took (including skipped leading CRLFs).
    case complete(ParsedHead, consumed: Int)
    case error(HeadError)
}

extension HeadParser {
    /// Parses the head at the start of `buffer`'s readable bytes; the head's bytes are a slice of it.
    static func parse(_ buffer: ByteBuffer, kind: Kind, limits: Limits, headers: inout [HeaderField]) -> ParsedHeadOutcome {
        var layout = HeadLayout()
        let outcome = buffer.withUnsafeReadableBytes { p in parse(p, kind: kind, limits: limits, headers: &headers, into: &layout) }
        switch outcome {
        case .incomplete: return .incomplete
        case .error(let e): return .error(e)
        case .complete(let start, let consumed):
            let bytes = buffer.getSlice(at: buffer.readerIndex + start, length: consumed - start)!
            return .complete(ParsedHead(bytes: bytes, layout: layout), consumed: consumed)
        }
    }
}
