extension Configuration {
    /// The effective configuration in nginx syntax, with every default written out (`tether -T`).
    /// `resolvedNow` says, for a `resolve` server (its upstream and index), what its name resolves
    /// to now (a comment after the line).
    public func effectiveText(resolvedNow: (Upstream, Int) -> String? = { _, _ in nil }) -> String {
        var out = "# configuration file \(file), with defaults filled in\n"
        switch workerProcesses {
        case .auto: out += "worker_processes auto;\n"
        case .count(let n): out += "worker_processes \(n);\n"
        }
        out += "error_log \(errorLog.path) \(errorLog.level.rawValue);\n"
        if let pidFile { out += "pid \(pidFile);\n" }
        if let n = workerRlimitNofile { out += "worker_rlimit_nofile \(n);\n" }
        out += "events {\n    worker_connections \(workerConnections);\n}\n\nhttp {\n"
        for name in logFormats.keys.sorted() {
            out += "    log_format \(name) \(Configuration.quote(logFormats[name]!.template.source));\n"
        }
        for u in upstreams {
            out += "\n    upstream \(u.name) {\(u.implicit ? "  # from proxy_pass" : "")\n"
            if u.balancing == .leastConn { out += "        least_conn;\n" }
            if let r = u.resolver {
                var line = "        resolver " + r.servers.map { $0.host.contains(":") ? "[\($0.host)]:\($0.port)" : "\($0.host):\($0.port)" }.joined(separator: " ")
                if let v = r.validMs { line += " valid=\(Units.formatTime(v))" }
                line += " ipv6=\(r.ipv6 ? "on" : "off");\n        resolver_timeout \(Units.formatTime(r.timeoutMs));\n"
                out += line
            }
            for (i, s) in u.servers.enumerated() {
                var line = "        server \(s.host == s.address ? s.addressText : "\(s.host):\(s.port)") weight=\(s.weight) max_fails=\(s.maxFails) fail_timeout=\(Units.formatTime(s.failTimeoutMs))"
                if s.maxConns > 0 { line += " max_conns=\(s.maxConns)" }
                if s.backup { line += " backup" }
                if s.down { line += " down" }
                if let k = s.tcpKeepalive { line += " tcp_keepalive=\(k)" }
                if let t = s.tcpUserTimeout { line += " tcp_user_timeout=\(t)" }
                if s.resolve { line += " resolve" }
                if s.proxyProtocol { line += " proxy_protocol" }
                line += ";"
                if s.resolve, let now = resolvedNow(u, i) { line += "  # \(now)" }
                out += line + "\n"
            }
            if let h = u.healthCheck {
                out += "        health_check interval=\(Units.formatTime(h.intervalMs)) fails=\(h.fails) passes=\(h.passes) uri=\(h.uri) match=\(h.match.lowerBound)-\(h.match.upperBound)"
                out += " timeout=\(Units.formatTime(h.effectiveTimeoutMs));\n"
            }
            if let q = u.queue { out += "        queue \(q.size) timeout=\(Units.formatTime(q.timeoutMs));\n" }
            out += "        keepalive \(u.keepalive);\n"
            out += "        keepalive_timeout \(Units.formatTime(u.keepaliveTimeoutMs));\n"
            out += "        keepalive_requests \(u.keepaliveRequests);\n"
            out += "        keepalive_time \(Units.formatTime(u.keepaliveTimeMs));\n"
            if let k = u.tcpKeepalive { out += "        tcp_keepalive \(k);\n" }
            out += "        tcp_user_timeout \(u.tcpUserTimeout);\n"
            out += "    }\n"
        }
        for s in servers {
            out += "\n    server {\n"
            for l in s.listens {
                var line = "        listen \(l.addressText)"
                if l.ssl { line += " ssl" }
                if l.proxyProtocol { line += " proxy_protocol" }
                if l.defaultServer { line += " default_server" }
                line += " backlog=\(l.backlog)"
                if let k = l.soKeepalive { line += " so_keepalive=\(k)" }
                line += " tcp_user_timeout=\(l.tcpUserTimeout)"
                out += line + ";\n"
            }
            if !s.names.isEmpty { out += "        server_name \(s.names.map(\.description).joined(separator: " "));\n" }
            out += "        merge_slashes \(s.settings.mergeSlashes ? "on" : "off");\n"
            out += Configuration.settingsText(s.settings, indent: "        ")
            if s.listens.contains(where: \.ssl) { out += Configuration.sslText(s.settings.ssl, indent: "        ") }
            if let r = s.returnAction { out += "        return \(Configuration.returnText(r));\n" }
            for loc in s.locations {
                let modifier: String
                switch loc.match {
                case .exact: modifier = "= "
                case .prefix: modifier = ""
                case .prefixStop: modifier = "^~ "
                case .regex: modifier = loc.regex?.caseInsensitive == true ? "~* " : "~ "
                }
                out += "\n        location \(modifier)\(loc.path) {\n"
                out += Configuration.settingsText(loc.settings, indent: "            ")
                switch loc.action {
                case .proxy(let p):
                    if p.isTLS { out += Configuration.proxySSLText(loc.settings.proxySSL, indent: "            ") }
                    out += "            proxy_pass \(p.source);\n"
                case .respond(let r): out += "            return \(Configuration.returnText(r));\n"
                case .stubStatus: out += "            stub_status;\n"
                case .stats(let f): out += "            stats \(f.rawValue);\n"
                case .none: break
                }
                out += "        }\n"
            }
            out += "    }\n"
        }
        out += "}\n"
        return out
    }

