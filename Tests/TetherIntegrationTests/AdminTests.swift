import Foundation
import NIOCore
import Testing
import TetherTestSupport

/// Reads one admin page over a fresh connection.
func scrape(_ proxy: any ProxyUnderTest, _ path: String) throws -> TestClient.Response {
    let c = try proxy.client()
    try c.send("GET \(path) HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
    return try c.readResponse()
}

/// The value of one Prometheus sample line, e.g. `tether_downstream_rq_total{code="2xx"}`.
func metric(_ text: String, _ series: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1))
    }
    return nil
}

let adminLocations = """
    location = /status { stub_status; }
    location = /metrics { stats prometheus; }
    location = /stats { stats json; }
    location = /denied { deny 127.0.0.0/8; allow all; stats json; }
    location = /allowed { allow 10.0.0.0/8; allow 127.0.0.1; deny all; stats json; }
    """

@Suite struct AdminTests {
    @Test func countersFollowKnownTraffic() throws {
        try withProxy(workers: 2, server: adminLocations) { proxy, backend in
            let before = try scrape(proxy, "/metrics").bodyText
            let a = try proxy.client(), b = try proxy.client()
            for i in 0..<100 {
                let c = i % 2 == 0 ? a : b
                #expect(try c.get().status == 200)
            }
            let after = try scrape(proxy, "/metrics").bodyText
            let up = "{upstream=\"backend\",server=\"127.0.0.1:\(backend.port)\"}"
            let rq = metric(after, "tether_downstream_rq_total{code=\"2xx\"}")! - metric(before, "tether_downstream_rq_total{code=\"2xx\"}")!
            #expect(rq == 101, "100 requests and the first scrape")
            let connects = metric(after, "tether_upstream_cx_total" + up)!
            let reused = metric(after, "tether_upstream_rq_reused_total" + up)!
            #expect(connects >= 1 && connects <= 4, "at most one per client connection per loop")
            #expect(metric(after, "tether_upstream_rq_total" + up) == 100)
            #expect(reused == 100 - connects)
            #expect(metric(after, "tether_upstream_cx_idle" + up) == connects)
            #expect(metric(after, "tether_upstream_server_up" + up) == 1)
            #expect(metric(after, "tether_upstream_response_seconds_count" + up) == 100)
            #expect(metric(after, "tether_downstream_cx{state=\"waiting\"}") == 2)
            #expect(metric(after, "tether_downstream_cx{state=\"writing\"}") == 1, "the scrape itself")
            #expect((metric(after, "tether_sockets{state=\"established\"}") ?? 0) >= 2)
            #expect(metric(after, "tether_sockets{state=\"close_wait\"}") == 0)
            #expect((metric(after, "process_resident_memory_bytes") ?? 0) > 1_000_000)

            let json = try JSONSerialization.jsonObject(with: Data(try scrape(proxy, "/stats").body)) as! [String: Any]
            let ups = json["upstreams"] as! [[String: Any]]
            #expect(ups[0]["name"] as? String == "backend")
            #expect(ups[0]["reuse_ratio"] as? Double == ((100 - connects) / 100 * 10000).rounded() / 10000)
            let servers = ups[0]["servers"] as! [[String: Any]]
            #expect(servers[0]["idle"] as? Int == Int(connects))
            #expect((json["event_loops"] as! [Any]).count == 2)
            let vservers = json["servers"] as! [[String: Any]]
            #expect(vservers.count == 1)
            #expect(vservers[0]["requests"] as? Int == 102, "100 proxied and the two scrapes before this one")
        }
    }

