import Foundation
import Testing
import TetherConfig
@testable import TetherCore
import TetherTLS
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `openssl s_client -status` against a proxy: what the client is stapled.
func sClientStatus(_ port: Int) throws -> String {
    let r = try run("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)", "-servername", "localhost", "-status",
                                         "-CAfile", TestPKI.path("ca.pem")])
    return r.out + r.err
}

/// `ssl_stapling` with `ssl_stapling_file`: a good, current response is stapled to clients that
/// ask (`openssl s_client -status`); a revoked one is never stapled as good, and the error log
/// says why; handshakes go on either way.
@Suite struct StaplingTests {

    @Test(arguments: ["good", "revoked", "none"])
    func aResponseIsStapledOnlyWhenGood(_ status: String) throws {
        let file = status == "none" ? nil : try TestPKI.ocspResponse(status)
        let log = ErrorLogFile(level: .warn)
        let proxy = try RunningProxy(config: """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:0 ssl;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    ssl_stapling on;
                    ssl_stapling_verify on;
                    ssl_trusted_certificate \(TestPKI.path("ca.pem"));
                    \(file.map { "ssl_stapling_file \($0);" } ?? "")
                    location / { return 200 "ok"; }
                }
            }
            """, errorLog: log.log)
        defer { proxy.stop() }
        let out = try sClientStatus(proxy.port)
        #expect(out.contains("Verify return code: 0 (ok)"), "the handshake works either way")
        if status == "good" {
            #expect(out.contains("OCSP Response Status: successful") && out.contains("Cert Status: good"), "\(out.prefix(600))")
        } else {
            #expect(out.contains("OCSP response: no response sent"), "\(out.prefix(600))")
            let why = status == "revoked" ? "is not stapled: the certificate's status is revoked" : "\"ssl_stapling\" ignored, no OCSP responder URL in the certificate"
            #expect(log.lines.contains { $0.contains(why) })
        }
    }
}

/// `ssl_stapling` without a file: the response is fetched from the responder (the certificate's
/// own, or `ssl_stapling_responder`), on a thread of its own, with `openssl ocsp` answering as
/// the responder; handshakes never wait for it.
@Suite struct StaplingFetchTests {
    static func config(certificate: String, key: String, extra: String = "") -> String {
        """
        worker_processes 1;
        http {
            \(extra)
            server {
                listen 127.0.0.1:0 ssl;
                ssl_certificate \(certificate);
                ssl_certificate_key \(key);
                ssl_stapling on;
                ssl_stapling_verify on;
                ssl_trusted_certificate \(TestPKI.path("ca.pem"));
                location / { return 200 "ok"; }
            }
        }
        """
    }

    static func fetches(_ proxy: RunningProxy, _ result: String) -> Int { proxy.stats().ocspFetches[result] ?? 0 }

    @Test func theResponseFromTheCertificatesResponderIsStapledAndAReloadKeepsIt() throws {
        let responder = try TestOCSPResponder()
        defer { responder.stop() }
        let leaf = try TestPKI.leaf(ocspResponder: responder.url)
        let log = ErrorLogFile(level: .info)
        let text = Self.config(certificate: leaf.certificate, key: leaf.key)
        let proxy = try RunningProxy(config: text, errorLog: log.log)
        defer { proxy.stop() }
        #expect(eventually(timeoutMs: 10_000) { Self.fetches(proxy, "good") == 1 })
        let out = try sClientStatus(proxy.port)
        #expect(out.contains("OCSP Response Status: successful") && out.contains("Cert Status: good"), "\(out.prefix(800))")
        #expect(out.contains("Verify return code: 0 (ok)"))
        // nginx's request: GET, the DER in escaped base64 after the responder's path.
        #expect(responder.targets.count == 1 && responder.targets[0].hasPrefix("/ocsp/"), "\(responder.targets)")
        #expect(log.lines.contains { $0.contains("the OCSP response for certificate \"\(leaf.certificate)\" from \(responder.url): good, stapled until") })
        // A reload's context staples the answer it already has, without asking again.
        try proxy.reload(try parse(text.replacingOccurrences(of: "127.0.0.1:0", with: "127.0.0.1:\(proxy.port)")))
        let again = try sClientStatus(proxy.port)
        #expect(again.contains("Cert Status: good"), "\(again.prefix(800))")
        #expect(Self.fetches(proxy, "good") == 1 && responder.targets.count == 1)
    }

    @Test(arguments: ["revoked", "unknown"])
    func aResponseThatIsNotGoodIsNotStapled(_ status: String) throws {
        let responder = try TestOCSPResponder(status: status)
        defer { responder.stop() }
        let log = ErrorLogFile(level: .warn)
        let proxy = try RunningProxy(config: Self.config(certificate: TestPKI.path("localhost.pem"), key: TestPKI.path("localhost.key"),
                                                         extra: "ssl_stapling_responder \(responder.url);"), errorLog: log.log)
        defer { proxy.stop() }
        #expect(eventually(timeoutMs: 10_000) { Self.fetches(proxy, "revoked") == 1 })
        let out = try sClientStatus(proxy.port)
        #expect(out.contains("OCSP response: no response sent") && out.contains("Verify return code: 0 (ok)"), "\(out.prefix(800))")
        #expect(log.lines.contains { $0.contains("is not stapled: the certificate's status is \(status)") })
    }

