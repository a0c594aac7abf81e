import Foundation
import Testing
import TetherConfig
import TetherIO
@testable import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `ssl_verify_client` with a CA made at test time, and curl presenting the certificates.
@Suite struct ClientCertificateTests {
    static let show = #"return 200 "$ssl_client_verify|$ssl_client_s_dn|$ssl_client_i_dn|$ssl_client_serial|$ssl_client_fingerprint";"#

    func withVerifyingProxy(_ mode: String, _ body: (any ProxyUnderTest, TestBackend) throws -> Void) throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http {
                upstream backend { server 127.0.0.1:\(backend.port); }
                server {
                    listen 127.0.0.1:0 ssl;
                    server_name localhost;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    ssl_verify_client \(mode);
                    ssl_client_certificate \(TestPKI.path("client-ca.pem"));
                    ssl_crl \(TestPKI.path("client-crl.pem"));
                    location / { \(Self.show) }
                    location /up { proxy_pass http://backend; proxy_set_header X-Client-Cert $ssl_client_escaped_cert; }
                }
            }
            """)
        defer { proxy.stop() }
        try body(proxy, backend)
    }

    /// curl with `cert` (a name in the test PKI, or nil for none); returns the body.
    func curl(_ proxy: any ProxyUnderTest, cert: String?, path: String = "/") throws -> String {
        var args = ["-sS", "--max-time", "10", "--cacert", TestPKI.path("ca.pem"), "--resolve", "localhost:\(proxy.port):127.0.0.1"]
        if let cert { args += ["--cert", TestPKI.path("\(cert).pem"), "--key", TestPKI.path("\(cert).key")] }
        return try run("/usr/bin/curl", args + ["https://localhost:\(proxy.port)\(path)"]).out
    }

    static let noCertificate = "No required SSL certificate was sent"
    static let certificateError = "The SSL certificate error"

    @Test(arguments: [
        ("on", "client", "SUCCESS|"), ("on", nil, noCertificate), ("on", "client-expired", certificateError),
        ("on", "client-revoked", certificateError), ("on", "client-other", certificateError),
        ("optional", nil, "NONE|"), ("optional", "client", "SUCCESS|"), ("optional", "client-other", certificateError),
        ("optional_no_ca", "client-other", "FAILED:unable to verify the first certificate|"),
        ("optional_no_ca", "client-expired", certificateError),
    ] as [(String, String?, String)])
    func verification(mode: String, cert: String?, expected: String) throws {
        try withVerifyingProxy(mode) { proxy, _ in
            let body = try curl(proxy, cert: cert)
            #expect(body.hasPrefix(expected) || body.contains("<center>\(expected)</center>"), "\(mode) \(cert ?? "none"): \(body)")
            let refused = expected == Self.noCertificate || expected == Self.certificateError
            #expect(proxy.stats().responsesByClass[4] == (refused ? 1 : 0))
            if refused {
                #expect(proxy.stats().clientCertificatesRefused[expected == Self.noCertificate ? "none" : "invalid"] == 1)
            }
        }
    }

    @Test func theCertificateReachesTheBackend() throws {
        try withVerifyingProxy("on") { proxy, backend in
            let body = try curl(proxy, cert: "client")
            let fields = body.split(separator: "|", omittingEmptySubsequences: false)
            #expect(fields.count == 5 && fields[0] == "SUCCESS")
            #expect(fields[1].contains("CN=client") && fields[1].contains("O=Tether Tests"), "\(body)")
            #expect(fields[2] == "CN=Tether Test Client CA")
            #expect(fields[3].count >= 4 && fields[4].count == 40, "\(body)")
            #expect(try curl(proxy, cert: "client", path: "/up") == "ok")
            let header = backend.requests.last?.header("x-client-cert") ?? ""
            #expect(header.hasPrefix("-----BEGIN%20CERTIFICATE-----%0A"), "\(header.prefix(60))")
            let pem = try String(contentsOfFile: TestPKI.path("client.pem"), encoding: .utf8)
            #expect(header.removingPercentEncoding == pem)
        }
    }
}

/// `proxy_ssl_certificate`: Tether presents a certificate of its own to an upstream that asks
/// for one (here another Tether with `ssl_verify_client on`, which says what it got).
@Suite struct UpstreamClientCertificateTests {
    @Test func anUpstreamThatAsksForACertificateGetsOne() throws {
        let upstream = try RunningProxy(config: """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:0 ssl;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    ssl_verify_client on;
                    ssl_client_certificate \(TestPKI.path("client-ca.pem"));
                    location / { return 200 "$ssl_client_verify $ssl_client_s_dn"; }
                }
            }
            """)
        defer { upstream.stop() }
        for (extra, expected) in [("proxy_ssl_certificate \(TestPKI.path("client.pem")); proxy_ssl_certificate_key \(TestPKI.path("client.key"));", "SUCCESS "),
                                  ("", "<html>")] {
            let proxy = try RunningProxy(config: """
                worker_processes 1;
                http {
                    server {
                        listen 127.0.0.1:0;
                        location / { proxy_pass https://127.0.0.1:\(upstream.port); \(extra) }
                    }
                }
                """)
            defer { proxy.stop() }
            let r = try proxy.client().get("/")
            #expect(r.bodyText.hasPrefix(expected), "\(extra.isEmpty ? "without" : "with") a certificate: \(r.bodyText)")
            if extra.isEmpty { #expect(r.status == 400 && r.bodyText.contains("No required SSL certificate was sent")) }
        }
    }
}
