import Foundation
import NIOCore
import Testing
import TetherConfig
import TetherCore
import TetherIO
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Tether's event loops (issue 15) serving real sockets in front of a real backend: loops sharing
/// a port, admin pages gathered from every loop, shutdown, access logs, the binary's signals.
@Suite struct EventLoopTests {
    @Test func keepaliveTimeoutAndRequestsAsNginx() throws {
        try withProxy(http: "keepalive_timeout 1s; keepalive_requests 3;") { proxy, _ in
            let c = try proxy.client()
            for i in 1...3 {
                let r = try c.get()
                #expect(r.status == 200 && (r.header("connection") == "close") == (i == 3))
            }
            #expect(c.waitForClose(timeoutMs: 2_000))
            let idle = try proxy.client()
            #expect(try idle.get().header("keep-alive") == "timeout=1")
            let t = NIODeadline.now()
            #expect(idle.waitForClose(timeoutMs: 3_000))
            let waited = seconds(since: t)
            #expect(waited >= 0.95 && waited < 1.9, "closed after \(waited) s")
        }
    }

    @Test func pipelinedRequestsAreAnsweredInOrder() throws {
        try withProxy() { proxy, _ in
            let c = try proxy.client()
            try c.send("GET /status/201 HTTP/1.1\r\nHost: t\r\n\r\nPOST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET /status/202 HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try c.readResponse().status == 201)
            let sum = try c.readResponse()
            #expect(sum.status == 200 && sum.bodyText.hasPrefix("3 "))
            #expect(try c.readResponse().status == 202)
        }
    }

    /// An admin page is answered once every loop has given its figures: requests pipelined
    /// behind it wait for it and come in order, a body it was sent is dropped, and a client that
    /// leaves before its page is ready costs nothing (the next scrape is answered).
    @Test func anAdminPageKeepsItsPlaceInAPipeline() throws {
        try withProxy(workers: 2, server: adminLocations) { proxy, _ in
            let c = try proxy.client()
            try c.send("GET /status/201 HTTP/1.1\r\nHost: t\r\n\r\nGET /status HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloGET /metrics HTTP/1.1\r\nHost: t\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try c.readResponse().status == 201)
            let status = try c.readResponse()
            #expect(status.status == 200 && status.bodyText.hasPrefix("Active connections: "))
            let metrics = try c.readResponse()
            #expect(metrics.status == 200 && metrics.header("content-type") == "text/plain; version=0.0.4; charset=utf-8")
            // The first answer and the stub_status page were counted before the metrics page was made.
            #expect(metric(metrics.bodyText, "tether_downstream_rq_total{code=\"2xx\"}") == 2)
            #expect(try c.readResponse().status == 202)
            for _ in 0..<20 {
                let gone = try proxy.client()
                try gone.sendGET("/stats")
            }
            let after = try scrape(proxy, "/stats")
            #expect(after.status == 200)
            let json = try JSONSerialization.jsonObject(with: Data(after.body)) as! [String: Any]
            #expect((json["event_loops"] as! [Any]).count == 2)
        }
    }

    @Test func aBackendThatIsDownIs502AndAGarbledAnswerToo() throws {
        let free = freePort()
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http { upstream down { server 127.0.0.1:\(free); }
              server { listen 127.0.0.1:0; location / { proxy_pass http://down; } } }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        #expect(try c.get().status == 502)
        try withProxy() { proxy, _ in
            let g = try proxy.client()
            #expect(try g.get("/garbage").status == 502)
        }
    }

    @Test func stopClosesTheListeners() throws {
        let proxy = try RunningProxy(config: "worker_processes 2; http { server { listen 127.0.0.1:0; location / { return 200 up; } } }")
        let c = try proxy.client()
        #expect(try c.get().bodyText == "up")
        proxy.stop()
        #expect(throws: (any Error).self) { try TestClient(port: proxy.port) }
    }

    /// A shutdown closes the listener and the idle connections, and a request whose head was
    /// still arriving is answered (marked close) once the rest of it comes.
    @Test
    func aHeadHalfReadAtShutdownIsAnsweredAndClosed() throws {
        let proxy = try startProxy(config: "worker_processes 1; http { server { listen 127.0.0.1:0; location / { return 200 up; } } }")
        let idle = try TestClient(port: proxy.port)
        #expect(try idle.get().bodyText == "up")
        let half = try TestClient(port: proxy.port)
        try half.send("GET /half HTTP/1.1\r\nHo")
        // The proxy has read the half head before the shutdown begins.
        #expect(eventually { (try? TestClient(port: proxy.port)).map { c in (try? c.sendGET()) != nil && (try? c.readResponse().status) == 200 } ?? false })
        let stopped = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            proxy.stop()
            stopped.signal()
        }
        #expect(idle.waitForClose(timeoutMs: 1_000))
        #expect(eventually { (try? TestClient(port: proxy.port)) == nil })
        try half.send("st: t\r\n\r\n")
        let r = try half.readResponse()
        #expect(r.status == 200 && r.bodyText == "up")
        #expect(r.header("connection") == "close")
        #expect(half.waitForClose(timeoutMs: 1_000))
        #expect(stopped.wait(timeout: .now() + 3) == .success)
    }

    /// The binary: its pid file and error log as nginx's; SIGHUP reloads under a request in flight;
    /// `tether -s quit` lets the request in flight finish (its answer marked close), then Tether
    /// exits 0, says so and removes its pid file.
    @Test func quitFinishesTheRequestInFlightThenExits() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let tether = try TetherBinary(http: """
            upstream b { server 127.0.0.1:\(backend.port); }
            server { listen 127.0.0.1:PORT; location / { proxy_pass http://b; } }
            """)
        defer { tether.end() }
        let (p, dir, port, file, log) = (tether.process!, tether.dir, tether.port, tether.file, tether.log)
        #expect(eventually { (try? String(contentsOfFile: dir + "/tether.pid", encoding: .utf8)) == "\(p.pid)\n" })
        let busy = try TestClient(port: port)
        try busy.sendGET("/slow/500")
        #expect(eventually { backend.requestCount == 1 })
        // SIGHUP reloads (the same file) with the request in flight; it must not end the process.
        kill(p.pid, SIGHUP)
        #expect(eventually { log().contains("configuration reloaded from \(file)") })
        let other = try TestClient(port: port)
        #expect(try other.get().status == 200)
        #expect(try runTether(["-s", "quit", "-c", file]).status == 0)
        let r = try busy.readResponse()
        #expect(r.status == 200 && r.bodyText == "slow")
        #expect(r.header("connection") == "close")
        #expect(busy.waitForClose(timeoutMs: 1_000))
        #expect(p.wait() == 0)
        #expect(log().contains("SIGQUIT received, shutting down gracefully"))
        #expect(log().contains("exiting"))
        #expect(!FileManager.default.fileExists(atPath: dir + "/tether.pid"))
    }

    /// A failing backend: its 502 and an error-log line that says why and where, as nginx's.
    @Test func aFailingBackendIsLoggedWithItsCause() throws {
        let down = freePort()
        let tether = try TetherBinary(http: """
            upstream b { server 127.0.0.1:\(down); }
            server { listen 127.0.0.1:PORT; location / { proxy_pass http://b; } }
            """)
        defer { tether.end() }
        let c = try TestClient(port: tether.port)
        #expect(try c.get().status == 502)
        #expect(eventually {
            tether.log().contains("[error] \(tether.process.pid)#0: connect() failed (111: Connection refused) while talking to upstream \"b\" server 127.0.0.1:\(down), answering 502")
        })
    }

    /// The access log says what each request got, whichever way it ended: a
    /// proxied answer (with the `$request_id` the backend was sent), a 502 made by Tether with
    /// the upstream's address, `return 444`, an admin page answered later, and 499 for a client
    /// that left before its answer began.
    @Test func theAccessLogSaysHowEachRequestEnded() throws {
        let dir = NSTemporaryDirectory() + "tether-bin-log-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let down = freePort()
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: """
            worker_processes 2;
            http {
                log_format t '$request $status $body_bytes_sent up=$upstream_addr ustatus=$upstream_status id=$request_id';
                access_log \(dir)/access.log t;
                upstream b { server 127.0.0.1:\(backend.port); }
                upstream down { server 127.0.0.1:\(down); }
                server {
                    listen 127.0.0.1:0;
                    location / { proxy_pass http://b; proxy_set_header X-Request-ID $request_id; }
                    location /down { proxy_pass http://down; }
                    location = /gone { return 444; }
                    location = /status { stub_status; }
                    location = /quiet { access_log off; return 200 "q"; }
                }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        #expect(try c.get("/bytes/7").status == 200)
        #expect(try c.get("/down").status == 502)
        let c2 = try proxy.client()
        try c2.send("GET /status HTTP/1.1\r\nHost: t\r\n\r\nGET /quiet HTTP/1.1\r\nHost: t\r\n\r\n")
        #expect(try c2.readResponse().status == 200)
        #expect(try c2.readResponse().bodyText == "q")
        let gone = try proxy.client()
        try gone.sendGET("/gone")
        #expect(gone.waitForClose(timeoutMs: 2_000))
        let left = try proxy.client()
        try left.sendGET("/slow/300")
        #expect(eventually { backend.requestCount == 2 })
        left.close()
        func lines() -> [String] {
            ((try? String(contentsOfFile: dir + "/access.log", encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
        }
        #expect(eventually { lines().count == 5 }, "\(lines())")
        let all = lines()
        let id = try #require(backend.requests.first?.header("x-request-id"))
        #expect(id.count == 32)
        #expect(all.contains("GET /bytes/7 HTTP/1.1 200 7 up=127.0.0.1:\(backend.port) ustatus=200 id=\(id)"), "\(all)")
        #expect(all.contains { $0.hasPrefix("GET /down HTTP/1.1 502 ") && $0.contains(" up=127.0.0.1:\(down) ustatus=- id=") }, "\(all)")
        #expect(all.contains { $0.hasPrefix("GET /status HTTP/1.1 200 ") && $0.contains(" up=- ustatus=- ") }, "\(all)")
        #expect(all.contains { $0.hasPrefix("GET /gone HTTP/1.1 444 0 up=- ") }, "\(all)")
        #expect(all.contains { $0.hasPrefix("GET /slow/300 HTTP/1.1 499 0 up=127.0.0.1:\(backend.port) ustatus=- ") }, "\(all)")
        #expect(!all.contains { $0.contains("/quiet") })
    }

    /// `error_log FILE error`: lines below the level (the notices) are not written, an error is;
    /// SIGUSR1 opens the file again by its name (as logrotate expects after moving it).
    @Test func theErrorLogKeepsItsLevelAndIsReopenedOnSIGUSR1() throws {
        let down = freePort()
        let tether = try TetherBinary(http: """
            upstream b { server 127.0.0.1:\(down); }
            server { listen 127.0.0.1:PORT; location / { proxy_pass http://b; } }
            """, level: "error")
        defer { tether.end() }
        func failOnce() throws {
            let c = try TestClient(port: tether.port)
            #expect(try c.get().status == 502)
        }
        let failure = "[error] \(tether.process.pid)#0: connect() failed (111: Connection refused) while talking to upstream \"b\""
        try failOnce()
        #expect(eventually { tether.log().contains(failure) })
        #expect(!tether.log().contains("[notice]"), "\(tether.log())")
        try FileManager.default.moveItem(atPath: tether.dir + "/error.log", toPath: tether.dir + "/error.log.1")
        kill(tether.process.pid, SIGUSR1)
        #expect(eventually {
            (try? failOnce()) != nil && tether.log().contains(failure)
        }, "no line in the reopened file")
        #expect(tether.process.isRunning)
    }

    /// A reload applies `error_log` as nginx's does: the lines go to the new file, at the new level.
    @Test func aReloadAppliesANewErrorLogFileAndLevel() throws {
        let tether = try TetherBinary(http: "server { listen 127.0.0.1:PORT; location / { return 200 \"hi\"; } }", level: "notice")
        defer { tether.end() }
        let other = tether.dir + "/other.log"
        func configure(_ path: String, _ level: String, broken: Bool = false) throws {
            try """
                pid \(tether.dir)/tether.pid;
                error_log \(path) \(level);
                worker_processes 2;
                http {
                    server { listen 127.0.0.1:\(tether.port); location / { return 200 "hi"; } }
                    \(broken ? "frobnicate;" : "")
                }
                """.write(toFile: tether.file, atomically: true, encoding: .utf8)
        }
        func lines(_ text: String) -> Int {
            ((try? String(contentsOfFile: other, encoding: .utf8)) ?? "").components(separatedBy: "\n").filter { $0.contains(text) }.count
        }
        func reload() { kill(tether.process.pid, SIGHUP) }
        // The reload that names the new file says so in the old one; what follows goes to the new.
        try configure(other, "notice")
        reload()
        #expect(eventually { tether.log().contains("configuration reloaded") })
        try configure(other, "error", broken: true)
        reload()
        #expect(eventually { lines("the running configuration stays in place") == 1 }, "no line in the new error_log file")
        #expect(lines("SIGHUP received") == 1)
        // The new level: lines below it are no longer written.
        try configure(other, "error")
        reload()
        #expect(eventually { lines("configuration reloaded") == 1 })
        try configure(other, "error", broken: true)
        reload()
        #expect(eventually { lines("the running configuration stays in place") == 2 })
        #expect(lines("SIGHUP received") == 2, "a notice line was written at level error")
        #expect(try TestClient(port: tether.port).get().bodyText == "hi")
    }

    /// IPv6 on both sides: a client over ::1, a listener on [::1] (IPv6 only, as nginx's
    /// ipv6only=on: the same port on 127.0.0.1 is another socket), an upstream server at [::1];
    /// `$remote_addr` is the IPv6 peer on both.
    @Test func ipv6ListenersAndUpstreams() throws {
        let back = try RunningProxy(config: #"worker_processes 1; http { server { listen [::1]:0; location / { return 200 "from $remote_addr for $http_x_client"; } } }"#)
        defer { back.stop() }
        let front = try RunningProxy(config: """
            worker_processes 2;
            http {
                upstream b { server [::1]:\(back.port); keepalive 4; }
                server { listen [::1]:0; location / { proxy_pass http://b; proxy_set_header X-Client $remote_addr; } }
            }
            """)
        defer { front.stop() }
        let c = try TestClient(host: "::1", port: front.port)
        for _ in 0..<3 {
            let r = try c.get()
            #expect(r.status == 200 && r.bodyText == "from ::1 for ::1")
        }
        #expect(throws: (any Error).self) { try TestClient(host: "127.0.0.1", port: front.port) }
        // A port the kernel chose for [::1] is free on 127.0.0.1: a second server binds it.
        let v4 = try RunningProxy(config: "worker_processes 1; http { server { listen 127.0.0.1:\(front.port); location / { return 200 v4; } } }")
        defer { v4.stop() }
        let c4 = try TestClient(port: front.port)
        #expect(try c4.get().bodyText == "v4")
    }

    /// A listening address that cannot be bound is an error with its place, as nginx says it.
    @Test func aListenAddressInUseIsRefusedWithItsPlace() throws {
        // SO_REUSEPORT lets Tether's own loops share a port; a socket without it holds it alone.
        let (holder, bound) = try Sockets.listenTCP(reusePort: false)
        defer { close(holder) }
        let port = Int(bound)
        #expect {
            try RunningProxy(config: "worker_processes 2;\nhttp { server {\nlisten 127.0.0.1:\(port); location / { return 200 two; } } }")
        } throws: { error in
            "\(error)" == "test.conf:3: bind() to 127.0.0.1:\(port) failed (98: Address already in use)"
        }
    }
}

/// `tether` as a process, with a pid file and an error log in a folder of its
/// own; `PORT` in the `http` block's text is a free port, listening once `log()` says so.
struct TetherBinary {
    var process: Spawn.Child!
    let dir = NSTemporaryDirectory() + "tether-bin-" + UUID().uuidString
    let port = freePort()
    var file: String { dir + "/t.conf" }

    init(http: String, level: String = "notice") throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
            pid \(dir)/tether.pid;
            error_log \(dir)/error.log \(level);
            worker_processes 2;
            http {
            \(http.replacingOccurrences(of: "PORT", with: "\(port)"))
            }
            """.write(toFile: file, atomically: true, encoding: .utf8)
        process = try Spawn.start(try tetherExecutable().path, ["-c", file])
        let port = self.port
        guard eventually({ (try? TestClient(port: port, timeoutMs: 200)) != nil }) else {
            end()
            throw TestError("tether did not start: \(log())")
        }
    }

    func log() -> String { (try? String(contentsOfFile: dir + "/error.log", encoding: .utf8)) ?? "" }

    func end() {
        process?.terminate()
        process?.wait()
        try? FileManager.default.removeItem(atPath: dir)
    }
}
