import Foundation
import NIOCore
import Testing
import TetherTestSupport

@Suite struct OperationsTests {
    @Test func accessLogCombinedAndUpstreamVariables() throws {
        let dir = NSTemporaryDirectory() + "tether-log-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try withProxy(workers: 1, http: """
            log_format up '$remote_addr "$request" $status $body_bytes_sent reused=$upstream_reused connect=$upstream_connect_time addr=$upstream_addr ustatus=$upstream_status';
            access_log \(dir)/access.log combined;
            access_log \(dir)/upstream.log up;
            """) { proxy, backend in
            let c = try proxy.client()
            for _ in 0..<2 {
                try c.send("GET /bytes/5 HTTP/1.1\r\nHost: t\r\nUser-Agent: test-agent\r\nReferer: http://r/\r\n\r\n")
                #expect(try c.readResponse().status == 200)
            }
            func lines(_ f: String) -> [String] {
                ((try? String(contentsOfFile: "\(dir)/\(f)", encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
            }
            #expect(eventually { lines("access.log").count == 2 && lines("upstream.log").count == 2 })
            let combined = lines("access.log")[0]
            let pattern = #/^127\.0\.0\.1 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "GET /bytes/5 HTTP/1\.1" 200 5 "http://r/" "test-agent"$/#
            #expect(combined.wholeMatch(of: pattern) != nil, "\(combined)")
            let up = lines("upstream.log")
            #expect(up[0].hasPrefix("127.0.0.1 \"GET /bytes/5 HTTP/1.1\" 200 5 reused=0 connect=0."))
            #expect(up[1].contains("reused=1 connect=0.000"))
            #expect(up[1].hasSuffix("addr=127.0.0.1:\(backend.port) ustatus=200"))
        }
    }

    @Test
    func gracefulShutdownFinishesRequestsInFlightAndClosesIdleConnections() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream b { server 127.0.0.1:\(backend.port); }
                server { listen 127.0.0.1:0; location / { proxy_pass http://b; } }
            }
            """)
        let idle = try proxy.client()
        #expect(try idle.get().status == 200)
        let busy = try proxy.client()
        try busy.sendGET("/slow/700")
        #expect(eventually { backend.requestCount == 2 })
        let stopped = DispatchSemaphore(value: 0)
        let started = NIODeadline.now()
        Thread.detachNewThread {
            proxy.stop()
            stopped.signal()
        }
        // The idle keep-alive connection is closed at once; the busy one gets its answer, marked close.
        #expect(idle.waitForClose(timeoutMs: 500))
        let r = try busy.readResponse()
        #expect(r.status == 200 && r.bodyText == "slow")
        #expect(r.header("connection") == "close")
        #expect(busy.waitForClose(timeoutMs: 1_000))
        #expect(stopped.wait(timeout: .now() + 3) == .success)
        #expect(seconds(since: started) < 2.5)
        #expect(throws: (any Error).self) { _ = try TestClient(port: proxy.port) }
    }

    /// `worker_connections` bounds a loop's client connections: one more is closed unanswered,
    /// and a place freed by a close is taken again.
    @Test
    func workerConnectionsBoundTheClientsOfALoop() throws {
        let proxy = try startProxy(config: """
            worker_processes 1;
            events { worker_connections 3; }
            http { server { listen 127.0.0.1:0; location / { return 200 in; } } }
            """)
        defer { proxy.stop() }
        func answered(_ c: TestClient) -> Bool {
            (try? c.sendGET()) != nil && (try? c.readResponse().bodyText) == "in"
        }
        var held: [TestClient] = []
        for _ in 0..<3 {
            let c = try proxy.client()
            #expect(answered(c))
            held.append(c)
        }
        let extra = try proxy.client()
        #expect(extra.waitForClose(timeoutMs: 2_000))
        held.removeFirst().close()
        // The close reaches the proxy asynchronously: a new client gets in once it has.
        #expect(eventually { (try? proxy.client()).map(answered) ?? false })
        for c in held { #expect(answered(c)) }
    }

    @Test func upgradeIsTunnelled() throws {
        try withProxy(location: "proxy_allow_upgrade echo;") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            let r = try c.readResponse(head: true)
            #expect(r.status == 101)
            #expect(r.header("upgrade") == "echo" && r.header("connection") == "upgrade")
            #expect(backend.requests.first?.header("upgrade") == "echo")
            try c.send("ping through the tunnel")
            var got = ""
            while got.utf8.count < 23 {
                var buf = [UInt8](repeating: 0, count: 64)
                let n = recv(c.fd, &buf, 64, 0)
                guard n > 0 else { break }
                got += String(decoding: buf[0..<n], as: UTF8.self)
            }
            #expect(got == "ping through the tunnel")
        }
    }

    @Test func upstreamThatStopsReadingTimesOutWithProxySendTimeout() throws {
        // A listener that accepts and never reads: the request body fills the socket buffers.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var small: Int32 = 4096
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, 4)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(fd, 8)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                client_max_body_size 0;
                server { listen 127.0.0.1:0; location / { proxy_pass http://127.0.0.1:\(port); proxy_send_timeout 300ms; } }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        try c.send("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: \(64 << 20)\r\n\r\n")
        let sender = Thread { try? c.sendPattern(count: 64 << 20) }
        sender.start()
        let r = try c.readResponse()
        #expect(r.status == 504)
    }
}
