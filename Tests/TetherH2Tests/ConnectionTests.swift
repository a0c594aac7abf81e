import NIOCore
import NIOHPACK
import Testing
@testable import TetherH2

/// A client for the tests: frames built by hand, header blocks by NIOHPACK's encoder (with
/// Huffman coding and its dynamic table, as browsers send them).
struct Client {
    var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
    var bytes: [UInt8] = []

    static func frame(_ type: UInt8, _ flags: H2Flags, _ stream: UInt32, _ payload: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        H2FrameHeader(length: payload.count, type: type, flags: flags, stream: stream).write(to: &out)
        return out + payload
    }

    mutating func preface() { bytes += H2Write.preface + Self.frame(4, [], 0, []) }
    mutating func add(_ type: H2FrameType, _ flags: H2Flags = [], _ stream: UInt32, _ payload: [UInt8] = []) {
        bytes += Self.frame(type.rawValue, flags, stream, payload)
    }

    mutating func block(_ fields: [(String, String)]) -> [UInt8] {
        var buffer = ByteBufferAllocator().buffer(capacity: 256)
        try! encoder.encode(headers: HPACKHeaders(fields), to: &buffer)
        return Array(buffer.readableBytesView)
    }

    static func get(_ path: String = "/") -> [(String, String)] {
        [(":method", "GET"), (":scheme", "https"), (":authority", "example.test"), (":path", path), ("user-agent", "test")]
    }

    mutating func request(_ stream: UInt32, _ fields: [(String, String)] = Client.get(), endStream: Bool = true) {
        add(.headers, endStream ? [.endHeaders, .endStream] : [.endHeaders], stream, block(fields))
    }
}

/// What the connection told its owner.
struct Recorder: H2Receiver {
    enum Event: Equatable {
        case headers(UInt32, String, end: Bool, trailers: Bool, tooLarge: Bool)
        case data(UInt32, [UInt8], end: Bool)
        case reset(UInt32, H2ErrorCode, byPeer: Bool)
        case window(UInt32)
        case goaway(UInt32, H2ErrorCode)
    }
    var events: [Event] = []
    mutating func headers(stream: UInt32, fields: [H2Field], endStream: Bool, trailers: Bool, tooLarge: Bool) {
        events.append(.headers(stream, fields.map { "\(H2Request.text($0.name))=\(H2Request.text($0.value))" }.joined(separator: " "), end: endStream, trailers: trailers, tooLarge: tooLarge))
    }
    mutating func data(stream: UInt32, bytes: UnsafeRawBufferPointer, endStream: Bool) { events.append(.data(stream, Array(bytes), end: endStream)) }
    mutating func streamReset(stream: UInt32, code: H2ErrorCode, byPeer: Bool) { events.append(.reset(stream, code, byPeer: byPeer)) }
    mutating func windowOpened(stream: UInt32) { events.append(.window(stream)) }
    mutating func goaway(lastStream: UInt32, code: H2ErrorCode) { events.append(.goaway(lastStream, code)) }
}

/// The frames in bytes the connection wrote.
struct Written: Equatable, CustomStringConvertible {
    var type: UInt8, flags: UInt8, stream: UInt32, payload: [UInt8]
    var description: String { "type \(type) flags \(flags) stream \(stream) \(payload)" }
    static func frames(_ b: [UInt8]) -> [Written] {
        var out: [Written] = []
        var at = 0
        while at + 9 <= b.count {
            let h = b.withUnsafeBytes { H2FrameHeader(UnsafeRawBufferPointer(rebasing: $0[at..<at + 9])) }
            out.append(Written(type: h.type, flags: h.flags.rawValue, stream: h.stream, payload: Array(b[at + 9..<at + 9 + h.length])))
            at += 9 + h.length
        }
        return out
    }
    var code: UInt32? {
        if type == 7 { return UInt32(payload[4]) << 24 | UInt32(payload[5]) << 16 | UInt32(payload[6]) << 8 | UInt32(payload[7]) }
        if type == 3 { return UInt32(payload[0]) << 24 | UInt32(payload[1]) << 16 | UInt32(payload[2]) << 8 | UInt32(payload[3]) }
        return nil
    }
}

