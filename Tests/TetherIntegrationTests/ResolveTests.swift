import Foundation
import Testing
import TetherConfig
@testable import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `server NAME resolve` with a DNS server of the test's own whose answers change.
@Suite struct ResolveTests {
    /// Two backends on one port, at 127.0.0.2 and 127.0.0.3 (loopback both), as one name's addresses.
    static func backends() throws -> (TestBackend, TestBackend) {
        var o = TestBackend.Options()
        o.host = "127.0.0.2"
        let a = try TestBackend(options: o)
        o.host = "127.0.0.3"
        o.port = a.port
        return (a, try TestBackend(options: o))
    }

    static func config(dns: Int, port: Int) -> String {
        """
        worker_processes 2;
        http {
            resolver 127.0.0.1:\(dns) valid=100ms;
            resolver_timeout 500ms;
            upstream backend {
                server backend.test:\(port) resolve;
                keepalive 8;
            }
            server { listen 127.0.0.1:0; location / { proxy_pass http://backend; } }
        }
        """
    }

    @Test func newAddressesGetTrafficRemovedOnesAreDrainedAndAFailureKeepsTheSet() throws {
        let dns = try TestDNS()
        defer { dns.stop() }
        let (a, b) = try Self.backends()
        defer { a.stop(); b.stop() }
        dns.set("backend.test", .addresses(["127.0.0.2"], ttl: 1))
        let log = ErrorLogFile(level: .notice)
        let proxy = try RunningProxy(config: Self.config(dns: dns.port, port: a.port), errorLog: log.log)
        defer { proxy.stop() }
        let c = try proxy.client()
        var failed = 0
        func request() { if (try? c.get("/"))?.status != 200 { failed += 1 } }
        for _ in 0..<10 { request() }
        #expect(a.requestCount == 10 && b.requestCount == 0)

        // The name gains an address: it gets traffic, without a reload.
        dns.set("backend.test", .addresses(["127.0.0.2", "127.0.0.3"], ttl: 1))
        #expect(eventually { request(); return b.requestCount > 0 })
        #expect(proxy.stats().upstreams[0].servers.map(\.address) == ["127.0.0.2:\(a.port)", "127.0.0.3:\(a.port)"])
        let aBefore = a.requestCount
        for _ in 0..<10 { request() }
        #expect(a.requestCount > aBefore, "both addresses are used")

        // Slow requests in flight on both, then .2 leaves the set: those on it finish, its
        // idle connections close, and every request goes on being answered.
        let slow = try (0..<6).map { _ in try proxy.client() }
        for s in slow { try s.sendGET("/slow/1500") }
        #expect(eventually { a.requests.contains { $0.target == "/slow/1500" } && b.requests.contains { $0.target == "/slow/1500" } })
        dns.set("backend.test", .addresses(["127.0.0.3"], ttl: 1))
        #expect(eventually { log.lines.contains { $0.contains("backend.test of upstream \"backend\" now resolves to 127.0.0.3 (was 127.0.0.2 127.0.0.3)") } })
        for s in slow { #expect(try s.readResponse().status == 200) }
        let aServed = a.requestCount
        for _ in 0..<10 { request() }
        #expect(a.requestCount == aServed, "no request goes to a removed address")
        #expect(eventually { a.openConnections == 0 }, "the removed address's pools closed their connections")
        #expect(proxy.stats().upstreams[0].servers.map(\.address) == ["127.0.0.3:\(a.port)"])

        // SERVFAIL: the last good set stays, and says so.
        dns.set("backend.test", .servfail)
        #expect(eventually { log.lines.contains { $0.contains("backend.test could not be resolved (server failure (SERVFAIL)) for upstream \"backend\", keeping 127.0.0.3") } })
        for _ in 0..<5 { request() }
        #expect(failed == 0)

        // tether -T shows the resolved set.
        dns.set("backend.test", .addresses(["127.0.0.3", "127.0.0.2"], ttl: 1))
        let text = proxy.configuration.effectiveText(resolvedNow: TetherServer.resolvedNow(proxy.configuration))
        #expect(text.contains("server backend.test:\(a.port) weight=1 max_fails=1 fail_timeout=10s resolve;  # resolves to 127.0.0.2 127.0.0.3"), "\(text)")
    }

    /// A name with no address yet: its upstream answers 502 (no live upstreams) until the name
    /// resolves, then serves. A silent DNS server costs resolver_timeout, not a loop's time.
    @Test func aNameThatDoesNotResolveYetGets502UntilItDoes() throws {
        let dns = try TestDNS()
        defer { dns.stop() }
        let (a, b) = try Self.backends()
        defer { a.stop(); b.stop() }
        dns.set("backend.test", .silence)
        let proxy = try RunningProxy(config: Self.config(dns: dns.port, port: a.port), errorLog: ErrorLogFile(level: .emerg).log)
        defer { proxy.stop() }
        let c = try proxy.client()
        #expect(try c.get("/").status == 502)
        dns.set("backend.test", .addresses(["127.0.0.3"], ttl: 0))
        #expect(eventually { (try? c.get("/"))?.status == 200 })
        #expect(b.requestCount >= 1)
    }
}
