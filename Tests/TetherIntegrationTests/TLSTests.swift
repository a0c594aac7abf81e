import Foundation
import NIOCore
import Testing
import TetherCore
import TetherTLS
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// TLS at both ends, with real clients: curl and `openssl s_client` (installed by scripts/test),
/// and Python's ssl module where a test needs to see how the connection ends.
@Suite(.serialized) struct TLSTests {
    static let ca = TestPKI.path("ca.pem")

    /// Tether with a TLS listener (localhost's certificate, and a.test's by SNI) in front of a backend.
    /// `logs` gets its error log.
    func withTLSProxy(http: String = "", server: String = "", logs: ErrorLogFile? = nil,
                      _ body: (any ProxyUnderTest, TestBackend) throws -> Void) throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let config = """
            worker_processes 2;
            http {
                \(http)
                upstream backend { server 127.0.0.1:\(backend.port); }
                server {
                    listen 127.0.0.1:0 ssl;
                    server_name localhost;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    \(server)
                    location / { proxy_pass http://backend; }
                    location = /scheme { return 200 "$scheme"; }
                    location = /tls { return 200 "$https $ssl_protocol $ssl_cipher $ssl_server_name $ssl_session_reused"; }
                }
                server {
                    listen 127.0.0.1:0 ssl;
                    server_name a.test;
                    ssl_certificate \(TestPKI.path("a.test.pem"));
                    ssl_certificate_key \(TestPKI.path("a.test.key"));
                    location / { return 200 "a.test server"; }
                }
            }
            """
        let proxy: any ProxyUnderTest = try RunningProxy(config: config, errorLog: logs?.log)
        defer { proxy.stop() }
        try body(proxy, backend)
    }

    func curl(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run("/usr/bin/curl", ["-sS", "--max-time", "10", "--cacert", TLSTests.ca] + args)
    }

    /// Runs `openssl s_client` with `input` on its standard input.
    func sClient(_ args: [String], input: String = "") throws -> (status: Int32, out: String) {
        let r = try Spawn.run("/usr/bin/openssl", ["s_client"] + args, input: input)
        return (r.status, r.out + r.err)
    }

    @Test(arguments: ["1.2", "1.3"])
    func curlKeepsOneTLSConnectionForSeveralRequests(_ version: String) throws {
        try withTLSProxy() { proxy, backend in
            let base = "https://localhost:\(proxy.port)"
            let r = try curl(["-v", "--tlsv\(version)", "--tls-max", version, "--resolve", "localhost:\(proxy.port):127.0.0.1",
                              "\(base)/one", "\(base)/two", "\(base)/scheme"])
            #expect(r.status == 0, "\(r.err)")
            #expect(r.out == "okokhttps")
            #expect(r.err.contains("SSL connection using TLSv\(version)"))
            #expect(r.err.contains("ALPN: server accepted http/1.1"))
            let stats = proxy.stats()
            #expect(stats.acceptedConnections == 1, "three requests on one TLS connection")
            #expect(stats.tlsHandshakes["TLSv\(version)"] == 1)
            #expect(backend.requestCount == 2)
        }
    }

    /// Bulk both ways through TLS: a 4 MB response (records of 16 KiB, backpressure from the
    /// client) and a 3 MB upload arrive whole.
    @Test func largeBodiesCrossTLSIntact() throws {
        try withTLSProxy(http: "client_max_body_size 0;") { proxy, _ in
            let file = NSTemporaryDirectory() + "tether-tls-body-\(UUID().uuidString)"
            defer { unlink(file) }
            let down = try curl(["--resolve", "localhost:\(proxy.port):127.0.0.1", "-o", file, "https://localhost:\(proxy.port)/bytes/4000000"])
            #expect(down.status == 0, "\(down.err)")
            let data = try Data(contentsOf: URL(fileURLWithPath: file))
            var sum = Checksum()
            data.withUnsafeBytes { sum.add($0) }
            #expect(sum == Pattern.checksum(count: 4_000_000))
            // Upload: the backend answers "<count> <checksum>" of what it received.
            var body = Data(count: 3_000_000)
            body.withUnsafeMutableBytes { Pattern.fill($0, offset: 0, count: 3_000_000) }
            try body.write(to: URL(fileURLWithPath: file))
            let up = try curl(["--resolve", "localhost:\(proxy.port):127.0.0.1", "--data-binary", "@\(file)", "-H", "Content-Type: application/octet-stream",
                               "https://localhost:\(proxy.port)/sum"])
            let expected = Pattern.checksum(count: 3_000_000)
            #expect(up.out == "\(expected.count) \(expected.value)", "\(up.out) \(up.err)")
        }
    }

    @Test func sClientSeesTheProtocolALPNAndAResumedSessionOnTheSecondConnection() throws {
        try withTLSProxy() { proxy, _ in
            let session = NSTemporaryDirectory() + "tether-session-\(UUID().uuidString)"
            defer { unlink(session) }
            let request = "GET /scheme HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            let common = ["-connect", "127.0.0.1:\(proxy.port)", "-servername", "localhost", "-alpn", "http/1.1", "-CAfile", TLSTests.ca, "-ign_eof"]
            let first = try sClient(common + ["-sess_out", session], input: request)
            #expect(first.out.contains("New, TLSv1.3"))
            #expect(first.out.contains("ALPN protocol: http/1.1"))
            #expect(first.out.contains("Verify return code: 0 (ok)"))
            #expect(first.out.contains("https"), "the response came through")
            let second = try sClient(common + ["-sess_in", session], input: request)
            #expect(second.out.contains("Reused, TLSv1.3"), "\(second.out)")
            #expect(proxy.stats().tlsSessionsReused == 1)
        }
    }

    /// Without tickets, resumption needs the server's session cache: on with `ssl_session_cache`,
    /// and no resumption at all with `off`.
    @Test(arguments: [true, false])
    func theSessionCacheResumesSessionsWithoutTickets(_ cache: Bool) throws {
        let settings = "ssl_session_tickets off; ssl_session_cache \(cache ? "shared:SSL:1m" : "off");"
        try withTLSProxy(server: settings) { proxy, _ in
            let session = NSTemporaryDirectory() + "tether-session-\(UUID().uuidString)"
            defer { unlink(session) }
            let request = "GET /scheme HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            let common = ["-connect", "127.0.0.1:\(proxy.port)", "-servername", "localhost", "-CAfile", TLSTests.ca, "-ign_eof"]
            _ = try sClient(common + ["-sess_out", session], input: request)
            let second = try sClient(common + ["-sess_in", session], input: request)
            #expect(second.out.contains(cache ? "Reused, TLSv1.3" : "New, TLSv1.3"), "\(second.out.prefix(2000))")
            #expect(proxy.stats().tlsSessionsReused == (cache ? 1 : 0))
        }
    }

    @Test func sslVariablesDescribeTheConnection() throws {
        try withTLSProxy() { proxy, _ in
            let r = try curl(["--tlsv1.2", "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256",
                              "--resolve", "localhost:\(proxy.port):127.0.0.1", "https://localhost:\(proxy.port)/tls"])
            #expect(r.out == "on TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256 localhost .", "\(r.out) \(r.err)")
            let t = try curl(["--resolve", "localhost:\(proxy.port):127.0.0.1", "https://localhost:\(proxy.port)/tls"])
            #expect(t.out.hasPrefix("on TLSv1.3 TLS_") && t.out.hasSuffix(" localhost ."), "\(t.out)")
        }
    }

    @Test func sniPicksTheNamedServersCertificateAndUnknownNamesGetTheDefault() throws {
        try withTLSProxy() { proxy, _ in
            let a = try sClient(["-connect", "127.0.0.1:\(proxy.port)", "-servername", "a.test", "-CAfile", TLSTests.ca, "-verify_hostname", "a.test"])
            #expect(a.out.contains("subject=CN = a.test"))
            #expect(a.out.contains("Verify return code: 0 (ok)"))
            let other = try sClient(["-connect", "127.0.0.1:\(proxy.port)", "-servername", "unknown.test"])
            #expect(other.out.contains("subject=CN = localhost"))
            let page = try curl(["--resolve", "a.test:\(proxy.port):127.0.0.1", "https://a.test:\(proxy.port)/"])
            #expect(page.out == "a.test server")
        }
    }

    @Test func tls11IsRefusedAndCountedAndServiceGoesOn() throws {
        try withTLSProxy() { proxy, _ in
            let r = try sClient(["-connect", "127.0.0.1:\(proxy.port)", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"])
            #expect(r.status != 0)
            #expect(r.out.contains("alert protocol version"))
            #expect(eventually { proxy.stats().tlsHandshakeFailures["protocol"] == 1 })
            let ok = try curl(["--resolve", "localhost:\(proxy.port):127.0.0.1", "https://localhost:\(proxy.port)/scheme"])
            #expect(ok.out == "https")
        }
    }

    /// The shipped default offers Mozilla intermediate's groups only: a client that can only do
    /// secp521r1 or X448 is refused, X25519, P-256 and P-384 are served.
    @Test func defaultKeyExchangeGroupsAreMozillaIntermediates() throws {
        try withTLSProxy() { proxy, _ in
            for group in ["X25519", "prime256v1", "secp384r1"] {
                let r = try sClient(["-connect", "127.0.0.1:\(proxy.port)", "-servername", "localhost", "-groups", group, "-brief"])
                #expect(r.status == 0, "\(group): \(r.out)")
            }
            for group in ["secp521r1", "X448"] {
                for version in ["-tls1_2", "-tls1_3"] {
                    let r = try sClient(["-connect", "127.0.0.1:\(proxy.port)", "-servername", "localhost", "-groups", group, version, "-brief"])
                    #expect(r.status != 0, "\(group) \(version) was accepted: \(r.out)")
                }
            }
        }
    }

    @Test func plainHTTPAndGarbageOnTheTLSPortAreClosedCleanly() throws {
        let logs = ErrorLogFile()
        try withTLSProxy(logs: logs) { proxy, _ in
            for input in ["GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "\u{16}\u{03}\u{01}\u{00}\u{01}xxxxxxxxxxxxxxxxxx", String(repeating: "\u{0}", count: 300)] {
                let c = try proxy.client()
                try c.send(input)
                #expect(c.waitForClose(timeoutMs: 5_000), "closed after \(input.prefix(8))")
            }
            #expect(eventually {
                let s = proxy.stats()
                return s.tlsHandshakeFailures.values.reduce(0, +) == 3 && s.activeConnections == 0
            })
            #expect(proxy.stats().tlsHandshakeFailures["not_tls"] ?? 0 >= 2)
            #expect(proxy.stats().downstreamClosed["tls_error"] == 3)
            #expect(logs.lines.contains { $0.contains("TLS handshake failed (not_tls)") })
            let ok = try curl(["--resolve", "localhost:\(proxy.port):127.0.0.1", "https://localhost:\(proxy.port)/scheme"])
            #expect(ok.out == "https")
        }
    }

    /// Python's ssl module tells a close with close_notify (recv returns b"") from one without
    /// (it raises): so this sees both that keepalive_timeout applies and how the connection ends.
    @Test func keepaliveTimeoutClosesAnIdleTLSConnectionWithCloseNotify() throws {
        try withTLSProxy(http: "keepalive_timeout 1s;") { proxy, _ in
            let script = """
                import socket, ssl, sys, time
                ctx = ssl.create_default_context(cafile=sys.argv[2])
                s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="localhost")
                for i in range(3):
                    s.sendall(b"GET /scheme HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n")
                    data = b""
                    while not data.endswith(b"https"):
                        data += s.recv(4096)
                t = time.monotonic()
                try:
                    rest = s.recv(4096)
                    print("close_notify" if rest == b"" else "data", round(time.monotonic() - t, 2), s.version())
                except ssl.SSLError as e:
                    print("unclean", e)
                """
            let r = try run("/usr/bin/python3", ["-c", script, String(proxy.port), TLSTests.ca])
            let words = r.out.split(separator: " ")
            #expect(words.first == "close_notify", "\(r.out) \(r.err)")
            if words.count == 3, let waited = Double(words[1]) {
                #expect(waited >= 0.9 && waited < 2.0, "closed after \(waited) s")
                #expect(words[2] == "TLSv1.3\n")
            }
            #expect(proxy.stats().downstreamClosed["keepalive_timeout"] == 1)
        }
    }

    @Test func handshakeTimeoutClosesASilentConnection() throws {
        try withTLSProxy(server: "ssl_handshake_timeout 300ms;") { proxy, _ in
            let c = try proxy.client()
            let t = NIODeadline.now()
            #expect(c.waitForClose(timeoutMs: 3_000))
            #expect(seconds(since: t) < 1.5)
            #expect(eventually { proxy.stats().tlsHandshakeFailures["timeout"] == 1 })
        }
    }

    /// A renewed certificate is picked up by a reload (new handshakes get it; the listening
    /// socket stays), and the handshake counters reach the Prometheus page.
    @Test func reloadSwapsTheCertificateAndTheCountersReachTheAdminPage() throws {
        func config(_ cert: String, admin: Int) -> String {
            """
            http {
                server {
                    listen 127.0.0.2:\(admin);
                    location /metrics { stats prometheus; }
                }
                server {
                    listen 127.0.0.1:0 ssl;
                    ssl_certificate \(TestPKI.path("\(cert).pem"));
                    ssl_certificate_key \(TestPKI.path("\(cert).key"));
                    location / { return 200 "hi"; }
                }
            }
            """
        }
        let proxy = try startProxy(config: config("localhost", admin: 0))
        defer { proxy.stop() }
        let admin = proxy.listeningPorts[0]
        let tls = proxy.listeningPorts[1]
        let before = try sClient(["-connect", "127.0.0.1:\(tls)"])
        #expect(before.out.contains("subject=CN = localhost"))
        try proxy.reload(try parse(config("b.test", admin: admin).replacingOccurrences(of: "127.0.0.1:0 ssl", with: "127.0.0.1:\(tls) ssl")))
        let after = try sClient(["-connect", "127.0.0.1:\(tls)"])
        #expect(after.out.contains("subject=CN = b.test"))
        let c = try TestClient(host: "127.0.0.2", port: admin)
        try c.send("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        let page = try c.readResponse().bodyText
        #expect(page.contains("tether_tls_handshakes_total{result=\"ok\",protocol=\"TLSv1.3\"} 2"))
        #expect(page.contains("tether_tls_handshake_failures_total{reason=\"not_tls\"} 0"))
        #expect(page.contains("tether_tls_sessions_reused_total 0"))
    }

    // MARK: Upstream TLS

    /// A TestBackend that serves HTTPS with localhost's certificate.
    func tlsBackend(_ options: TestBackend.Options = .init()) throws -> TestBackend {
        var o = options
        o.tls = (TestPKI.path("localhost.pem"), TestPKI.path("localhost.key"))
        return try TestBackend(options: o)
    }

    func withTLSBackend(backend options: TestBackend.Options = .init(), location: String, logs: ErrorLogFile? = nil,
                        _ body: (any ProxyUnderTest, TestBackend) throws -> Void) throws {
        let backend = try tlsBackend(options)
        defer { backend.stop() }
        let config = """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:0;
                    location / {
                        proxy_pass https://localhost:\(backend.port);
                        \(location)
                    }
                }
            }
            """
        let proxy: any ProxyUnderTest = try RunningProxy(config: config, errorLog: logs?.log)
        defer { proxy.stop() }
        try body(proxy, backend)
    }

    @Test func upstreamTLSConnectionsAreVerifiedAndReused() throws {
        try withTLSBackend(location: "proxy_ssl_verify on; proxy_ssl_trusted_certificate \(TLSTests.ca); proxy_ssl_server_name on;") { proxy, backend in
            let clients = try (0..<4).map { _ in try proxy.client() }
            for i in 0..<200 {
                let c = clients[i % 4]
                let r = try c.get("/x/\(i)")
                #expect(r.status == 200 && r.bodyText == "ok")
            }
            #expect(backend.requestCount == 200)
            #expect(backend.connectionCount == 1, "requests one after another reuse one warm TLS connection")
            let s = proxy.stats()
            let srv = s.upstreams[0].servers[0]
            #expect(srv.counters.tlsHandshakes == 1)
            #expect(srv.counters.reused == 199)
        }
    }

    @Test func aCertificateThatDoesNotVerifyIsA502() throws {
        let logs = ErrorLogFile()
        try withTLSBackend(location: "proxy_ssl_verify on; proxy_ssl_trusted_certificate \(TestPKI.path("other-ca.pem"));", logs: logs) { proxy, backend in
            let c = try proxy.client()
            #expect(try c.get().status == 502)
            #expect(backend.requestCount == 0)
            #expect(proxy.stats().upstreams[0].servers[0].counters.tlsFailures == 1)
            #expect(logs.lines.contains { $0.contains("TLS handshake with upstream") && $0.contains("certificate verify failed") })
        }
        try withTLSBackend(location: "proxy_ssl_verify on; proxy_ssl_trusted_certificate \(TLSTests.ca); proxy_ssl_name b.test;") { proxy, _ in
            let c = try proxy.client()
            #expect(try c.get().status == 502, "localhost's certificate is not b.test's")
        }
    }

    @Test func anIdleUpstreamTLSConnectionClosedByTheBackendIsDroppedAndTheNextResumesTheSession() throws {
        var o = TestBackend.Options()
        o.closeIdleAfterMs = 200
        try withTLSBackend(backend: o, location: "proxy_ssl_trusted_certificate \(TLSTests.ca);") { proxy, backend in
            let c = try proxy.client()
            #expect(try c.get().status == 200)
            #expect(eventually { proxy.stats().upstreams[0].servers[0].counters.closed["peer_closed"] == 1 })
            #expect(proxy.stats().upstreams[0].servers[0].idle == 0)
            #expect(eventually { socketsInState("CLOSE_WAIT", remotePort: backend.port) == 0 })
            #expect(try c.get().status == 200)
            let srv = proxy.stats().upstreams[0].servers[0]
            #expect(srv.counters.tlsHandshakes == 2)
            #expect(srv.counters.tlsResumed == 1, "proxy_ssl_session_reuse resumes the session")
            #expect(backend.connectionCount == 2)
        }
    }

    /// Connections made under different TLS settings are never shared: the pool key has them.
    @Test func locationsWithDifferentTLSSettingsUseSeparatePools() throws {
        let backend = try tlsBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream tlsbackend { server 127.0.0.1:\(backend.port); }
                server {
                    listen 127.0.0.1:0;
                    location /a { proxy_pass https://tlsbackend; proxy_ssl_server_name on; proxy_ssl_name a.test; }
                    location /b { proxy_pass https://tlsbackend; proxy_ssl_server_name on; proxy_ssl_name b.test; }
                    location /c { proxy_pass https://tlsbackend; proxy_ssl_server_name on; proxy_ssl_name a.test; }
                }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        for path in ["/a", "/b", "/c", "/a", "/b", "/c"] {
            #expect(try c.get("\(path)").status == 200)
        }
        #expect(backend.requestCount == 6)
        #expect(backend.connectionCount == 2, "one pool for SNI a.test (/a and /c), one for b.test")
        let srv = proxy.stats().upstreams.first { $0.name == "tlsbackend" }!.servers[0]
        #expect(srv.counters.tlsHandshakes == 2)
        #expect(srv.counters.reused == 4)
    }

    /// A reload re-reads `proxy_ssl_trusted_certificate` even when the directive is unchanged:
    /// a CA file replaced on disk applies to the connections opened after the reload.
    @Test func reloadRereadsTheUpstreamTrustedCertificates() throws {
        let backend = try tlsBackend()
        defer { backend.stop() }
        let ca = NSTemporaryDirectory() + "tether-ca-\(UUID().uuidString).pem"
        defer { unlink(ca) }
        try FileManager.default.copyItem(atPath: TestPKI.path("other-ca.pem"), toPath: ca)
        let port = freePort()
        let config = """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:\(port);
                    location / { proxy_pass https://127.0.0.1:\(backend.port); proxy_ssl_verify on; proxy_ssl_trusted_certificate \(ca); proxy_ssl_name localhost; }
                }
            }
            """
        let proxy = try startProxy(config: config)
        defer { proxy.stop() }
        let c = try proxy.client()
        #expect(try c.get().status == 502, "the other CA does not verify the backend")
        try FileManager.default.removeItem(atPath: ca)
        try FileManager.default.copyItem(atPath: TestPKI.path("ca.pem"), toPath: ca)
        try proxy.reload(try parse(config))
        let d = try proxy.client()
        #expect(try d.get().status == 200)
    }

    @Test func sessionReuseOffMakesFullHandshakes() throws {
        var o = TestBackend.Options()
        o.closeAfterRequests = 1
        try withTLSBackend(backend: o, location: "proxy_ssl_session_reuse off;") { proxy, _ in
            let c = try proxy.client()
            for _ in 0..<3 {
                #expect(try c.get().status == 200)
            }
            let srv = proxy.stats().upstreams[0].servers[0]
            #expect(srv.counters.tlsHandshakes == 3)
            #expect(srv.counters.tlsResumed == 0)
        }
    }

    /// A TLS backend that marks a response's end by closing: with close_notify the response is
    /// complete; without it (a ragged EOF) it may be truncated, and the client must be able to tell.
    @Test(arguments: [true, false])
    func aCloseDelimitedUpstreamResponseIsCompleteOnlyWithCloseNotify(_ clean: Bool) throws {
        let script = """
            import socket, ssl, sys
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(sys.argv[1], sys.argv[2])
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(8)
            print(srv.getsockname()[1], flush=True)
            conn = ctx.wrap_socket(srv.accept()[0], server_side=True)
            data = b""
            while b"\\r\\n\\r\\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nConnection: close\\r\\n\\r\\n" + b"x" * 5000)
            if sys.argv[3] == "clean":
                conn.unwrap()  # sends close_notify
            conn.close()       # without unwrap: a TCP close and no close_notify
            """
        let p = try Spawn.start("/usr/bin/python3", ["-c", script, TestPKI.path("localhost.pem"), TestPKI.path("localhost.key"), clean ? "clean" : "ragged"],
                                stdout: .pipe)
        defer { p.terminate(); p.wait() }
        let port = Int((p.readLine() ?? "").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        let logs = ErrorLogFile()
        let config = """
            worker_processes 1;
            http { server { listen 127.0.0.1:0; location / { proxy_pass https://127.0.0.1:\(port); } } }
            """
        let proxy: any ProxyUnderTest = try RunningProxy(config: config, errorLog: logs.log)
        defer { proxy.stop() }
        let c = try proxy.client()
        try c.sendGET()
        if clean {
            let r = try c.readResponse()
            #expect(r.status == 200 && r.body.count == 5000 && r.header("transfer-encoding") == "chunked")
        } else {
            #expect(throws: (any Error).self, "the chunked body has no end") { try c.readResponse() }
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(logs.lines.contains { $0.contains("without close_notify") && $0.contains("may be truncated") })
        }
    }

    /// To a TLS client that reads until the close (HTTP/1.0), the end of a close-delimited response
    /// is Tether's close_notify. So when the backend's response was cut short, Tether must not send
    /// one: the client sees the connection reset (or at least a TCP close without close_notify),
    /// never an orderly end.
    @Test(arguments: [true, false])
    func aTruncatedResponseToATLSClientEndsWithoutCloseNotify(_ orderly: Bool) throws {
        let backend = try ScriptedBackend { c in
            guard c.read(through: "\r\n\r\n") != nil else { c.close(); return }
            c.send(Array("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".utf8) + [UInt8](repeating: 120, count: 1000))
            if orderly { c.close() } else { c.reset() }
        }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http { server {
                listen 127.0.0.1:0 ssl;
                ssl_certificate \(TestPKI.path("localhost.pem"));
                ssl_certificate_key \(TestPKI.path("localhost.key"));
                location / { proxy_pass http://127.0.0.1:\(backend.port); }
            } }
            """)
        defer { proxy.stop() }
        // Prints how the TLS stream ended: "close_notify", "ragged" (a TCP close without it) or "reset".
        let script = """
            import socket, ssl, sys
            ctx = ssl.create_default_context(cafile=sys.argv[2])
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="localhost", suppress_ragged_eofs=False)
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            data = b""
            try:
                while True:
                    d = s.recv(65536)
                    if not d:
                        print("close_notify", len(data)); break
                    data += d
            except ssl.SSLEOFError:
                print("ragged", len(data))
            except ConnectionResetError:
                print("reset", len(data))
            """
        for _ in 0..<3 {
            let r = try run("/usr/bin/python3", ["-c", script, String(proxy.port), TLSTests.ca])
            let words = r.out.split(separator: " ")
            // A reset may reach Python's ssl module as an EOF without close_notify: either way the
            // client can tell that the stream did not end as it should.
            if orderly {
                #expect(words.first == "close_notify", "\(r.out) \(r.err)")
            } else {
                #expect(words.first == "ragged" || words.first == "reset", "\(r.out) \(r.err)")
            }
            #expect(words.count == 2 && Int(words[1].trimmingCharacters(in: .whitespacesAndNewlines))! > 1000, "\(r.out)")
        }
    }

    /// The binary the tests built (and the release one, when bench/ or the README's command built
    /// it: both link the same way) uses the system's libssl.so.3, not a bundled BoringSSL.
    @Test func theBinaryLinksTheSystemOpenSSL() throws {
        var binaries = [try tetherExecutable().path]
        let release = packageRoot() + "/.build/release/tether"
        if FileManager.default.fileExists(atPath: release) { binaries.append(release) }
        for b in binaries {
            let r = try run("/usr/bin/ldd", [b])
            #expect(r.out.contains("libssl.so.3"), "\(b)")
            #expect(r.out.contains("libcrypto.so.3"), "\(b)")
            #expect(!r.out.lowercased().contains("boringssl"), "\(b)")
        }
    }

    /// Issue 15: the binary serves on Tether's own loop and holds no SwiftNIO code at all (the
    /// test backends use SwiftNIO; Tether does not).
    @Test func theBinaryContainsNoSwiftNIO() throws {
        let r = try run("/usr/bin/nm", [try tetherExecutable().path])
        #expect(r.status == 0 && r.out.contains("TetherIO"), "nm read the symbols")
        for module in ["NIOCore", "NIOPosix", "NIOConcurrencyHelpers", "NIOEmbedded"] {
            #expect(!r.out.contains(module), "\(module) is linked")
        }
    }
}
