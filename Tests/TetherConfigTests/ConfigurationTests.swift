import Foundation
import Testing
@testable import TetherConfig

/// Resolves numeric hosts and localhost only: tests never ask DNS.
@Sendable func offlineResolver(_ host: String) -> String? {
    if host == "localhost" { return "127.0.0.1" }
    return Builder.isNumeric(host) ? host : nil
}

func load(_ text: String) throws -> Configuration {
    switch Configuration.parse(text, file: "t.conf", resolver: offlineResolver) {
    case .success(let c): return c
    case .failure(let e): throw e
    }
}

/// A folder under /tmp that is removed at the end.
final class TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "tether-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func write(_ name: String, _ text: String) {
        let full = path + "/" + name
        try! FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try! text.write(toFile: full, atomically: true, encoding: .utf8)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

@Suite struct ConfigurationTests {
    /// What an nginx user writes for a keepalive reverse proxy loads unchanged.
    @Test func nginxKeepaliveProxyLoads() throws {
        let c = try load("""
            worker_processes auto;
            error_log stderr warn;
            events { worker_connections 1024; }
            http {
                keepalive_timeout 65;
                upstream backend {
                    server 127.0.0.1:8081 weight=2 max_fails=3 fail_timeout=30s;
                    server 127.0.0.1:8082 backup;
                    keepalive 64;
                }
                server {
                    listen 8080;
                    server_name example.com *.example.org;
                    location / {
                        proxy_pass http://backend;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_set_header Host $host;
                        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                    }
                }
            }
            """)
        #expect(c.workerConnections == 1024)
        #expect(c.errorLog == .init(path: "stderr", level: .warn))
        let u = try #require(c.upstream(named: "backend"))
        #expect(u.keepalive == 64)
        #expect(u.servers.map(\.port) == [8081, 8082])
        #expect(u.servers[0].weight == 2 && u.servers[0].maxFails == 3 && u.servers[0].failTimeoutMs == 30_000)
        #expect(u.servers[1].backup)
        let server = try #require(c.servers.first)
        #expect(server.listens.map(\.addressText) == ["0.0.0.0:8080"])
        #expect(server.names == [.exact("example.com"), .wildcardPrefix(".example.org")])
        let loc = try #require(server.locations.first)
        #expect(loc.settings.keepaliveTimeoutMs == 65_000)
        #expect(loc.settings.keepaliveHeaderTimeoutMs == 65_000)
        guard case .proxy(let pass) = loc.action else { Issue.record("no proxy"); return }
        #expect(pass.upstream == "backend" && pass.uri == nil)
        #expect(loc.settings.proxySetHeaders.map(\.name) == ["Host", "Connection", "X-Forwarded-For"])
        #expect(loc.settings.proxySetHeaders[0].value.parts == [.variable(.host)])
        #expect(loc.settings.proxySetHeaders[1].value.isEmpty)
    }

    @Test func defaultsAreNginxsExceptKeepAlive() throws {
        let c = try load("http { server { listen 127.0.0.1:8080; location / { return 200 ok; } } }")
        let s = c.servers[0].locations[0].settings
        #expect(s.keepaliveTimeoutMs == 75_000)
        #expect(s.keepaliveHeaderTimeoutMs == 75_000)
        #expect(s.keepaliveRequests == 1000)
        #expect(s.keepaliveTimeMs == 3_600_000)
        #expect(s.clientMaxBodySize == 1 << 20)
        #expect(s.largeClientHeaderBuffers == (4, 8192))
        #expect(s.proxyHTTPVersion == "1.1")
        #expect(s.proxyNextUpstream == [.error, .timeout])
        #expect(s.proxySetHeaders.map(\.name) == ["Host"])
        #expect(c.workerConnections == 512)
        #expect(c.workerProcesses == .auto)
    }