    /// A responder that refuses the connection, and one that never answers (bounded by
    /// resolver_timeout): handshakes go on without a staple, the log says why, and it is counted.
    @Test(arguments: ["refused", "silent"])
    func anUnreachableResponderLeavesHandshakesWorking(_ how: String) throws {
        let silent = try ScriptedBackend { c in _ = c.readToEOF(); c.close() }
        defer { silent.stop() }
        let port: Int
        if how == "refused" {
            // A port nothing listens on: bound, never listened on, closed.
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
            port = Int(UInt16(bigEndian: a.sin_port))
            close(fd)
        } else {
            port = silent.port
        }
        let dns = try TestDNS()
        defer { dns.stop() }
        let log = ErrorLogFile(level: .warn)
        let proxy = try RunningProxy(config: Self.config(certificate: TestPKI.path("localhost.pem"), key: TestPKI.path("localhost.key"), extra: """
            ssl_stapling_responder http://127.0.0.1:\(port)/;
            resolver 127.0.0.1:\(dns.port);
            resolver_timeout 300ms;
            """), errorLog: log.log)
        defer { proxy.stop() }
        let during = try sClientStatus(proxy.port)
        #expect(during.contains("Verify return code: 0 (ok)"), "a handshake does not wait for the responder")
        #expect(eventually(timeoutMs: 10_000) { Self.fetches(proxy, "failed") == 1 })
        let out = try sClientStatus(proxy.port)
        #expect(out.contains("OCSP response: no response sent") && out.contains("Verify return code: 0 (ok)"), "\(out.prefix(800))")
        let why = how == "refused" ? "connect() failed: Connection refused" : "the responder timed out"
        #expect(log.lines.contains { $0.contains("could not be fetched: \(why); nothing is stapled, trying again in 300 s") }, "\(log.lines)")
    }

    /// A responder named by a name is found through http's `resolver`; without one, the log says so.
    @Test func aResponderNamedByANameIsResolvedThroughTheResolver() throws {
        let responder = try TestOCSPResponder()
        defer { responder.stop() }
        let dns = try TestDNS()
        defer { dns.stop() }
        dns.set("ocsp.test", .addresses(["127.0.0.1"], ttl: 60))
        let url = "http://ocsp.test:\(responder.port)/ocsp"
        let proxy = try RunningProxy(config: Self.config(certificate: TestPKI.path("localhost.pem"), key: TestPKI.path("localhost.key"),
                                                         extra: "ssl_stapling_responder \(url); resolver 127.0.0.1:\(dns.port); resolver_timeout 1s;"))
        defer { proxy.stop() }
        #expect(eventually(timeoutMs: 10_000) { Self.fetches(proxy, "good") == 1 })
        #expect(try sClientStatus(proxy.port).contains("Cert Status: good"))
        #expect(dns.queryCount >= 1)

        let log = ErrorLogFile(level: .warn)
        let unresolved = try RunningProxy(config: Self.config(certificate: TestPKI.path("localhost.pem"), key: TestPKI.path("localhost.key"),
                                                              extra: "ssl_stapling_responder \(url);"), errorLog: log.log)
        defer { unresolved.stop() }
        #expect(eventually(timeoutMs: 10_000) { Self.fetches(unresolved, "failed") == 1 })
        #expect(log.lines.contains { $0.contains("could not be fetched: no resolver defined to resolve ocsp.test") })
    }
}

/// What a context does with each kind of answer, whichever thread hands it one: a good one is
/// stapled, a revoked one takes down what was stapled, one that cannot be used leaves it.
@Suite struct StapleOutcomeTests {
    @Test func aRevokedAnswerTakesDownAGoodStaple() throws {
        var s = TLSServerSettings(certificates: [(TestPKI.path("localhost.pem"), TestPKI.path("localhost.key"))])
        s.stapling = true
        s.staplingVerify = true
        s.trustedCertificate = TestPKI.path("ca.pem")
        s.staplingResponder = "http://127.0.0.1:9/"
        let ctx = try TLSContext.server(s)
        #expect(ctx.ocspQuery?.port == 9 && ctx.ocspQuery?.request.isEmpty == false && !ctx.isStapling)
        let good = Array(try Data(contentsOf: URL(fileURLWithPath: try TestPKI.ocspResponse("good"))))
        let revoked = Array(try Data(contentsOf: URL(fileURLWithPath: try TestPKI.ocspResponse("revoked"))))
        guard case .stapled(let until) = ctx.staple(response: good) else { Issue.record("good is stapled"); return }
        #expect(until > Int(time(nil)) + 3600, "until its nextUpdate, a day away")
        #expect(ctx.isStapling)
        #expect(ctx.staple(response: Array(good.dropLast(10))) == .refused("not an OCSP response"))
        #expect(ctx.isStapling, "an answer that cannot be used leaves the good one")
        #expect(ctx.staple(response: revoked) == .revoked("the certificate's status is revoked"))
        #expect(!ctx.isStapling)
        // A response about another certificate (b.test's context asking about localhost's).
        var other = s
        other.certificates = [(TestPKI.path("b.test.pem"), TestPKI.path("b.test.key"))]
        #expect(try TLSContext.server(other).staple(response: good) == .refused("the response is not about this certificate"))
    }
}
