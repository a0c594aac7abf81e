import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing
@testable import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct UpstreamTests {
    /// A client that leaves while its response is on the way does not cost an upstream
    /// connection: the rest of the response is read and dropped, and the next request reuses
    /// the connection (length-framed and chunked responses).
    @Test(arguments: ["", "?mode=chunked"])
    func aClientLeavingMidResponseLeavesTheConnectionPooled(framing: String) throws {
        try withProxy(workers: 1) { proxy, backend in
            let a = try proxy.client()
            try a.sendGET("/slow/1000\(framing)")
            #expect(eventually { backend.requestCount == 1 })
            a.close()
            #expect(eventually { proxy.stats().upstreams[0].servers[0].counters.drained == 1 })
            let b = try proxy.client()
            #expect(try b.get().status == 200)
            #expect(backend.connectionCount == 1)
            let counters = proxy.stats().upstreams[0].servers[0].counters
            #expect(counters.reused == 1)
            #expect(counters.closed.values.reduce(0, +) == 0)
        }
    }

    /// least_conn counts a request as active on its server until it ends, however it ends: one
    /// whose client leaves before it has an upstream connection is no longer counted, so equal
    /// servers keep taking turns afterwards.
    @Test
    func aClientLeavingBeforeItsRequestHasAConnectionIsNotLeftActiveForLeastConn() throws {
        let b1 = try TestBackend(), b2 = try TestBackend()
        defer { b1.stop(); b2.stop() }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream backend { least_conn; server 127.0.0.1:\(b1.port); server 127.0.0.1:\(b2.port); }
                server { listen 127.0.0.1:0; location / { proxy_pass http://backend; } }
            }
            """)
        defer { proxy.stop() }
        let a = try proxy.client()
        let held = NIOLockedValueBox(false)
        proxy.executeOnEachLoop {
            held.withLockedValue { $0 = true }
            usleep(300_000)
        }
        #expect(eventually { held.withLockedValue { $0 } })
        try a.sendGET()
        a.close()
        #expect(eventually { proxy.stats().downstreamClosed.values.reduce(0, +) == 1 })
        let c = try proxy.client()
        for _ in 0..<4 {
            #expect(try c.get().status == 200)
        }
        let served = (b1.requestCount, b2.requestCount)
        #expect(served.0 + served.1 <= 5)
        #expect(abs(served.0 - served.1) <= 1, "the servers took turns: \(served)")
    }

    /// What cannot end soon is not waited for: a response longer than the budget, or one slower
    /// than proxy_read_timeout. Those connections are closed and counted as client_abort.
    /// (Streamed: with proxy_buffering on, a long answer that arrives fast is read whole into the
    /// spool before the client's close is seen, and its connection is kept.)
    @Test(arguments: ["/bytes/33554432", "/slow/5000"])
    func aResponseThatWouldTakeLongIsNotWaitedFor(path: String) throws {
        try withProxy(workers: 1, location: "proxy_read_timeout 1s; proxy_buffering off;") { proxy, backend in
            let a = try proxy.client()
            try a.sendGET("\(path)")
            #expect(eventually { backend.requestCount == 1 })
            a.close()
            #expect(eventually { proxy.stats().upstreams[0].servers[0].counters.closed["client_abort"] == 1 })
            #expect(proxy.stats().upstreams[0].servers[0].counters.drained == 0)
            let b = try proxy.client()
            #expect(try b.get().status == 200)
            #expect(backend.connectionCount == 2)
        }
    }

    /// A backend that closes idle connections after 1 s, hit about once a second: every GET succeeds.
    @Test func backendClosingIdleConnectionsCausesNoFailures() throws {
        var o = TestBackend.Options()
        o.closeIdleAfterMs = 1_000
        try withProxy(backend: o, workers: 1) { proxy, backend in
            let c = try proxy.client()
            var failures = 0
            for i in 0..<30 {
                // Around the backend's window: 0.9 s .. 1.1 s.
                usleep(UInt32(900_000 + (i % 3) * 100_000))
                try c.sendGET()
                if try c.readResponse().status != 200 { failures += 1 }
            }
            #expect(failures == 0)
            #expect(backend.requestCount == 30)
            // Closes the backend made were noticed and counted: on an idle connection (peer_closed),
            // or, when a request met the close first, as the retry on a fresh connection (after
            // which the learned window expires connections before the backend does).
            let s = proxy.stats()
            #expect(s.upstreamClosed["peer_closed", default: 0] + s.upstreamRetries["reused_connection_closed", default: 0] >= 1)
        }
    }

    /// A backend that drops, unanswered, requests on connections idle for 1 s or more: GETs are
    /// retried on a fresh connection; after the first drop Tether learns the window, so POSTs stop failing.
    @Test func racingBackendIsRetriedAndLearned() throws {
        var o = TestBackend.Options()
        o.dropRequestsIdleForMs = 1_000
        try withProxy(backend: o, workers: 1) { proxy, backend in
            let c = try proxy.client()
            #expect(try c.get().status == 200)
            var getFailures = 0
            for _ in 0..<4 {
                usleep(1_050_000)
                try c.sendGET()
                if try c.readResponse().status != 200 { getFailures += 1 }
            }
            #expect(getFailures == 0)
            #expect(backend.droppedCount == 1, "only the first stale connection meets the backend's close")
            let stats = proxy.stats()
            #expect(stats.upstreamRetries["reused_connection_closed"] == 1)
            #expect(stats.learnedIdleMs.values.first.map { $0 < 1_000 } == true)
            var postFailures = 0
            for _ in 0..<3 {
                usleep(1_050_000)
                try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
                if try c.readResponse().status != 200 { postFailures += 1 }
            }
            #expect(postFailures == 0)
            #expect(backend.droppedCount == 1)
        }
    }

    /// Without learning, a POST on a stale connection is not retried: it is not idempotent.
    @Test func nonIdempotentRequestIsNotRetriedOnAStaleConnection() throws {
        var o = TestBackend.Options()
        o.dropRequestsIdleForMs = 300
        try withProxy(backend: o, workers: 1) { proxy, backend in
            let c = try proxy.client()
            #expect(try c.get().status == 200)
            usleep(400_000)
            try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")
            #expect(try c.readResponse().status == 502)
            #expect(backend.droppedCount == 1)
            #expect(proxy.stats().upstreamRetries["reused_connection_closed"] == nil)
        }
    }

    /// `Keep-Alive: timeout=2` from the backend: Tether never sends on a connection idle for 2 s.
    @Test func backendKeepAliveTimeoutIsHonoured() throws {
        var o = TestBackend.Options()
        o.keepAliveHeader = "timeout=2, max=100"
        try withProxy(backend: o, workers: 1, upstream: "keepalive_timeout 60s;") { proxy, backend in
            let c = try proxy.client()
            for pause in [0, 500_000, 1_200_000, 2_100_000, 300_000, 1_700_000] {
                usleep(UInt32(pause))
                #expect(try c.get().status == 200)
            }
            #expect(backend.requests.allSatisfy { $0.idleMs < 2_000 }, "\(backend.requests.map(\.idleMs))")
            #expect(backend.requests.contains { $0.idleMs >= 400 }, "connections are still reused within the window")
        }
    }

    /// A backend that advertises a shorter keep-alive window than configured is warned about once.
    @Test func shorterBackendTimeoutIsWarnedAboutOnce() throws {
        var o = TestBackend.Options()
        o.keepAliveHeader = "timeout=5"
        let backend = try TestBackend(options: o)
        defer { backend.stop() }
        let logs = ErrorLogFile(level: .notice)
        let config = """
            worker_processes 1;
            http {
                upstream app { server 127.0.0.1:\(backend.port); keepalive_timeout 60s; }
                server { listen 127.0.0.1:0; location / { proxy_pass http://app; } }
            }
            """
        let proxy: any ProxyUnderTest = try RunningProxy(config: config, errorLog: logs.log)
        defer { proxy.stop() }
        let c = try proxy.client()
        for _ in 0..<3 {
            #expect(try c.get().status == 200)
        }
        let text = "upstream \"app\" server 127.0.0.1:\(backend.port) advertises Keep-Alive: timeout=5, shorter than its keepalive_timeout 1m; Tether expires its connections before the backend does"
        let lines = logs.lines.filter { $0.contains("advertises Keep-Alive") }
        #expect(lines.count == 1 && lines[0].contains("[warn] ") && lines[0].hasSuffix(text), "\(lines)")
    }

    /// When the backend closes its side of an idle pooled connection, Tether closes its side at once.
    @Test func noCloseWaitAfterBackendCloses() throws {
        var o = TestBackend.Options()
        o.closeIdleAfterMs = 200
        try withProxy(backend: o, workers: 1) { proxy, backend in
            let c = try proxy.client()
            #expect(try c.get().status == 200)
            #expect(eventually { backend.openConnections == 0 })
            #expect(eventually { proxy.stats().idleUpstreamConnections == 0 })
            #expect(eventually { socketsInState("08", remotePort: backend.port) == 0 })
            #expect(proxy.stats().upstreamClosed["peer_closed"] == 1)
        }
    }

    @Test func backendDownGives502() throws {
        let proxy = try startProxy(config: """
            worker_processes 1;
            http { server { listen 127.0.0.1:0; location / { proxy_pass http://127.0.0.1:1; } } }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        let r = try c.get()
        #expect(r.status == 502)
        #expect(r.bodyText.contains("502 Bad Gateway"))
        // The client connection stays usable.
        #expect(try c.get().status == 502)
        #expect(proxy.stats().upstreamFailures["error"] == 2)
    }

    @Test func slowBackendGives504() throws {
        try withProxy(location: "proxy_read_timeout 300ms;") { proxy, _ in
            let c = try proxy.client()
            let t = NIODeadline.now()
            let r = try c.get("/slow/3000")
            #expect(r.status == 504)
            #expect(seconds(since: t) < 2)
        }
    }

    @Test func malformedUpstreamResponseGives502() throws {
        try withProxy { proxy, _ in
            let c = try proxy.client()
            let r = try c.get("/garbage")
            #expect(r.status == 502)
            #expect(!r.bodyText.contains("nonsense"))
        }
    }

    @Test func nextUpstreamAfterConnectFailure() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream pair { server 127.0.0.1:1; server 127.0.0.1:\(backend.port); }
                server { listen 127.0.0.1:0; location / { proxy_pass http://pair; } }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        for _ in 0..<4 {
            #expect(try c.get().status == 200)
        }
        #expect(backend.requestCount == 4)
    }

    @Test func upstreamConnectionCloseIsNotReused() throws {
        var o = TestBackend.Options()
        o.closeAfterRequests = 1
        try withProxy(backend: o, workers: 1) { proxy, backend in
            let c = try proxy.client()
            for _ in 0..<3 {
                let r = try c.get()
                #expect(r.status == 200)
                // The backend's Connection: close is hop-by-hop: the client connection stays open.
                #expect(r.header("connection") == nil)
            }
            #expect(backend.connectionCount == 3)
            #expect(proxy.stats().upstreamRetries.isEmpty)
        }
    }

    @Test func closeDelimitedResponseIsChunkedForHTTP11Clients() throws {
        try withProxy { proxy, backend in
            let c = try proxy.client()
            for _ in 0..<2 {
                let r = try c.get("/bytes/100000?mode=close")
                #expect(r.header("transfer-encoding") == "chunked")
                #expect(r.bodySum == Pattern.checksum(count: 100_000))
            }
            #expect(backend.connectionCount == 2)
        }
    }

    @Test func chunkedResponseIsDechunkedForHTTP10Clients() throws {
        try withProxy { proxy, _ in
            let c = try proxy.client()
            try c.send("GET /bytes/70000?mode=chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            let r = try c.readResponse()
            #expect(r.header("transfer-encoding") == nil)
            #expect(r.header("connection") == "close")
            #expect(r.bodySum == Pattern.checksum(count: 70_000))
        }
    }
}