    @Test func inheritanceHttpServerLocation() throws {
        let c = try load("""
            http {
                keepalive_timeout 10s 5s;
                send_timeout 7s;
                proxy_set_header X-A a;
                server {
                    keepalive_requests 5;
                    location /one { send_timeout 3s; return 200; }
                    location /two { proxy_set_header X-B b; return 200; }
                    location /three { keepalive_header off; return 200; }
                }
            }
            """)
        let server = c.servers[0]
        #expect(server.settings.keepaliveRequests == 5)
        let one = server.locations[0].settings, two = server.locations[1].settings, three = server.locations[2].settings
        #expect(one.sendTimeoutMs == 3_000 && two.sendTimeoutMs == 7_000)
        #expect(one.keepaliveTimeoutMs == 10_000 && one.keepaliveHeaderTimeoutMs == 5_000 && one.keepaliveRequests == 5)
        #expect(one.proxySetHeaders.map(\.name) == ["Host", "X-A"])
        // A level that sets proxy_set_header replaces the inherited list (nginx's rule); Host stays.
        #expect(two.proxySetHeaders.map(\.name) == ["Host", "X-B"])
        #expect(three.keepaliveHeaderTimeoutMs == nil)
    }

    @Test func proxyPassForms() throws {
        let c = try load("""
            http {
                upstream app { server localhost:9000; keepalive 8; keepalive_timeout 30s; keepalive_requests 50; keepalive_time 10m; least_conn; }
                server {
                    location = /exact { proxy_pass http://app/replaced; }
                    location /api/ { proxy_pass http://127.0.0.1:9001/v1/; }
                    location / { proxy_pass http://127.0.0.1:9001; }
                }
            }
            """)
        let app = try #require(c.upstream(named: "app"))
        #expect(app.servers[0].address == "127.0.0.1")
        #expect(app.keepalive == 8 && app.keepaliveTimeoutMs == 30_000 && app.keepaliveRequests == 50 && app.keepaliveTimeMs == 600_000)
        #expect(app.balancing == .leastConn)
        let locs = c.servers[0].locations
        #expect(locs[0].match == .exact)
        guard case .proxy(let p0) = locs[0].action, case .proxy(let p1) = locs[1].action, case .proxy(let p2) = locs[2].action else {
            Issue.record("expected proxies"); return
        }
        #expect(p0.upstream == "app" && p0.uri == "/replaced")
        #expect(p1.upstream == "127.0.0.1:9001" && p1.uri == "/v1/" && p1.proxyHost == "127.0.0.1:9001")
        #expect(p2.upstream == "127.0.0.1:9001" && p2.uri == nil)
        // One implicit upstream for the two identical addresses.
        #expect(c.upstreams.filter(\.implicit).count == 1)
    }

    @Test func quotingCommentsAndVariables() throws {
        let c = try load("""
            http { # a comment
                log_format main '$remote_addr "$request"' ' $status';
                server {
                    server_name a#b;  # '#' inside a word is not a comment
                    location / { return 200 "semi;colon \\"quoted\\" ${host}x"; }
                }
            }
            """)
        #expect(c.servers[0].names == [.exact("a#b")])
        #expect(c.logFormats["main"]!.template.source == "$remote_addr \"$request\" $status")
        guard case .respond(let r) = c.servers[0].locations[0].action else { Issue.record("no return"); return }
        #expect(r.text!.parts == [.literal("semi;colon \"quoted\" "), .variable(.host), .literal("x")])
    }

    @Test func includeGlobSortedAndRelative() throws {
        let dir = TempDir()
        dir.write("main.conf", "http {\n    include conf.d/*.conf;\n}\n")
        dir.write("conf.d/b.conf", "server { listen 127.0.0.1:8002; }\n")
        dir.write("conf.d/a.conf", "server { listen 127.0.0.1:8001; }\n")
        dir.write("conf.d/ignored.txt", "garbage {")
        let c = try Configuration.load(path: dir.path + "/main.conf", resolver: offlineResolver).get()
        #expect(c.servers.map { $0.listens[0].port } == [8001, 8002])
    }

