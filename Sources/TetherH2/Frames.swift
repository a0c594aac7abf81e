/// HTTP/2 frames (RFC 9113 §4, §6): the nine-byte header, the types and flags, the error codes,
/// and writers for the frames a server sends. No I/O: frames are read from and written to byte
/// arrays the caller owns.

public enum H2FrameType: UInt8, Sendable {
    case data = 0, headers = 1, priority = 2, rstStream = 3, settings = 4, pushPromise = 5, ping = 6, goaway = 7,
         windowUpdate = 8, continuation = 9
}

public struct H2Flags: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// DATA, HEADERS.
    public static let endStream = H2Flags(rawValue: 0x1)
    /// SETTINGS, PING (same bit).
    public static let ack = H2Flags(rawValue: 0x1)
    /// HEADERS, CONTINUATION.
    public static let endHeaders = H2Flags(rawValue: 0x4)
    /// DATA, HEADERS.
    public static let padded = H2Flags(rawValue: 0x8)
    /// HEADERS.
    public static let priority = H2Flags(rawValue: 0x20)
}

/// RFC 9113 §7.
public enum H2ErrorCode: UInt32, Sendable, CaseIterable {
    case noError = 0x0, protocolError = 0x1, internalError = 0x2, flowControlError = 0x3, settingsTimeout = 0x4,
         streamClosed = 0x5, frameSizeError = 0x6, refusedStream = 0x7, cancel = 0x8, compressionError = 0x9,
         connectError = 0xa, enhanceYourCalm = 0xb, inadequateSecurity = 0xc, http11Required = 0xd

    /// The name RFC 9113 gives it, for logs and metrics.
    public var name: String {
        switch self {
        case .noError: "NO_ERROR"
        case .protocolError: "PROTOCOL_ERROR"
        case .internalError: "INTERNAL_ERROR"
        case .flowControlError: "FLOW_CONTROL_ERROR"
        case .settingsTimeout: "SETTINGS_TIMEOUT"
        case .streamClosed: "STREAM_CLOSED"
        case .frameSizeError: "FRAME_SIZE_ERROR"
        case .refusedStream: "REFUSED_STREAM"
        case .cancel: "CANCEL"
        case .compressionError: "COMPRESSION_ERROR"
        case .connectError: "CONNECT_ERROR"
        case .enhanceYourCalm: "ENHANCE_YOUR_CALM"
        case .inadequateSecurity: "INADEQUATE_SECURITY"
        case .http11Required: "HTTP_1_1_REQUIRED"
        }
    }
}

/// SETTINGS parameters (RFC 9113 §6.5.2).
public enum H2Setting: UInt16, Sendable {
    case headerTableSize = 0x1, enablePush = 0x2, maxConcurrentStreams = 0x3, initialWindowSize = 0x4,
         maxFrameSize = 0x5, maxHeaderListSize = 0x6
}

/// A frame's nine-byte header.
public struct H2FrameHeader: Equatable, Sendable {
    public var length: Int
    /// The raw type: unknown types are read and ignored (§4.1), so this is not `H2FrameType`.
    public var type: UInt8
    public var flags: H2Flags
    public var stream: UInt32

    public init(length: Int, type: UInt8, flags: H2Flags, stream: UInt32) {
        self.length = length
        self.type = type
        self.flags = flags
        self.stream = stream
    }

    public static let size = 9

    /// Reads a header from the first nine bytes of `b` (the reserved bit of the stream is dropped).
    public init(_ b: UnsafeRawBufferPointer) {
        length = Int(b[0]) << 16 | Int(b[1]) << 8 | Int(b[2])
        type = b[3]
        flags = H2Flags(rawValue: b[4])
        stream = (UInt32(b[5]) << 24 | UInt32(b[6]) << 16 | UInt32(b[7]) << 8 | UInt32(b[8])) & 0x7fff_ffff
    }