    static func quote(_ s: String) -> String {
        "\"" + s.replacingOccurrences("\\", "\\\\").replacingOccurrences("\"", "\\\"") + "\""
    }

    static func returnText(_ r: ReturnAction) -> String {
        guard let t = r.text else { return "\(r.code)" }
        return "\(r.code) \(quote(t.source))"
    }

    static func settingsText(_ s: HTTPSettings, indent: String) -> String {
        var lines: [String] = []
        var ka = "keepalive_timeout \(Units.formatTime(s.keepaliveTimeoutMs))"
        if let h = s.keepaliveHeaderTimeoutMs, h != s.keepaliveTimeoutMs { ka += " \(Units.formatTime(h))" }
        lines.append(ka)
        lines.append("keepalive_header \(s.keepaliveHeaderTimeoutMs == nil ? "off" : "on")")
        lines.append("keepalive_requests \(s.keepaliveRequests)")
        lines.append("keepalive_time \(Units.formatTime(s.keepaliveTimeMs))")
        lines.append("client_header_timeout \(Units.formatTime(s.clientHeaderTimeoutMs))")
        lines.append("client_body_timeout \(Units.formatTime(s.clientBodyTimeoutMs))")
        lines.append("send_timeout \(Units.formatTime(s.sendTimeoutMs))")
        lines.append("client_max_body_size \(Units.formatSize(s.clientMaxBodySize))")
        lines.append("large_client_header_buffers \(s.largeClientHeaderBuffers.count) \(Units.formatSize(Int64(s.largeClientHeaderBuffers.size)))")
        for a in s.accessLog {
            switch a {
            case .off: lines.append("access_log off")
            case .file(let path, let format): lines.append("access_log \(path) \(format)")
            }
        }
        lines.append("server_tokens \(s.serverTokens ? "on" : "off")")
        lines.append("proxy_allow_upgrade \(s.proxyAllowUpgrade.isEmpty ? "off" : s.proxyAllowUpgrade.joined(separator: " "))")
        lines.append("proxy_http_version \(s.proxyHTTPVersion)")
        lines.append("proxy_connect_timeout \(Units.formatTime(s.proxyConnectTimeoutMs))")
        lines.append("proxy_read_timeout \(Units.formatTime(s.proxyReadTimeoutMs))")
        lines.append("proxy_send_timeout \(Units.formatTime(s.proxySendTimeoutMs))")
        for h in s.proxySetHeaders { lines.append("proxy_set_header \(h.name) \(quote(h.value.source))") }
        let conds = NextUpstreamCondition.allCases.filter { s.proxyNextUpstream.contains($0) }.map(\.rawValue)
        lines.append("proxy_next_upstream \(conds.isEmpty ? "off" : conds.joined(separator: " "))")
        lines.append("proxy_next_upstream_tries \(s.proxyNextUpstreamTries)")
        lines.append("proxy_socket_keepalive \(s.proxySocketKeepalive ? "on" : "off")")
        lines.append("proxy_request_buffering \(s.proxyRequestBuffering ? "on" : "off")")
        lines.append("client_body_buffer_size \(Units.formatSize(Int64(s.clientBodyBufferSize)))")
        lines.append("client_body_temp_path \(s.clientBodyTempPath)")
        lines.append("proxy_buffering \(s.proxyBuffering ? "on" : "off")")
        lines.append("proxy_buffers \(s.proxyBuffers.count) \(Units.formatSize(Int64(s.proxyBuffers.size)))")
        lines.append("proxy_buffer_size \(Units.formatSize(Int64(s.proxyBufferSize)))")
        lines.append("proxy_max_temp_file_size \(Units.formatSize(s.proxyMaxTempFileSize))")
        lines.append("proxy_temp_path \(s.proxyTempPath)")
        for r in s.accessRules { lines.append(r.description) }
        for r in s.realIPFrom { lines.append("set_real_ip_from \(r.source)") }
        lines.append("real_ip_header \(s.realIPHeader)")
        lines.append("real_ip_recursive \(s.realIPRecursive ? "on" : "off")")
        return lines.map { indent + $0 + ";\n" }.joined()
    }
}

