import Foundation
import Testing
import TetherConfig
@testable import TetherCore
import TetherHTTP
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Behind a load balancer: `listen … proxy_protocol`, `set_real_ip_from` / `real_ip_header`,
/// and `server … proxy_protocol` towards a backend.
@Suite struct ProxyProtocolIntegrationTests {
    static let show = #"return 200 "pp=$proxy_protocol_addr:$proxy_protocol_port to=$proxy_protocol_server_addr:$proxy_protocol_server_port remote=$remote_addr own=$realip_remote_addr";"#

    func withEdge(listen: String = "proxy_protocol", server: String = "", log: ErrorLogFile? = nil,
                  _ body: (any ProxyUnderTest) throws -> Void) throws {
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http {
                client_header_timeout 500ms;
                server {
                    listen 127.0.0.1:0 \(listen);
                    \(server)
                    location / { \(Self.show) }
                    location /blocked { deny 203.0.113.5; allow all; return 200 "in"; }
                }
            }
            """, errorLog: log?.log)
        defer { proxy.stop() }
        try body(proxy)
    }

    @Test func version1AndVersion2NameTheClient() throws {
        try withEdge { proxy in
            let c = try proxy.client()
            try c.send("PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try c.readResponse().bodyText == "pp=192.0.2.1:56324 to=198.51.100.7:443 remote=127.0.0.1 own=127.0.0.1")
            // Later requests on the connection keep what the header said.
            #expect(try c.get("/").bodyText.hasPrefix("pp=192.0.2.1:56324 "))

            let v2 = ProxyProtocol.v2Signature + [0x21, 0x21, 0, 36] + [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [9]
                + [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [1] + [0x1F, 0x90, 0x01, 0xBB]
            let d = try proxy.client()
            try d.send(v2 + Array("GET / HTTP/1.1\r\nHost: t\r\n\r\n".utf8))
            #expect(try d.readResponse().bodyText == "pp=2001:db8::9:8080 to=2001:db8::1:443 remote=127.0.0.1 own=127.0.0.1")
            #expect(proxy.stats().proxyProtocolHeaders == 2)
        }
    }

    /// A header that arrives in pieces is waited for; nothing is answered before it is whole.
    @Test(arguments: [1, 6, 20, 44])
    func aHeaderInPiecesIsWaitedFor(split: Int) throws {
        try withEdge { proxy in
            let header = Array("PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n".utf8)
            let c = try proxy.client()
            try c.send(Array(header[0..<split]))
            // Nothing comes back while the header is incomplete (the connection stays open).
            #expect(c.readRawToClose(timeoutMs: 150).isEmpty)
            try c.send(Array(header[split...]) + Array("GET / HTTP/1.1\r\nHost: t\r\n\r\n".utf8))
            #expect(try c.readResponse().bodyText.hasPrefix("pp=192.0.2.1:56324 "))
        }
    }

    /// Malformed, missing and late headers close the connection before HTTP: no answer at all,
    /// a count, an error-log line.
    @Test func badHeadersNeverReachHTTP() throws {
        let log = ErrorLogFile(level: .error)
        try withEdge(log: log) { proxy in
            for bad in ["PROXY TCP4 192.0.2.300 198.51.100.7 1 2\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
                        "GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                        "PROXY TCP4 " + String(repeating: "1", count: 120) + "\r\n"] {
                let c = try proxy.client()
                try c.send(bad)
                #expect(c.readRawToClose(timeoutMs: 2_000).isEmpty, "\(bad.prefix(20))")
            }
            // Nothing at all within client_header_timeout.
            let quiet = try proxy.client()
            #expect(quiet.waitForClose(timeoutMs: 3_000))
            #expect(eventually { proxy.stats().downstreamClosed["proxy_protocol"] == 4 })
            #expect(proxy.stats().requests == 0)
            let lines = log.lines
            #expect(lines.contains { $0.contains("broken header: a bad address or port in the PROXY protocol v1 header while reading PROXY protocol") })
            #expect(lines.contains { $0.contains("broken header: no PROXY protocol header") })
            #expect(lines.contains { $0.contains("client timed out while reading PROXY protocol header") })
        }
    }

    /// Before TLS: curl's --haproxy-protocol sends a v1 header, then the handshake.
    @Test func theHeaderComesBeforeTLS() throws {
        try withEdge(listen: "ssl proxy_protocol", server: """
            server_name localhost;
            ssl_certificate \(TestPKI.path("localhost.pem"));
            ssl_certificate_key \(TestPKI.path("localhost.key"));
            """) { proxy in
            let out = try run("/usr/bin/curl", ["-sS", "--max-time", "10", "--haproxy-protocol", "--cacert", TestPKI.path("ca.pem"),
                                                "--resolve", "localhost:\(proxy.port):127.0.0.1", "https://localhost:\(proxy.port)/"]).out
            #expect(out.hasPrefix("pp=127.0.0.1:"))
            #expect(proxy.stats().tlsHandshakes["TLSv1.3"] == 1)
        }
    }

    /// `real_ip_header proxy_protocol` from a trusted peer: the header's client is `$remote_addr`,
    /// for `allow`/`deny` too; from an untrusted peer it is not.
    @Test func realIPFromTheProxyProtocol() throws {
        try withEdge(server: "set_real_ip_from 127.0.0.0/8; real_ip_header proxy_protocol;") { proxy in
            let c = try proxy.client()
            try c.send("PROXY TCP4 203.0.113.5 198.51.100.7 4000 80\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try c.readResponse().bodyText == "pp=203.0.113.5:4000 to=198.51.100.7:80 remote=203.0.113.5 own=127.0.0.1")
            #expect(try c.get("/blocked").status == 403)
        }
        try withEdge(server: "set_real_ip_from 192.0.2.0/24; real_ip_header proxy_protocol;") { proxy in
            let c = try proxy.client()
            try c.send("PROXY TCP4 203.0.113.5 198.51.100.7 4000 80\r\nGET /blocked HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try c.readResponse().status == 200, "an untrusted peer's header changes nothing")
        }
    }
}

@Suite struct RealIPTests {
    /// X-Forwarded-For from a trusted peer: the rightmost address, or with real_ip_recursive the
    /// rightmost untrusted one; the backend sees it in X-Forwarded-For and the log in $remote_addr.
    @Test(arguments: [
        ("", "203.0.113.5, 10.1.1.1", "10.1.1.1"),
        ("real_ip_recursive on;", "203.0.113.5, 10.1.1.1", "203.0.113.5"),
        ("real_ip_recursive on;", "10.2.2.2, 10.1.1.1", "10.2.2.2"),
        ("real_ip_recursive on;", "198.51.100.1, not-an-address, 10.1.1.1", "127.0.0.1"),
        ("", "", "127.0.0.1"),
    ])
    func xForwardedFor(extra: String, header: String, expected: String) throws {
        try withProxy(server: "set_real_ip_from 127.0.0.1; set_real_ip_from 10.0.0.0/8; real_ip_header X-Forwarded-For; \(extra)",
                      location: "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Seen $remote_addr;") { proxy, backend in
            let c = try proxy.client()
            try c.send("GET / HTTP/1.1\r\nHost: t\r\n" + (header.isEmpty ? "" : "X-Forwarded-For: \(header)\r\n") + "\r\n")
            #expect(try c.readResponse().status == 200)
            let seen = backend.requests.last
            #expect(seen?.header("x-seen") == expected)
            #expect(seen?.header("x-forwarded-for") == (header.isEmpty ? expected : "\(header), \(expected)"))
        }
    }

    /// X-Real-IP (the default header) from a trusted peer decides `allow`/`deny`; from an
    /// untrusted one it does not.
    @Test func allowAndDenySeeTheRealAddress() throws {
        for (trusted, expected) in [("127.0.0.1", 403), ("192.0.2.0/24", 200)] {
            try withProxy(server: "set_real_ip_from \(trusted);", location: "deny 203.0.113.5; allow all;") { proxy, _ in
                let c = try proxy.client()
                try c.send("GET / HTTP/1.1\r\nHost: t\r\nX-Real-IP: 203.0.113.5\r\n\r\n")
                #expect(try c.readResponse().status == expected, "set_real_ip_from \(trusted)")
                // The next request on the connection, without the header, is the peer's again.
                #expect(try c.get("/").status == 200)
            }
        }
    }
}

/// `server … proxy_protocol`: each request's connection starts with a v2 header naming its
/// client, and is never reused.
@Suite struct UpstreamProxyProtocolTests {
    @Test func eachRequestGoesOnAConnectionOfItsOwnWithItsClientsHeader() throws {
        let backend = try ScriptedBackend { conn in
            guard let head = conn.read(count: 16) else { return }
            let rest = Int(head[14]) << 8 | Int(head[15])
            guard conn.read(count: rest) != nil, conn.read(through: "\r\n\r\n") != nil else { return }
            conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            _ = conn.readToEOF()
        }
        defer { backend.stop() }
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http {
                upstream b { server 127.0.0.1:\(backend.port) proxy_protocol; keepalive 8; }
                server { listen 127.0.0.1:0; set_real_ip_from 127.0.0.1; location / { proxy_pass http://b; } }
            }
            """)
        defer { proxy.stop() }
        let c = try proxy.client()
        #expect(try c.get("/").status == 200)
        try c.send("GET / HTTP/1.1\r\nHost: t\r\nX-Real-IP: 198.51.100.20\r\n\r\n")
        #expect(try c.readResponse().status == 200)
        #expect(eventually { backend.accepted.count == 2 }, "one connection per request")
        let headers = backend.accepted.map { conn -> String in
            let bytes = conn.received
            guard case .complete(let h) = bytes.withUnsafeBytes({ ProxyProtocol.parse($0) }), let s = h.source else { return "none" }
            var out: [UInt8] = []
            s.writeText(into: &out)
            return String(decoding: out, as: UTF8.self)
        }
        #expect(headers == ["127.0.0.1", "198.51.100.20"])
        #expect(proxy.stats().idleUpstreamConnections == 0)
    }
}
