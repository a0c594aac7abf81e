import Foundation
import Testing
@testable import TetherCore
import TetherIO
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `server ... max_conns=N` and `queue N [timeout=T]` (issue 17): the cap holds process-wide,
/// requests that find every server at its cap wait first in first out, and a full queue or a
/// request that waited too long gets a 503 with `Retry-After`.
@Suite struct QueueTests {
    func config(_ backend: TestBackend, maxConns: Int, queue: String, workers: Int = 1) -> String {
        """
        worker_processes \(workers);
        http {
            upstream app {
                server 127.0.0.1:\(backend.port) max_conns=\(maxConns);
                \(queue)
            }
            server {
                listen 127.0.0.1:0;
                location / { proxy_pass http://app; }
                location = /metrics { stats prometheus; }
            }
        }
        """
    }

    func withQueue(maxConns: Int, queue: String, workers: Int = 1, _ body: (any ProxyUnderTest, TestBackend) throws -> Void) throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: config(backend, maxConns: maxConns, queue: queue, workers: workers))
        defer { proxy.stop() }
        try body(proxy, backend)
    }

    /// 40 clients at once on two loops, 5 slow requests each, through `max_conns=4`: every
    /// request answered, the backend never sees more than 4 connections, and requests waited.
    @Test func theCapHoldsAcrossLoopsUnderLoad() throws {
        try withQueue(maxConns: 4, queue: "queue 100 timeout=30s;", workers: 2) { proxy, backend in
            // Each round: all 40 requests go out at once, then the 40 answers are read.
            let clients = try (0..<40).map { _ in try proxy.client() }
            var statuses: [Int] = []
            for round in 0..<5 {
                for (i, c) in clients.enumerated() { try c.sendGET("/slow/20?c=\(i)&r=\(round)") }
                for c in clients { statuses.append(try c.readResponse().status) }
            }
            #expect(statuses.count == 200 && statuses.allSatisfy { $0 == 200 })
            #expect(backend.requestCount == 200)
            // Tether's count, from each connect to its close. (The backend may see one more for a
            // moment: a connection's FIN can still be on its way when the slot's next connect lands.)
            let peak = (proxy as! RunningProxy).server.limits["app"]!.servers[0].peak.load(ordering: .relaxed)
            #expect(peak == 4, "Tether had \(peak) connections open at once")
            let srv = proxy.stats().upstreams[0].servers[0]
            // New connections only where a slot moved to the other loop (an idle connection there
            // closed for a waiting request: `slot_wanted`), besides the first 4.
            let moved = srv.counters.closed["slot_wanted"] ?? 0
            #expect(srv.counters.connects <= 4 + moved, "\(srv.counters.connects) connects, \(moved) slots moved")
            #expect(backend.peakOpenConnections <= 4 + moved)
            let u = proxy.stats().upstreams.first { $0.name == "app" }!
            #expect(u.queueWait.count > 0, "no request waited: the test proves nothing")
            #expect(u.queueLength == 0 && u.refused.byLabel.values.reduce(0, +) == 0)
            #expect(u.servers[0].active + u.servers[0].idle <= 4)
        }
    }

    /// 300 requests through one connection: each leaves the queue after a different wait. (The
    /// queue's timer once was armed for whatever time its oldest request had left, and the loop
    /// keeps a timer list per distinct duration: past 256 of them the process stopped.)
    @Test func manyRequestsThroughOneConnection() throws {
        try withQueue(maxConns: 1, queue: "queue 500 timeout=30s;") { proxy, backend in
            let clients = try (0..<300).map { _ in try proxy.client() }
            for (i, c) in clients.enumerated() { try c.sendGET("/slow/1?n=\(i)") }
            for c in clients { #expect(try c.readResponse().status == 200) }
            #expect(backend.requestCount == 300 && backend.connectionCount == 1)
        }
    }

    /// One connection, held by a slow request; three more requests wait and go in the order
    /// they came.
    @Test func waitingRequestsGoFirstInFirstOut() throws {
        try withQueue(maxConns: 1, queue: "queue 10;") { proxy, backend in
            let holder = try proxy.client()
            try holder.sendGET("/slow/600")
            #expect(eventually { backend.requestCount == 1 })
            var waiting: [TestClient] = []
            for i in 1...3 {
                let c = try proxy.client()
                try c.sendGET("/n/\(i)")
                waiting.append(c)
                #expect(eventually { proxy.stats().upstreams[0].queueLength == i }, "request \(i) is not queued")
            }
            #expect(try holder.readResponse().status == 200)
            for c in waiting { #expect(try c.readResponse().status == 200) }
            #expect(backend.requests.map(\.target) == ["/slow/600", "/n/1", "/n/2", "/n/3"])
            #expect(backend.connectionCount == 1, "one connection, reused for each in turn")
        }
    }

    @Test func aRequestThatWaitsItsTimeoutGets503WithRetryAfter() throws {
        try withQueue(maxConns: 1, queue: "queue 5 timeout=300ms;") { proxy, backend in
            let holder = try proxy.client()
            try holder.sendGET("/slow/2000")
            #expect(eventually { backend.requestCount == 1 })
            let c = try proxy.client()
            let started = IOLoop.monotonicNanoseconds()
            let r = try c.get("/late")
            let waited = Double(IOLoop.monotonicNanoseconds() - started) / 1e9
            #expect(r.status == 503)
            #expect(r.header("retry-after") == "1")
            #expect(waited >= 0.29 && waited < 1.5, "answered after \(waited) s")
            let u = proxy.stats().upstreams[0]
            #expect(u.refused.byLabel["queue_timeout"] == 1)
            #expect(u.queueLength == 0)
            #expect(backend.requests.map(\.target) == ["/slow/2000"], "the refused request never reached the backend")
            // The client connection stays usable (a 503 made here keeps it alive, as a 502 does).
            #expect(try holder.readResponse().status == 200)
        }
    }

    @Test func aFullQueueGets503AtOnce() throws {
        try withQueue(maxConns: 1, queue: "queue 1;") { proxy, backend in
            let holder = try proxy.client()
            try holder.sendGET("/slow/800")
            #expect(eventually { backend.requestCount == 1 })
            let queued = try proxy.client()
            try queued.sendGET("/queued")
            #expect(eventually { proxy.stats().upstreams[0].queueLength == 1 })
            let overflow = try proxy.client()
            let r = try overflow.get("/overflow")
            #expect(r.status == 503 && r.header("retry-after") == "1")
            #expect(proxy.stats().upstreams[0].refused.byLabel["queue_full"] == 1)
            #expect(try holder.readResponse().status == 200)
            #expect(try queued.readResponse().status == 200)
            #expect(backend.requests.map(\.target) == ["/slow/800", "/queued"])
            let metrics = try proxy.client().get("/metrics").bodyText
            #expect(metrics.contains("tether_upstream_rq_refused_total{upstream=\"app\",reason=\"queue_full\"} 1"))
            #expect(metrics.contains("tether_upstream_server_max_conns{upstream=\"app\",server=\"127.0.0.1:\(backend.port)\"} 1"))
            #expect(metrics.contains("tether_upstream_queue_wait_seconds_count{upstream=\"app\"} 1"))
        }
    }

    /// Without a queue, a request that finds every server at its cap gets nginx's 502.
    @Test func withoutAQueueTheCapGives502() throws {
        try withQueue(maxConns: 1, queue: "") { proxy, backend in
            let holder = try proxy.client()
            try holder.sendGET("/slow/500")
            #expect(eventually { backend.requestCount == 1 })
            #expect(try proxy.client().get("/other").status == 502)
            #expect(proxy.stats().upstreams[0].refused.byLabel["no_live_upstreams"] == 1)
            #expect(try holder.readResponse().status == 200)
        }
    }

    @Test func aClientThatLeavesWhileQueuedLeavesTheQueueAtOnce() throws {
        try withQueue(maxConns: 1, queue: "queue 5;") { proxy, backend in
            let holder = try proxy.client()
            try holder.sendGET("/slow/800")
            #expect(eventually { backend.requestCount == 1 })
            do {
                let leaver = try proxy.client()
                try leaver.sendGET("/gone")
                #expect(eventually { proxy.stats().upstreams[0].queueLength == 1 })
            }  // closed here
            #expect(eventually { proxy.stats().upstreams[0].queueLength == 0 }, "the request stayed queued after its client left")
            #expect(try holder.readResponse().status == 200)
            let after = try proxy.client()
            #expect(try after.get("/after").status == 200)
            #expect(backend.requests.map(\.target) == ["/slow/800", "/after"], "the request of the client that left was never sent")
        }
    }

    /// A reload that raises the cap lets the waiting requests go at once: none is dropped.
    @Test func reloadChangesTheCapWithoutDroppingQueuedRequests() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: config(backend, maxConns: 1, queue: "queue 10 timeout=30s;"))
        defer { proxy.stop() }
        let holder = try proxy.client()
        try holder.sendGET("/slow/1500")
        #expect(eventually { backend.requestCount == 1 })
        let waiting = try (1...2).map { i -> TestClient in
            let c = try proxy.client()
            try c.sendGET("/n/\(i)")
            return c
        }
        #expect(eventually { proxy.stats().upstreams[0].queueLength == 2 })
        let started = IOLoop.monotonicNanoseconds()
        try proxy.reload(try parse(config(backend, maxConns: 3, queue: "queue 10 timeout=30s;")))
        for c in waiting { #expect(try c.readResponse().status == 200) }
        #expect(Double(IOLoop.monotonicNanoseconds() - started) / 1e9 < 1.0, "the waiting requests went only when the slow one ended")
        #expect(try holder.readResponse().status == 200)
        #expect(backend.peakOpenConnections == 3)
    }
}
