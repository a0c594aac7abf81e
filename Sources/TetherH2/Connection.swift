/// What a server connection tells its owner as it reads the client's frames.
public protocol H2Receiver {
    /// A stream's request head (or, `trailers`, its trailer fields), decoded. `endStream`: no
    /// body follows (or, for trailers, the body is complete). Fields over the header list limit
    /// come as `tooLarge` (answer 431), with the fields decoded so far dropped.
    mutating func headers(stream: UInt32, fields: [H2Field], endStream: Bool, trailers: Bool, tooLarge: Bool)
    /// Request body bytes of a stream (valid during the call only); hand back what is used with
    /// `H2Connection.consumed`, which opens the client's window again.
    mutating func data(stream: UInt32, bytes: UnsafeRawBufferPointer, endStream: Bool)
    /// The stream ended abnormally: reset by the client, or by the connection for a stream
    /// error (`byPeer` false; the RST_STREAM is in the output already).
    mutating func streamReset(stream: UInt32, code: H2ErrorCode, byPeer: Bool)
    /// The client's window grew (stream 0: the connection's): more of a response may be sent.
    mutating func windowOpened(stream: UInt32)
    /// The client said GOAWAY: no stream above `lastStream` will be answered by it.
    mutating func goaway(lastStream: UInt32, code: H2ErrorCode)
}

/// The server side of one HTTP/2 connection (RFC 9113) as a value: it takes the bytes the client
/// sent and tells a `H2Receiver` what they mean, and keeps in `output` the control frames it
/// answers with (SETTINGS and their ACKs, PING ACKs, WINDOW_UPDATE, RST_STREAM, GOAWAY). No I/O:
/// the owner writes `output`, and the responses it frames itself (`H2Write.headers`,
/// `H2Write.dataHeader`) within `sendWindow`.
///
/// Defences, each bounded and counted: a header block over the limit of encoded bytes
/// (CONTINUATION flood) or decoded size (HPACK bomb) ends the connection; streams over
/// `maxConcurrentStreams` are refused; resets of unanswered streams (rapid reset), empty DATA
/// frames, empty CONTINUATION frames, SETTINGS, PING and PRIORITY frames count as glitches, and
/// past `maxGlitches` (less one per stream answered) the connection ends with ENHANCE_YOUR_CALM.
public struct H2Connection {
    public struct Settings: Sendable {
        /// `http2_max_concurrent_streams` (nginx's default).
        public var maxConcurrentStreams = 128
        /// Each stream's receive window (nginx's `http2_body_preread_size`: 64k).
        public var initialWindowSize = 65_535
        public var maxFrameSize = 16_384
        /// `large_client_header_buffers`: the decoded header list (RFC 7541's size: names and
        /// values plus 32 each); over it, a stream is answered 431.
        public var maxHeaderListSize = 32_768
        public var headerTableSize = 4_096
        /// Glitches (see the type) past which the connection is closed.
        public var maxGlitches = 256
        public init() {}
    }

    public enum Failure: Equatable, Sendable {
        case connection(H2ErrorCode, String)
    }

    struct Stream {
        var id: UInt32
        /// The client sent END_STREAM.
        var remoteClosed = false
        /// The owner sent its END_STREAM (or the stream was reset).
        var localClosed = false
        var recvWindow: Int
        var sendWindow: Int
        /// Consumed bytes not yet given back to the client in the stream's WINDOW_UPDATE (the
        /// connection's count is `connectionUnacked`, given back as they are consumed).
        var unacked = 0
        /// The request's content-length, to check the DATA against (RFC 9113 §8.1.1).
        var expectedLength: Int64?
        var received: Int64 = 0
    }

