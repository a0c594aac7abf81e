import Testing
@testable import TetherHTTP

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
