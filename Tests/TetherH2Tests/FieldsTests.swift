import NIOCore
import NIOHPACK
import Testing
@testable import TetherH2

/// A stream's fields as a request (RFC 9113 §8.2-8.3) and the HTTP/1.1 head made of it; a
/// response's head as a header block.
@Suite struct H2FieldsTests {
    static func parse(_ fields: [(String, String)]) -> Result<H2Request, H2Malformed> { H2Request.parse(fields.map { H2Field($0.0, $0.1) }) }
    static let get = [(":method", "GET"), (":scheme", "https"), (":authority", "example.test"), (":path", "/a?b=1")]

    @Test func aRequestBecomesAnHTTP11Head() throws {
        let r = try Self.parse(Self.get + [("accept", "*/*"), ("cookie", "a=1"), ("user-agent", "t"), ("cookie", "b=2")]).get()
        var out: [UInt8] = []
        r.http1Head(bodyFollows: false, into: &out)
        #expect(String(decoding: out, as: UTF8.self) == "GET /a?b=1 HTTP/1.1\r\nhost: example.test\r\naccept: */*\r\nuser-agent: t\r\ncookie: a=1; b=2\r\nconnection: close\r\n\r\n")
        // A body of unknown length is framed as chunked; one with content-length keeps it.
        let post = try Self.parse([(":method", "POST"), (":scheme", "https"), (":path", "/u"), ("host", "h.test")]).get()
        out = []
        post.http1Head(bodyFollows: true, into: &out)
        #expect(String(decoding: out, as: UTF8.self) == "POST /u HTTP/1.1\r\nhost: h.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        let sized = try Self.parse([(":method", "POST"), (":scheme", "https"), (":authority", "h.test"), (":path", "/u"), ("content-length", "5")]).get()
        out = []
        sized.http1Head(bodyFollows: true, into: &out)
        #expect(String(decoding: out, as: UTF8.self) == "POST /u HTTP/1.1\r\nhost: h.test\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
    }

    @Test(arguments: [
        ("no :method", [(":scheme", "https"), (":path", "/")], "no :method"),
        ("no :scheme", [(":method", "GET"), (":path", "/")], "no :scheme"),
        ("no :path", [(":method", "GET"), (":scheme", "https")], "no :path"),
        ("an empty :path", [(":method", "GET"), (":scheme", "https"), (":path", "")], "no :path"),
        ("an absolute :path", [(":method", "GET"), (":scheme", "https"), (":path", "http://x/")], ":path \"http://x/\" is not origin-form"),
        ("* for GET", [(":method", "GET"), (":scheme", "https"), (":path", "*")], ":path \"*\" is not origin-form"),
        ("a pseudo-header twice", get + [(":path", "/b")], "pseudo-header :path twice"),
        ("a pseudo-header after a field", [(":method", "GET"), ("accept", "*/*"), (":scheme", "https"), (":path", "/")], "pseudo-header :scheme after a regular field"),
        ("an unknown pseudo-header", get + [(":protocol", "websocket")], "pseudo-header :protocol in a request"),
        (":status in a request", [(":status", "200")] + get, "pseudo-header :status in a request"),
        ("an uppercase name", get + [("Accept", "*/*")], "field name \"Accept\" is not a lowercase token"),
        ("a name with a space", get + [("x y", "1")], "field name \"x y\" is not a lowercase token"),
        ("connection", get + [("connection", "close")], "connection-specific field \"connection\""),
        ("transfer-encoding", get + [("transfer-encoding", "chunked")], "connection-specific field \"transfer-encoding\""),
        ("upgrade", get + [("upgrade", "h2c")], "connection-specific field \"upgrade\""),
        ("keep-alive", get + [("keep-alive", "timeout=5")], "connection-specific field \"keep-alive\""),
        ("te other than trailers", get + [("te", "gzip")], "\"te: gzip\" (only \"trailers\" is allowed)"),
        ("a value with CR LF", get + [("x", "a\r\nInjected: 1")], "field \"x\" has a value with NUL, CR, LF or surrounding whitespace"),
        ("a value with NUL", get + [("x", "a\u{0}b")], "field \"x\" has a value with NUL, CR, LF or surrounding whitespace"),
        ("a value with a leading space", get + [("x", " a")], "field \"x\" has a value with NUL, CR, LF or surrounding whitespace"),
        ("host unlike :authority", get + [("host", "evil.test")], "host \"evil.test\" differs from :authority \"example.test\""),
        ("two hosts", [(":method", "GET"), (":scheme", "https"), (":path", "/"), ("host", "a"), ("host", "b")], "two host fields"),
        ("CONNECT with a path", [(":method", "CONNECT"), (":authority", "a:443"), (":path", "/")], "CONNECT needs :authority and no :scheme or :path"),
    ] as [(String, [(String, String)], String)])
    func malformedRequests(_ name: String, _ fields: [(String, String)], _ why: String) {
        #expect(Self.parse(fields) == .failure(H2Malformed(why)), "\(name)")
    }

