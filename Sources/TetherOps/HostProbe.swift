#if canImport(Glibc)
import Glibc
#endif
import TetherConfig

/// Reads the kernel's TCP socket table and the process's own figures from /proc.
public enum HostProbe {
    public struct Peer: Hashable, Sendable {
        public var address: String
        public var port: Int
        public init(address: String, port: Int) {
            self.address = address
            self.port = port
        }
    }

    /// /proc/net/tcp state codes.
    static let states: [String: String] = [
        "01": "established", "02": "syn_sent", "03": "syn_recv", "04": "fin_wait1", "05": "fin_wait2",
        "06": "time_wait", "07": "close", "08": "close_wait", "09": "last_ack", "0A": "listen", "0B": "closing",
    ]

    public static func read(listenPorts: Set<Int>, upstreamPeers: Set<Peer>, proc: String = "/proc") -> HostSnapshot {
        var h = HostSnapshot()
        for s in ["established", "time_wait", "close_wait"] { h.sockets[s] = 0 }
        let peerKeys = Set(upstreamPeers.compactMap { p in hexAddress(p.address).map { "\($0):\(hex4(p.port))" } })
        let listenKeys = Set(listenPorts.map(hex4))
        for table in ["net/tcp", "net/tcp6"] {
            guard let text = try? Loader.readFile("\(proc)/\(table)", includedAt: nil) else { continue }
            for line in text.split(separator: "\n").dropFirst() {
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                guard f.count > 3 else { continue }
                let local = f[1], remote = f[2]
                let localPort = String(local.suffix(4))
                guard listenKeys.contains(localPort) || peerKeys.contains(String(remote)), let state = states[String(f[3])], state != "listen" else { continue }
                h.sockets[state, default: 0] += 1
            }
        }
        if let fds = opendir("\(proc)/self/fd") {
            while let e = readdir(fds) { if e.pointee.d_name.0 != 0x2E { h.openFDs += 1 } }
            closedir(fds)
        }
        var rl = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) == 0 { h.maxFDs = Int(rl.rlim_cur) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let hz = Double(sysconf(Int32(_SC_CLK_TCK)))
        if let statm = try? Loader.readFile("\(proc)/self/statm", includedAt: nil) {
            let f = statm.split(separator: " ")
            if f.count > 1 { h.virtualBytes = (Int(f[0]) ?? 0) * page; h.residentBytes = (Int(f[1]) ?? 0) * page }
        }
        if let stat = try? Loader.readFile("\(proc)/self/stat", includedAt: nil), let close = stat.lastIndex(of: ")") {
            // Fields after "(comm)": state is field 3, so utime (14) is index 11 here.
            let f = stat[stat.index(after: close)...].split(separator: " ")
            if f.count > 19 {
                h.cpuSeconds = (Double(f[11]) ?? 0) / hz + (Double(f[12]) ?? 0) / hz
                let startTicks = Double(f[19]) ?? 0
                if let uptime = try? Loader.readFile("\(proc)/uptime", includedAt: nil), let up = Double(uptime.split(separator: " ")[0]) {
                    var now = timespec()
                    clock_gettime(CLOCK_REALTIME, &now)
                    h.startTimeSeconds = (Double(now.tv_sec) - up + startTicks / hz).rounded()
                }
            }
        }
        return h
    }

    static func hex4(_ port: Int) -> String {
        let s = String(port, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 4 - s.count)) + s
    }

    /// An IPv4 address as /proc/net/tcp writes it (little-endian hex), e.g. 127.0.0.1 -> 0100007F.
    static func hexAddress(_ address: String) -> String? {
        guard let b = Builder.addressBytes(address), b.count == 4 else { return nil }
        return b.reversed().map { let s = String($0, radix: 16, uppercase: true); return s.count == 1 ? "0" + s : s }.joined()
    }
}

/// What the kernel and the process say, read at scrape time (never on the request path).
public struct HostSnapshot: Sendable {
    public init() {}

    /// TCP sockets of Tether's listening ports and upstream peers, by state name
    /// (`established`, `time_wait`, `close_wait`, ...).
    public var sockets: [String: Int] = [:]
    public var openFDs = 0
    public var maxFDs = 0
    public var residentBytes = 0
    public var virtualBytes = 0
    public var cpuSeconds: Double = 0
    public var startTimeSeconds: Double = 0
}