extension H2Connection {
    /// Feeds all of `bytes` (in pieces of `split` bytes, the rest kept for the next piece as an
    /// owner would) and returns the frames written since the last call.
    mutating func feed(_ bytes: [UInt8], _ r: inout Recorder, split: Int = .max) -> [Written] {
        var pending: [UInt8] = []
        var at = 0
        while at < bytes.count {
            let n = min(split, bytes.count - at)
            pending += bytes[at..<at + n]
            at += n
            let used = pending.withUnsafeBytes { receive($0, &r) }
            pending.removeFirst(used)
        }
        defer { output.removeAll() }
        return Written.frames(output)
    }

    /// The code of the GOAWAY written, if one was.
    var goawayCode: H2ErrorCode? {
        if case .connection(let c, _) = failure { return c }
        return nil
    }
}

@Suite struct H2ConnectionTests {
    /// A fresh connection past the exchange of prefaces, its own frames taken.
    static func open(_ settings: H2Connection.Settings = .init()) -> (H2Connection, Recorder, Client) {
        var c = H2Connection(settings: settings)
        var r = Recorder()
        var client = Client()
        client.preface()
        let w = c.feed(client.bytes, &r)
        client.bytes = []
        #expect(w.contains { $0.type == 4 && $0.flags == 1 }, "the client's SETTINGS is acknowledged")
        return (c, r, client)
    }