    @Test func includeErrorsPointIntoTheIncludedFile() {
        let dir = TempDir()
        dir.write("main.conf", "http {\n    include extra.conf;\n}\n")
        dir.write("extra.conf", "\n\nkeepalive_timeout never;\n")
        guard case .failure(let e) = Configuration.load(path: dir.path + "/main.conf", resolver: offlineResolver) else { Issue.record("loaded"); return }
        #expect(e.errors.map(\.description) == [
            "\(dir.path)/extra.conf:3: invalid value \"never\" in \"keepalive_timeout\" directive, it must be a time (for example 500ms, 30s, 1h30m)",
        ])
    }

    @Test func includeCycleDetected() {
        let dir = TempDir()
        dir.write("a.conf", "include b.conf;\n")
        dir.write("b.conf", "\ninclude a.conf;\n")
        guard case .failure(let e) = Configuration.load(path: dir.path + "/a.conf", resolver: offlineResolver) else { Issue.record("loaded"); return }
        #expect(e.errors.map(\.description) == ["\(dir.path)/b.conf:2: include cycle: \"\(dir.path)/a.conf\" is already being read"])
    }

    @Test func missingMainFile() {
        guard case .failure(let e) = Configuration.load(path: "/nonexistent/tether.conf") else { Issue.record("loaded"); return }
        #expect(e.description == "open() \"/nonexistent/tether.conf\" failed (2: No such file or directory)")
    }

    @Test func bufferingDirectivesAreNginxs() throws {
        let c = try load("""
        http {
            proxy_buffers 4 16k;
            server {
                listen 80;
                client_body_buffer_size 64k;
                location /a { proxy_buffering off; proxy_request_buffering off; proxy_pass http://127.0.0.1:1; }
                location /b { proxy_max_temp_file_size 0; proxy_buffer_size 8k; proxy_temp_path /tmp 1 2; client_body_temp_path /tmp; proxy_pass http://127.0.0.1:1; }
            }
        }
        """)
        #expect(c.warnings.isEmpty)
        let a = c.servers[0].locations[0].settings, b = c.servers[0].locations[1].settings
        #expect(!a.proxyBuffering && !a.proxyRequestBuffering && a.clientBodyBufferSize == 64 << 10 && a.proxyBuffers == (4, 16 << 10))
        #expect(b.proxyBuffering && b.proxyRequestBuffering && b.proxyMaxTempFileSize == 0 && b.proxyBufferSize == 8 << 10 && b.proxyTempPath == "/tmp")
        // nginx's defaults, but for proxy_buffer_size (one of Tether's buffers).
        let d = HTTPSettings()
        #expect(d.proxyBuffering && d.proxyRequestBuffering && d.clientBodyBufferSize == 16 << 10 && d.proxyBuffers == (8, 4 << 10)
                && d.proxyMaxTempFileSize == 1 << 30 && d.proxyBufferSize == 16 << 10)
    }

    @Test func resolveNeedsAResolverAndIsResolvedAtRunTime() throws {
        let c = try load("""
        http {
            resolver 10.0.0.53 [::1]:5353 valid=30s ipv6=on;
            resolver_timeout 2s;
            upstream a { server api.internal:8080 resolve weight=2; server 127.0.0.1:81; }
            upstream b { resolver 127.0.0.1:53; server web.internal resolve; }
        }
        """)
        let a = try #require(c.upstream(named: "a")), b = try #require(c.upstream(named: "b"))
        #expect(a.servers[0].resolve && a.servers[0].address == "" && a.servers[0].weight == 2 && !a.servers[1].resolve)
        #expect(a.resolver?.servers == [.init(host: "10.0.0.53", port: 53), .init(host: "::1", port: 5353)])
        #expect(a.resolver?.validMs == 30_000 && a.resolver?.ipv6 == true && a.resolver?.timeoutMs == 2_000)
        #expect(b.resolver?.servers == [.init(host: "127.0.0.1", port: 53)] && b.resolver?.timeoutMs == 2_000)
        #expect(c.effectiveText().contains("        resolver 10.0.0.53:53 [::1]:5353 valid=30s ipv6=on;\n        resolver_timeout 2s;\n"))
    }

    @Test func edgeDirectivesAreNginxs() throws {
        let c = try load("""
        http {
            set_real_ip_from 10.0.0.0/8;
            set_real_ip_from 2001:db8::/32;
            real_ip_header X-Forwarded-For;
            upstream u { server 127.0.0.1:81 proxy_protocol; }
            server {
                listen 127.0.0.1:8443 ssl proxy_protocol;
                ssl_certificate a.pem; ssl_certificate_key a.key;
                location / { real_ip_recursive on; set_real_ip_from 192.0.2.1; proxy_pass http://u; }
            }
            server { listen 127.0.0.1:8443; server_name b; ssl_certificate a.pem; ssl_certificate_key a.key; }
        }
        """)
        #expect(c.servers[0].listens[0].proxyProtocol && c.servers[1].listens[0].proxyProtocol, "proxy_protocol belongs to the address")
        let server = c.servers[0].settings, loc = c.servers[0].locations[0].settings
        #expect(server.realIPFrom.map(\.source) == ["10.0.0.0/8", "2001:db8::/32"] && server.realIPHeader == "x-forwarded-for" && !server.realIPRecursive)
        #expect(loc.realIPFrom.map(\.source) == ["192.0.2.1"] && loc.realIPRecursive, "a level's own list replaces the inherited one, as nginx's")
        #expect(c.upstream(named: "u")?.servers[0].proxyProtocol == true)
        let text = c.effectiveText()
        #expect(text.contains("listen 127.0.0.1:8443 ssl proxy_protocol default_server") || text.contains("listen 127.0.0.1:8443 ssl proxy_protocol"))
        #expect(text.contains("server 127.0.0.1:81 weight=1 max_fails=1 fail_timeout=10s proxy_protocol;"))
        #expect(text.contains("set_real_ip_from 192.0.2.1;") && text.contains("real_ip_recursive on;"))
    }

    @Test func effectiveTextReloadsToTheSameConfiguration() throws {
        let c = try load("""
            http {
                upstream up { server 127.0.0.1:9000 weight=3; keepalive 4; }
                upstream capped { server 127.0.0.2:9000 max_conns=64; queue 100; health_check interval=2s fails=3 passes=2 uri=/healthz match=200-299; }
                server {
                    listen 127.0.0.1:8080 default_server;
                    server_name a.example;
                    keepalive_timeout 1h30m 20s;
                    location = /x { return 301 "https://example.com/"; }
                    location / { proxy_pass http://up; proxy_set_header X-Real-IP $remote_addr; }
                }
            }
            """)
        let text = c.effectiveText()
        #expect(text.contains("keepalive_timeout 1h30m 20s;"))
        #expect(text.contains("server 127.0.0.2:9000 weight=1 max_fails=1 fail_timeout=10s max_conns=64;"))
        #expect(text.contains("queue 100 timeout=1m;"))
        #expect(text.contains("health_check interval=2s fails=3 passes=2 uri=/healthz match=200-299 timeout=2s;"))
        #expect(c.upstreams.first { $0.name == "capped" }?.queue == .init(size: 100, timeoutMs: 60_000))
        #expect(c.upstreams.first { $0.name == "capped" }?.servers[0].maxConns == 64)
        // nginx Plus's place for it: a location's health_check checks the upstream it proxies to.
        let inLocation = try load("http { upstream up { server 127.0.0.1:9000; } server { location / { proxy_pass http://up; health_check uri=/ping fails=2; } } }")
        #expect(inLocation.upstreams[0].healthCheck?.uri == "/ping" && inLocation.upstreams[0].healthCheck?.fails == 2)
        #expect(text.contains("server 127.0.0.1:9000 weight=3 max_fails=1 fail_timeout=10s;"))
        let again = try load(text)
        #expect(again.effectiveText().dropFirst(again.effectiveText().firstIndex(of: "\n")!.utf16Offset(in: text)) ==
                text.dropFirst(text.firstIndex(of: "\n")!.utf16Offset(in: text)))
    }

    /// Random and truncated inputs give a configuration or a located error, never a crash.
    @Test func randomAndTruncatedInputsNeverCrash() {
        let sample = """
            worker_processes 2; events { worker_connections 64; }
            http { log_format f '$remote_addr ${status}'; upstream u { server 127.0.0.1:1 weight=2; keepalive 2; }
            server { listen 127.0.0.1:8080 default_server; server_name "x y" *.z; location = /a { return 200 "t\\"x"; }
            location / { proxy_pass http://u/p; proxy_set_header A $http_x_y; } } } # end
            """
        let bytes = Array(sample.utf8)
        var rng = SplitMix(seed: 42)
        var outcomes = 0
        for cut in 0...bytes.count {
            outcomes += check(String(decoding: bytes[0..<cut], as: UTF8.self))
        }
        let alphabet = Array("{};\"'\\#$ \n\tabcdefghijklmnopqrstuvwxyz0123456789=:/._-*".utf8)
        for _ in 0..<3000 {
            var b = bytes
            for _ in 0..<Int(rng.next() % 6 + 1) {
                let i = Int(rng.next() % UInt64(b.count))
                switch rng.next() % 3 {
                case 0: b[i] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                case 1: b.remove(at: i)
                default: b.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: i)
                }
            }
            outcomes += check(String(decoding: b, as: UTF8.self))
        }
        for _ in 0..<1000 {
            let n = Int(rng.next() % 200)
            let b = (0..<n).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }
            outcomes += check(String(decoding: b, as: UTF8.self))
        }
        #expect(outcomes == bytes.count + 1 + 4000)
    }

    private func check(_ text: String) -> Int {
        switch Configuration.parse(text, file: "f.conf", resolver: offlineResolver) {
        case .success: return 1
        case .failure(let e):
            // Every error but a missing main file has a place.
            #expect(!e.errors.isEmpty)
            #expect(e.errors.allSatisfy { $0.location?.file == "f.conf" && $0.location!.line >= 1 }, "\(e)")
            return 1
        }
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct TLSConfigTests {
    @Test func sslDirectivesInheritFromHTTPToServerAndPairCertificatesWithKeys() throws {
        let text = """
            http {
                ssl_protocols TLSv1.3;
                ssl_session_cache shared:SSL:10m;
                ssl_certificate rsa.pem;
                ssl_certificate_key rsa.key;
                ssl_certificate ecdsa.pem;
                ssl_certificate_key ecdsa.key;
                proxy_ssl_verify on;
                server {
                    listen 8443 ssl;
                    ssl_session_tickets off;
                    location / { proxy_pass https://127.0.0.1; proxy_ssl_name backend.internal; }
                }
                server {
                    listen 8444 ssl;
                    ssl_certificate /etc/other.pem;
                    ssl_certificate_key /etc/other.key;
                }
            }
            """
        let c = try Configuration.parse(text, file: "/etc/tether/t.conf", resolver: offlineResolver).get()
        let a = c.servers[0].settings.ssl
        #expect(a.protocols == ["TLSv1.3"])
        #expect(a.sessionCache == .sessions(10 * 1024 * 1024 / 256))
        #expect(a.sessionTickets == false)
        #expect(a.certificates.map(\.certificate) == ["/etc/tether/rsa.pem", "/etc/tether/ecdsa.pem"], "relative to the main file's folder")
        #expect(a.certificates.map(\.key) == ["/etc/tether/rsa.key", "/etc/tether/ecdsa.key"])
        #expect(c.servers[0].listens[0].ssl)
        let b = c.servers[1].settings.ssl
        #expect(b.certificates.map(\.certificate) == ["/etc/other.pem"], "a server's own list replaces the inherited one")
        #expect(b.sessionTickets == true)
        let loc = c.servers[0].locations[0]
        #expect(loc.settings.proxySSL.verify)
        #expect(loc.settings.proxySSL.name == "backend.internal")
        guard case .proxy(let pass) = loc.action else { Issue.record("no proxy_pass"); return }
        #expect(pass.isTLS && pass.host == "127.0.0.1")
        #expect(c.upstreams.first { $0.name == pass.upstream }?.servers[0].port == 443, "https defaults to port 443")
    }
}
