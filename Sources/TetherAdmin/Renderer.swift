import Foundation
import TetherCore
import TetherPool

/// Renders the admin pages. It runs once per scrape, never on the request path.
public struct Renderer: AdminRenderer {
    public init() {}

    public func render(_ page: AdminPage, stats: StatsSnapshot, host: HostSnapshot) -> (contentType: String, body: String) {
        switch page {
        case .stubStatus: return ("text/plain", Self.stubStatus(stats))
        case .prometheus: return ("text/plain; version=0.0.4; charset=utf-8", Self.prometheus(stats, host: host))
        case .json: return ("application/json", Self.json(stats, host: host))
        }
    }

    /// nginx's `stub_status` page, byte for byte in its format (`ngx_http_stub_status_module.c`),
    /// trailing spaces included, so that nginx exporters and scripts read it unchanged.
    public static func stubStatus(_ s: StatsSnapshot) -> String {
        "Active connections: \(s.activeConnections) \n"
            + "server accepts handled requests\n"
            + " \(s.acceptedConnections) \(s.handledConnections) \(s.requests) \n"
            + "Reading: \(s.reading) Writing: \(s.writing) Waiting: \(s.waiting) \n"
    }

    static let downstreamCloseReasons = ReasonCounts<DownstreamCloseReason>.labels
    static let upstreamCloseReasons = CloseReason.allCases.map(\.rawValue)
    /// The failures charged to an upstream as a whole, not to one of its servers.
    static let groupReasons = [UpstreamFailedReason.noLiveUpstreams, .queueFull, .queueTimeout].map(\.label)

