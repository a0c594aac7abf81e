import NIOCore
import Testing
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct KeepAliveTests {
    @Test func thousandRequestsOverTenClientsReuseUpstreamConnections() throws {
        try withProxy(workers: 2) { proxy, backend in
            let clients = try (0..<10).map { _ in try proxy.client() }
            for i in 0..<1000 {
                let c = clients[i % 10]
                let r = try c.get("/n/\(i)")
                #expect(r.status == 200 && r.bodyText == "ok")
            }
            #expect(backend.requestCount == 1000)
            // One request at a time over two loops: warm connections are reused, never one per request.
            #expect(backend.connectionCount <= 10, "backend accepted \(backend.connectionCount) connections")
            let stats = proxy.stats()
            #expect(stats.upstreamReused == 1000 - stats.upstreamConnects)
        }
    }

    @Test func keepaliveTimeoutClosesAfterItNotBefore() throws {
        try withProxy(http: "keepalive_timeout 1s;") { proxy, _ in
            let c = try proxy.client()
            let r = try c.get()
            #expect(r.header("keep-alive") == "timeout=1")
            let t = NIODeadline.now()
            #expect(c.waitForClose(timeoutMs: 3_000))
            let waited = seconds(since: t)
            #expect(waited >= 0.95 && waited < 1.9, "closed after \(waited) s")
            #expect(proxy.stats().downstreamClosed["keepalive_timeout"] == 1)
        }
    }

    /// As in nginx, the location that answered the last request decides how long the connection idles.
    @Test
    func keepaliveTimeoutOfTheAnsweringLocationApplies() throws {
        try withProxy(http: "keepalive_timeout 75s;", server: "location /short { keepalive_timeout 300ms; return 200 short; }") { proxy, _ in
            let c = try proxy.client()
            let r = try c.get("/short")
            #expect(r.bodyText == "short" && r.header("keep-alive") == nil, "timeout=0 is not advertised for under a second")
            let t = NIODeadline.now()
            #expect(c.waitForClose(timeoutMs: 3_000))
            #expect(seconds(since: t) < 1.5)
        }
    }

    @Test func keepaliveRequestsLimitsRequestsPerConnection() throws {
        try withProxy(http: "keepalive_requests 3;") { proxy, _ in
            let c = try proxy.client()
            for i in 1...3 {
                let r = try c.get()
                #expect(r.status == 200)
                #expect((r.header("connection") == "close") == (i == 3))
            }
            #expect(c.waitForClose(timeoutMs: 2_000))
            // Counted under its reason (closes after a final response once went uncounted).
            #expect(eventually { proxy.stats().downstreamClosed == ["keepalive_requests": 1] })
        }
    }

    @Test func keepaliveTimeZeroClosesAfterFirstResponse() throws {
        try withProxy(http: "keepalive_time 0s;") { proxy, _ in
            let c = try proxy.client()
            #expect(try c.get().header("connection") == "close")
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(eventually { proxy.stats().downstreamClosed == ["keepalive_time": 1] })
        }
    }

    @Test
    func http10KeepsAliveOnlyWhenAsked() throws {
        try withProxy() { proxy, _ in
            let a = try proxy.client()
            try a.send("GET / HTTP/1.0\r\n\r\n")
            let r = try a.readResponse()
            #expect(r.header("connection") == "close")
            #expect(a.waitForClose(timeoutMs: 2_000))

            let b = try proxy.client()
            for _ in 0..<2 {
                try b.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                let r = try b.readResponse()
                #expect(r.status == 200 && r.header("connection") == "keep-alive")
            }
        }
    }

    @Test func clientConnectionCloseIsHonoured() throws {
        try withProxy { proxy, _ in
            let c = try proxy.client()
            try c.send("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            #expect(try c.readResponse().header("connection") == "close")
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(eventually { proxy.stats().downstreamClosed == ["client_close": 1] })
        }
    }

    @Test
    func pipelinedMixedRequestsAnsweredInOrderByteExact() throws {
        try withProxy() { proxy, backend in
            let c = try proxy.client()
            var wire = ""
            var expected: [(head: Bool, body: String)] = []
            for i in 0..<16 {
                switch i % 4 {
                case 0:
                    wire += "GET /bytes/\(100 + i) HTTP/1.1\r\nHost: t\r\n\r\n"
                    expected.append((false, "bytes:\(100 + i)"))
                case 1:
                    wire += "HEAD /bytes/\(100 + i) HTTP/1.1\r\nHost: t\r\n\r\n"
                    expected.append((true, ""))
                case 2:
                    let body = "post-\(i)-" + String(repeating: "x", count: i)
                    wire += "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
                    expected.append((false, body))
                default:
                    let body = "chunked-\(i)"
                    wire += "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\(String(body.utf8.count, radix: 16))\r\n\(body)\r\n0\r\n\r\n"
                    expected.append((false, body))
                }
            }
            try c.send(wire)  // all at once: the proxy must answer strictly in order
            for (i, e) in expected.enumerated() {
                let r = try c.readResponse(head: e.head)
                #expect(r.status == 200, "response \(i)")
                if e.body.hasPrefix("bytes:") {
                    let n = Int(e.body.dropFirst(6))!
                    #expect(r.bodySum == Pattern.checksum(count: n), "response \(i)")
                } else if e.head {
                    #expect(r.header("content-length") == String(100 + i))
                    #expect(r.body.isEmpty)
                } else {
                    #expect(r.bodyText == e.body, "response \(i)")
                }
            }
            #expect(backend.requestCount == 16)
        }
    }
}