    @Test func closeReasonsAreCounted() throws {
        var o = TestBackend.Options()
        o.closeIdleAfterMs = 200
        try withProxy(backend: o, workers: 1, http: "keepalive_timeout 300ms;", server: adminLocations) { proxy, backend in
            let c = try proxy.client()
            try c.sendGET()
            _ = try c.readResponse()
            #expect(c.waitForClose(timeoutMs: 2_000))
            #expect(eventually { backend.openConnections == 0 })
            let up = "{upstream=\"backend\",server=\"127.0.0.1:\(backend.port)\",reason=\"peer_closed\"}"
            var text = ""
            #expect(eventually {
                text = (try? scrape(proxy, "/metrics").bodyText) ?? ""
                return metric(text, "tether_upstream_cx_closed_total" + up) == 1
            })
            #expect(metric(text, "tether_downstream_cx_closed_total{reason=\"keepalive_timeout\"}") == 1)
        }
    }

    @Test func allowAndDenyAsNginx() throws {
        try withProxy(server: adminLocations) { proxy, _ in
            let denied = try scrape(proxy, "/denied")
            let allowed = try scrape(proxy, "/allowed")
            #expect(denied.status == 403)
            #expect(allowed.status == 200)
        }
    }

    /// Byte-compatible with nginx's stub_status (ngx_http_stub_status_module.c):
    /// "Active connections: %N \n" "server accepts handled requests\n" " %N %N %N \n" "Reading: %N Writing: %N Waiting: %N \n"
    @Test func stubStatusMatchesNginxFormat() throws {
        try withProxy(server: adminLocations) { proxy, _ in
            let r = try scrape(proxy, "/status")
            #expect(r.header("content-type") == "text/plain")
            let pattern = #/Active connections: (\d+) \nserver accepts handled requests\n (\d+) (\d+) (\d+) \nReading: (\d+) Writing: (\d+) Waiting: (\d+) \n/#
            let m = try #require(r.bodyText.wholeMatch(of: pattern))
            #expect(m.1 == "1" && m.2 == "1" && m.3 == "1" && m.4 == "1")
            #expect(m.5 == "0" && m.6 == "1" && m.7 == "0")
        }
    }

    /// The Prometheus page passes the reference parser (the Python client's, from PyPI).
    @Test func prometheusOutputParses() throws {
        try withProxy(server: adminLocations) { proxy, _ in
            let c = try proxy.client()
            try c.sendGET()
            _ = try c.readResponse()
            let text = try scrape(proxy, "/metrics").bodyText
            let file = NSTemporaryDirectory() + "tether-metrics-\(UUID().uuidString).txt"
            try text.write(toFile: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(atPath: file) }
            let r = try Spawn.run("/usr/bin/env", ["python3", "-c", """
                import sys
                from prometheus_client.parser import text_string_to_metric_families
                fams = list(text_string_to_metric_families(open(sys.argv[1]).read()))
                names = {f.name for f in fams}
                for n in ["tether_downstream_cx", "tether_upstream_rq_reused", "tether_upstream_connect_seconds", "tether_sockets", "process_open_fds"]:
                    assert n in names, n
                print(len(fams), sum(len(f.samples) for f in fams))
                """, file])
            #expect(r.status == 0, "\(r.err)")
            let counts = r.out.split(whereSeparator: { $0 == " " || $0 == "\n" })
            #expect(counts.count == 2 && (Int(counts[0]) ?? 0) >= 25)
        }
    }
}

@Suite struct DashboardTests {
    /// The shipped Grafana dashboard is valid JSON and queries only series Tether exports.
    @Test func dashboardQueriesExportedSeries() throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: packageRoot() + "/deploy/grafana/tether-dashboard.json"))
        let dash = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let exprs = (dash["panels"] as! [[String: Any]]).flatMap { ($0["targets"] as! [[String: Any]]).map { $0["expr"] as! String } }
        #expect(exprs.count >= 12)
        try withProxy(server: adminLocations) { proxy, _ in
            let c = try proxy.client()
            try c.sendGET()
            _ = try c.readResponse()
            let text = try scrape(proxy, "/metrics").bodyText
            let exported = Set(text.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { String($0.split(separator: " ")[2]) })
            for e in exprs {
                let names = e.matches(of: #/(tether|process)_[a-z_]+/#).map { String($0.output.0) }
                #expect(!names.isEmpty)
                for n in names {
                    let family = n.hasSuffix("_bucket") ? String(n.dropLast(7)) : n
                    #expect(exported.contains(family), "\(n) in \(e)")
                }
            }
        }
    }
}