    @Test func thePrefacesAndARequestFromEverySplit() {
        var client = Client()
        client.preface()
        client.request(1)
        client.request(3, Client.get("/b"), endStream: false)
        client.add(.data, [], 3, Array("hel".utf8))
        client.add(.data, .endStream, 3, Array("lo".utf8))
        var first: [Recorder.Event]?
        for split in [1, 2, 7, 9, 10, 24, 25, 100, .max] {
            var c = H2Connection()
            var r = Recorder()
            let w = c.feed(client.bytes, &r, split: split)
            #expect(c.failure == nil)
            if let first { #expect(r.events == first, "split \(split)") } else { first = r.events }
            // The server's SETTINGS, its connection window, and the ACK of the client's.
            #expect(w.map(\.type) == [4, 8, 4], "split \(split)")
        }
        #expect(first == [
            .headers(1, ":method=GET :scheme=https :authority=example.test :path=/ user-agent=test", end: true, trailers: false, tooLarge: false),
            .headers(3, ":method=GET :scheme=https :authority=example.test :path=/b user-agent=test", end: false, trailers: false, tooLarge: false),
            .data(3, Array("hel".utf8), end: false), .data(3, Array("lo".utf8), end: true),
        ])
    }

    @Test func theServersSettings() {
        let c = H2Connection()
        let w = Written.frames(c.output)
        #expect(w[0].type == 4 && w[0].payload.count == 30)
        #expect(w[1].type == 8 && w[1].stream == 0, "the connection's window opened to cover every stream's")
    }

    @Test(arguments: [
        ("a wrong preface", H2Write.preface.dropLast(1) + [0x00] + Client.frame(4, [], 0, []), H2ErrorCode.protocolError),
        ("PING first", H2Write.preface + Client.frame(6, [], 0, [UInt8](repeating: 0, count: 8)), .protocolError),
        ("a frame over the maximum", H2Write.preface + Client.frame(4, [], 0, []) + Client.frame(0, [], 1, [UInt8](repeating: 0, count: 16_385)), .frameSizeError),
    ] as [(String, [UInt8], H2ErrorCode)])
    func aBadStartEndsTheConnection(_ name: String, _ bytes: [UInt8], _ code: H2ErrorCode) {
        var c = H2Connection()
        var r = Recorder()
        c.output = []
        let w = c.feed(bytes, &r)
        #expect(c.goawayCode == code, "\(name)")
        #expect(w.last?.type == 7 && w.last?.code == code.rawValue)
    }

    /// Connection errors RFC 9113 names, each answered with GOAWAY and its code.
    @Test func protocolViolations() {
        func check(_ name: String, _ code: H2ErrorCode, _ build: (inout Client) -> Void) {
            var (c, r, client) = Self.open()
            build(&client)
            let w = c.feed(client.bytes, &r)
            #expect(c.goawayCode == code, "\(name): \(w)")
            #expect(w.last?.type == 7 && w.last?.code == code.rawValue, "\(name)")
        }
        check("HEADERS on stream 0", .protocolError) { $0.request(0) }
        check("HEADERS on an even stream", .protocolError) { $0.request(2) }
        check("a stream below the last", .protocolError) { $0.request(5); $0.request(3) }
        check("HEADERS again on a closed stream", .streamClosed) { $0.request(1); $0.request(1) }
        check("DATA on stream 0", .protocolError) { $0.add(.data, [], 0, [1]) }
        check("DATA on an idle stream", .protocolError) { $0.add(.data, [], 7, [1]) }
        check("padding longer than the frame", .protocolError) { $0.add(.data, .padded, 1, [5, 1, 2]) }
        check("a frame inside a header block", .protocolError) { c in
            let b = c.block(Client.get())
            c.add(.headers, [], 1, Array(b.prefix(3)))
            c.add(.ping, [], 0, [UInt8](repeating: 0, count: 8))
        }
        check("CONTINUATION on another stream", .protocolError) { c in
            let b = c.block(Client.get())
            c.add(.headers, [], 1, Array(b.prefix(3)))
            c.add(.continuation, .endHeaders, 3, Array(b.dropFirst(3)))
        }
        check("CONTINUATION alone", .protocolError) { $0.add(.continuation, .endHeaders, 1, [0x82]) }
        check("PUSH_PROMISE from a client", .protocolError) { $0.add(.pushPromise, .endHeaders, 1, [0, 0, 0, 2]) }
        check("SETTINGS on a stream", .protocolError) { $0.add(.settings, [], 1, []) }
        check("SETTINGS of 5 bytes", .frameSizeError) { $0.add(.settings, [], 0, [0, 2, 0, 0, 0]) }
        check("a SETTINGS ACK with a payload", .frameSizeError) { $0.add(.settings, .ack, 0, [0, 2, 0, 0, 0, 0]) }
        check("SETTINGS_ENABLE_PUSH 2", .protocolError) { $0.add(.settings, [], 0, [0, 2, 0, 0, 0, 2]) }
        check("SETTINGS_INITIAL_WINDOW_SIZE 2^31", .flowControlError) { $0.add(.settings, [], 0, [0, 4, 0x80, 0, 0, 0]) }
        check("SETTINGS_MAX_FRAME_SIZE below 16384", .protocolError) { $0.add(.settings, [], 0, [0, 5, 0, 0, 0x3f, 0xff]) }
        check("PING of 7 bytes", .frameSizeError) { $0.add(.ping, [], 0, [0, 0, 0, 0, 0, 0, 0]) }
        check("PING on a stream", .protocolError) { $0.add(.ping, [], 1, [UInt8](repeating: 0, count: 8)) }
        check("RST_STREAM on an idle stream", .protocolError) { $0.add(.rstStream, [], 9, [0, 0, 0, 8]) }
        check("RST_STREAM of 3 bytes", .frameSizeError) { $0.request(1, endStream: false); $0.add(.rstStream, [], 1, [0, 0, 8]) }
        check("WINDOW_UPDATE of 0 on the connection", .protocolError) { $0.add(.windowUpdate, [], 0, [0, 0, 0, 0]) }
        check("the connection's window over 2^31-1", .flowControlError) { $0.add(.windowUpdate, [], 0, [0x7f, 0xff, 0xff, 0xff]) }
        check("a header block HPACK cannot decode", .compressionError) { $0.add(.headers, [.endHeaders, .endStream], 1, [0xff, 0xff, 0xff, 0xff, 0xff]) }
        check("trailers without END_STREAM", .protocolError) { c in
            c.request(1, endStream: false)
            c.add(.headers, .endHeaders, 1, c.block([("x-trailer", "1")]))
        }
    }

    /// Stream errors: the stream is reset, the connection goes on.
    @Test func streamErrors() {
        func check(_ name: String, _ stream: UInt32, _ code: H2ErrorCode, _ build: (inout Client) -> Void) {
            var (c, r, client) = Self.open()
            build(&client)
            let w = c.feed(client.bytes, &r)
            #expect(c.failure == nil, "\(name)")
            #expect(w.contains { $0.type == 3 && $0.stream == stream && $0.code == code.rawValue }, "\(name): \(w)")
        }
        check("DATA after END_STREAM", 1, .streamClosed) { $0.request(1); $0.add(.data, [], 1, [1]) }
        check("a body longer than content-length", 1, .protocolError) { c in
            c.request(1, Client.get() + [("content-length", "2")], endStream: false)
            c.add(.data, .endStream, 1, [1, 2, 3])
        }
        check("a body shorter than content-length", 1, .protocolError) { c in
            c.request(1, Client.get() + [("content-length", "4")], endStream: false)
            c.add(.data, .endStream, 1, [1, 2, 3])
        }
        check("content-length with no body", 1, .protocolError) { $0.request(1, Client.get() + [("content-length", "4")]) }
        check("a stream depending on itself", 1, .protocolError) { $0.add(.priority, [], 1, [0, 0, 0, 1, 16]) }
        check("PRIORITY of 4 bytes", 1, .frameSizeError) { $0.add(.priority, [], 1, [0, 0, 0, 3]) }
        check("WINDOW_UPDATE of 0 on a stream", 1, .protocolError) { $0.request(1, endStream: false); $0.add(.windowUpdate, [], 1, [0, 0, 0, 0]) }
        check("DATA beyond the stream's window", 1, .flowControlError) { c in
            c.request(1, endStream: false)
            for _ in 0..<4 { c.add(.data, [], 1, [UInt8](repeating: 7, count: 16_384)) }
            c.add(.data, [], 1, [1, 2, 3, 4])
        }
    }

    @Test func trailersEndTheRequest() {
        var (c, r, client) = Self.open()
        client.request(1, endStream: false)
        client.add(.data, [], 1, [1])
        client.add(.headers, [.endHeaders, .endStream], 1, client.block([("x-checksum", "1")]))
        _ = c.feed(client.bytes, &r)
        #expect(r.events.last == .headers(1, "x-checksum=1", end: true, trailers: true, tooLarge: false))
        #expect(c.failure == nil)
    }

    @Test func headersAcrossContinuationFrames() {
        var (c, r, client) = Self.open()
        let b = client.block(Client.get() + [("x-long", String(repeating: "v", count: 100))])
        client.add(.headers, .endStream, 1, Array(b.prefix(10)))
        client.add(.continuation, [], 1, Array(b[10..<50]))
        client.add(.continuation, .endHeaders, 1, Array(b[50...]))
        _ = c.feed(client.bytes, &r)
        #expect(r.events.count == 1 && c.failure == nil)
        if case .headers(1, let text, end: true, trailers: false, tooLarge: false) = r.events.first {
            #expect(text.hasSuffix("x-long=" + String(repeating: "v", count: 100)))
        } else {
            Issue.record("\(r.events)")
        }
    }

    /// CONTINUATION flood (2024): a header block that never ends costs at most the limit in
    /// bytes, and empty CONTINUATION frames count as glitches.
    @Test func continuationFloodsAreBounded() {
        var (c, r, client) = Self.open()
        client.add(.headers, [], 1, client.block(Client.get()))
        for _ in 0..<100 { client.add(.continuation, [], 1, [UInt8](repeating: 0x40, count: 1_000)) }
        let w = c.feed(client.bytes, &r)
        #expect(c.goawayCode == .enhanceYourCalm && r.events.isEmpty)
        #expect(w.last?.type == 7)

        var (d, r2, empty) = Self.open()
        empty.add(.headers, [], 1, empty.block(Client.get()))
        for _ in 0..<1_000 { empty.add(.continuation, [], 1, []) }
        _ = d.feed(empty.bytes, &r2)
        #expect(d.goawayCode == .enhanceYourCalm && r2.events.isEmpty)
    }

    /// An HPACK bomb: one large value put in the dynamic table, then referenced again and again
    /// in a small block. Over the limit the stream is answered 431 (`tooLarge`); far over it, the
    /// decoding stops and the connection ends.
    @Test func decodedHeaderListsAreBounded() {
        var settings = H2Connection.Settings()
        settings.maxHeaderListSize = 8_192
        var (c, r, client) = Self.open(settings)
        let big = String(repeating: "x", count: 3_000)
        // GET https / with :authority "a", from the static table only (no dynamic entries).
        let head: [UInt8] = [0x82, 0x87, 0x84, 0x01, 0x01, UInt8(ascii: "a")]
        // 0x40: a literal with incremental indexing and a new name (b: 3,000 x's, its length
        // 127 + 2873 on a 7-bit prefix), then 0xbe (index 62, that entry) twice: 3 x 3,033 bytes.
        let b = head + [0x40, 0x01, UInt8(ascii: "b"), 0x7f, 0xb9, 0x16] + Array(big.utf8) + [0xbe, 0xbe]
        client.add(.headers, [.endHeaders, .endStream], 1, b)
        _ = c.feed(client.bytes, &r)
        #expect(c.failure == nil)
        if case .headers(1, _, end: true, trailers: false, tooLarge: true) = r.events.last {} else { Issue.record("\(r.events)") }

        // 20 references in 26 bytes: 60,660 bytes decoded, over four times the limit.
        client.bytes = []
        client.add(.headers, [.endHeaders, .endStream], 3, head + [UInt8](repeating: 0xbe, count: 20))
        _ = c.feed(client.bytes, &r)
        #expect(c.goawayCode == .enhanceYourCalm)
    }

    @Test func streamsOverTheLimitAreRefused() {
        var settings = H2Connection.Settings()
        settings.maxConcurrentStreams = 4
        var (c, r, client) = Self.open(settings)
        for i in 0..<5 { client.request(UInt32(1 + 2 * i), endStream: false) }
        let w = c.feed(client.bytes, &r)
        #expect(r.events.count == 4 && c.openStreams == 4)
        #expect(w.contains { $0.type == 3 && $0.stream == 9 && $0.code == H2ErrorCode.refusedStream.rawValue })
        #expect(c.refusedStreams == 1 && c.failure == nil)
        // One ends (answered and its request complete): a new one is taken.
        c.sent(1, 0, end: true)
        client.bytes = []
        client.add(.data, .endStream, 1, [])
        client.request(11, endStream: false)
        _ = c.feed(client.bytes, &r)
        #expect(c.openStreams == 4 && r.events.last == .headers(11, ":method=GET :scheme=https :authority=example.test :path=/ user-agent=test", end: false, trailers: false, tooLarge: false))
    }

    /// Rapid reset (CVE-2023-44487): streams opened and reset before their answer end the
    /// connection once they pass the glitch limit; streams answered in between earn it back.
    @Test func rapidResetEndsTheConnection() {
        var (c, r, client) = Self.open()
        var id: UInt32 = 1
        for _ in 0..<300 {
            client.request(id, endStream: true)
            client.add(.rstStream, [], id, [0, 0, 0, 8])
            id += 2
        }
        let w = c.feed(client.bytes, &r)
        #expect(c.goawayCode == .enhanceYourCalm, "\(c.glitches)")
        #expect(w.last?.type == 7)
        let opened = r.events.filter { if case .headers = $0 { return true } else { return false } }.count
        #expect(opened <= 260, "the owner saw \(opened) streams before the connection ended")

        // A client that cancels now and then, among answered requests, is fine.
        var (d, r2, polite) = Self.open()
        id = 1
        for i in 0..<1_000 {
            polite.bytes = []
            polite.request(id)
            if i % 4 == 0 { polite.add(.rstStream, [], id, [0, 0, 0, 8]) }
            _ = d.feed(polite.bytes, &r2)
            d.sent(id, 0, end: true)
            id += 2
        }
        #expect(d.failure == nil && d.openStreams == 0)
    }

    @Test func pingsAreAnsweredAndFloodsBounded() {
        var (c, r, client) = Self.open()
        client.add(.ping, [], 0, [1, 2, 3, 4, 5, 6, 7, 8])
        let w = c.feed(client.bytes, &r)
        #expect(w == [Written(type: 6, flags: 1, stream: 0, payload: [1, 2, 3, 4, 5, 6, 7, 8])])
        client.bytes = []
        for _ in 0..<300 { client.add(.ping, [], 0, [UInt8](repeating: 0, count: 8)) }
        _ = c.feed(client.bytes, &r)
        #expect(c.goawayCode == .enhanceYourCalm)

        var (d, r2, settings) = Self.open()
        for _ in 0..<300 { settings.add(.settings, [], 0, []) }
        _ = d.feed(settings.bytes, &r2)
        #expect(d.goawayCode == .enhanceYourCalm)

        var (e, r3, data) = Self.open()
        data.request(1, endStream: false)
        for _ in 0..<300 { data.add(.data, [], 1, []) }
        _ = e.feed(data.bytes, &r3)
        #expect(e.goawayCode == .enhanceYourCalm, "empty DATA frames")
    }

    /// The client's window bounds what is sent; WINDOW_UPDATE and SETTINGS open it; what the owner
    /// consumed is given back to the client once half a window is used.
    @Test func flowControl() {
        var (c, r, client) = Self.open()
        client.request(1, endStream: false)
        _ = c.feed(client.bytes, &r)
        #expect(c.sendWindow(1) == 16_384, "one frame at most")
        c.sent(1, 16_384, end: false)
        c.sent(1, 16_384, end: false)
        c.sent(1, 16_384, end: false)
        #expect(c.sendWindow(1) == 16_383)
        c.sent(1, 16_383, end: false)
        #expect(c.sendWindow(1) == 0, "the stream's 65,535 bytes are used")
        client.bytes = []
        client.add(.windowUpdate, [], 1, [0, 0, 0, 100])
        var w = c.feed(client.bytes, &r)
        #expect(r.events.last == .window(1) && c.sendWindow(1) == 0, "the connection's window is used up too")
        client.bytes = []
        client.add(.windowUpdate, [], 0, [0, 1, 0, 0])
        w = c.feed(client.bytes, &r)
        #expect(r.events.last == .window(0) && c.sendWindow(1) == 100)
        // SETTINGS_INITIAL_WINDOW_SIZE applies to the streams open, by its difference.
        client.bytes = []
        client.add(.settings, [], 0, [0, 4, 0, 1, 0, 0])
        w = c.feed(client.bytes, &r)
        #expect(c.sendWindow(1) == 100 + 65_536 - 65_535)
        #expect(w.contains { $0.type == 4 && $0.flags == 1 })
        // Receiving: the owner consumes, a WINDOW_UPDATE follows once half the window is used.
        client.bytes = []
        client.add(.data, [], 1, [UInt8](repeating: 1, count: 16_384))
        client.add(.data, [], 1, [UInt8](repeating: 1, count: 16_384))
        _ = c.feed(client.bytes, &r)
        c.consumed(1, 16_384)
        #expect(c.output.isEmpty)
        c.consumed(1, 16_384)
        w = Written.frames(c.output)
        #expect(w == [Written(type: 8, flags: 0, stream: 1, payload: [0, 0, 0x80, 0])])
        // A stream's window over 2^31-1 resets the stream.
        c.output = []
        client.bytes = []
        client.add(.windowUpdate, [], 1, [0x7f, 0xff, 0xff, 0xff])
        w = c.feed(client.bytes, &r)
        #expect(w.contains { $0.type == 3 && $0.code == H2ErrorCode.flowControlError.rawValue } && c.failure == nil)
    }

    /// What a stream consumed is given back to the connection's window once, whether the stream
    /// then ends, is reset, or its answer completes first.
    @Test func theConnectionWindowIsGivenBackOnce() {
        var settings = H2Connection.Settings()
        settings.maxConcurrentStreams = 1
        var (c, r, client) = Self.open(settings)
        c.output = []
        func stream(_ id: UInt32, end: (inout H2Connection, inout Client) -> Void) -> [Written] {
            client.bytes = []
            client.request(id, endStream: false)
            client.add(.data, [], id, [UInt8](repeating: 1, count: 10_000))
            _ = c.feed(client.bytes, &r)
            c.consumed(id, 10_000)
            client.bytes = []
            end(&c, &client)
            // (feed returns what was written since the last call, the consumed's too)
            return c.feed(client.bytes, &r).filter { $0.type == 8 && $0.stream == 0 }
        }
        // Half the connection's window (65,535 with one stream) is 32,767: three streams of
        // 10,000 bytes give back nothing yet, however they end; the fourth gives back 40,000.
        #expect(stream(1) { c, client in c.sent(1, 0, end: true); client.add(.data, .endStream, 1, []) }.isEmpty)
        #expect(stream(3) { _, client in client.add(.rstStream, [], 3, [0, 0, 0, 8]) }.isEmpty)
        #expect(stream(5) { c, _ in c.reset(5, .cancel) }.isEmpty)
        let updates = stream(7) { _, client in client.add(.data, .endStream, 7, []) }
        #expect(updates == [Written(type: 8, flags: 0, stream: 0, payload: [0, 0, 0x9c, 0x40])], "40,000 once")
    }

    @Test func goAwayTakesNoNewStream() {
        var (c, r, client) = Self.open()
        client.request(1, endStream: false)
        _ = c.feed(client.bytes, &r)
        c.goAway()
        #expect(Written.frames(c.output).last == Written(type: 7, flags: 0, stream: 0, payload: [0, 0, 0, 1, 0, 0, 0, 0]))
        c.output = []
        client.bytes = []
        client.request(3)
        client.add(.data, .endStream, 1, [1])
        _ = c.feed(client.bytes, &r)
        #expect(r.events.last == .data(1, [1], end: true), "stream 1 finishes; stream 3 is not taken")
        #expect(!r.events.contains { if case .headers(3, _, _, _, _) = $0 { return true } else { return false } })
    }

    @Test func resetsBothWays() {
        var (c, r, client) = Self.open()
        client.request(1, endStream: false)
        client.request(3, endStream: false)
        client.add(.rstStream, [], 1, [0, 0, 0, 8])
        _ = c.feed(client.bytes, &r)
        #expect(r.events.last == .reset(1, .cancel, byPeer: true))
        c.reset(3, .internalError)
        #expect(Written.frames(c.output) == [Written(type: 3, flags: 0, stream: 3, payload: [0, 0, 0, 2])])
        c.output = []
        client.bytes = []
        client.add(.data, [], 3, [1, 2])
        let w = c.feed(client.bytes, &r)
        #expect(w.isEmpty && c.failure == nil, "frames in flight on a stream this side reset are dropped")
    }
}
