import TetherConfig

/// The servers that share one listening address, with nginx's virtual host rules:
/// exact name, then the longest `*.suffix` / `.domain`, then the default server.
struct VirtualHosts: Sendable {
    var servers: [Server]
    var defaultIndex: Int
    private var exact: [String: Int] = [:]
    /// (suffix including the leading dot, server index, also matches the bare domain)
    private var wildcards: [(String, Int, Bool)] = []

    init(servers: [Server], defaultIndex: Int) {
        self.servers = servers
        self.defaultIndex = defaultIndex
        for (i, s) in servers.enumerated() {
            for name in s.names {
                switch name {
                case .exact(let n): if exact[n] == nil { exact[n] = i }
                case .wildcardPrefix(let suffix): wildcards.append((suffix, i, false))
                case .domainAndSubdomains(let d): wildcards.append(("." + d, i, true))
                }
            }
        }
        wildcards.sort { $0.0.count > $1.0.count }
    }

    /// The server for a Host value (lowercase, without port); nil means the default.
    func server(forHost host: String?) -> Int {
        guard let host, !host.isEmpty else { return defaultIndex }
        if let i = exact[host] { return i }
        for (suffix, i, bare) in wildcards {
            if host.hasSuffix(suffix) && host.count > suffix.count { return i }
            if bare && host == suffix.dropFirst() { return i }
        }
        return defaultIndex
    }
}