    @Test func sameHostAndAuthorityIsFine() throws {
        let r = try Self.parse(Self.get + [("host", "EXAMPLE.test"), ("te", "trailers")]).get()
        var out: [UInt8] = []
        r.http1Head(bodyFollows: false, into: &out)
        #expect(String(decoding: out, as: UTF8.self) == "GET /a?b=1 HTTP/1.1\r\nhost: example.test\r\nte: trailers\r\nconnection: close\r\n\r\n", "host from :authority, once")
    }

    /// The response block decodes (NIOHPACK's decoder as the client's) to the status and the
    /// fields, names lowercased, without the connection's own fields.
    @Test(arguments: [200, 204, 206, 304, 400, 404, 500, 201, 302, 418, 502, 999])
    func responseBlocks(_ status: Int) throws {
        var block: [UInt8] = []
        let long = String(repeating: "v", count: 300)
        H2ResponseBlock.encode(status: status, fields: [("Content-Type", "text/plain"), ("Connection", "close, X-Hop"), ("Keep-Alive", "timeout=5"),
                                                        ("Transfer-Encoding", "chunked"), ("X-Hop", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                                                        ("X-Long", long), ("Upgrade", "h2c")], into: &block)
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        var buffer = ByteBufferAllocator().buffer(bytes: block)
        let fields = try decoder.decodeHeaders(from: &buffer)
        #expect(fields.map { "\($0.name): \($0.value)" } == [":status: \(status)", "content-type: text/plain", "set-cookie: a=1", "set-cookie: b=2", "x-long: \(long)"])
    }

    /// The bytes path the streams use: `:status` and fields copied from a head, names lowercased.
    @Test(arguments: [200, 204, 206, 304, 400, 404, 500, 100, 302, 599])
    func blocksFromBytes(_ status: Int) throws {
        var block: [UInt8] = []
        H2ResponseBlock.status(status, into: &block)
        let long = Array(String(repeating: "w", count: 200).utf8)
        Array("Content-Type".utf8).withUnsafeBytes { n in Array("text/plain".utf8).withUnsafeBytes { v in H2ResponseBlock.field(name: n, value: v, into: &block) } }
        Array("X-Long".utf8).withUnsafeBytes { n in long.withUnsafeBytes { v in H2ResponseBlock.field(name: n, value: v, into: &block) } }
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        var buffer = ByteBufferAllocator().buffer(bytes: block)
        let fields = try decoder.decodeHeaders(from: &buffer)
        #expect(fields.map { "\($0.name): \($0.value)" } == [":status: \(status)", "content-type: text/plain", "x-long: " + String(repeating: "w", count: 200)])
    }

    @Test func integersPastTheirPrefix() {
        var out: [UInt8] = []
        H2ResponseBlock.integer(1337, prefixBits: 5, into: &out)
        #expect(out == [31, 154, 10], "RFC 7541 C.1.2")
        out = []
        H2ResponseBlock.integer(10, prefixBits: 5, into: &out)
        #expect(out == [10], "RFC 7541 C.1.1")
    }
}
