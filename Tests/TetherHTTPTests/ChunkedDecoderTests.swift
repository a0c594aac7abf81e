import Testing
@testable import TetherHTTP

@Suite struct ChunkedDecoderTests {
    func run(_ text: String, pieces: Int = 1) throws -> (data: String, consumed: Int, done: Bool) {
        let bytes = Array(text.utf8)
        var d = ChunkedDecoder()
        var data: [UInt8] = []
        var consumed = 0
        let step = max(1, bytes.count / pieces)
        var off = 0
        while off < bytes.count && !d.isDone {
            let piece = Array(bytes[off..<min(bytes.count, off + step)])
            let n = try piece.withUnsafeBytes { p in
                try d.consume(p) { a, b in data.append(contentsOf: p[a..<b]) }
            }
            consumed += n
            off += piece.count
        }
        return (String(decoding: data, as: UTF8.self), consumed, d.isDone)
    }

    @Test func decodesAcrossAnySplit() throws {
        let body = "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"
        for pieces in [1, 2, 3, 7, body.utf8.count] {
            let r = try run(body, pieces: pieces)
            #expect(r.data == "hello world" && r.done)
            #expect(r.consumed == body.utf8.count - 4, "stops before the next message (\(pieces) pieces)")
        }
    }

    @Test(arguments: [
        "x\r\n", "5\r\nhelloXY", "5\rnhello", "-1\r\n", "1234567890123456\r\n", "0\r\nbad\nline\r\n\r\n", "\r\n",
        "5 \r\nhello\r\n0\r\n\r\n", "5\t\r\nhello\r\n0\r\n\r\n", "5 x\r\n", "0\r\nNoColon\r\n\r\n", "0\r\nX: a\r\n b\r\n\r\n",
        "0\r\n: v\r\n\r\n", "0\r\nX y: v\r\n\r\n", "5;a\u{1}\r\n", "5;a=\"x\u{1}\"\r\n", "5;a@b\r\n", "5\r\nhello\n0\r\n\r\n",
        "0\r\nX: a\u{0}\r\n\r\n", " 5\r\n",
    ])
    func refusesMalformed(text: String) {
        #expect(throws: ChunkedDecoder.Failure.self) { try run(text) }
    }

    /// The limit is on the size's value, not its digits (RFC 9112 puts none on digits).
    @Test func leadingZerosAreFine() throws {
        let r = try run(String(repeating: "0", count: 33) + "e3\r\n" + String(repeating: "z", count: 227) + "\r\n0\r\n\r\n")
        #expect(r.done && r.data.utf8.count == 227)
    }

    @Test(arguments: ["5 ;x\r\nhello\r\n0\r\n\r\n", "5\t; a = b ; c=\"q\\\"d\"\r\nhello\r\n0\r\n\r\n", "5;x;y=z\r\nhello\r\n0\r\n\r\n"])
    func extensionsAfterWhiteSpaceAreAccepted(text: String) throws {
        #expect(try run(text).data == "hello")
    }

    /// Kept trailers are field lines; framing and routing fields are dropped from them.
    @Test func trailersAreKeptOrDropped() throws {
        var d = ChunkedDecoder()
        let bytes = Array("0\r\nX-Sum: 1\r\nContent-Length: 5\r\nhost: h\r\nX-B:\r\n\r\n".utf8)
        _ = try bytes.withUnsafeBytes { try d.consume($0, data: { _, _ in }) }
        #expect(d.isDone)
        #expect(String(decoding: d.trailers, as: UTF8.self) == "X-Sum: 1\r\nX-B:\r\n")
    }

    @Test func boundedLines() {
        #expect(throws: ChunkedDecoder.Failure.self) { try run("5;" + String(repeating: "a", count: 5000) + "\r\n") }
        #expect(throws: ChunkedDecoder.Failure.self) { try run("0\r\n" + (0..<2000).map { "X-\($0): vvvvvvvv\r\n" }.joined() + "\r\n") }
    }
}