    /// The Prometheus text exposition format, version 0.0.4.
    public static func prometheus(_ s: StatsSnapshot, host: HostSnapshot) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        func sample(_ name: String, _ labels: [(String, String)], _ value: String) {
            out += name
            if !labels.isEmpty {
                out += "{" + labels.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") + "}"
            }
            out += " \(value)\n"
        }
        func sample(_ name: String, _ labels: [(String, String)], _ value: Int) { sample(name, labels, String(value)) }
        /// A histogram's cumulative buckets, sum and count under `labels`.
        func histogram(_ name: String, _ labels: [(String, String)], _ h: Histogram) {
            var cumulative = 0
            for (i, le) in histogramBuckets.enumerated() {
                cumulative += h.buckets[i]
                sample(name + "_bucket", labels + [("le", number(le))], cumulative)
            }
            sample(name + "_bucket", labels + [("le", "+Inf")], h.count)
            sample(name + "_sum", labels, number(h.sum))
            sample(name + "_count", labels, h.count)
        }

        family("tether_downstream_cx_total", "counter", "Client connections accepted.")
        sample("tether_downstream_cx_total", [], s.acceptedConnections)
        family("tether_downstream_cx_active", "gauge", "Client connections open.")
        sample("tether_downstream_cx_active", [], s.activeConnections)
        family("tether_downstream_cx", "gauge", "Client connections by state: reading a request head, writing a response, or waiting idle (keep-alive).")
        sample("tether_downstream_cx", [("state", "reading")], s.reading)
        sample("tether_downstream_cx", [("state", "writing")], s.writing)
        sample("tether_downstream_cx", [("state", "waiting")], s.waiting)
        family("tether_downstream_rq_total", "counter", "Requests answered, by status class.")
        for c in 1...5 { sample("tether_downstream_rq_total", [("code", "\(c)xx")], s.responsesByClass[c]) }
        family("tether_downstream_cx_closed_total", "counter", "Client connections closed, by reason.")
        for r in Set(downstreamCloseReasons).union(s.downstreamClosed.keys).sorted() {
            sample("tether_downstream_cx_closed_total", [("reason", r)], s.downstreamClosed[r] ?? 0)
        }

        family("tether_downstream_cx_accept_failed_total", "counter", "Connections accept4() could not take, by reason (emfile: the process is out of descriptors; enfile: the system is).")
        for r in Set(StatsSnapshot.acceptFailureReasons).union(s.acceptFailures.keys).sorted() {
            sample("tether_downstream_cx_accept_failed_total", [("reason", r)], s.acceptFailures[r] ?? 0)
        }

        family("tether_tls_handshakes_total", "counter", "Client TLS handshakes completed, by protocol version.")
        for v in Set(["TLSv1.2", "TLSv1.3"]).union(s.tlsHandshakes.keys).sorted() {
            sample("tether_tls_handshakes_total", [("result", "ok"), ("protocol", v)], s.tlsHandshakes[v] ?? 0)
        }
        family("tether_tls_handshake_failures_total", "counter", "Client TLS handshakes that failed, by reason.")
        for r in Set(TLSHandshakeFailureReasons.all).union(s.tlsHandshakeFailures.keys).sorted() {
            sample("tether_tls_handshake_failures_total", [("reason", r)], s.tlsHandshakeFailures[r] ?? 0)
        }
        family("tether_tls_sessions_reused_total", "counter", "Client TLS handshakes that resumed a session (ticket or cache).")
        sample("tether_tls_sessions_reused_total", [], s.tlsSessionsReused)

        family("tether_tls_client_certificates_refused_total", "counter", "Requests answered 400 under ssl_verify_client: no certificate (none) or one that failed verification (invalid).")
        for r in ["invalid", "none"] { sample("tether_tls_client_certificates_refused_total", [("reason", r)], s.clientCertificatesRefused[r] ?? 0) }
        family("tether_ssl_stapling_fetches_total", "counter", "OCSP responses fetched for ssl_stapling, by result: good (stapled), revoked (nothing stapled), failed (the last good one stays until its nextUpdate).")
        for r in ["failed", "good", "revoked"] { sample("tether_ssl_stapling_fetches_total", [("result", r)], s.ocspFetches[r] ?? 0) }
        family("tether_http2_connections_total", "counter", "Client connections that chose HTTP/2 (ALPN h2).")
        sample("tether_http2_connections_total", [], s.http2Connections)
        family("tether_http2_streams_total", "counter", "HTTP/2 streams (requests) taken.")
        sample("tether_http2_streams_total", [], s.http2Streams)
        family("tether_http2_streams_active", "gauge", "HTTP/2 streams open now.")
        sample("tether_http2_streams_active", [], s.http2StreamsActive)
        family("tether_http2_resets_received_total", "counter", "RST_STREAM frames from clients, by error code.")
        for (code, n) in s.http2Resets.sorted(by: { $0.key < $1.key }) { sample("tether_http2_resets_received_total", [("code", code)], n) }
        family("tether_http2_errors_total", "counter", "HTTP/2 connections ended for an error (by code; ENHANCE_YOUR_CALM for floods and rapid resets) and streams refused as malformed_request.")
        for (code, n) in s.http2Errors.sorted(by: { $0.key < $1.key }) { sample("tether_http2_errors_total", [("code", code)], n) }
        family("tether_http2_goaways_total", "counter", "GOAWAY frames sent to clients (direction=sent: idle, keepalive_requests, shutdown, errors) and received from them.")
        sample("tether_http2_goaways_total", [("direction", "received")], s.http2GoawaysReceived)
        sample("tether_http2_goaways_total", [("direction", "sent")], s.http2GoawaysSent)
        family("tether_proxy_protocol_headers_total", "counter", "PROXY protocol headers read on listen ... proxy_protocol addresses (the refused ones close with reason proxy_protocol).")
        sample("tether_proxy_protocol_headers_total", [], s.proxyProtocolHeaders)

        family("tether_buffered_bytes", "gauge", "Bytes held for the slower side of exchanges (proxy_request_buffering, proxy_buffering), in memory and in temp files.")
        sample("tether_buffered_bytes", [("where", "memory")], s.buffered.memoryBytes)
        sample("tether_buffered_bytes", [("where", "file")], Int(s.buffered.fileBytes))
        family("tether_temp_files_total", "counter", "Temp files opened for request or response bodies that did not fit their memory buffers.")
        sample("tether_temp_files_total", [], s.buffered.filesOpened)
        family("tether_temp_file_written_bytes_total", "counter", "Bytes written to temp files.")
        sample("tether_temp_file_written_bytes_total", [], Int(s.buffered.bytesWrittenToFiles))
        family("tether_temp_file_errors_total", "counter", "Temp file opens, writes or reads that failed (each failed its request: 500, or a cut response).")
        sample("tether_temp_file_errors_total", [], s.buffered.fileErrors)

        let servers = s.upstreams.flatMap { u in u.servers.map { (u.name, $0) } }
        func perServer(_ name: String, _ type: String, _ help: String, _ value: (StatsSnapshot.Server) -> Int) {
            family(name, type, help)
            for (u, srv) in servers { sample(name, [("upstream", u), ("server", srv.address)], value(srv)) }
        }
        func perServerReason(_ name: String, _ help: String, known: [String], _ value: (StatsSnapshot.Server) -> [String: Int]) {
            family(name, "counter", help)
            for (u, srv) in servers {
                let v = value(srv)
                for r in Set(known).union(v.keys).sorted() {
                    sample(name, [("upstream", u), ("server", srv.address), ("reason", r)], v[r] ?? 0)
                }
            }
        }
        perServer("tether_upstream_cx_total", "counter", "Upstream connections opened.") { $0.counters.connects }
        perServer("tether_upstream_cx_active", "gauge", "Upstream connections in use by a request.") { $0.active }
        perServer("tether_upstream_cx_idle", "gauge", "Idle upstream connections kept warm in the pools.") { $0.idle }
        perServer("tether_upstream_rq_total", "counter", "Requests sent upstream.") { $0.counters.requests }
        perServer("tether_upstream_rq_reused_total", "counter", "Requests sent on a reused (warm) upstream connection.") { $0.counters.reused }
        perServer("tether_upstream_rq_abandoned_drained_total", "counter", "Responses read to their end after the client left, so that the upstream connection was kept.") { $0.counters.drained }
        perServerReason("tether_upstream_cx_closed_total", "Upstream connections closed, by reason.", known: upstreamCloseReasons) { $0.counters.closed }
        perServerReason("tether_upstream_rq_retry_total", "Requests sent again, by reason.", known: ReasonCounts<UpstreamRetryReason>.labels) { $0.counters.retries.byLabel }
        perServerReason("tether_upstream_rq_failed_total", "Requests that failed upstream, by reason.", known: ReasonCounts<UpstreamFailedReason>.labels.filter { !groupReasons.contains($0) }) { $0.counters.failures.byLabel }
        family("tether_upstream_health_checks_total", "counter", "Active health checks (health_check), by result.")
        for (u, srv) in servers {
            guard let h = srv.health else { continue }
            sample("tether_upstream_health_checks_total", [("upstream", u), ("server", srv.address), ("result", "pass")], h.passed)
            sample("tether_upstream_health_checks_total", [("upstream", u), ("server", srv.address), ("result", "fail")], h.failed)
        }
        family("tether_upstream_health_transitions_total", "counter", "Times a server went out of service or came back by its health checks.")
        for (u, srv) in servers { if let h = srv.health { sample("tether_upstream_health_transitions_total", [("upstream", u), ("server", srv.address)], h.transitions) } }
        family("tether_upstream_server_healthy", "gauge", "1 while the server passes its health checks.")
        for (u, srv) in servers { if let h = srv.health { sample("tether_upstream_server_healthy", [("upstream", u), ("server", srv.address)], h.healthy ? 1 : 0) } }
        family("tether_upstream_health_check_last_seconds", "gauge", "How long the server's last health check took.")
        for (u, srv) in servers {
            if let s = srv.health?.lastCheckSeconds { sample("tether_upstream_health_check_last_seconds", [("upstream", u), ("server", srv.address)], number(s)) }
        }
        perServer("tether_upstream_server_max_conns", "gauge", "The server's max_conns (0: no cap); tether_upstream_cx_active + tether_upstream_cx_idle is what it caps, over all event loops.") { $0.maxConns }
        family("tether_upstream_rq_refused_total", "counter", "Requests refused for the whole upstream: no live upstreams (502), or every server at its max_conns and the queue full or waited out (503).")
        for u in s.upstreams {
            let v = u.refused.byLabel
            for r in groupReasons { sample("tether_upstream_rq_refused_total", [("upstream", u.name), ("reason", r)], v[r] ?? 0) }
        }
        family("tether_upstream_queue_length", "gauge", "Requests waiting in the upstream's queue for a server below its max_conns.")
        for u in s.upstreams { sample("tether_upstream_queue_length", [("upstream", u.name)], u.queueLength) }
        family("tether_upstream_queue_size", "gauge", "The upstream's queue size (queue N; 0: none).")
        for u in s.upstreams { sample("tether_upstream_queue_size", [("upstream", u.name)], u.queueSize) }
        family("tether_upstream_queue_wait_seconds", "histogram", "Time requests waited in the upstream's queue.")
        for u in s.upstreams { histogram("tether_upstream_queue_wait_seconds", [("upstream", u.name)], u.queueWait) }
        perServer("tether_upstream_tls_handshakes_total", "counter", "TLS handshakes with upstream servers (proxy_pass https://).") { $0.counters.tlsHandshakes }
        perServer("tether_upstream_tls_sessions_reused_total", "counter", "Upstream TLS handshakes that resumed a session (proxy_ssl_session_reuse).") { $0.counters.tlsResumed }
        perServer("tether_upstream_tls_handshake_failures_total", "counter", "Upstream TLS handshakes that failed.") { $0.counters.tlsFailures }
        perServer("tether_upstream_server_up", "gauge", "1 when the server is configured up and not marked failed (max_fails) on any event loop.") { $0.up ? 1 : 0 }
        family("tether_upstream_learned_idle_seconds", "gauge", "The backend's idle window as Tether learned it from connections the backend closed.")
        for (u, srv) in servers { if let ms = srv.learnedIdleMs { sample("tether_upstream_learned_idle_seconds", [("upstream", u), ("server", srv.address)], seconds(ms)) } }
        family("tether_upstream_advertised_keepalive_timeout_seconds", "gauge", "The backend's Keep-Alive: timeout= as last seen.")
        for (u, srv) in servers { if let ms = srv.advertisedTimeoutMs { sample("tether_upstream_advertised_keepalive_timeout_seconds", [("upstream", u), ("server", srv.address)], seconds(ms)) } }
        for (name, help, pick) in [
            ("tether_upstream_connect_seconds", "Time to connect to an upstream server.", { (x: StatsSnapshot.Server) in x.counters.connectTime }),
            ("tether_upstream_response_seconds", "Time from sending a request upstream to the end of its response.", { (x: StatsSnapshot.Server) in x.counters.responseTime }),
        ] as [(String, String, (StatsSnapshot.Server) -> Histogram)] {
            family(name, "histogram", help)
            for (u, srv) in servers { histogram(name, [("upstream", u), ("server", srv.address)], pick(srv)) }
        }
        family("tether_sockets", "gauge", "TCP sockets of Tether's listening ports and upstream servers in the kernel's table, by state.")
        for state in host.sockets.keys.sorted() { sample("tether_sockets", [("state", state)], host.sockets[state]!) }
        family("process_open_fds", "gauge", "Number of open file descriptors.")
        sample("process_open_fds", [], host.openFDs)
        family("process_max_fds", "gauge", "Maximum number of open file descriptors.")
        sample("process_max_fds", [], host.maxFDs)
        family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
        sample("process_resident_memory_bytes", [], host.residentBytes)
        family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
        sample("process_virtual_memory_bytes", [], host.virtualBytes)
        family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
        sample("process_cpu_seconds_total", [], number(host.cpuSeconds))
        family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
        sample("process_start_time_seconds", [], number(host.startTimeSeconds))
        return out
    }

    /// The same figures, structured by upstream, server and event loop, with reuse ratios.
    public static func json(_ s: StatsSnapshot, host: HostSnapshot) -> String {
        func ratio(_ reused: Int, _ total: Int) -> Double { total == 0 ? 0 : (Double(reused) / Double(total) * 10000).rounded() / 10000 }
        func hist(_ h: Histogram) -> [String: Any] { ["count": h.count, "sum_seconds": h.sum] }
        let upstreams: [[String: Any]] = s.upstreams.map { u in
            let reqs = u.servers.reduce(0) { $0 + $1.counters.requests }
            let reused = u.servers.reduce(0) { $0 + $1.counters.reused }
            return [
                "name": u.name,
                "keepalive": u.keepalive,
                "requests": reqs,
                "reuse_ratio": ratio(reused, reqs),
                "refused": groupReasons.reduce(into: u.refused.byLabel) { $0[$1] = $0[$1] ?? 0 },
                "queue": ["size": u.queueSize, "length": u.queueLength, "wait_seconds": hist(u.queueWait)],
                "servers": u.servers.map { srv -> [String: Any] in
                    var d: [String: Any] = [
                        "address": srv.address, "up": srv.up, "active": srv.active, "idle": srv.idle,
                        "connections_opened": srv.counters.connects, "requests": srv.counters.requests,
                        "requests_reused": srv.counters.reused, "reuse_ratio": ratio(srv.counters.reused, srv.counters.requests),
                        "closed": srv.counters.closed, "retries": srv.counters.retries.byLabel, "failures": srv.counters.failures.byLabel,
                        "abandoned_drained": srv.counters.drained,
                        "connect_seconds": hist(srv.counters.connectTime), "response_seconds": hist(srv.counters.responseTime),
                    ]
                    if srv.counters.tlsHandshakes + srv.counters.tlsFailures > 0 {
                        d["tls"] = ["handshakes": srv.counters.tlsHandshakes, "sessions_reused": srv.counters.tlsResumed, "failures": srv.counters.tlsFailures]
                    }
                    if srv.maxConns > 0 { d["max_conns"] = srv.maxConns }
                    if let h = srv.health {
                        // "checking" until the first check has a verdict (the server takes requests meanwhile).
                        let state = h.passed + h.failed == 0 ? "checking" : h.healthy ? "up" : "down"
                        var hd: [String: Any] = ["state": state, "checks_passed": h.passed, "checks_failed": h.failed,
                                                 "transitions": h.transitions]
                        if let s = h.lastCheckSeconds { hd["last_check_seconds"] = s }
                        d["health"] = hd
                    }
                    if let l = srv.learnedIdleMs { d["learned_idle_seconds"] = Double(l) / 1000 }
                    if let a = srv.advertisedTimeoutMs { d["advertised_keepalive_timeout_seconds"] = Double(a) / 1000 }
                    return d
                },
            ]
        }
        let root: [String: Any] = [
            "connections": [
                "accepted": s.acceptedConnections, "handled": s.handledConnections, "active": s.activeConnections,
                "reading": s.reading, "writing": s.writing, "waiting": s.waiting, "closed": s.downstreamClosed,
                "accept_failed": StatsSnapshot.acceptFailureReasons.reduce(into: s.acceptFailures) { $0[$1] = $0[$1] ?? 0 },
            ],
            "tls": ["handshakes": s.tlsHandshakes, "sessions_reused": s.tlsSessionsReused, "handshake_failures": s.tlsHandshakeFailures,
                    "stapling_fetches": ["failed", "good", "revoked"].reduce(into: s.ocspFetches) { $0[$1] = $0[$1] ?? 0 }],
            "http2": ["connections": s.http2Connections, "streams": s.http2Streams, "streams_active": s.http2StreamsActive,
                      "resets_received": s.http2Resets, "errors": s.http2Errors,
                      "goaways_received": s.http2GoawaysReceived, "goaways_sent": s.http2GoawaysSent],
            "buffered": ["memory_bytes": s.buffered.memoryBytes, "file_bytes": s.buffered.fileBytes, "temp_files": s.buffered.filesOpened,
                         "temp_file_written_bytes": s.buffered.bytesWrittenToFiles, "temp_file_errors": s.buffered.fileErrors],
            "requests": ["total": s.requests, "by_status": (1...5).reduce(into: [String: Int]()) { $0["\($1)xx"] = s.responsesByClass[$1] }],
            "upstreams": upstreams,
            "servers": s.servers.map { v -> [String: Any] in
                ["names": v.names, "listen": v.listen, "requests": v.requests,
                 "by_status": (1...5).reduce(into: [String: Int]()) { $0["\($1)xx"] = v.responsesByClass[$1] }]
            },
            "event_loops": s.loops.map { ["index": $0.index, "active_connections": $0.activeConnections, "requests": $0.requests,
                                          "upstream_idle": $0.upstreamIdle, "upstream_active": $0.upstreamActive] },
            "sockets": host.sockets,
            "process": ["open_fds": host.openFDs, "max_fds": host.maxFDs, "resident_memory_bytes": host.residentBytes,
                        "cpu_seconds": host.cpuSeconds, "start_time_seconds": host.startTimeSeconds],
        ]
        let data = (try? JSONSerialization.data(withJSONObject: root, options: [.prettyPrinted, .sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self) + "\n"
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    static func number(_ d: Double) -> String {
        if d == d.rounded() && abs(d) < 1e15 { return String(Int64(d)) }
        return String(d)
    }

    static func seconds(_ ms: Int64) -> String { number(Double(ms) / 1000) }
}
