import Testing
@testable import TetherCore
import TetherHTTP

@Suite struct RequestTargetTests {
    func parse(_ text: String) -> ParsedHeadOutcome {
        var storage: [HeaderField] = []
        return HeadParser.parse(Array(text.utf8), kind: .request, limits: .init(lineLimit: 8192, headLimit: 32768), headers: &storage)
    }

    func status(_ text: String) -> Int {
        switch parse(text) {
        case .complete: return 200
        case .error(let e): return e.status
        case .incomplete: return 0
        }
    }

    @Test(arguments: [
        "", " ", "\t", "local host", "localhost/x", "user@localhost", "localhost:abc", "localhost:65536", "localhost:123456",
        "[::1", "[]", "a b:80", "localhost:8080:80", "exa%zzmple", "a\"b", "a<b",
    ])
    func invalidHostIs400(_ host: String) {
        #expect(status("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n") == 400, "Host: \(host.debugDescription)")
    }

    @Test(arguments: ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:443", "[::1]", "Example.COM", "a-b.c_d~e", "localhost:", "xn--bcher-kva.example:65535"])
    func validHost(_ host: String) {
        #expect(status("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n") == 200, "Host: \(host)")
    }

    @Test func hostIsTheAbsoluteFormsAuthority() throws {
        guard case .complete(let h, _) = parse("GET http://Other.Example:81/abs?q HTTP/1.1\r\nHost: localhost\r\n\r\n") else { Issue.record("refused"); return }
        #expect(h.targetForm == .absolute)
        #expect(h.string(h.hostStart, h.hostEnd) == "Other.Example")
        #expect(h.string(h.pathStart, h.pathEnd) == "/abs")
        guard case .complete(let o, _) = parse("GET /x?y HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n") else { Issue.record("refused"); return }
        #expect(o.string(o.hostStart, o.hostEnd) == "[::1]")
        #expect(o.string(o.pathStart, o.pathEnd) == "/x")
        guard case .complete(let e, _) = parse("GET http://h?q HTTP/1.1\r\nHost: h\r\n\r\n") else { Issue.record("refused"); return }
        #expect(e.pathStart == e.pathEnd, "no path: it means /")
    }

    @Test(arguments: [
        "GET http://other.example/abs HTTP/1.1\r\nHost:  \r\n\r\n",
        "GET http://other.example/abs HTTP/1.1\r\nHost: \t\r\n\r\n",
        "GET ftp://other.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http://user@other.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http:/x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        "OPTIONS *x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /../x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /%00 HTTP/1.1\r\nHost: a\r\n\r\n",
    ])
    func refusedTargets(_ text: String) {
        #expect(status(text) == 400, "\(text.debugDescription)")
    }

    @Test func optionsAsteriskAndHTTP10WithoutHost() {
        #expect(status("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n") == 200)
        #expect(status("GET / HTTP/1.0\r\n\r\n") == 200)
        #expect(status("GET HTTPS://a.example HTTP/1.1\r\nHost: a\r\n\r\n") == 200)
    }

    /// The Host check reads a reg-name's bytes through two masks: they are RFC 3986's unreserved
    /// and sub-delims, byte for byte.
    @Test func regNameBytesAreUnreservedAndSubDelims() {
        let unreserved = Set(Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~".utf8))
        let subDelims = Set(Array("!$&'()*+,;=".utf8))
        for c in 0...255 {
            let b = UInt8(c)
            #expect(RequestTarget.isRegNameByte(b) == (unreserved.contains(b) || subDelims.contains(b)), "byte \(c)")
            #expect(RequestTarget.isRegNameByte(b) == (RequestTarget.isUnreserved(b) || RequestTarget.isSubDelim(b)), "byte \(c)")
        }
    }
}
