import NIOCore
import Testing
@testable import TetherCore

@Suite struct NormalizedPathTests {
    func normalize(_ raw: String, mergeSlashes: Bool = true) -> Result<(uri: String, match: String), NormalizedPath.Invalid> {
        let bytes = Array(raw.utf8)
        return bytes.withUnsafeBytes { p in
            NormalizedPath.make(p, 0, p.count, mergeSlashes: mergeSlashes).map { n in
                let uri = n.uri.map { String(decoding: $0, as: UTF8.self) } ?? raw
                return (uri, n.match.map { String(decoding: $0, as: UTF8.self) } ?? uri)
            }
        }
    }

    /// Every spelling of `/admin/` a client can send normalises to it, for matching.
    @Test(arguments: [
        "/admin/", "/x/../admin/", "/x/./../admin/", "/./admin/", "//admin/", "/%61dmin/", "/admin%2F", "/admin%2f",
        "/x/%2e%2e/admin/", "/x/..%2fadmin/", "/x/%2E%2E/admin/", "/x/%2e./admin/", "/x/.%2e/admin/", "/x/y/../../admin/",
        "/admin/.", "/admin/x/..", "///admin//", "/%2e/admin/", "/x/..;/admin/", "/admin;jsessionid=1/", "/x;p/..;q/admin/",
        "/%2fadmin/", "/x/%2e%2e%2fadmin/", "/ADMIN/../admin/",
    ])
    func spellingsOfAdmin(_ raw: String) throws {
        let n = try normalize(raw).get()
        #expect(n.match == "/admin/", "\(raw) matched as \(n.match)")
    }

    @Test(arguments: [
        ("/a/b/c", "/a/b/c"), ("/", "/"), ("", "/"), ("/a/./b", "/a/b"), ("/a/b/..", "/a/"), ("/a/.", "/a/"),
        ("/a//b", "/a/b"), ("/a/b/", "/a/b/"), ("/a%20b", "/a b"), ("/%C3%A9", "/é"), ("/a/.hidden", "/a/.hidden"),
        ("/a/...", "/a/..."), ("/a/..b", "/a/..b"), ("/a%3Fb", "/a?b"), ("/a;p=1/b", "/a;p=1/b"), ("/..a/b", "/..a/b"),
    ])
    func uris(_ c: (String, String)) throws {
        #expect(try normalize(c.0).get().uri == c.1)
    }

    @Test(arguments: ["/..", "/../admin/", "/x/../../admin", "/%2e%2e/admin", "/..%2f", "/a/..;/..;/b", "/%00", "/a%00b", "/%0", "/%zz", "/a%", "/a%g1"])
    func refused(_ raw: String) {
        #expect(throws: NormalizedPath.Invalid.self, "\(raw)") { try normalize(raw).get() }
    }

    @Test func mergeSlashesOffKeepsRunsOfSlashes() throws {
        #expect(try normalize("//admin/", mergeSlashes: false).get().uri == "//admin/")
        #expect(try normalize("/a//../b", mergeSlashes: false).get().uri == "/a/b")
    }

    /// The usual path costs nothing: no array is made for it.
    @Test func normalPathsAllocateNothing() {
        for raw in ["/", "/index.html", "/api/v1/users/42", "/a/.well-known/x", "/a-b_c~d/e.f"] {
            let bytes = Array(raw.utf8)
            let n = bytes.withUnsafeBytes { NormalizedPath.make($0, 0, $0.count, mergeSlashes: true) }
            #expect(n == .success(NormalizedPath()), "\(raw)")
        }
    }

    @Test func escapingForTheUpstreamKeepsWhatDecodingMeant() {
        var out: [UInt8] = []
        Array("/a b/%/?#/é\r\n".utf8).withUnsafeBytes { NormalizedPath.escape($0, into: &out) }
        #expect(String(decoding: out, as: UTF8.self) == "/a%20b/%25/%3F%23/%C3%A9%0D%0A")
    }
}

@Suite struct RequestTargetTests {
    func parse(_ text: String) -> HeadParser.Outcome {
        var storage: [HeaderField] = []
        return HeadParser.parse(ByteBuffer(string: text), kind: .request, limits: .init(lineLimit: 8192, headLimit: 32768), headers: &storage)
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
}