    public func write(to out: inout [UInt8]) {
        out.append(UInt8(truncatingIfNeeded: length >> 16))
        out.append(UInt8(truncatingIfNeeded: length >> 8))
        out.append(UInt8(truncatingIfNeeded: length))
        out.append(type)
        out.append(flags.rawValue)
        H2Write.u32(stream & 0x7fff_ffff, to: &out)
    }
}

/// The frames a server writes, appended to a byte array.
public enum H2Write {
    /// The client's connection preface (RFC 9113 §3.4), before its first SETTINGS.
    public static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    static func u32(_ v: UInt32, to out: inout [UInt8]) {
        out.append(UInt8(truncatingIfNeeded: v >> 24))
        out.append(UInt8(truncatingIfNeeded: v >> 16))
        out.append(UInt8(truncatingIfNeeded: v >> 8))
        out.append(UInt8(truncatingIfNeeded: v))
    }

    public static func settings(_ values: [(H2Setting, UInt32)], to out: inout [UInt8]) {
        H2FrameHeader(length: values.count * 6, type: H2FrameType.settings.rawValue, flags: [], stream: 0).write(to: &out)
        for (k, v) in values {
            out.append(UInt8(truncatingIfNeeded: k.rawValue >> 8))
            out.append(UInt8(truncatingIfNeeded: k.rawValue))
            u32(v, to: &out)
        }
    }

    public static func settingsAck(to out: inout [UInt8]) {
        H2FrameHeader(length: 0, type: H2FrameType.settings.rawValue, flags: .ack, stream: 0).write(to: &out)
    }

    public static func pingAck(_ opaque: UInt64, to out: inout [UInt8]) {
        H2FrameHeader(length: 8, type: H2FrameType.ping.rawValue, flags: .ack, stream: 0).write(to: &out)
        u32(UInt32(truncatingIfNeeded: opaque >> 32), to: &out)
        u32(UInt32(truncatingIfNeeded: opaque), to: &out)
    }

    public static func goaway(lastStream: UInt32, _ code: H2ErrorCode, to out: inout [UInt8]) {
        H2FrameHeader(length: 8, type: H2FrameType.goaway.rawValue, flags: [], stream: 0).write(to: &out)
        u32(lastStream, to: &out)
        u32(code.rawValue, to: &out)
    }

    public static func rstStream(_ stream: UInt32, _ code: H2ErrorCode, to out: inout [UInt8]) {
        H2FrameHeader(length: 4, type: H2FrameType.rstStream.rawValue, flags: [], stream: stream).write(to: &out)
        u32(code.rawValue, to: &out)
    }

    public static func windowUpdate(_ stream: UInt32, _ increment: UInt32, to out: inout [UInt8]) {
        H2FrameHeader(length: 4, type: H2FrameType.windowUpdate.rawValue, flags: [], stream: stream).write(to: &out)
        u32(increment, to: &out)
    }

    /// A header block as HEADERS and, past `maxFrame` bytes, CONTINUATION frames.
    public static func headers(_ stream: UInt32, block: [UInt8], endStream: Bool, maxFrame: Int, to out: inout [UInt8]) {
        var at = 0
        var first = true
        repeat {
            let n = min(maxFrame, block.count - at)
            let last = at + n == block.count
            var flags: H2Flags = last ? .endHeaders : []
            if first && endStream { flags.insert(.endStream) }
            let type = first ? H2FrameType.headers : .continuation
            H2FrameHeader(length: n, type: type.rawValue, flags: flags, stream: stream).write(to: &out)
            out.append(contentsOf: block[at..<at + n])
            at += n
            first = false
        } while at < block.count
    }

    /// A DATA frame's header: the `length` payload bytes follow from the caller's buffers
    /// (never copied into a frame of their own).
    public static func dataHeader(_ stream: UInt32, length: Int, endStream: Bool, to out: inout [UInt8]) {
        H2FrameHeader(length: length, type: H2FrameType.data.rawValue, flags: endStream ? .endStream : [], stream: stream).write(to: &out)
    }
}
