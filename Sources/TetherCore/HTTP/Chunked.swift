import NIOCore

/// Follows a chunked body byte by byte to find where it ends, and where its data is.
/// Used both to forward chunked bodies verbatim (the proxy only needs the end) and to
/// de-chunk them for HTTP/1.0 clients.
struct ChunkedDecoder {
    enum State: Equatable {
        case size(digits: Int)
        case extensions
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

    struct Failure: Error, Equatable { var reason: String }

    private(set) var state = State.size(digits: 0)
    private var size: Int64 = 0
    /// Data bytes seen so far.
    private(set) var dataBytes: Int64 = 0

    var isDone: Bool { state == .done }

    /// Consumes bytes from the start of `p`, calling `data` with the offsets of each data run.
    /// Returns how many bytes belong to the body (all of `p`, unless the body ended inside it).
    mutating func consume(_ p: UnsafeRawBufferPointer, data: (Int, Int) -> Void) throws(Failure) -> Int {
        var i = 0
        let n = p.count
        while i < n {
            switch state {
            case .size(let digits):
                let c = p[i]
                if let v = ChunkedDecoder.hex(c) {
                    guard digits < 15 else { throw Failure(reason: "chunk size too large") }
                    size = size << 4 | Int64(v)
                    state = .size(digits: digits + 1)
                } else if digits > 0 && (c == UInt8(ascii: ";") || c == 0x20 || c == 0x09) {
                    state = .extensions
                } else if digits > 0 && c == 0x0D {
                    state = .sizeLF
                } else {
                    throw Failure(reason: "invalid chunk size")
                }
                i += 1
            case .extensions:
                let c = p[i]
                if c == 0x0D { state = .sizeLF } else if c == 0x0A || (c < 0x20 && c != 0x09) {
                    throw Failure(reason: "invalid chunk extension")
                }
                i += 1
            case .sizeLF:
                guard p[i] == 0x0A else { throw Failure(reason: "bare CR in chunk size line") }
                i += 1
                if size == 0 {
                    state = .trailerStart
                } else {
                    state = .data(remaining: size)
                }
                size = 0
            case .data(let remaining):
                let take = Int(min(remaining, Int64(n - i)))
                data(i, i + take)
                dataBytes += Int64(take)
                i += take
                state = remaining == Int64(take) ? .dataCR : .data(remaining: remaining - Int64(take))
            case .dataCR:
                guard p[i] == 0x0D else { throw Failure(reason: "chunk data not followed by CRLF") }
                state = .dataLF; i += 1
            case .dataLF:
                guard p[i] == 0x0A else { throw Failure(reason: "chunk data not followed by CRLF") }
                state = .size(digits: 0); i += 1
            case .trailerStart:
                if p[i] == 0x0D { state = .finalLF } else if p[i] == 0x0A { throw Failure(reason: "bare LF in trailer") } else { state = .trailerLine }
                i += 1
            case .trailerLine:
                let c = p[i]
                if c == 0x0D { state = .trailerLF } else if c == 0x0A || c == 0 { throw Failure(reason: "invalid trailer") }
                i += 1
            case .trailerLF:
                guard p[i] == 0x0A else { throw Failure(reason: "bare CR in trailer") }
                state = .trailerStart; i += 1
            case .finalLF:
                guard p[i] == 0x0A else { throw Failure(reason: "bare CR after last chunk") }
                state = .done; i += 1
                return i
            case .done:
                return i
            }
        }
        return i
    }

    @inline(__always) static func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x61...0x66: return c - 0x61 + 10
        case 0x41...0x46: return c - 0x41 + 10
        default: return nil
        }
    }
}

/// How a message body is delimited on the wire.
enum BodyFraming: Equatable {
    case none
    case length(Int64)
    case chunked
    /// Until the connection closes (responses only).
    case untilClose
}