    public let settings: Settings
    /// Frames to write, in order.
    public var output: [UInt8] = []
    /// Set once the connection has failed: the GOAWAY is in `output`; write it and close.
    public private(set) var failure: Failure?
    /// A GOAWAY went out (`goAway` or a failure): streams above `lastStream` are not taken.
    public private(set) var goingAway = false
    /// The highest stream the client opened.
    public private(set) var lastStream: UInt32 = 0
    public private(set) var glitches = 0
    /// Streams refused or reset for being over the limits, by reason, for the metrics.
    public private(set) var refusedStreams = 0

    private var prefaceLeft = H2Write.preface.count
    private var sawSettings = false
    private var streams: [UInt32: Stream] = [:]
    /// Streams this side reset lately: frames still in flight on them are dropped (§5.4.2).
    private var resetLately: [UInt32] = []
    private var decoder: H2HeaderDecoder
    /// A header block being gathered from HEADERS and CONTINUATION frames.
    private var block: [UInt8] = []
    private var blockStream: UInt32 = 0
    private var blockEndStream = false
    private var inBlock = false
    /// The client's SETTINGS as they apply to what this side sends.
    public private(set) var peerMaxFrameSize = 16_384
    private var peerInitialWindow = 65_535
    private var connectionSendWindow = 65_535
    private var connectionRecvWindow: Int
    private var connectionUnacked = 0
    private let connectionWindow: Int
    static let maxWindow = Int(Int32.max)

    public init(settings: Settings = Settings()) {
        self.settings = settings
        // Decoding stops past four times the limit (an HPACK bomb costs no more than that); up
        // to it the stream is answered 431 and the connection goes on.
        decoder = H2HeaderDecoder(maxTableSize: settings.headerTableSize, maxListSize: 4 * settings.maxHeaderListSize)
        // The connection's window covers every stream's at once.
        connectionWindow = min(Self.maxWindow, settings.initialWindowSize * settings.maxConcurrentStreams)
        connectionRecvWindow = connectionWindow
        H2Write.settings([(.maxConcurrentStreams, UInt32(settings.maxConcurrentStreams)),
                          (.initialWindowSize, UInt32(settings.initialWindowSize)),
                          (.maxFrameSize, UInt32(settings.maxFrameSize)),
                          (.maxHeaderListSize, UInt32(settings.maxHeaderListSize)),
                          (.enablePush, 0)], to: &output)
        if connectionWindow > 65_535 { H2Write.windowUpdate(0, UInt32(connectionWindow - 65_535), to: &output) }
    }

    /// Streams open now (not yet ended on both sides).
    public var openStreams: Int { streams.count }

    /// Reads whole frames from `input` and returns how many bytes were used; the rest (part of
    /// a frame) is to be offered again with more. Stops at a connection failure.
    public mutating func receive<R: H2Receiver>(_ input: UnsafeRawBufferPointer, _ r: inout R) -> Int {
        var at = 0
        if prefaceLeft > 0 {
            let n = min(prefaceLeft, input.count)
            let start = H2Write.preface.count - prefaceLeft
            for i in 0..<n where input[i] != H2Write.preface[start + i] {
                fail(.protocolError, "the client's preface is not HTTP/2's")
                return input.count
            }
            prefaceLeft -= n
            at = n
            if prefaceLeft > 0 { return at }
        }
        while failure == nil, input.count - at >= H2FrameHeader.size {
            let h = H2FrameHeader(UnsafeRawBufferPointer(rebasing: input[at..<at + H2FrameHeader.size]))
            guard h.length <= settings.maxFrameSize else {
                fail(.frameSizeError, "a frame of \(h.length) bytes, over SETTINGS_MAX_FRAME_SIZE \(settings.maxFrameSize)")
                return input.count
            }
            guard input.count - at - H2FrameHeader.size >= h.length else { break }
            let payload = UnsafeRawBufferPointer(rebasing: input[at + H2FrameHeader.size..<at + H2FrameHeader.size + h.length])
            at += H2FrameHeader.size + h.length
            frame(h, payload, &r)
        }
        return failure == nil ? at : input.count
    }

    // MARK: Frames

