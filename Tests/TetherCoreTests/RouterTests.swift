#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import TetherConfig
import TetherHTTP
import TetherIO
@testable import TetherCore

/// A configuration's first listening address served by `Router` on the rig's loop, with its
/// upstreams' servers at the `ok:` backend (`BACKEND` in the text stands for its port).
final class CoreRig: FrontRig {
    let backend: PoolRig
    let front: ClientLoop
    let router: Router
    let upstreams: [String: LoopUpstream]
    var raw: [RawBackend] = []

    init(_ text: String) throws {
        let backend = try PoolRig()
        self.backend = backend
        let conf = "events {}\nhttp {\n" + text.replacingOccurrences(of: "BACKEND", with: "\(backend.port)") + "\n}\n"
        let c = try Configuration.parse(conf, file: "core.conf", resolver: { $0 }).get()
        let setup = try ProxySetup(c, hostKeepalive: HostKeepalive())
        var ups: [String: LoopUpstream] = [:]
        for (name, u) in setup.upstreams { ups[name] = try LoopUpstream.make(u, loop: backend.loop, buffers: backend.rig.pool) }
        upstreams = ups
        let (_, hosts, servers) = setup.virtualHosts()[0]
        router = Router(hosts: hosts, servers: servers, upstreams: ups)
        front = ClientLoop(loop: backend.loop, pool: backend.rig.pool, settings: ClientSettings(), handler: router)
    }

    /// Sends `request` on a new connection and returns what came back once `done` holds.
    func ask(_ request: String, until done: @escaping ([UInt8], Bool) -> Bool = { got, _ in responses(got).count == 1 }) throws -> [UInt8] {
        let c = try connect()
        defer { Glibc.close(c) }
        backend.rig.send(c, request)
        var got: [UInt8] = []
        #expect(try run(c, into: &got, until: done))
        return got
    }
}

@Suite struct RouterTests {
    static let twoServers = """
        upstream backend { server 127.0.0.1:BACKEND; }
        server { listen 127.0.0.1:8080; server_name a.test; location / { return 200 "a:$host:$uri"; } }
        server { listen 127.0.0.1:8080; server_name b.test *.b.test; location / { proxy_pass http://backend; } }
        """

    @Test func theServerIsChosenByHostAsNginxDoes() throws {
        let r = try CoreRig(Self.twoServers)
        #expect(responses(try r.ask("GET /x HTTP/1.1\r\nHost: A.test\r\n\r\n")).map(\.body) == ["a:a.test:/x"])
        #expect(responses(try r.ask("GET /x HTTP/1.1\r\nHost: www.b.test:8080\r\n\r\n")).map(\.body) == ["ok:/x"])
        // No server by that name: the address's default server (the first).
        #expect(responses(try r.ask("GET /y/../z HTTP/1.1\r\nHost: other\r\n\r\n")).map(\.body) == ["a:other:/z"])
    }

    /// The location is chosen on the normalised path: none of these spellings reaches the backend.
    @Test func locationsMatchTheNormalisedPath() throws {
        let r = try CoreRig("""
            upstream backend { server 127.0.0.1:BACKEND; }
            server { listen 127.0.0.1:8080; location /admin/ { return 403; } location / { proxy_pass http://backend; } }
            """)
        for target in ["/admin/", "/x/../admin/", "//admin/", "/%61dmin/", "/x/..%2fadmin/", "/./admin/"] {
            let got = responses(try r.ask("GET \(target) HTTP/1.1\r\nHost: t\r\n\r\n"))
            #expect(got.map(\.status) == ["HTTP/1.1 403 Forbidden"], "\(target)")
        }
        #expect(responses(try r.ask("GET /public HTTP/1.1\r\nHost: t\r\n\r\n")).map(\.body) == ["ok:/public"])
        #expect(r.backend.rig.handler.seen == ["/public"])
    }

    @Test func denyAndBodyLimitsAnswerBeforeTheBackend() throws {
        let r = try CoreRig("""
            upstream backend { server 127.0.0.1:BACKEND; }
            server { listen 127.0.0.1:8080; client_max_body_size 10;
              location /closed/ { allow 192.0.2.1; deny all; proxy_pass http://backend; }
              location / { proxy_pass http://backend; } }
            """)
        #expect(responses(try r.ask("GET /closed/x HTTP/1.1\r\nHost: t\r\n\r\n")).map(\.status) == ["HTTP/1.1 403 Forbidden"])
        let big = try r.ask("POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + String(repeating: "x", count: 100)) { _, eof in eof }
        #expect(responses(big).map(\.status) == ["HTTP/1.1 413 Request Entity Too Large"])
        let connect = try r.ask("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n") { _, eof in eof }
        #expect(responses(connect).map(\.status) == ["HTTP/1.1 405 Not Allowed"])
        #expect(r.backend.rig.handler.seen.isEmpty)
    }

    @Test func returnAnswersRedirectsAndCloses() throws {
        let r = try CoreRig("""
            server { listen 127.0.0.1:8080;
              location = /moved { return 301 https://$host/new$uri; }
              location /gone { return 444; }
              location /text { return 200 "hi $request_method\\n"; } }
            """)
        let moved = responses(try r.ask("GET /moved HTTP/1.1\r\nHost: t.example\r\n\r\n"))
        #expect(moved.map(\.status) == ["HTTP/1.1 301 Moved Permanently"])
        #expect(moved.first?.head.contains("\r\nLocation: https://t.example/new/moved\r\n") == true)
        let gone = try r.ask("GET /gone HTTP/1.1\r\nHost: t\r\n\r\n") { _, eof in eof }
        #expect(gone.isEmpty, "444 closes without an answer")
        #expect(responses(try r.ask("GET /text HTTP/1.1\r\nHost: t\r\n\r\n")).map(\.body) == ["hi GET\n"])
        // HEAD: the same head, no body.
        let head = try r.ask("HEAD /text HTTP/1.1\r\nHost: t\r\n\r\n") { got, _ in String(decoding: got, as: UTF8.self).hasSuffix("\r\n\r\n") }
        #expect(String(decoding: head, as: UTF8.self).hasSuffix("Content-Length: 8\r\nKeep-Alive: timeout=75\r\n\r\n"), "the length of \"hi HEAD\\n\", no body")
        let none = responses(try r.ask("GET /elsewhere HTTP/1.1\r\nHost: t\r\n\r\n"))
        #expect(none.map(\.status) == ["HTTP/1.1 404 Not Found"] && none.first?.body.contains("<h1>404 Not Found</h1>") == true)
    }
}
