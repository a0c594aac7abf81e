import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Requests an attacker would send to get past a location's rules: each must meet the rule.
@Suite struct PathNormalisationTests {
    static let adminSpellings = [
        "/admin/", "/x/../admin/", "/x/./../admin/", "/./admin/", "//admin/", "/%61dmin/", "/admin%2F", "/x/%2e%2e/admin/",
        "/x/..%2fadmin/", "/x/%2E%2E/admin/",
        "/x/%2e./admin/", "/x/.%2e/admin/", "/admin/.", "/admin/x/..", "/admin;p=1/", "/x/..;/admin/", "/%61dmin%2f",
        "/admin/secret", "/x/y/%2e%2e/%2E%2E/admin/secret?q=1", "http://localhost/x/../admin/",
    ]

    /// `location /admin/ { return 403; }` holds for every spelling; none reaches the backend.
    @Test(arguments: adminSpellings)
    func locationRulesHoldForEverySpelling(_ target: String) throws {
        try withProxy(server: "location /admin/ { return 403; }") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET \(target) HTTP/1.1\r\nHost: localhost\r\n\r\n")
            #expect(try c.readResponse().status == 403, "\(target)")
            #expect(backend.requestCount == 0, "\(target) reached the backend as \(backend.requests.map(\.target))")
        }
    }

    /// `deny` in a location applies to every spelling of its path.
    @Test func denyHoldsForEverySpelling() throws {
        try withProxy(server: "location /admin/ { deny 127.0.0.1; proxy_pass http://backend; }") { proxy, backend in
            for target in PathNormalisationTests.adminSpellings {
                let c = try proxy.client()
                try c.send("GET \(target) HTTP/1.1\r\nHost: localhost\r\n\r\n")
                #expect(try c.readResponse().status == 403, "\(target)")
            }
            #expect(backend.requestCount == 0, "reached the backend: \(backend.requests.map(\.target))")
        }
    }

    @Test(arguments: ["/../admin/", "/x/../../admin/", "/%2e%2e/admin/", "/x/..%2f..%2fadmin/", "/a%00b", "/a%zz", "/a%4"])
    func pathsThatClimbAboveTheRootOrDecodeBadlyAre400(_ target: String) throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            try c.send("GET \(target) HTTP/1.1\r\nHost: localhost\r\n\r\n")
            #expect(try c.readResponse().status == 400, "\(target)")
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(backend.requestCount == 0)
        }
    }

    /// Without a URI part, `proxy_pass` sends the target as the client wrote it (as nginx).
    @Test func theTargetGoesAsItCameWithoutAURIPart() throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            for target in ["/x/./y%41?a=%2e", "/a//b", "/p;q/r"] {
                try c.send("GET \(target) HTTP/1.1\r\nHost: localhost\r\n\r\n")
                #expect(try c.readResponse().status == 200)
            }
            #expect(backend.requests.map(\.target) == ["/x/./y%41?a=%2e", "/a//b", "/p;q/r"])
        }
    }

    /// With a URI part, the normalised path's prefix is replaced (re-escaped, as nginx does) and
    /// the query goes as it came.
    @Test func aURIPartReplacesThePrefixOfTheNormalisedPath() throws {
        try withProxy(server: "location /api/ { proxy_pass http://backend/v2/; }") { proxy, backend in
            let c = try proxy.client()
            let cases = [
                ("/api/users", "/v2/users"), ("/api/x/../users?id=%20", "/v2/users?id=%20"), ("/x/../api/%75sers", "/v2/users"),
                ("//api//a%20b", "/v2/a%20b"), ("/api/%3F%23", "/v2/%3F%23"), ("/api;v=1/z", "/v2/z"),
            ]
            for (sent, _) in cases {
                try c.send("GET \(sent) HTTP/1.1\r\nHost: localhost\r\n\r\n")
                #expect(try c.readResponse().status == 200, "\(sent)")
            }
            #expect(backend.requests.map(\.target) == cases.map(\.1))
        }
    }

    @Test func uriIsTheNormalisedPath() throws {
        try withProxy(server: "location /u/ { return 200 \"$uri|$request_uri\"; }") { proxy, _ in
            let c = try proxy.client()
            try c.send("GET /x/../u/%61b?q HTTP/1.1\r\nHost: localhost\r\n\r\n")
            #expect(try c.readResponse().bodyText == "/u/ab|/x/../u/%61b?q")
        }
    }
}

