import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Running out of descriptors, and the admin endpoint under load: against the binary in a process
/// of its own where limits and resident size are its alone.
@Suite(.serialized) struct ResourceTests {
    /// With 64 descriptors and 120 clients, accept4() fails with EMFILE: Tether logs it (once a
    /// second at most), counts it, and serves again once descriptors come back.
    @Test func runningOutOfDescriptorsIsLoggedCountedAndRecovered() throws {
        let port = freePort()
        try withTetherProcess(config: { dir in """
            worker_processes 1;
            worker_rlimit_nofile 64;
            error_log \(dir)/error.log info;
            http {
                server {
                    listen 127.0.0.1:\(port);
                    location / { return 200 "hi"; }
                    location = /metrics { stats prometheus; }
                }
            }
            """ }, port: port, arguments: []) { pid, dir in
            var clients: [TestClient] = []
            for _ in 0..<120 { clients.append(try TestClient(port: port)) }
            let log = dir + "/error.log"
            func errors() -> [Substring] {
                ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").filter { $0.contains("accept4() failed (24: Too many open files)") }
            }
            #expect(eventually(timeoutMs: 5_000) { !errors().isEmpty }, "no accept4() error logged")
            let started = NIODeadline.now()
            // Out of descriptors for a while: the log stays at about a line a second.
            usleep(1_500_000)
            #expect(errors().count <= Int(seconds(since: started)) + 2, "\(errors().count) lines")
            clients.removeAll()  // every client closes
            #expect(eventually(timeoutMs: 5_000) {
                guard let c = try? TestClient(port: port, timeoutMs: 1_000) else { return false }
                guard (try? c.sendGET()) != nil else { return false }
                return (try? c.readResponse())?.bodyText == "hi"
            }, "not serving again after descriptors came back")
            let c = try TestClient(port: port)
            try c.sendGET("/metrics")
            let metrics = try c.readResponse().bodyText
            let line = metrics.split(separator: "\n").first { $0.hasPrefix("tether_downstream_cx_accept_failed_total{reason=\"emfile\"}") }
            #expect((line?.split(separator: " ").last.flatMap { Int($0) } ?? 0) > 0, "\(line ?? "no emfile sample")")
        }
    }
}

extension ResourceTests {
    /// After a burst of 1,000 connections that each held a large head half-read, the resident size
    /// comes back near where it started once they are answered and gone, instead of staying at
    /// the burst's peak. (Answered by Tether itself: proxied, the pool would rightly keep upstream
    /// connections open.)
    @Test func memoryComesBackAfterABurst() throws {
        let port = freePort()
        try withTetherProcess(config: { _ in """
            worker_processes 2;
            events { worker_connections 4096; }
            http {
                server {
                    listen 127.0.0.1:\(port);
                    large_client_header_buffers 4 16k;
                    location /local { return 200 "local"; }
                }
            }
            """ }, port: port, arguments: []) { pid, _ in
            let big = String(repeating: "v", count: 12_000)
            /// `n` clients send all of a large head but its last line, so that Tether holds each
            /// half-read; `during` runs then; then the heads are finished and answered.
            func burst(_ n: Int, during: () -> Void = {}) throws {
                var clients: [TestClient] = []
                for _ in 0..<n {
                    let c = try TestClient(port: port)
                    try c.send("GET /local HTTP/1.1\r\nHost: t\r\nX-Big: \(big)\r\n")
                    clients.append(c)
                }
                during()
                for c in clients { try c.send("\r\n") }
                for c in clients { let s = try c.readResponse(keepBody: false).status; #expect(s == 200, "status \(s)") }
            }
            try burst(50)
            let start = residentKiB(pid)
            var peak = start
            try burst(1_000) {
                // The heads are read as they arrive: the peak is reached once all are in.
                _ = eventually(timeoutMs: 5_000) {
                    peak = residentKiB(pid)
                    return peak - start > 12_000
                }
            }
            #expect(peak - start > 10_000, "the burst took only \(peak - start) KiB: it proves nothing")
            var now = peak
            let back = eventually(timeoutMs: 20_000) {
                now = residentKiB(pid)
                return now - start < (peak - start) / 4
            }
            #expect(back, "resident \(start) KiB before, \(peak) KiB at the peak, \(now) KiB after")
        }
    }
}

@Suite struct AdminMethodTests {
    @Test(arguments: ["POST", "PUT", "DELETE", "OPTIONS"])
    func adminPagesAnswerGETAndHEADOnly(_ method: String) throws {
        try withProxy(server: "location = /status { stub_status; } location = /metrics { stats prometheus; }") { proxy, _ in
            let c = try proxy.client()
            for page in ["/status", "/metrics"] {
                try c.send("\(method) \(page) HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
                let r = try c.readResponse()
                #expect(r.status == 405)
                #expect(r.header("allow") == "GET, HEAD")
            }
            try c.send("HEAD /status HTTP/1.1\r\nHost: t\r\n\r\n")
            let h = try c.readResponse(head: true)
            #expect(h.status == 200 && h.header("content-length").map { Int($0)! > 0 } == true)
            #expect(try c.get("/status").bodyText.hasPrefix("Active connections: "))
        }
    }

    /// Concurrent scrapes share gatherings: all are answered, and none waits behind the others.
    @Test func concurrentScrapesAreAllAnsweredTogether() throws {
        try withProxy(server: "location = /metrics { stats prometheus; } location = /stats { stats json; }") { proxy, _ in
            let answered = NIOLockedValueBox(0)
            DispatchQueue.concurrentPerform(iterations: 100) { i in
                guard let c = try? proxy.client() else { return }
                let page = i % 2 == 0 ? "/metrics" : "/stats"
                guard (try? c.sendGET("\(page)")) != nil, let r = try? c.readResponse() else { return }
                if r.status == 200 && !r.body.isEmpty { answered.withLockedValue { $0 += 1 } }
            }
            #expect(answered.withLockedValue { $0 } == 100)
        }
    }
}
