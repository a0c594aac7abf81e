import Foundation
import Testing
import TetherConfig
@testable import TetherCore
import TetherH2
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// HTTP/2 to clients over TLS (ALPN `h2`): curl and h2load (nghttp2's) as real clients, a raw
/// client of the test's own for exact and hostile frames; every stream proxied through the same
/// keep-alive upstream pools as HTTP/1.1 requests, to real backends.
@Suite struct Http2Tests {
    static func config(backend: Int, http: String = "", server: String = "") -> String {
        """
        worker_processes 1;
        http {
            \(http)
            upstream backend { server 127.0.0.1:\(backend); keepalive 128; }
            server {
                listen 127.0.0.1:0 ssl;
                http2 on;
                client_max_body_size 0;
                ssl_certificate \(TestPKI.path("localhost.pem"));
                ssl_certificate_key \(TestPKI.path("localhost.key"));
                \(server)
                location / { proxy_pass http://backend; }
                location = /local { return 200 "local answer\\n"; }
            }
        }
        """
    }

    static func curl(_ port: Int, _ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run("/usr/bin/curl", ["-sS", "--cacert", TestPKI.path("ca.pem"), "--resolve", "localhost:\(port):127.0.0.1"] + args)
    }

    @Test func curlSpeaksHTTP2AndHTTP11OnTheSameListener() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        defer { proxy.stop() }
        let url = "https://localhost:\(proxy.port)"
        var r = try Self.curl(proxy.port, ["--http2", "-w", " %{http_version} %{http_code}", "\(url)/local", "\(url)/x", "\(url)/status/404"])
        #expect(r.out == "local answer\n 2 200ok 2 200status 2 404", "\(r.out) \(r.err)")
        r = try Self.curl(proxy.port, ["--http1.1", "-w", " %{http_version}", "\(url)/x"])
        #expect(r.out == "ok 1.1")
        let s = proxy.stats()
        #expect(s.http2Connections == 1 && s.http2Streams == 3)
        // The three HTTP/2 requests and the HTTP/1.1 one went to the backend over pooled connections.
        #expect(backend.requestCount == 3 && backend.connectionCount == 1)
    }

    /// h2load: many streams at once on few connections, all answered, through a pool that opens no
    /// upstream connection once warm.
    @Test func manyConcurrentStreamsThroughAWarmPool() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        // keepalive_requests counts streams (as nginx's): h2load does not reconnect after a GOAWAY.
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "keepalive_requests 100000;"))
        defer { proxy.stop() }
        func load(_ n: Int) throws -> String {
            let r = try run("/usr/bin/h2load", ["-n", "\(n)", "-c", "4", "-m", "32", "https://127.0.0.1:\(proxy.port)/x"])
            return r.out
        }
        let warm = try load(1_000)
        #expect(warm.contains("1000 succeeded, 0 failed, 0 errored, 0 timeout"), "\(warm)")
        let opened = backend.connectionCount
        #expect(opened <= 128, "at most one per stream in flight")
        // Bounded (a debug build shares the machine with the other tests); bench/http2.sh runs 100,000.
        let out = try load(6_000)
        #expect(out.contains("6000 succeeded, 0 failed, 0 errored, 0 timeout"), "\(out)")
        #expect(out.contains("status codes: 6000 2xx"))
        #expect(backend.connectionCount == opened, "no upstream connection was opened after the warm-up")
        #expect(backend.requestCount == 7_000)
    }

    /// Bodies both ways, with their checksums: a request body of known length and one of unknown
    /// length (chunked upstream), and answers framed by length, by chunks and by the close.
    /// (http2_recv_buffer_size at its least: the upload is read 16k a pass, the rest at each
    /// pass's end.)
    @Test(arguments: ["length", "chunked", "close"])
    func bodiesArriveWhole(_ mode: String) throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "http2_recv_buffer_size 16k;"))
        defer { proxy.stop() }
        let size = 3_000_000
        var expected = Checksum()
        var pattern = [UInt8](repeating: 0, count: size)
        pattern.withUnsafeMutableBytes { Pattern.fill($0, offset: 0, count: size) }
        pattern.withUnsafeBytes { expected.add($0) }
        let file = NSTemporaryDirectory() + "tether-h2-\(UUID().uuidString)"
        try Data(pattern).write(to: URL(fileURLWithPath: file))
        defer { unlink(file) }
        let url = "https://localhost:\(proxy.port)"
        // Upload: curl sends content-length; with the header removed, the length is unknown.
        var args = ["--http2", "--data-binary", "@\(file)", "-o", "/dev/null", "-w", "%{http_code}"]
        if mode == "chunked" { args += ["-H", "Content-Length:", "-H", "Transfer-Encoding: chunked"] }
        let up = try Self.curl(proxy.port, args + ["\(url)/upload"])
        #expect(up.out == "200", "\(up.err)")
        let got = backend.requests.last
        #expect(got?.bodyCount == size && got?.bodySum == expected.value, "\(String(describing: got?.bodyCount))")
        // Download.
        let out = NSTemporaryDirectory() + "tether-h2-down-\(UUID().uuidString)"
        defer { unlink(out) }
        let down = try Self.curl(proxy.port, ["--http2", "-o", out, "-w", "%{http_code} %{http_version}", "\(url)/bytes/\(size)?mode=\(mode)"])
        #expect(down.out == "200 2", "\(down.err)")
        let data = try Data(contentsOf: URL(fileURLWithPath: out))
        var sum = Checksum()
        data.withUnsafeBytes { sum.add($0) }
        #expect(sum == expected, "\(data.count) of \(size) bytes")
    }

    /// A client with tiny windows (h2load -w 10: 1 KiB per stream) still gets every byte: the
    /// answers wait for its WINDOW_UPDATEs.
    @Test func smallClientWindowsAreRespected() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        defer { proxy.stop() }
        let r = try run("/usr/bin/h2load", ["-n", "40", "-c", "2", "-m", "8", "-w", "10", "-W", "16", "https://127.0.0.1:\(proxy.port)/bytes/200000"])
        #expect(r.out.contains("40 succeeded, 0 failed, 0 errored"), "\(r.out)")
        #expect(r.out.contains("(8000000) data"), "\(r.out)")
    }

    @Test func aMalformedRequestIsResetAndTheConnectionGoesOn() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        c.request(1, TestH2Client.get("/x") + [("connection", "keep-alive")])
        let reset = c.response(1)
        #expect(reset.reset == H2ErrorCode.protocolError.rawValue)
        c.request(3, TestH2Client.get("/x"))
        let ok = c.response(3)
        #expect(ok.status == "200" && ok.body == Array("ok".utf8))
        #expect(backend.requestCount == 1, "the malformed request never reached the backend")
        #expect(proxy.stats().http2Errors["malformed_request"] == 1)
    }

    /// Hop-by-hop fields never cross: not from the client (refused above), not from the backend.
    @Test func theBackendsConnectionFieldsAreNotForwarded() throws {
        let backend = try ScriptedBackend { c in
            _ = c.read(through: "\r\n\r\n")
            c.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\nX-Private: secret\r\nX-Public: yes\r\n\r\nhi")
            c.close()
        }
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        c.request(1, TestH2Client.get("/"))
        let r = c.response(1)
        #expect(r.status == "200" && r.body == Array("hi".utf8))
        let names = r.fields.map(\.0)
        #expect(names.contains("x-public") && !names.contains("connection") && !names.contains("keep-alive") && !names.contains("x-private"), "\(names)")
    }

    /// A header list over large_client_header_buffers is answered 431; the connection goes on.
    @Test func aHeaderListOverTheLimitGets431() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "large_client_header_buffers 4 1k;"))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        c.request(1, TestH2Client.get("/x") + [("x-big", String(repeating: "a", count: 3_000)), ("x-big2", String(repeating: "b", count: 1_500))])
        let r = c.response(1)
        #expect(r.status == "431", "\(r)")
        c.request(3, TestH2Client.get("/x"))
        #expect(c.response(3).status == "200")
        #expect(backend.requestCount == 1)
    }

    /// Rapid reset (CVE-2023-44487): streams opened and reset at once end the connection with
    /// GOAWAY ENHANCE_YOUR_CALM, counted; the backend saw at most a bounded number of them.
    @Test func rapidResetEndsTheConnection() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        var id: UInt32 = 1
        for _ in 0..<1_000 {
            c.request(id, TestH2Client.get("/slow/1000"))
            c.frame(.rstStream, stream: id, [0, 0, 0, 8])
            id += 2
        }
        let frames = c.frames { $0.type == 7 }
        #expect(frames.last?.type == 7 && frames.last?.code == H2ErrorCode.enhanceYourCalm.rawValue, "\(frames.suffix(3))")
        #expect(c.next() == nil && c.closed, "the connection closes after the GOAWAY")
        #expect(proxy.stats().http2Errors["ENHANCE_YOUR_CALM"] == 1)
        #expect(proxy.stats().http2Resets["CANCEL"] ?? 0 <= 300)
    }

    /// CONTINUATION flood (2024): a header block that never ends costs a bounded amount, then the
    /// connection ends.
    @Test func continuationFloodEndsTheConnection() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        c.frame(.headers, [], stream: 1, c.block(TestH2Client.get("/x")))
        let filler = [UInt8](repeating: 0x40, count: 4_096)
        for _ in 0..<64 { c.frame(.continuation, [], stream: 1, filler) }
        let frames = c.frames { $0.type == 7 }
        #expect(frames.last?.code == H2ErrorCode.enhanceYourCalm.rawValue, "\(frames)")
        #expect(backend.requestCount == 0)
    }

    /// Streams over http2_max_concurrent_streams are refused (REFUSED_STREAM); the others are answered.
    @Test func streamsOverTheLimitAreRefused() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "http2_max_concurrent_streams 2;"))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        for id in [1, 3, 5] as [UInt32] { c.request(id, TestH2Client.get("/slow/300")) }
        var refused = false
        var answered = Set<UInt32>()
        for f in c.frames(until: { _ in false }).prefix(while: { _ in true }) where f.stream != 0 {
            if f.type == 3 && f.stream == 5 && f.code == H2ErrorCode.refusedStream.rawValue { refused = true }
            if f.type == 0 && f.flags & 1 == 1 { answered.insert(f.stream) }
            if answered.count == 2 && refused { break }
        }
        #expect(refused && answered == [1, 3])
    }

    /// A client that never opens its window: its stream waits, bounded by send_timeout, and is
    /// then reset; another stream on the same connection is answered meanwhile.
    @Test func aClientThatNeverOpensItsWindow() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "send_timeout 500ms;"))
        defer { proxy.stop() }
        // Stream windows of 0 bytes: nothing of a body may be sent until a WINDOW_UPDATE.
        let c = try TestH2Client(port: proxy.port, settings: [(.initialWindowSize, 0)])
        c.request(1, TestH2Client.get("/bytes/100000"))
        var sawHeaders = false
        var reset: UInt32?
        for f in c.frames(until: { $0.type == 3 }) where f.stream == 1 {
            if f.type == 1 { sawHeaders = true }
            #expect(f.type != 0 || f.payload.isEmpty, "no body byte past a window of 0")
            if f.type == 3 { reset = f.code }
        }
        #expect(sawHeaders && reset == H2ErrorCode.internalError.rawValue)
        // The connection goes on: the small answer needs no body window... give it one.
        c.frame(.settings, stream: 0, [0, 4, 0, 1, 0, 0])
        c.request(3, TestH2Client.get("/x"))
        let r = c.response(3)
        #expect(r.status == "200" && r.body == Array("ok".utf8))
    }

    /// keepalive_timeout: an idle HTTP/2 connection gets GOAWAY (NO_ERROR) and is closed.
    @Test func anIdleConnectionGetsGoawayAndCloses() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "keepalive_timeout 300ms;"))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        c.request(1, TestH2Client.get("/x"))
        #expect(c.response(1).status == "200")
        let frames = c.frames { $0.type == 7 }
        #expect(frames.last?.type == 7 && frames.last?.code == 0)
        #expect(c.next() == nil && c.closed)
        #expect(proxy.stats().http2GoawaysSent == 1)
    }

    /// A graceful shutdown sends GOAWAY and lets the stream under way finish.
    @Test func shutdownLetsStreamsFinish() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port))
        let c = try TestH2Client(port: proxy.port)
        c.request(1, TestH2Client.get("/slow/400"))
        #expect(eventually { backend.connectionCount == 1 })
        #expect(proxy.stats().http2StreamsActive == 1)
        let stopper = Thread { proxy.stop() }
        stopper.start()
        let r = c.response(1)
        #expect(r.status == "200" && r.body == Array("slow".utf8), "\(r)")
        #expect(r.others.contains { $0.type == 7 && $0.code == 0 } || c.frames { $0.type == 7 }.last?.type == 7)
    }

    /// `http2 on` on a plain listener: a client with prior knowledge (its preface first) speaks
    /// HTTP/2 (h2c), another speaks HTTP/1.1 on the same port; `$http2`, `$server_protocol` and
    /// `$request` say which in the access log.
    @Test func priorKnowledgeOnAPlainListener() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let logPath = NSTemporaryDirectory() + "tether-h2c-\(UUID().uuidString).log"
        defer { unlink(logPath) }
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http {
                log_format p '$request|$server_protocol|$http2';
                upstream backend { server 127.0.0.1:\(backend.port); keepalive 8; }
                server {
                    listen 127.0.0.1:0;
                    http2 on;
                    access_log \(logPath) p;
                    location / { proxy_pass http://backend; }
                }
            }
            """)
        defer { proxy.stop() }
        let h2 = try run("/usr/bin/curl", ["-sS", "--http2-prior-knowledge", "-w", " %{http_version}", "http://127.0.0.1:\(proxy.port)/a"])
        #expect(h2.out == "ok 2", "\(h2.out) \(h2.err)")
        let h1 = try run("/usr/bin/curl", ["-sS", "-w", " %{http_version}", "http://127.0.0.1:\(proxy.port)/b"])
        #expect(h1.out == "ok 1.1")
        let load = try run("/usr/bin/h2load", ["-n", "500", "-c", "2", "-m", "10", "http://127.0.0.1:\(proxy.port)/c"])
        #expect(load.out.contains("500 succeeded, 0 failed, 0 errored"), "\(load.out)")
        #expect(eventually { ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").split(separator: "\n").count >= 502 })
        let lines = ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").split(separator: "\n")
        #expect(lines.first == "GET /a HTTP/2.0|HTTP/2.0|h2c", "\(lines.prefix(2))")
        #expect(lines.dropFirst().first == "GET /b HTTP/1.1|HTTP/1.1|-", "an empty variable logs as -, as nginx")
        #expect(proxy.stats().http2Connections == 3)
    }

    /// keepalive_requests counts streams: the last one allowed gets its answer, with a GOAWAY
    /// naming it, and the connection then closes (counted as keepalive_requests).
    @Test func keepaliveRequestsCountsStreams() throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: Self.config(backend: backend.port, server: "keepalive_requests 3;"))
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port)
        var seen: [TestH2Client.Frame] = []
        for id in [1, 3, 5] as [UInt32] {
            c.request(id, TestH2Client.get("/x"))
            let r = c.response(id)
            #expect(r.status == "200")
            seen += r.others
        }
        if !seen.contains(where: { $0.type == 7 }) { seen += c.frames { $0.type == 7 } }
        let goaway = seen.last { $0.type == 7 }
        #expect(goaway?.code == 0 && goaway?.payload.prefix(4) == [0, 0, 0, 5], "GOAWAY NO_ERROR, last stream 5")
        #expect(c.next() == nil && c.closed)
        #expect(eventually { proxy.stats().downstreamClosed["keepalive_requests"] == 1 })
    }

    /// `listen … ssl proxy_protocol` with HTTP/2: the header's client is every stream's
    /// (`$proxy_protocol_addr`, and `$remote_addr` through `real_ip_header proxy_protocol`).
    @Test func proxyProtocolAddressesReachStreams() throws {
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:0 ssl proxy_protocol;
                    http2 on;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    set_real_ip_from 127.0.0.1;
                    real_ip_header proxy_protocol;
                    location / { return 200 "$proxy_protocol_addr $remote_addr"; }
                }
            }
            """)
        defer { proxy.stop() }
        let c = try TestH2Client(port: proxy.port, proxyHeader: "PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n")
        for id in [1, 3] as [UInt32] {
            c.request(id, TestH2Client.get("/"))
            let r = c.response(id)
            #expect(r.status == "200" && String(decoding: r.body, as: UTF8.self) == "203.0.113.7 203.0.113.7", "\(String(decoding: r.body, as: UTF8.self))")
        }
    }
}