/// RFC 9112 §3.2 and RFC 9110 §7.2: the authority a request names.
@Suite struct HostTests {
    @Test(arguments: [
        "Host: \r\n", "Host:    \r\n", "Host: \t\r\n", "Host: local host\r\n", "Host: localhost/x\r\n", "Host: user@localhost\r\n",
        "Host: localhost:abc\r\n", "Host: localhost:65536\r\n", "Host: a\r\nHost: a\r\n", "",
    ])
    func invalidOrMissingHostIs400AndClosed(_ hostLines: String) throws {
        try withProxy(location: "proxy_set_header Host $host;") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET / HTTP/1.1\r\n\(hostLines)\r\n")
            #expect(try c.readResponse().status == 400, "\(hostLines.debugDescription)")
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(backend.requestCount == 0, "\(hostLines.debugDescription) was forwarded")
        }
    }

    /// The absolute-form target's authority is the request's host: for routing, `$host` and the
    /// Host sent upstream; the connection still goes to the configured upstream only.
    @Test func absoluteFormAuthorityWinsOverTheHostField() throws {
        try withProxy(server: "location /abs { proxy_pass http://backend; proxy_set_header Host $host; }") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET http://Other.Example:9/abs?x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            let r = try #require(backend.requests.first)
            #expect(r.target == "/abs?x")
            #expect(r.header("host") == "other.example")
        }
    }

    @Test func absoluteFormRoutesByItsAuthority() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: """
            http {
                upstream backend { server 127.0.0.1:\(backend.port); }
                server { listen 127.0.0.1:0; server_name localhost; location / { return 200 "default"; } }
                server { listen 127.0.0.1:0; server_name other.example; location / { return 200 "other"; } }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        try c.send("GET http://other.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        #expect(try c.readResponse().bodyText == "other")
        try c.send("GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
        #expect(try c.readResponse().bodyText == "other")
        try c.send("GET http://localhost/ HTTP/1.1\r\nHost: other.example\r\n\r\n")
        #expect(try c.readResponse().bodyText == "default")
    }

    @Test(arguments: [
        "GET http://other.example/abs HTTP/1.1\r\nHost:   \r\n\r\n", "GET http://other.example/abs HTTP/1.1\r\nHost: \t\r\n\r\n",
        "GET ftp://other.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n", "GET http://u@other.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /a#b HTTP/1.1\r\nHost: localhost\r\n\r\n", "GET /\u{e9} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ])
    func badTargetsAre400(_ wire: String) throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            try c.send(wire)
            #expect(try c.readResponse().status == 400, "\(wire.debugDescription)")
            #expect(backend.requestCount == 0)
        }
    }
}

/// Starts Tether in front of `backend` (one upstream server, `location /`), runs `body`, stops it.
/// Tether on `loop` in front of a scripted backend (stopped with it).
func withProxy(scripted backend: ScriptedBackend, http: String = "", location: String = "",
               _ body: (any ProxyUnderTest) throws -> Void) throws {
    defer { backend.stop() }
    let proxy = try startProxy(config: """
        worker_processes 1;
        http {
            \(http)
            upstream backend { server 127.0.0.1:\(backend.port); }
            server {
                listen 127.0.0.1:0;
                location / { proxy_pass http://backend; \(location) }
            }
        }
        """)
    defer { proxy.stop() }
    try body(proxy)
}

/// Chunked bodies are parsed strictly and written out again in canonical form, both ways.
@Suite struct ChunkedFramingTests {
    @Test func requestBodiesReachTheBackendReframed() throws {
        let seen = NIOLockedValueBox<String?>(nil)
        let backend = try ScriptedBackend { c in
            guard c.read(through: "\r\n\r\n") != nil, let body = c.read(through: "\r\n0\r\n"), let trailers = c.read(through: "\r\n\r\n") ?? c.read(through: "\r\n") else { c.close(); return }
            seen.withLockedValue { $0 = body + trailers }
            c.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            c.close()
        }
        try withProxy(scripted: backend) { proxy in
            let c = try proxy.client()
            try c.send("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0005;ext=\"a b\"\r\nhello\r\n6 ; x\r\n world\r\n00000000000000000000000000000000001\r\n!\r\n0\r\nX-Sum: 12\r\nContent-Length: 99\r\n\r\n")
            #expect(try c.readResponse().bodyText == "ok")
            #expect(eventually { seen.withLockedValue { $0 } != nil })
            #expect(seen.withLockedValue { $0 } == "5\r\nhello\r\n6\r\n world\r\n1\r\n!\r\n0\r\nX-Sum: 12\r\n\r\n")
        }
    }

    @Test func aSizeWithManyLeadingZerosIsItsValue() throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + String(repeating: "0", count: 33) + "e3\r\n")
            try c.send(String(repeating: "z", count: 227) + "\r\n0\r\n\r\n")
            let r = try c.readResponse()
            #expect(r.status == 200)
            #expect(r.bodyText.hasPrefix("227 "))
            #expect(backend.requests.first?.bodyCount == 227)
        }
    }

    @Test func responsesReachTheClientReframed() throws {
        let backend = try ScriptedBackend { c in
            guard c.read(through: "\r\n\r\n") != nil else { c.close(); return }
            c.send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0005 ;a=b\r\nhello\r\n000\r\nX-Sum: 5\r\nSet-Cookie: evil=1\r\n\r\n")
            _ = c.readToEOF()
            c.close()
        }
        try withProxy(scripted: backend) { proxy in
            let c = try proxy.client()
            try c.send("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            let raw = String(decoding: c.readRawToClose(), as: UTF8.self)
            #expect(raw.hasSuffix("\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n"), "\(raw)")
        }
    }

    @Test(arguments: ["5 \r\nhello\r\n0\r\n\r\n", "5\r\nhello\r\n0\r\nNoColon\r\n\r\n", "5\r\nhello\r\n0\r\nX: a\r\n b\r\n\r\n"])
    func aBadlyChunkedResponseIsNeverPassedOn(_ body: String) throws {
        let backend = try ScriptedBackend { c in
            guard c.read(through: "\r\n\r\n") != nil else { c.close(); return }
            c.send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            _ = c.readToEOF()
            c.close()
        }
        try withProxy(scripted: backend) { proxy in
            let c = try proxy.client()
            try c.sendGET()
            let raw = String(decoding: c.readRawToClose(), as: UTF8.self)
            // A 502; or, when the head had been relayed, a close without the last chunk (here the
            // head and the body arrive in one read, and nothing of the response goes out).
            if raw.isEmpty || raw.hasPrefix("HTTP/1.1 502") { return }
            #expect(raw.hasPrefix("HTTP/1.1 200"), "\(raw)")
            #expect(!raw.hasSuffix("0\r\n\r\n"), "a broken response looked complete: \(raw.debugDescription)")
        }
    }
}

/// No h2c smuggling: an upgrade is forwarded only for an allowed protocol, and a tunnel opens only
/// after a 101 to the protocol the request offered.
@Suite struct UpgradeTests {
    @Test func h2cAndHTTP2SettingsAreNeverForwarded() throws {
        try withProxy(location: "proxy_allow_upgrade websocket echo;") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            try c.send("GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c, echo\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            let r = backend.requests
            #expect(r.count == 2)
            #expect(r.first?.header("upgrade") == nil && r.first?.header("http2-settings") == nil)
            #expect(r.last?.header("upgrade") == "echo", "only the allowed protocol is offered")
            #expect(r.last?.header("http2-settings") == nil)
        }
    }

    /// The default allows `websocket` only; a 101 to a request whose upgrade was not forwarded is a 502.
    @Test func unlistedProtocolsAreNotForwardedAndAnUnaskedFor101Is502() throws {
        try withProxy() { proxy, backend in
            let c = try proxy.client()
            try c.send("GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nping")
            #expect(try c.readResponse().status == 502)
            #expect(backend.requests.first?.header("upgrade") == nil)
            #expect(eventually { proxy.stats().upstreams.first?.servers.first?.counters.failures["invalid_header"] == 1 })
        }
    }

    /// nginx's `proxy_set_header Upgrade $http_upgrade` is ignored (with a warning at load):
    /// otherwise it would carry `h2c` through.
    @Test func aTemplatedUpgradeHeaderDoesNotCarryH2C() throws {
        try withProxy(location: "proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\";") { proxy, backend in
            #expect(proxy.configuration.warnings.contains { $0.description.contains("\"proxy_set_header Upgrade\" is ignored") })
            let c = try proxy.client()
            try c.send("GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            #expect(backend.requests.first?.header("upgrade") == nil)
            #expect(backend.requests.first?.header("connection") == nil)
        }
    }

    /// A WebSocket upgrade works by default, and only a 101 naming it opens the tunnel.
    @Test(arguments: [("websocket", true), ("WebSocket", true), ("h2c", false), ("", false), ("websocket, h2c", false)])
    func theTunnelOpensOnlyForTheOfferedProtocol(_ c: (answer: String, opens: Bool)) throws {
        let tunnelled = NIOLockedValueBox<String?>(nil)
        let backend = try ScriptedBackend { conn in
            guard conn.read(through: "\r\n\r\n") != nil else { conn.close(); return }
            conn.send("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n" + (c.answer.isEmpty ? "" : "Upgrade: \(c.answer)\r\n") + "\r\n")
            if let bytes = conn.read(count: 4) {
                tunnelled.withLockedValue { $0 = String(decoding: bytes, as: UTF8.self) }
                conn.send(bytes)
            }
            conn.close()
        }
        try withProxy(scripted: backend) { proxy in
            let client = try proxy.client()
            try client.send("GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            let r = try client.readResponse(head: c.opens)
            if c.opens {
                #expect(r.status == 101)
                try client.send("ping")
                #expect(String(decoding: client.readRawToClose(), as: UTF8.self) == "ping")
            } else {
                #expect(r.status == 502)
                // What the client sends next is parsed as a request of its own, not tunnelled.
                #expect(try client.get("/smuggled").status == 502)
                #expect(backend.accepted.count == 2)
                #expect(tunnelled.withLockedValue { $0 } == nil, "bytes went through a tunnel that should not exist")
            }
        }
    }
}

/// A response is complete only when its framing says so: a length reached, a last chunk, or an
/// orderly close where the close delimits it. Anything else never reaches the client as complete.
@Suite struct TruncationTests {
    enum End: String, CaseIterable, Sendable { case fin, reset }

    /// A backend that answers `head` and 1,000 body bytes, then ends as `end` says.
    func backend(head: String, body: [UInt8], end: End) throws -> ScriptedBackend {
        try ScriptedBackend { c in
            guard c.read(through: "\r\n\r\n") != nil else { c.close(); return }
            c.send(Array(head.utf8) + body)
            switch end {
            case .fin: c.close()
            case .reset: c.reset()
            }
        }
    }

    static let body = [UInt8](repeating: UInt8(ascii: "x"), count: 1000)

    @Test(arguments: End.allCases)
    func closeDelimitedResponseToAnHTTP11Client(_ end: End) throws {
        let b = try backend(head: "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", body: Self.body, end: end)
        try withProxy(scripted: b) { proxy in
            for _ in 0..<5 {
                let c = try proxy.client()
                try c.send("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                let raw = String(decoding: c.readRawToClose(), as: UTF8.self)
                let complete = raw.hasSuffix("\r\n0\r\n\r\n")
                #expect(raw.hasPrefix("HTTP/1.1 200") && raw.contains("Transfer-Encoding: chunked"))
                #expect(complete == (end == .fin), "\(end): ends \(raw.suffix(12).debugDescription)")
            }
            if end == .reset {
                #expect(eventually { proxy.stats().upstreams.first?.servers.first?.counters.failures["truncated"] == 5 })
            }
        }
    }

    /// To an HTTP/1.0 client the close delimits the response, so a truncated one ends with a reset.
    @Test(arguments: End.allCases)
    func closeDelimitedResponseToAnHTTP10Client(_ end: End) throws {
        let b = try backend(head: "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", body: Self.body, end: end)
        try withProxy(scripted: b) { proxy in
            for _ in 0..<5 {
                let c = try proxy.client()
                try c.send("GET / HTTP/1.0\r\n\r\n")
                _ = c.readRawToClose()
                #expect(c.sawReset == (end == .reset), "\(end)")
            }
        }
    }

    /// A chunked response cut short (by a FIN or a reset): no last chunk to an HTTP/1.1 client,
    /// a reset to an HTTP/1.0 one (it was sent the data only, delimited by the close).
    @Test(arguments: End.allCases)
    func chunkedResponseCutShort(_ end: End) throws {
        let b = try backend(head: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", body: Array("3e8\r\n".utf8) + Self.body + Array("\r\n3e8\r\nxx".utf8), end: end)
        try withProxy(scripted: b) { proxy in
            let c11 = try proxy.client()
            try c11.sendGET()
            let raw = String(decoding: c11.readRawToClose(), as: UTF8.self)
            #expect(!raw.hasSuffix("0\r\n\r\n"))
            let c10 = try proxy.client()
            try c10.send("GET / HTTP/1.0\r\n\r\n")
            _ = c10.readRawToClose()
            #expect(c10.sawReset)
        }
    }

    @Test func aShortLengthDelimitedBodyIsCutNotPadded() throws {
        let b = try backend(head: "HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", body: Self.body, end: .reset)
        try withProxy(scripted: b) { proxy in
            let c = try proxy.client()
            try c.sendGET()
            #expect(throws: TestError.self) { try c.readResponse() }
            #expect(eventually { proxy.stats().upstreams.first?.servers.first?.counters.failures["truncated"] == 1 })
        }
    }
}

/// Each timer measures what it names, and blames that side (scaled-down times: the rules are the
/// same at 60 s).
@Suite struct TimerBlameTests {
    func upstreamTimeouts(_ proxy: any ProxyUnderTest) -> Int {
        proxy.stats().upstreams.first?.servers.first?.counters.failures["timeout"] ?? 0
    }

    /// A steady upload that takes longer than proxy_read_timeout is not the backend's fault.
    @Test func aSlowUploadIsNotAnUpstreamReadTimeout() throws {
        try withProxy(location: "proxy_read_timeout 300ms; client_body_timeout 2s;") { proxy, _ in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
            for _ in 0..<10 {
                try c.send(String(repeating: "u", count: 100))
                usleep(100_000)  // the scenario: a client that sends 1 kB/s
            }
            let r = try c.readResponse()
            #expect(r.status == 200)
            #expect(r.bodyText.hasPrefix("1000 "))
            #expect(upstreamTimeouts(proxy) == 0)
        }
    }

    /// A client that stops reading for longer than proxy_read_timeout (but within send_timeout)
    /// gets the whole response.
    @Test func aPausingReaderGetsTheWholeResponse() throws {
        try withProxy(location: "proxy_read_timeout 300ms; send_timeout 5s;") { proxy, _ in
            let c = try proxy.client()
            try c.sendGET("/bytes/20000000")
            usleep(1_000_000)  // the scenario: the client reads nothing for a second
            let r = try c.readResponse(keepBody: false)
            #expect(r.status == 200)
            #expect(r.bodySum == Pattern.checksum(count: 20_000_000))
            #expect(upstreamTimeouts(proxy) == 0)
        }
    }

    /// A client that takes nothing of its answer for send_timeout is closed, the close counted
    /// under its reason, and what it then reads is short of the length announced.
    @Test func aClientThatStopsReadingIsClosedAfterSendTimeout() throws {
        try withProxy(server: "send_timeout 300ms;") { proxy, _ in
            let c = try proxy.client()
            try c.sendGET("/bytes/20000000")
            #expect(eventually { proxy.stats().downstreamClosed["send_timeout"] == 1 })
            let got = c.readRawToClose(timeoutMs: 5_000)
            #expect(got.count > 0 && got.count < 20_000_000)
        }
    }

    /// The backend is still blamed when it is the one that is silent.
    @Test func aSilentBackendIsStillA504() throws {
        try withProxy(location: "proxy_read_timeout 300ms;") { proxy, _ in
            let c = try proxy.client()
            try c.send("POST /slow/2000 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            #expect(try c.readResponse().status == 504)
            #expect(eventually { upstreamTimeouts(proxy) == 1 })
        }
    }

    /// Many clients trickling their bodies within client_body_timeout are all served; when the
    /// gaps exceed it, every one gets 408 at the timeout, and the backend is not blamed.
    @Test func clientBodyTimeoutCountsGapsInTheBody() throws {
        let n = 500
        // Streamed (proxy_request_buffering off), the case where both timers run at once: with
        // buffering the backend sees nothing until a body is whole, and 500 bodies completing
        // together would put 500 new connections inside one proxy_read_timeout.
        try withProxy(workers: 2, http: "client_body_timeout 1s; proxy_read_timeout 300ms; proxy_request_buffering off;") { proxy, _ in
            var clients: [TestClient] = []
            for _ in 0..<n {
                let c = try proxy.client()
                // Connection: close, so that the second round finds worker_connections free.
                try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
                clients.append(c)
            }
            for _ in 0..<4 {
                usleep(300_000)  // the scenario: a byte every 300 ms from each client
                for c in clients { try c.send("b") }
            }
            var served = 0
            for c in clients where (try? c.readResponse())?.bodyText.hasPrefix("4 ") == true { served += 1 }
            #expect(served == n, "\(type(of: proxy))")

            clients = []
            for _ in 0..<n {
                let c = try proxy.client()
                try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nb")
                clients.append(c)
            }
            let started = NIODeadline.now()
            var timedOut = 0
            for c in clients where (try? c.readResponse())?.status == 408 { timedOut += 1 }
            let took = seconds(since: started)
            #expect(timedOut == n)
            #expect(took >= 0.9 && took < 3, "408s after \(took) s")
            #expect(upstreamTimeouts(proxy) == 0)
        }
    }
}
