#if canImport(Glibc)
import Glibc
#endif
import Testing
import TetherConfig
@testable import TetherCore

/// `location ~`, `~*` and `^~`, in nginx's matching order, with captures.
@Suite struct RegexLocationTests {
    /// The example of nginx's documentation for `location`, each location answering its letter.
    static let nginxExample = """
        server {
            listen 127.0.0.1:8080;
            location = / { return 200 "A"; }
            location / { return 200 "B"; }
            location /documents/ { return 200 "C"; }
            location ^~ /images/ { return 200 "D"; }
            location ~* \\.(gif|jpg|jpeg)$ { return 200 "E"; }
        }
        """

    static func body(_ r: CoreRig, _ path: String) throws -> String {
        responses(try r.ask("GET \(path) HTTP/1.1\r\nHost: t\r\n\r\n")).first?.body ?? "(none)"
    }

    @Test(arguments: [
        ("/", "A"), ("/index.html", "B"), ("/documents/document.html", "C"), ("/images/1.gif", "D"), ("/documents/1.jpg", "E"),
        // Case-insensitive, and on the normalised path (an escaped dot, a dot segment).
        ("/x/Photo.JPG", "E"), ("/x/a%2Egif", "E"), ("/images/../documents/2.gif", "E"), ("/documents/1.jpg.txt", "C"),
    ])
    func nginxsMatchingOrder(path: String, expected: String) throws {
        let r = try CoreRig(Self.nginxExample)
        #expect(try Self.body(r, path) == expected, "\(path)")
    }

    @Test func regexesAreTriedInFileOrderAndCaseMatters() throws {
        let r = try CoreRig("""
            server {
                listen 127.0.0.1:8080;
                location /api/ { return 200 "prefix"; }
                location ~ ^/api/v(\\d+)/ { return 200 "first:$1"; }
                location ~ ^/api/ { return 200 "second"; }
                location ~ \\.PHP$ { return 200 "upper"; }
            }
            """)
        do { let got = try Self.body(r, "/api/v2/users"); #expect(got == "first:2", "\(got.debugDescription)") }
        do { let got = try Self.body(r, "/api/users"); #expect(got == "second", "\(got.debugDescription)") }
        do { let got = try Self.body(r, "/x.PHP"); #expect(got == "upper", "\(got.debugDescription)") }
        #expect(responses(try r.ask("GET /x.php HTTP/1.1\r\nHost: t\r\n\r\n")).first?.status == "HTTP/1.1 404 Not Found", "~ is case-sensitive")
    }

    @Test func numberedAndNamedCapturesExpand() throws {
        let r = try CoreRig("""
            upstream backend { server 127.0.0.1:BACKEND; }
            server {
                listen 127.0.0.1:8080;
                location ~ ^/u/(?<user>[a-z]+)/(\\d+)$ { return 200 "user=$user id=$2 all=$0 ${1}x $9."; }
                location ~ (?s)^/p/(.*)$ { proxy_pass http://backend/files/$1?from=$args; }
            }
            """)
        do { let got = try Self.body(r, "/u/ann/42"); #expect(got == "user=ann id=42 all=/u/ann/42 annx .", "\(got.debugDescription)") }
        // proxy_pass with captures: the whole URI, what the capture brings escaped.
        do { let got = try Self.body(r, "/p/a%20b/c?k=v"); #expect(got == "ok:/files/a%20b/c?from=k=v", "\(got.debugDescription)") }
        do { let got = try Self.body(r, "/p/x%0d%0aInjected:%201"); #expect(got == "ok:/files/x%0D%0AInjected:%201?from=", "\(got.debugDescription)") }
    }

    /// A pattern that backtracks catastrophically gives up at PCRE2's limits: 500, not a stuck loop.
    @Test func aCatastrophicPatternIsBounded() throws {
        let r = try CoreRig("""
            server {
                listen 127.0.0.1:8080;
                location ~ ^/(a|aa)+$ { return 200 "matched"; }
                location / { return 200 "prefix"; }
            }
            """)
        let path = "/" + String(repeating: "a", count: 60) + "b"
        let got = responses(try r.ask("GET \(path) HTTP/1.1\r\nHost: t\r\n\r\n"))
        #expect(got.first?.status == "HTTP/1.1 500 Internal Server Error")
        do { let got = try Self.body(r, "/aaaa"); #expect(got == "matched", "\(got.debugDescription)") }
    }
}