extension Configuration {
    static func sslText(_ s: SSLSettings, indent: String) -> String {
        var lines: [String] = []
        for c in s.certificates {
            lines.append("ssl_certificate \(c.certificate)")
            lines.append("ssl_certificate_key \(c.key)")
        }
        lines.append("ssl_protocols \(s.protocols.joined(separator: " "))")
        if let c = s.ciphers { lines.append("ssl_ciphers \(c)") }
        lines.append("ssl_prefer_server_ciphers \(s.preferServerCiphers ? "on" : "off")")
        lines.append("ssl_ecdh_curve \(s.ecdhCurve)")
        switch s.sessionCache {
        case .off: lines.append("ssl_session_cache off")
        case .none: lines.append("ssl_session_cache none")
        case .sessions(let n): lines.append("ssl_session_cache builtin:\(n)")
        }
        lines.append("ssl_session_timeout \(Units.formatTime(s.sessionTimeoutMs))")
        lines.append("ssl_session_tickets \(s.sessionTickets ? "on" : "off")")
        lines.append("ssl_handshake_timeout \(Units.formatTime(s.handshakeTimeoutMs))")
        // The default cipher list is long: it is named rather than spelled out.
        let note = s.ciphers == nil ? indent + "# ssl_ciphers: the Mozilla \"intermediate\" list (the default)\n" : ""
        return lines.map { indent + $0 + ";\n" }.joined() + note
    }

    static func proxySSLText(_ p: ProxySSLSettings, indent: String) -> String {
        var lines = ["proxy_ssl_verify \(p.verify ? "on" : "off")"]
        if let t = p.trustedCertificate { lines.append("proxy_ssl_trusted_certificate \(t)") }
        lines.append("proxy_ssl_server_name \(p.serverName ? "on" : "off")")
        if let n = p.name { lines.append("proxy_ssl_name \(n)") }
        lines.append("proxy_ssl_session_reuse \(p.sessionReuse ? "on" : "off")")
        lines.append("proxy_ssl_protocols \(p.protocols.joined(separator: " "))")
        lines.append("proxy_ssl_ciphers \(p.ciphers)")
        return lines.map { indent + $0 + ";\n" }.joined()
    }
}

extension String {
    func replacingOccurrences(_ target: String, _ replacement: String) -> String {
        var out = ""
        var rest = self[...]
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound]
            out += replacement
            rest = rest[r.upperBound...]
        }
        out += rest
        return out
    }
}
