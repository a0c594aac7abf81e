import Logging
import NIOCore
import TetherConfig

/// Everything the proxy derives from a configuration once, shared read-only by every loop.
final class ProxySetup: Sendable {
    let configuration: Configuration
    let upstreams: [String: ResolvedUpstream]
    let servers: [CompiledServer]

    init(_ configuration: Configuration) throws {
        self.configuration = configuration
        var ups: [String: ResolvedUpstream] = [:]
        for u in configuration.upstreams { ups[u.name] = try ResolvedUpstream(u) }
        upstreams = ups
        servers = configuration.servers.map(CompiledServer.init)
    }

    /// The virtual hosts of each listening address, in configuration order.
    func virtualHosts() -> [(Listen, VirtualHosts, [CompiledServer])] {
        var order: [String] = []
        var byAddress: [String: (Listen, [Int])] = [:]
        for (i, s) in configuration.servers.enumerated() {
            for l in s.listens {
                let key = l.addressText
                if byAddress[key] == nil { order.append(key); byAddress[key] = (l, []) }
                if !byAddress[key]!.1.contains(i) { byAddress[key]!.1.append(i) }
                if l.defaultServer { byAddress[key]!.0 = l }
            }
        }
        return order.map { key in
            let (listen, indices) = byAddress[key]!
            let servers = indices.map { configuration.servers[$0] }
            let def = indices.firstIndex { i in configuration.servers[i].listens.contains { $0.addressText == key && $0.defaultServer } } ?? 0
            return (listen, VirtualHosts(servers: servers, defaultIndex: def), indices.map { self.servers[$0] })
        }
    }
}

/// A location with what the hot path needs precomputed.
final class CompiledLocation: Sendable {
    let location: Location?
    let settings: HTTPSettings
    let action: Location.Action
    /// Lowercased names of `proxy_set_header`, to drop the client's headers they replace.
    let setHeaderNames: [[UInt8]]
    /// `Keep-Alive: timeout=N\r\n`, or empty when none is sent.
    let keepAliveHeader: [UInt8]

    init(location: Location?, settings: HTTPSettings, action: Location.Action) {
        self.location = location
        self.settings = settings
        self.action = action
        setHeaderNames = settings.proxySetHeaders.map { Array($0.name.lowercased().utf8) }
        if let t = settings.keepaliveHeaderTimeoutMs {
            keepAliveHeader = Array("Keep-Alive: timeout=\(t / 1000)\r\n".utf8)
        } else {
            keepAliveHeader = []
        }
    }
}

final class CompiledServer: Sendable {
    let server: Server
    let locations: [CompiledLocation]
    /// For requests no location matches: the server's settings, its `return` or a 404.
    let fallback: CompiledLocation

    init(_ server: Server) {
        self.server = server
        locations = server.locations.map { CompiledLocation(location: $0, settings: $0.settings, action: $0.action) }
        fallback = CompiledLocation(location: nil, settings: server.settings, action: server.returnAction.map { .respond($0) } ?? .none)
    }

    func route(path: Substring) -> CompiledLocation {
        if server.returnAction != nil { return fallback }
        var best: CompiledLocation?
        var bestLength = -1
        for c in locations {
            guard let loc = c.location else { continue }
            switch loc.match {
            case .exact:
                if path == loc.path { return c }
            case .prefix:
                if loc.path.count > bestLength, path.hasPrefix(loc.path) { best = c; bestLength = loc.path.count }
            }
        }
        return best ?? fallback
    }
}

/// The state of one event loop: its pools, counters and connections. Touched only on that loop.
final class LoopContext {
    let eventLoop: EventLoop
    let setup: ProxySetup
    let logger: Logger
    let accessLog: AccessLogSink?
    var stats = LoopStats()
    private var groups: [String: UpstreamGroup] = [:]
    var connections: [ObjectIdentifier: DownstreamHandler] = [:]
    var draining = false
    let dateCache = DateCache()

    init(eventLoop: EventLoop, setup: ProxySetup, logger: Logger, accessLog: AccessLogSink?) {
        self.eventLoop = eventLoop
        self.setup = setup
        self.logger = logger
        self.accessLog = accessLog
    }

    func group(_ name: String) -> UpstreamGroup {
        if let g = groups[name] { return g }
        let g = UpstreamGroup(upstream: setup.upstreams[name]!, loop: self)
        groups[name] = g
        return g
    }

    var allGroups: [UpstreamGroup] { Array(groups.values) }
}
