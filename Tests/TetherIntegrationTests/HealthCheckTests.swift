import Foundation
import Testing
import TetherCore
import TetherIO
import TetherTestSupport

/// `health_check` in an `upstream` (issue 17): a server that fails its check is taken out of every
/// loop's balancer after `fails` checks in a row, and comes back after `passes`.
@Suite struct HealthCheckTests {
    @Test func aServerThatFailsItsCheckIsTakenOutThenComesBack() throws {
        let a = try TestBackend(), b = try TestBackend()
        defer { a.stop(); b.stop() }
        let errorLog = ErrorLogFile(level: .notice)
        let proxy = try RunningProxy(config: """
            worker_processes 2;
            http {
                upstream app {
                    server 127.0.0.1:\(a.port);
                    server 127.0.0.1:\(b.port);
                    health_check interval=100ms fails=2 passes=2 uri=/healthz timeout=1s;
                }
                server {
                    listen 127.0.0.1:0;
                    location / { proxy_pass http://app; }
                    location = /metrics { stats prometheus; }
                    location = /stats { stats json; }
                }
            }
            """, errorLog: errorLog.log)
        defer { proxy.stop() }
        func health(_ i: Int) -> (up: Bool, passed: Int, failed: Int, transitions: Int) {
            let h = proxy.stats().upstreams[0].servers[i].health
            return (h?.healthy ?? false, h?.passed ?? 0, h?.failed ?? 0, h?.transitions ?? -1)
        }
        func proxied(_ backend: TestBackend) -> Int { backend.requests.filter { $0.target != "/healthz" }.count }
        #expect(eventually { health(0).passed >= 2 && health(1).passed >= 2 }, "no checks ran")
        let c = try proxy.client()
        for _ in 0..<20 { #expect(try c.get("/x").status == 200) }
        #expect(proxied(a) == 10 && proxied(b) == 10, "round robin over both while both pass")

        a.setHealthy(false)
        let failedAt = IOLoop.monotonicNanoseconds()
        #expect(eventually { !health(0).up }, "still up after its checks failed")
        let took = Double(IOLoop.monotonicNanoseconds() - failedAt) / 1e9
        #expect(took < 0.2 * 2 + 0.3, "out of service after \(took) s (interval 100ms x fails 2)")
        #expect(health(0).transitions == 1 && health(1).up)
        let json = try JSONSerialization.jsonObject(with: Data(try c.get("/stats").bodyText.utf8)) as! [String: Any]
        let servers = ((json["upstreams"] as! [[String: Any]])[0]["servers"] as! [[String: Any]])
        #expect((servers[0]["health"] as? [String: Any])?["state"] as? String == "down")
        #expect((servers[1]["health"] as? [String: Any])?["state"] as? String == "up")
        let before = proxied(a)
        for _ in 0..<20 { #expect(try c.get("/y").status == 200, "no request fails while the other server is up") }
        #expect(proxied(a) == before, "a server out of service got requests")
        #expect(errorLog.lines.contains { $0.contains("[warn]") && $0.contains("failed its health check 2 times in a row (status 503 for GET /healthz): out of service") })
        let metrics = try c.get("/metrics").bodyText
        #expect(metrics.contains("tether_upstream_server_healthy{upstream=\"app\",server=\"127.0.0.1:\(a.port)\"} 0"))
        #expect(metrics.contains("tether_upstream_server_up{upstream=\"app\",server=\"127.0.0.1:\(a.port)\"} 0"))

        a.setHealthy(true)
        #expect(eventually { health(0).up }, "not back after its checks passed")
        #expect(health(0).transitions == 2)
        for _ in 0..<20 { #expect(try c.get("/z").status == 200) }
        #expect(proxied(a) > before, "back in service but no request reached it")
        #expect(errorLog.lines.contains { $0.contains("passed its health check 2 times in a row") && $0.contains("back in service") })
    }

    /// A server that refuses connections fails its checks; with every server out of service,
    /// requests get nginx's 502 (no live upstreams).
    @Test func aServerThatRefusesConnectionsIsOutOfService() throws {
        let port = freePort()
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream dead { server 127.0.0.1:\(port); health_check interval=50ms fails=1; }
                server { listen 127.0.0.1:0; location / { proxy_pass http://dead; } }
            }
            """)
        defer { proxy.stop() }
        #expect(eventually { proxy.stats().upstreams[0].servers[0].health.map { !$0.healthy && $0.failed >= 1 } ?? false })
        #expect(try proxy.client().get().status == 502)
        #expect(proxy.stats().upstreams[0].refused.byLabel["no_live_upstreams"] == 1)
    }

    /// An upstream reached with `proxy_pass https://` is checked over TLS, verified as its
    /// location says: a backend whose certificate does not verify fails its checks.
    @Test(arguments: [true, false]) func anHTTPSUpstreamIsCheckedOverTLS(_ verifies: Bool) throws {
        var o = TestBackend.Options()
        o.tls = (TestPKI.path("localhost.pem"), TestPKI.path("localhost.key"))
        let backend = try TestBackend(options: o)
        defer { backend.stop() }
        let ca = verifies ? TestPKI.path("ca.pem") : TestPKI.path("other-ca.pem")
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream app { server 127.0.0.1:\(backend.port); health_check interval=100ms uri=/healthz; }
                server {
                    listen 127.0.0.1:0;
                    location / { proxy_pass https://app; proxy_ssl_verify on; proxy_ssl_trusted_certificate \(ca); proxy_ssl_name localhost; }
                }
            }
            """)
        defer { proxy.stop() }
        func health() -> StatsSnapshot.Health? { proxy.stats().upstreams[0].servers[0].health }
        if verifies {
            #expect(eventually { (health()?.passed ?? 0) >= 2 }, "no check passed over TLS")
            #expect(backend.requests.contains { $0.target == "/healthz" })
            backend.setHealthy(false)
            #expect(eventually { health()?.healthy == false })
            #expect(try proxy.client().get().status == 502)
            backend.setHealthy(true)
            #expect(eventually { health()?.healthy == true })
            #expect(try proxy.client().get().status == 200)
        } else {
            #expect(eventually { (health()?.failed ?? 0) >= 1 && health()?.healthy == false })
            #expect(!backend.requests.contains { $0.target == "/healthz" }, "a check went through a certificate that does not verify")
        }
    }
}
