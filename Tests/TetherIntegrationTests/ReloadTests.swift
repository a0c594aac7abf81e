import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing
import TetherConfig
import TetherTestSupport

/// A port that was free a moment ago (bound to 0, read back, released).
func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return Int(UInt16(bigEndian: a.sin_port))
}

func parse(_ text: String) throws -> Configuration {
    try Configuration.parse(text, file: "reload.conf", resolver: { Builder.isNumeric($0) ? $0 : nil }).get()
}

/// One case at a time: the tests pick free ports, which parallel cases could pick twice.
@Suite(.serialized) struct ReloadTests {
    static func config(port: Int, backend: Int, generation: Int, extra: String = "") -> String {
        """
        worker_processes 2;
        http {
            upstream b { server 127.0.0.1:\(backend); keepalive 16; }
            server {
                listen 127.0.0.1:\(port);
                location / { proxy_pass http://b; proxy_set_header X-Gen \(generation); }
            }
            \(extra)
        }
        """
    }

    /// Reloads under steady load: no request fails, no client connection is dropped, the new
    /// configuration applies to the next request on each kept-alive connection, and the unchanged
    /// upstream keeps its warm connections.
    @Test func reloadUnderLoadLosesNothing() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let port = freePort()
        let proxy = try startProxy(config: Self.config(port: port, backend: backend.port, generation: 1))
        defer { proxy.stop() }
        let stop = NIOLockedValueBox(false)
        let failures = NIOLockedValueBox(0)
        let done = DispatchGroup()
        let clients = try (0..<4).map { _ in try TestClient(port: port) }
        for c in clients {
            done.enter()
            Thread.detachNewThread {
                defer { done.leave() }
                while !stop.withLockedValue({ $0 }) {
                    do {
                        try c.sendGET()
                        if try c.readResponse().status != 200 { failures.withLockedValue { $0 += 1 } }
                    } catch {
                        failures.withLockedValue { $0 += 1 }
                        return
                    }
                }
            }
        }
        #expect(eventually { backend.requestCount >= 50 })
        let connectionsBefore = backend.connectionCount
        for generation in 2...4 {
            try proxy.reload(try parse(Self.config(port: port, backend: backend.port, generation: generation)))
            let seen = backend.requestCount
            #expect(eventually { backend.requestCount >= seen + 50 })
        }
        stop.withLockedValue { $0 = true }
        done.wait()
        #expect(failures.withLockedValue { $0 } == 0)
        for c in clients {
            #expect(try c.get("/last").status == 200)
        }
        let last = backend.requests.filter { $0.target == "/last" }
        #expect(last.count == 4 && last.allSatisfy { $0.header("x-gen") == "4" })
        #expect(backend.connectionCount <= max(connectionsBefore, 8), "unchanged pools stay warm")
        #expect(proxy.stats().acceptedConnections == 4)
    }

    @Test func removedUpstreamDrainsAndListenersFollowTheConfiguration() throws {
        let a = try TestBackend(), b = try TestBackend()
        defer { a.stop(); b.stop() }
        let port = freePort(), extraPort = freePort()
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream a { server 127.0.0.1:\(a.port); }
                server { listen 127.0.0.1:\(port); location / { proxy_pass http://a; } }
            }
            """)
        defer { proxy.stop() }
        let c = try TestClient(port: port)
        #expect(try c.get().status == 200)
        #expect(a.openConnections == 1)

        try proxy.reload(try parse("""
            worker_processes 1;
            http {
                upstream b { server 127.0.0.1:\(b.port); }
                server { listen 127.0.0.1:\(port); location / { proxy_pass http://b; } }
                server { listen 127.0.0.1:\(extraPort); location / { return 200 "extra"; } }
            }
            """))
        #expect(eventually { a.openConnections == 0 }, "the removed upstream's idle connection is closed")
        #expect(try c.get().status == 200)
        #expect(b.requestCount == 1, "the same client connection now goes to the new upstream")
        let extra = try TestClient(port: extraPort)
        #expect(try extra.get().bodyText == "extra")

        try proxy.reload(try parse("""
            worker_processes 1;
            http {
                upstream b { server 127.0.0.1:\(b.port); }
                server { listen 127.0.0.1:\(port); location / { proxy_pass http://b; } }
            }
            """))
        #expect(throws: (any Error).self) { _ = try TestClient(port: extraPort) }
        #expect(b.connectionCount == 1, "the unchanged upstream kept its warm connection")
    }

    /// A reload that binds two new ports and fails on a third leaves neither open, now or
    /// after a later successful reload, and the running listener keeps serving.
    @Test func aRefusedReloadClosesWhatItOpened() throws {
        let port = freePort(), new1 = freePort(), new2 = freePort()
        // The third port is taken by a socket of the test's own (no SO_REUSEPORT).
        let taken = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(taken) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(taken, $0, len) } }
        #expect(listen(taken, 1) == 0)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(taken, $0, &len) } }
        let takenPort = Int(UInt16(bigEndian: a.sin_port))

        let base = """
            worker_processes 2;
            http { server { listen 127.0.0.1:\(port); location / { return 200 "base"; } }
            """
        let proxy = try startProxy(config: base + "}")
        defer { proxy.stop() }
        let before = proxy.listeningPorts
        #expect(throws: (any Error).self) {
            try proxy.reload(try parse(base + """
                server { listen 127.0.0.1:\(new1); location / { return 200 "1"; } }
                server { listen 127.0.0.1:\(new2); location / { return 200 "2"; } }
                server { listen 127.0.0.1:\(takenPort); location / { return 200 "3"; } }
            }
            """))
        }
        #expect(proxy.listeningPorts == before)
        // No socket of this process listens on the ports the refused configuration named.
        #expect(socketsInState("0A", localPort: new1) == 0 && socketsInState("0A", localPort: new2) == 0)
        #expect(throws: (any Error).self) { _ = try TestClient(port: new1) }
        #expect(throws: (any Error).self) { _ = try TestClient(port: new2) }
        try proxy.reload(try parse(base + "server { listen 127.0.0.1:\(freePort()); location / { return 200 \"4\"; } } }"))
        #expect(socketsInState("0A", localPort: new1) == 0 && socketsInState("0A", localPort: new2) == 0)
        let c = try TestClient(port: port)
        #expect(try c.get().bodyText == "base")
    }

    @Test
    func shutdownLetsALargeDownloadFinish() throws {
        try withProxy() { proxy, _ in
            let c = try proxy.client()
            let size = 100 << 20
            try c.sendGET("/bytes/\(size)")
            let stopped = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                usleep(50_000)
                proxy.stop()
                stopped.signal()
            }
            let r = try c.readResponse(keepBody: false)
            #expect(r.bodySum == Pattern.checksum(count: size))
            #expect(r.header("connection") == nil || r.header("connection") == "close")
            #expect(stopped.wait(timeout: .now() + 5) == .success)
        }
    }
}

@Suite(.serialized) struct SignalTests {
    /// The real binary: SIGHUP with a broken file keeps the old configuration serving and logs
    /// the error with its place; `tether -s reload` applies a good one.
    @Test func reloadBySignal() throws {
        let dir = NSTemporaryDirectory() + "tether-sig-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = freePort()
        let file = dir + "/t.conf"
        func write(_ body: String) throws {
            try """
                pid \(dir)/tether.pid;
                error_log \(dir)/error.log notice;
                worker_processes 1;
                http { server { listen 127.0.0.1:\(port); \(body) } }
                """.write(toFile: file, atomically: true, encoding: .utf8)
        }
        try write("location / { return 200 \"one\"; }")
        let exe = try tetherExecutable()
        let p = try Spawn.start(exe.path, ["-c", file])
        defer { p.terminate(); p.wait() }
        func get() throws -> String {
            let c = try TestClient(port: port)
            try c.sendGET()
            return try c.readResponse().bodyText
        }
        #expect(eventually { (try? get()) == "one" })
        #expect(eventually { FileManager.default.fileExists(atPath: dir + "/tether.pid") })

        try write("location / { return 200 \"two\"; }\n  bogus_directive on;")
        kill(p.pid, SIGHUP)
        #expect(eventually {
            ((try? String(contentsOfFile: dir + "/error.log", encoding: .utf8)) ?? "").contains("reload of \(file) failed")
        })
        let log = (try? String(contentsOfFile: dir + "/error.log", encoding: .utf8)) ?? ""
        #expect(log.contains("\(file):5: unknown directive \"bogus_directive\""))
        #expect(try get() == "one")

        // What only OpenSSL can refuse (a certificate that is not there) fails the reload as well.
        try write("listen 127.0.0.1:\(freePort()) ssl; ssl_certificate \(dir)/missing.pem; ssl_certificate_key \(dir)/missing.key; location / { return 200 \"two\"; }")
        kill(p.pid, SIGHUP)
        #expect(eventually {
            ((try? String(contentsOfFile: dir + "/error.log", encoding: .utf8)) ?? "").contains("\(file):4: cannot load certificate \"\(dir)/missing.pem\"")
        })
        #expect(try get() == "one")

        try write("location / { return 200 \"two\"; }")
        let r = try runTether(["-s", "reload", "-c", file])
        #expect(r.status == 0, "\(r.err)")
        #expect(eventually { (try? get()) == "two" })

        #expect(try runTether(["-s", "quit", "-c", file]).status == 0)
        #expect(p.wait() == 0)
        #expect(!FileManager.default.fileExists(atPath: dir + "/tether.pid"))
    }

    /// SIGUSR1 (as logrotate sends it after moving the files) makes Tether write to new files.
    @Test func reopenLogsBySignal() throws {
        let dir = NSTemporaryDirectory() + "tether-reopen-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = freePort()
        let file = dir + "/t.conf"
        try """
            pid \(dir)/tether.pid;
            error_log \(dir)/error.log notice;
            worker_processes 1;
            http { access_log \(dir)/access.log; server { listen 127.0.0.1:\(port); location / { return 200 "x"; } } }
            """.write(toFile: file, atomically: true, encoding: .utf8)
        let p = try Spawn.start(try tetherExecutable().path, ["-c", file])
        defer { p.terminate(); p.wait() }
        func get(_ path: String) throws {
            let c = try TestClient(port: port)
            try c.sendGET("\(path)")
            _ = try c.readResponse()
        }
        func read(_ name: String) -> String { (try? String(contentsOfFile: dir + "/" + name, encoding: .utf8)) ?? "" }
        #expect(eventually { (try? get("/before")) != nil })
        #expect(eventually { read("access.log").contains("GET /before") })
        try FileManager.default.moveItem(atPath: dir + "/access.log", toPath: dir + "/access.log.1")
        try FileManager.default.moveItem(atPath: dir + "/error.log", toPath: dir + "/error.log.1")
        #expect(try runTether(["-s", "reopen", "-c", file]).status == 0)
        #expect(eventually { read("error.log").contains("log files reopened") })
        try get("/after")
        #expect(eventually { read("access.log").contains("GET /after") })
        #expect(!read("access.log.1").contains("/after"))
        kill(p.pid, SIGTERM)
        p.wait()
    }
}