    private mutating func frame<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        if !sawSettings {
            guard h.type == H2FrameType.settings.rawValue, !h.flags.contains(.ack) else {
                return fail(.protocolError, "the client's first frame is not SETTINGS")
            }
            sawSettings = true
        }
        if inBlock && h.type != H2FrameType.continuation.rawValue {
            return fail(.protocolError, "a frame other than CONTINUATION inside a header block")
        }
        guard let type = H2FrameType(rawValue: h.type) else { return }  // unknown types are ignored (§4.1)
        switch type {
        case .data: data(h, p, &r)
        case .headers: headers(h, p, &r)
        case .priority:
            guard h.stream != 0 else { return fail(.protocolError, "PRIORITY on stream 0") }
            guard p.count == 5 else { return streamError(h.stream, .frameSizeError, &r) }
            if Self.u32(p, 0) & 0x7fff_ffff == h.stream { return streamError(h.stream, .protocolError, &r) }
            glitch()
        case .rstStream: rstStream(h, p, &r)
        case .settings: settingsFrame(h, p, &r)
        case .pushPromise: fail(.protocolError, "PUSH_PROMISE from a client")
        case .ping:
            guard h.stream == 0 else { return fail(.protocolError, "PING on a stream") }
            guard p.count == 8 else { return fail(.frameSizeError, "PING of \(p.count) bytes") }
            if !h.flags.contains(.ack) {
                H2Write.pingAck(UInt64(Self.u32(p, 0)) << 32 | UInt64(Self.u32(p, 4)), to: &output)
                glitch()
            }
        case .goaway:
            guard h.stream == 0 else { return fail(.protocolError, "GOAWAY on a stream") }
            guard p.count >= 8 else { return fail(.frameSizeError, "GOAWAY of \(p.count) bytes") }
            r.goaway(lastStream: Self.u32(p, 0) & 0x7fff_ffff, code: H2ErrorCode(rawValue: Self.u32(p, 4)) ?? .internalError)
        case .windowUpdate: windowUpdate(h, p, &r)
        case .continuation: continuation(h, p, &r)
        }
    }

    private mutating func data<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        guard h.stream != 0 else { return fail(.protocolError, "DATA on stream 0") }
        guard let body = unpadded(h, p) else { return }
        // The whole frame counts against the windows, padding included (§6.9.1).
        guard p.count <= connectionRecvWindow else { return fail(.flowControlError, "DATA beyond the connection's window") }
        connectionRecvWindow -= p.count
        // Padding is given back at once.
        giveBackConnection(p.count - body.count)
        guard var s = streams[h.stream] else {
            giveBackConnection(body.count)
            if h.stream > lastStream { return fail(.protocolError, "DATA on an idle stream") }
            if !resetLately.contains(h.stream) { streamError(h.stream, .streamClosed, &r) }
            return
        }
        guard !s.remoteClosed else {
            giveBackConnection(body.count)
            return streamError(h.stream, .streamClosed, &r)
        }
        guard p.count <= s.recvWindow else {
            giveBackConnection(body.count)
            return streamError(h.stream, .flowControlError, &r)
        }
        s.recvWindow -= p.count
        s.received += Int64(body.count)
        let end = h.flags.contains(.endStream)
        if let expected = s.expectedLength, s.received > expected || end && s.received != expected {
            streams[h.stream] = s
            giveBackConnection(body.count)
            return streamError(h.stream, .protocolError, &r)
        }
        if body.isEmpty && !end { glitch() }
        if end { s.remoteClosed = true }
        // A stream whose answer went out already ends with its request.
        streams[h.stream] = end && s.localClosed ? nil : s
        r.data(stream: h.stream, bytes: body, endStream: end)
    }

    private mutating func headers<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        guard h.stream != 0 else { return fail(.protocolError, "HEADERS on stream 0") }
        guard h.stream & 1 == 1 else { return fail(.protocolError, "HEADERS on an even stream") }
        guard var fragment = unpadded(h, p) else { return }
        if h.flags.contains(.priority) {
            guard fragment.count >= 5 else { return fail(.frameSizeError, "HEADERS too short for its priority") }
            if Self.u32(fragment, 0) & 0x7fff_ffff == h.stream { return streamError(h.stream, .protocolError, &r) }
            fragment = UnsafeRawBufferPointer(rebasing: fragment[5...])
        }
        if let s = streams[h.stream] {
            // Trailers: only on a stream whose request is still coming, and they end it.
            guard !s.remoteClosed else { return fail(.streamClosed, "HEADERS on a half-closed stream") }
            guard h.flags.contains(.endStream) else { return fail(.protocolError, "trailers without END_STREAM") }
        } else {
            guard h.stream > lastStream else {
                return fail(h.stream == lastStream || resetLately.contains(h.stream) ? .streamClosed : .protocolError,
                            "HEADERS on closed stream \(h.stream)")
            }
        }
        block.removeAll(keepingCapacity: true)
        blockStream = h.stream
        blockEndStream = h.flags.contains(.endStream)
        guard append(fragment) else { return }
        if h.flags.contains(.endHeaders) { endBlock(&r) } else { inBlock = true }
    }

    private mutating func continuation<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        guard inBlock, h.stream == blockStream else { return fail(.protocolError, "CONTINUATION outside a header block") }
        if p.isEmpty && !h.flags.contains(.endHeaders) { glitch() }
        guard failure == nil, append(p) else { return }
        if h.flags.contains(.endHeaders) {
            inBlock = false
            endBlock(&r)
        }
    }

    /// Adds a fragment to the header block; false (and the connection failed) past the limit:
    /// an encoded block larger than the decoded limit cannot be a fair request.
    private mutating func append(_ fragment: UnsafeRawBufferPointer) -> Bool {
        guard block.count + fragment.count <= settings.maxHeaderListSize else {
            fail(.enhanceYourCalm, "a header block over \(settings.maxHeaderListSize) bytes")
            return false
        }
        block.append(contentsOf: fragment)
        return true
    }

    private mutating func endBlock<R: H2Receiver>(_ r: inout R) {
        let id = blockStream
        var decoded: Result<[H2Field], H2HeaderDecoder.Failure> = .success([])
        block.withUnsafeBytes { b in
            do throws(H2HeaderDecoder.Failure) { decoded = .success(try decoder.decode(b)) } catch { decoded = .failure(error) }
        }
        let fields: [H2Field]
        switch decoded {
        case .success(let f): fields = f
        case .failure(.tooLarge): return fail(.enhanceYourCalm, "a header list over \(4 * settings.maxHeaderListSize) bytes decoded")
        case .failure(.malformed): return fail(.compressionError, "a header block HPACK cannot decode")
        }
        let size = fields.reduce(0) { $0 + $1.size }
        let tooLarge = size > settings.maxHeaderListSize
        if var s = streams[id] {
            // Trailers.
            s.remoteClosed = true
            if let expected = s.expectedLength, s.received != expected {
                streams[id] = s
                return streamError(id, .protocolError, &r)
            }
            streams[id] = s.localClosed ? nil : s
            r.headers(stream: id, fields: fields, endStream: true, trailers: true, tooLarge: tooLarge)
            return
        }
        lastStream = id
        if goingAway { return }
        guard streams.count < settings.maxConcurrentStreams else {
            refusedStreams += 1
            glitch()
            H2Write.rstStream(id, .refusedStream, to: &output)
            remember(id)
            return
        }
        var s = Stream(id: id, recvWindow: settings.initialWindowSize, sendWindow: peerInitialWindow)
        s.remoteClosed = blockEndStream
        if let v = fields.first(where: { $0.name == H2Request.contentLength })?.value, let n = H2Request.decimal(v) {
            s.expectedLength = n
            if blockEndStream && n != 0 { return streamError(id, .protocolError, &r) }
        }
        streams[id] = s
        r.headers(stream: id, fields: fields, endStream: blockEndStream, trailers: false, tooLarge: tooLarge)
    }

    private mutating func rstStream<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        guard h.stream != 0 else { return fail(.protocolError, "RST_STREAM on stream 0") }
        guard p.count == 4 else { return fail(.frameSizeError, "RST_STREAM of \(p.count) bytes") }
        guard h.stream <= lastStream else { return fail(.protocolError, "RST_STREAM on an idle stream") }
        guard let s = streams.removeValue(forKey: h.stream) else { return }
        // A stream reset before its answer is complete: the rapid-reset pattern, when repeated.
        if !s.localClosed { glitch() }
        r.streamReset(stream: h.stream, code: H2ErrorCode(rawValue: Self.u32(p, 0)) ?? .internalError, byPeer: true)
    }

    private mutating func settingsFrame<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        guard h.stream == 0 else { return fail(.protocolError, "SETTINGS on a stream") }
        if h.flags.contains(.ack) {
            guard p.isEmpty else { return fail(.frameSizeError, "a SETTINGS ACK with a payload") }
            return
        }
        guard p.count % 6 == 0 else { return fail(.frameSizeError, "SETTINGS of \(p.count) bytes") }
        var i = 0
        while i < p.count {
            let key = UInt16(p[i]) << 8 | UInt16(p[i + 1])
            let value = Self.u32(p, i + 2)
            i += 6
            switch H2Setting(rawValue: key) {
            case .enablePush:
                guard value <= 1 else { return fail(.protocolError, "SETTINGS_ENABLE_PUSH \(value)") }
            case .initialWindowSize:
                guard value <= UInt32(Self.maxWindow) else { return fail(.flowControlError, "SETTINGS_INITIAL_WINDOW_SIZE \(value)") }
                let delta = Int(value) - peerInitialWindow
                peerInitialWindow = Int(value)
                for k in Array(streams.keys) {
                    streams[k]!.sendWindow += delta
                    guard streams[k]!.sendWindow <= Self.maxWindow else { return fail(.flowControlError, "a stream's window over 2^31-1") }
                }
                if delta > 0 { for k in streams.keys.sorted() { r.windowOpened(stream: k) } }
            case .maxFrameSize:
                guard value >= 16_384, value <= 16_777_215 else { return fail(.protocolError, "SETTINGS_MAX_FRAME_SIZE \(value)") }
                peerMaxFrameSize = Int(value)
            default:
                break  // header table size: this side's encoder uses no dynamic table; others are advisory
            }
        }
        H2Write.settingsAck(to: &output)
        glitch()
    }

    private mutating func windowUpdate<R: H2Receiver>(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer, _ r: inout R) {
        guard p.count == 4 else { return fail(.frameSizeError, "WINDOW_UPDATE of \(p.count) bytes") }
        let increment = Int(Self.u32(p, 0) & 0x7fff_ffff)
        if h.stream == 0 {
            guard increment > 0 else { return fail(.protocolError, "a WINDOW_UPDATE of 0 for the connection") }
            guard connectionSendWindow + increment <= Self.maxWindow else { return fail(.flowControlError, "the connection's window over 2^31-1") }
            connectionSendWindow += increment
            r.windowOpened(stream: 0)
            return
        }
        guard h.stream <= lastStream else { return fail(.protocolError, "WINDOW_UPDATE on an idle stream") }
        guard var s = streams[h.stream] else { return }
        guard increment > 0 else { return streamError(h.stream, .protocolError, &r) }
        guard s.sendWindow + increment <= Self.maxWindow else { return streamError(h.stream, .flowControlError, &r) }
        s.sendWindow += increment
        streams[h.stream] = s
        r.windowOpened(stream: h.stream)
    }

    // MARK: The owner's side

    /// How many bytes of DATA may go out on `stream` now (within both windows and one frame).
    public func sendWindow(_ stream: UInt32) -> Int {
        guard let s = streams[stream], !s.localClosed else { return 0 }
        return max(0, min(connectionSendWindow, s.sendWindow, peerMaxFrameSize))
    }

    /// `n` bytes of DATA went out on `stream` (`end`: with END_STREAM, the response is complete).
    public mutating func sent(_ stream: UInt32, _ n: Int, end: Bool) {
        connectionSendWindow -= n
        guard var s = streams[stream] else { return }
        s.sendWindow -= n
        if end {
            s.localClosed = true
            if glitches > 0 { glitches -= 1 }
            if s.remoteClosed {
                streams[stream] = nil
                return
            }
        }
        streams[stream] = s
    }

    /// The owner used `n` body bytes of `stream` (passed them on): the client may send as much
    /// again, told in a WINDOW_UPDATE once half a window has been used.
    public mutating func consumed(_ stream: UInt32, _ n: Int) {
        if var s = streams[stream] {
            s.unacked += n
            if !s.remoteClosed && s.unacked >= settings.initialWindowSize / 2 {
                H2Write.windowUpdate(stream, UInt32(s.unacked), to: &output)
                s.recvWindow += s.unacked
                s.unacked = 0
            }
            streams[stream] = s
        }
        giveBackConnection(n)
    }

    /// Ends a stream with RST_STREAM (an answer cut short, an upstream failure after the head).
    public mutating func reset(_ stream: UInt32, _ code: H2ErrorCode) {
        guard streams.removeValue(forKey: stream) != nil else { return }
        H2Write.rstStream(stream, code, to: &output)
        remember(stream)
    }

    /// Sends GOAWAY (keepalive_timeout, keepalive_requests, a reload or a drain): the streams
    /// open now finish, no new one is taken.
    public mutating func goAway(_ code: H2ErrorCode = .noError) {
        guard !goingAway else { return }
        goingAway = true
        H2Write.goaway(lastStream: lastStream, code, to: &output)
    }

    // MARK: Helpers

    private mutating func giveBackConnection(_ n: Int) {
        guard n > 0 else { return }
        connectionUnacked += n
        if connectionUnacked >= connectionWindow / 2 {
            H2Write.windowUpdate(0, UInt32(connectionUnacked), to: &output)
            connectionRecvWindow += connectionUnacked
            connectionUnacked = 0
        }
    }

    /// The payload without its padding; nil (the connection failed) when the padding does not fit.
    private mutating func unpadded(_ h: H2FrameHeader, _ p: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
        guard h.flags.contains(.padded) else { return p }
        guard p.count >= 1, Int(p[0]) < p.count else {
            fail(.protocolError, "padding longer than its frame")
            return nil
        }
        return UnsafeRawBufferPointer(rebasing: p[1..<p.count - Int(p[0])])
    }

    private mutating func streamError<R: H2Receiver>(_ id: UInt32, _ code: H2ErrorCode, _ r: inout R) {
        H2Write.rstStream(id, code, to: &output)
        remember(id)
        if streams.removeValue(forKey: id) != nil {
            r.streamReset(stream: id, code: code, byPeer: false)
        }
    }

    private mutating func remember(_ id: UInt32) {
        if resetLately.count == 16 { resetLately.removeFirst() }
        resetLately.append(id)
    }

    private mutating func glitch() {
        glitches += 1
        if glitches > settings.maxGlitches { fail(.enhanceYourCalm, "too many resets, refused streams or control frames (\(glitches))") }
    }

    private mutating func fail(_ code: H2ErrorCode, _ why: String) {
        guard failure == nil else { return }
        failure = .connection(code, why)
        goingAway = true
        H2Write.goaway(lastStream: lastStream, code, to: &output)
    }

    static func u32(_ p: UnsafeRawBufferPointer, _ i: Int) -> UInt32 {
        UInt32(p[i]) << 24 | UInt32(p[i + 1]) << 16 | UInt32(p[i + 2]) << 8 | UInt32(p[i + 3])
    }
}
