import TetherConfig
#if canImport(Glibc)
import Glibc
#endif

/// `tether doctor`: what the host's settings mean for a configuration, a verdict per line.
public enum Doctor {
    public enum Verdict: String, Sendable {
        case ok, warn, critical
    }

    public struct Line: Sendable, CustomStringConvertible {
        public var verdict: Verdict
        public var text: String
        public var description: String {
            "[\(verdict.rawValue)]" + String(repeating: " ", count: 11 - verdict.rawValue.count) + text
        }
    }

    /// - Parameters:
    ///   - proc: where /proc is (tests give a fake tree).
    ///   - openFiles: the process's open-files limit (RLIMIT_NOFILE), or nil to read it.
    public static func check(_ config: Configuration, proc: String = "/proc", openFiles: Int? = nil, cores: Int = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))) -> [Line] {
        var out: [Line] = []
        func sysctl(_ name: String) -> String? {
            let path = proc + "/sys/" + name.split(separator: ".").joined(separator: "/")
            return (try? Loader.readFile(path, includedAt: nil))?.split(separator: "\n").first.map(String.init)
        }
        func int(_ name: String) -> Int? { sysctl(name).flatMap { Int($0.split(whereSeparator: { $0 == " " || $0 == "\t" })[0]) } }
        let loops: Int
        switch config.workerProcesses {
        case .auto: loops = cores
        case .count(let n): loops = n
        }
        let listens = config.servers.flatMap(\.listens)
        let upstreamServers = config.upstreams.flatMap(\.servers)

        // TCP keepalive: per-socket settings, or the host's timers.
        let idle = int("net.ipv4.tcp_keepalive_time") ?? 7200
        let intvl = int("net.ipv4.tcp_keepalive_intvl") ?? 75
        let probes = int("net.ipv4.tcp_keepalive_probes") ?? 9
        let hostDetect = idle + intvl * probes
        let perSocketUpstream = config.upstreams.contains { $0.tcpKeepalive?.enabled == true || $0.servers.contains { $0.tcpKeepalive?.enabled == true } }
        let perSocketClient = listens.contains { $0.soKeepalive?.enabled == true }
        let hostText = "net.ipv4.tcp_keepalive_time/intvl/probes = \(idle)/\(intvl)/\(probes) (a dead peer is found after \(Units.formatTime(Int64(hostDetect) * 1000)))"
        if !upstreamServers.isEmpty && !perSocketUpstream {
            out.append(Line(verdict: hostDetect > 600 ? .warn : .ok, text: hostText + (hostDetect > 600
                ? "; no upstream sets tcp_keepalive, so a crashed backend behind an idle pooled connection goes unnoticed that long: add \"tcp_keepalive 60s:10s:3;\" to the upstream blocks rather than lowering the host's value" : "")))
        } else {
            out.append(Line(verdict: .ok, text: hostText + "; Tether's sockets use their own settings (\(perSocketUpstream ? "upstream tcp_keepalive" : "")\(perSocketUpstream && perSocketClient ? ", " : "")\(perSocketClient ? "listen so_keepalive" : ""))"))
        }

        // Accept queue.
        if let somaxconn = int("net.core.somaxconn") {
            let backlog = listens.map(\.backlog).max() ?? 511
            out.append(backlog > somaxconn
                ? Line(verdict: .warn, text: "net.core.somaxconn = \(somaxconn): the kernel caps \"listen ... backlog=\(backlog)\" at it; raise net.core.somaxconn to \(backlog) or more")
                : Line(verdict: .ok, text: "net.core.somaxconn = \(somaxconn) (largest listen backlog \(backlog))"))
        }

        // Ephemeral ports: connections to one upstream server can use at most this many.
        if let range = sysctl("net.ipv4.ip_local_port_range") {
            let f = range.split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { Int($0) }
            if f.count == 2 {
                let ports = f[1] - f[0] + 1
                let most = config.workerConnections * loops
                if upstreamServers.isEmpty {
                    out.append(Line(verdict: .ok, text: "net.ipv4.ip_local_port_range = \(f[0]) \(f[1]) (no upstreams)"))
                } else if most > ports {
                    out.append(Line(verdict: .warn, text: "net.ipv4.ip_local_port_range = \(f[0]) \(f[1]): \(ports) ports per upstream server, but \(loops) loops x worker_connections \(config.workerConnections) can need \(most) connections to one; widen it (for example 10240 65535)"))
                } else {
                    out.append(Line(verdict: .ok, text: "net.ipv4.ip_local_port_range = \(f[0]) \(f[1]) (\(ports) ports per upstream server, at most \(most) needed)"))
                }
            }
        }

        // TIME_WAIT reuse for outgoing (upstream) connections.
        if let reuse = int("net.ipv4.tcp_tw_reuse") {
            let meaning = reuse == 0 ? "off" : reuse == 1 ? "on" : "loopback only"
            out.append(reuse == 0 && !upstreamServers.isEmpty
                ? Line(verdict: .warn, text: "net.ipv4.tcp_tw_reuse = 0 (off): new upstream connections cannot take ports still in TIME_WAIT; set 1 if upstream connects are frequent (it affects outgoing connections only)")
                : Line(verdict: .ok, text: "net.ipv4.tcp_tw_reuse = \(reuse) (\(meaning); affects outgoing connections only)"))
        }
        if let fin = int("net.ipv4.tcp_fin_timeout") {
            out.append(Line(verdict: fin > 60 ? .warn : .ok, text: "net.ipv4.tcp_fin_timeout = \(fin)" + (fin > 60 ? ": orphaned connections hold resources that long after close; 30 is plenty" : "")))
        }
        if sysctl("net.ipv4.tcp_tw_recycle") != nil {
            out.append(Line(verdict: .warn, text: "net.ipv4.tcp_tw_recycle exists on this kernel: keep it 0, it breaks clients behind NAT (it was removed in Linux 4.12)"))
        }

        // Open files: a client and an upstream descriptor per connection, on every loop.
        let limit = openFiles ?? {
            var rl = rlimit()
            return getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) == 0 ? Int(rl.rlim_cur) : 1024
        }()
        let effective = config.workerRlimitNofile ?? limit
        let needed = config.workerConnections * loops * 2 + 64
        out.append(effective < needed
            ? Line(verdict: .critical, text: "open files limit = \(effective): \(loops) loops x worker_connections \(config.workerConnections) x 2 (client and upstream) needs \(needed); raise LimitNOFILE / ulimit -n or worker_rlimit_nofile")
            : Line(verdict: .ok, text: "open files limit = \(effective) (\(needed) needed for \(loops) loops x worker_connections \(config.workerConnections) x 2)"))

        // Sockets now in TIME_WAIT and CLOSE_WAIT on Tether's ports and upstream peers.
        let ports = Set(listens.map(\.port))
        let peers = Set(upstreamServers.map { HostProbe.Peer(address: $0.address, port: $0.port) })
        let host = HostProbe.read(listenPorts: ports, upstreamPeers: peers, proc: proc)
        let tw = host.sockets["time_wait"] ?? 0, cw = host.sockets["close_wait"] ?? 0
        out.append(Line(verdict: cw > 0 ? .warn : .ok, text: "sockets: \(tw) in TIME_WAIT, \(cw) in CLOSE_WAIT on the configured ports and upstreams"
            + (cw > 0 ? " (CLOSE_WAIT means a peer closed and the local side did not: if that is Tether, report it)" : "")))
        return out
    }
}
