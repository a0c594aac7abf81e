@testable import TetherCore
import TetherHTTP
import TetherPool

/// A parsed head together with a copy of its bytes, for the parser's tests: the layout says where
/// everything is in them.
struct ParsedHead {
    /// The head's bytes, from the first line to the blank line's CRLF inclusive.
    var bytes: [UInt8]
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
        String(decoding: bytes[start..<end], as: UTF8.self)
    }

    var method: String { string(0, layout.methodEnd) }
    var target: String { string(layout.targetStart, layout.targetEnd) }

    func value(_ h: HeaderField) -> String { string(Int(h.valueStart), Int(h.valueEnd)) }

    /// The value of the first header named `name` (lowercase), if any.
    func value(named name: String) -> String? {
        let i = bytes.withUnsafeBytes { p in layout.index(named: Array(name.utf8), in: p) }
        return i.map { value(layout.headers[$0]) }
    }

    var isIdempotent: Bool { bytes.withUnsafeBytes { layout.isIdempotent(in: $0) } }
    var isHEAD: Bool { layout.methodEnd == 4 && methodIs("HEAD") }
    func methodIs(_ m: StaticString) -> Bool { bytes.withUnsafeBytes { layout.methodIs(m, in: $0) } }

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
    /// Parses the head at the start of `buffer`; the head's bytes are copied out of it.
    static func parse(_ buffer: [UInt8], kind: Kind, limits: Limits, headers: inout [HeaderField]) -> ParsedHeadOutcome {
        var layout = HeadLayout()
        let outcome = buffer.withUnsafeBytes { p in parse(p, kind: kind, limits: limits, headers: &headers, into: &layout) }
        switch outcome {
        case .incomplete: return .incomplete
        case .error(let e): return .error(e)
        case .complete(let start, let consumed):
            let bytes = Array(buffer[start..<consumed])
            return .complete(ParsedHead(bytes: bytes, layout: layout), consumed: consumed)
        }
    }
}
