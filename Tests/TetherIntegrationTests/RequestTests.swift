import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct RequestValidationTests {
    struct Bad: CustomTestStringConvertible, Sendable {
        var name: String
        var wire: String
        var status: Int
        var testDescription: String { name }
    }

    static let cases: [Bad] = [
        Bad(name: "Content-Length and Transfer-Encoding", wire: "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", status: 400),
        Bad(name: "conflicting Content-Length", wire: "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", status: 400),
        Bad(name: "duplicate Content-Length", wire: "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", status: 400),
        Bad(name: "invalid Content-Length", wire: "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5x\r\n\r\nhello", status: 400),
        Bad(name: "negative Content-Length", wire: "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", status: 400),
        Bad(name: "unknown transfer coding", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", status: 501),
        Bad(name: "chunked not last", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", status: 501),
        Bad(name: "obs-fold", wire: "GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n", status: 400),
        Bad(name: "bare CR", wire: "GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n", status: 400),
        Bad(name: "bare LF", wire: "GET / HTTP/1.1\nHost: t\r\n\r\n", status: 400),
        Bad(name: "NUL in a header", wire: "GET / HTTP/1.1\r\nHost: t\r\nX-A: a\u{0}b\r\n\r\n", status: 400),
        Bad(name: "space before colon", wire: "GET / HTTP/1.1\r\nHost : t\r\n\r\n", status: 400),
        Bad(name: "missing Host in HTTP/1.1", wire: "GET / HTTP/1.1\r\n\r\n", status: 400),
        Bad(name: "two Host headers", wire: "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", status: 400),
        Bad(name: "HTTP/2.0 request line", wire: "GET / HTTP/2.0\r\nHost: t\r\n\r\n", status: 505),
        Bad(name: "garbage request line", wire: "HELLO\r\n\r\n", status: 400),
        Bad(name: "invalid chunk size", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", status: 400),
        Bad(name: "space after chunk size without extension", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", status: 400),
        Bad(name: "trailer line without colon", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer\r\n\r\n", status: 400),
        Bad(name: "obs-folded trailer", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n", status: 400),
        Bad(name: "control byte in chunk extension", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;a\u{1}\r\nhello\r\n0\r\n\r\n", status: 400),
        Bad(name: "chunk size above 2^60", wire: "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n", status: 400),
        Bad(name: "body above client_max_body_size", wire: "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\n\r\n", status: 413),
        Bad(name: "header line above large_client_header_buffers", wire: "GET / HTTP/1.1\r\nHost: t\r\nX-Big: \(String(repeating: "a", count: 2000))\r\n\r\n", status: 431),
        Bad(name: "request line above large_client_header_buffers", wire: "GET /\(String(repeating: "a", count: 2000)) HTTP/1.1\r\nHost: t\r\n\r\n", status: 414),
        Bad(name: "CONNECT", wire: "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", status: 405),
    ]

    /// Each malformed request class gets its status, and never reaches the backend.
    @Test(arguments: cases)
    func rejectedAndNeverForwarded(_ c: Bad) throws {
        try withProxy(http: "client_max_body_size 1k; large_client_header_buffers 4 1k;") { proxy, backend in
            let client = try proxy.client()
            try client.send(c.wire)
            let r = try client.readResponse()
            #expect(r.status == c.status)
            // Followed by a request that would be forwarded if the connection were still in use.
            try? client.sendGET("/after")
            #expect(client.waitForClose(timeoutMs: 2_000))
            #expect(backend.requestCount == 0, "forwarded: \(backend.requests.map(\.target))")
        }
    }

    @Test func chunkedBodyAboveLimitIs413() throws {
        try withProxy(http: "client_max_body_size 1k;") { proxy, _ in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            let chunk = String(repeating: "z", count: 800)
            try c.send("320\r\n\(chunk)\r\n320\r\n\(chunk)\r\n")
            let r = try c.readResponse()
            // The head already went to the backend; the rest of the body did not.
            #expect(r.status == 413 || r.status == 502)
            #expect(c.waitForClose(timeoutMs: 2_000))
        }
    }

    @Test func headerTimeoutGives408() throws {
        try withProxy(http: "client_header_timeout 300ms;") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET / HTTP/1.1\r\nHo")
            let t = NIODeadline.now()
            let r = try c.readResponse()
            #expect(r.status == 408)
            #expect(seconds(since: t) >= 0.25)
            #expect(backend.requestCount == 0)
        }
    }

    @Test func bodyTimeoutGives408() throws {
        try withProxy(http: "client_body_timeout 300ms;") { proxy, _ in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            let r = try c.readResponse()
            #expect(r.status == 408)
        }
    }

    @Test func idleConnectionWithoutRequestClosesAfterHeaderTimeout() throws {
        try withProxy(http: "client_header_timeout 300ms;") { proxy, _ in
            let c = try proxy.client()
            let t = NIODeadline.now()
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(seconds(since: t) >= 0.25)
        }
    }
}

@Suite struct ProxySemanticsTests {
    @Test func hopByHopHeadersAreRemovedAndSetHeadersApplied() throws {
        try withProxy(location: """
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Empty "";
            proxy_set_header X-Req $request_method-$request_uri;
            """) { proxy, backend in
            let c = try proxy.client()
            try c.send("GET /a?b=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Empty: client\r\nX-Forwarded-For: 10.0.0.1\r\nX-Kept: yes\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            let r = try #require(backend.requests.first)
            #expect(r.target == "/a?b=1")
            #expect(r.header("host") == "example.com")
            #expect(r.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1")
            #expect(r.header("x-real-ip") == "127.0.0.1")
            #expect(r.header("x-req") == "GET-/a?b=1")
            #expect(r.header("x-kept") == "yes")
            for gone in ["connection", "x-secret", "keep-alive", "proxy-connection", "te", "upgrade", "x-empty"] {
                #expect(r.header(gone) == nil, "\(gone) was forwarded")
            }
        }
    }

    @Test func absoluteFormTargetIsForwardedInOriginForm() throws {
        try withProxy(location: "proxy_set_header Host $host;") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET http://example.test/a/b?c=d HTTP/1.1\r\nHost: example.test\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            try c.send("GET http://example.test HTTP/1.1\r\nHost: example.test\r\n\r\n")
            #expect(try c.readResponse().status == 200)
            #expect(backend.requests.map(\.target) == ["/a/b?c=d", "/"])
        }
    }

    @Test func chunkedBodyToAnHTTP10BackendIs411() throws {
        try withProxy(location: "proxy_http_version 1.0;") { proxy, backend in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            #expect(try c.readResponse().status == 411)
            #expect(backend.requestCount == 0)
        }
    }

    @Test func defaultHostIsTheUpstreamName() throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            try c.send("GET / HTTP/1.1\r\nHost: client.example\r\n\r\n")
            _ = try c.readResponse()
            #expect(backend.requests.first?.header("host") == "backend")
        }
    }

    @Test func routingByServerNameAndLocation() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream b { server 127.0.0.1:\(backend.port); }
                server {
                    listen 127.0.0.1:0;
                    server_name default.test;
                    location / { return 200 "default-server"; }
                }
                server {
                    listen 127.0.0.1:0;
                    server_name api.test *.wild.test .dom.test;
                    location = /exact { return 200 "exact"; }
                    location /exact { return 200 "prefix-exact"; }
                    location /api/ { proxy_pass http://b/v2/; }
                    location /api/long/ { return 200 "longer-prefix"; }
                    location / { return 200 "api-root"; }
                }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        func get(_ host: String, _ path: String) throws -> String {
            try c.send("GET \(path) HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            return try c.readResponse().bodyText
        }
        #expect(try get("unknown.test", "/") == "default-server")
        #expect(try get("api.test", "/") == "api-root")
        #expect(try get("API.test:80", "/exact") == "exact")
        #expect(try get("api.test", "/exactly") == "prefix-exact")
        #expect(try get("x.wild.test", "/") == "api-root")
        #expect(try get("wild.test", "/") == "default-server")
        #expect(try get("dom.test", "/") == "api-root")
        #expect(try get("a.b.dom.test", "/api/long/x") == "longer-prefix")
        #expect(try get("api.test", "/api/items?q=1") == "ok")
        #expect(backend.requests.last?.target == "/v2/items?q=1")
    }

    @Test func returnDirectiveAndNotFound() throws {
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:0;
                    location = /moved { return 301 https://example.com/new; }
                    location = /teapot { return 418; }
                    location /known { return 204; }
                }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        let moved = try c.get("/moved")
        #expect(moved.status == 301 && moved.header("location") == "https://example.com/new")
        #expect(try c.get("/nothing").status == 404)
        #expect(try c.get("/known/x").status == 204)
        // A local answer with a request body still keeps the connection in step.
        try c.send("POST /nothing HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody")
        #expect(try c.readResponse().status == 404)
        #expect(try c.get("/known").status == 204)
    }

    @Test func expectContinueIsAnsweredBeforeTheBody() throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            let interim = try c.readResponse()
            #expect(interim.status == 100)
            try c.send("hello")
            let r = try c.readResponse()
            #expect(r.status == 200)
            var sum = Checksum()
            Array("hello".utf8).withUnsafeBytes { sum.add($0) }
            #expect(r.bodyText == "5 \(sum.value)")
            #expect(backend.requests.first?.header("expect") == nil)
        }
    }

    @Test func expectContinueAboveLimitGets413WithoutContinue() throws {
        try withProxy(http: "client_max_body_size 10;") { proxy, backend in
            let c = try proxy.client()
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n")
            #expect(try c.readResponse().status == 413)
            #expect(backend.requestCount == 0)
        }
    }
}

@Suite struct BodyTests {
    static let size = 200 << 20

    /// 200 MB each way through the proxy, byte-exact, while the process grows far less than that.
    @Test
    func largeUploadAndDownloadAreStreamedInBoundedMemory() throws {
        try withProxy(http: "client_max_body_size 0;") { proxy, backend in
            let before = residentBytes()
            let up = try proxy.client()
            try up.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: \(Self.size)\r\n\r\n")
            try up.sendPattern(count: Self.size)
            let r = try up.readResponse()
            let expected = Pattern.checksum(count: Self.size)
            #expect(r.bodyText == "\(Self.size) \(expected.value)")

            let down = try proxy.client()
            try down.sendGET("/bytes/\(Self.size)")
            let d = try down.readResponse(keepBody: false)
            #expect(d.bodySum == expected)

            let chunkedUp = try proxy.client()
            try chunkedUp.send("POST /sum HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            try chunkedUp.sendPattern(count: 20 << 20, chunked: true)
            #expect(try chunkedUp.readResponse().bodyText == "\(20 << 20) \(Pattern.checksum(count: 20 << 20).value)")

            let grown = residentBytes() - before
            #expect(grown < 64 << 20, "resident memory grew by \(grown >> 20) MiB")
            #expect(backend.requestCount == 3)
        }
    }
}

@Suite struct LiveFuzzTests {
    /// Thousands of mutated and cut requests over real connections (eight at a time): Tether
    /// answers or closes, never crashes, and a good request afterwards is served.
    @Test
    func mutatedRequestsNeverBreakTheProxy() throws {
        try withProxy(http: "client_header_timeout 200ms; client_body_timeout 200ms; client_max_body_size 4k;") { proxy, backend in
            let samples = [
                "GET /a?b=c HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Y\r\nX-Y: 1\r\n\r\n",
                "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
                "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                "GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nping",
                "HEAD /bytes/10?mode=chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            ].map { Array($0.utf8) }
            let alphabet = Array("\r\n :;,\t\u{0}\u{7f}/?0123456789abcdefHTPGEOSchunked-ContentLength".utf8)
            let workers = 8, perWorker = 100
            let answered = NIOLockedValueBox(0), finished = NIOLockedValueBox(0)
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                var seed = UInt64(0x5eed + w)
                func next() -> Int { seed = seed &* 6364136223846793005 &+ 1442695040888963407; return Int(seed >> 33) }
                for i in 0..<perWorker {
                    var b = samples[(i + w) % samples.count]
                    for _ in 0..<(next() % 4 + 1) {
                        let k = next() % b.count
                        switch next() % 3 {
                        case 0: b[k] = alphabet[next() % alphabet.count]
                        case 1: b.remove(at: k)
                        default: b.insert(alphabet[next() % alphabet.count], at: k)
                        }
                    }
                    if next() % 4 == 0 { b = Array(b[0..<(next() % b.count)]) }
                    guard let c = try? proxy.client() else { continue }
                    c.setTimeout(ms: 1_500)
                    try? c.send(b + b)  // twice: the second copy lands wherever the first left the connection
                    if (try? c.readResponse()) != nil { answered.withLockedValue { $0 += 1 } }
                    finished.withLockedValue { $0 += 1 }
                    c.close()
                }
            }
            #expect(finished.withLockedValue { $0 } == workers * perWorker, "every connection was accepted")
            #expect(answered.withLockedValue { $0 } > 100, "most mutations still get an answer")
            let c = try proxy.client()
            #expect(try c.get("/after").status == 200)
            // Whatever reached the backend was a well-formed request line.
            #expect(backend.requests.allSatisfy { !$0.method.isEmpty && $0.target.hasPrefix("/") })
        }
    }
}
