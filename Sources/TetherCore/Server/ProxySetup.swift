#if canImport(Glibc)
import Glibc
#endif
import TetherHTTP
import TetherConfig
import TetherTLS

/// Everything the proxy derives from a configuration once, shared read-only by every loop.
final class ProxySetup: Sendable {
    let configuration: Configuration
    let upstreams: [String: Upstream]
    let servers: [CompiledServer]
    let hostKeepalive: HostKeepalive
    let tls: TLSSetup

    init(_ configuration: Configuration, hostKeepalive: HostKeepalive = .read()) throws {
        self.configuration = configuration
        self.hostKeepalive = hostKeepalive
        upstreams = Dictionary(configuration.upstreams.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let tls = try TLSSetup(configuration)
        self.tls = tls
        servers = configuration.servers.enumerated().map { CompiledServer($1, index: $0, tls: tls) }
    }

    /// `old` with `u` (an upstream whose `resolve` names changed) in place of its namesake.
    init(replacing old: ProxySetup, upstream u: Upstream) {
        var c = old.configuration
        if let i = c.upstreams.firstIndex(where: { $0.name == u.name }) { c.upstreams[i] = u }
        configuration = c
        hostKeepalive = old.hostKeepalive
        var ups = old.upstreams
        ups[u.name] = u
        upstreams = ups
        tls = old.tls
        servers = old.servers
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

/// One `proxy_set_header` as the upstream request gets it.
enum SetHeaderLine: Sendable {
    /// The whole line, CRLF included: the value has no variable that changes per request.
    case constant([UInt8])
    /// `Name: ` and the value to expand per request.
    case template(prefix: [UInt8], value: Template)
}

/// A location with what the hot path needs precomputed.
final class CompiledLocation: Sendable {
    let location: Location?
    let settings: HTTPSettings
    let action: Location.Action
    /// Lowercased names of `proxy_set_header`, to drop the client's headers they replace.
    let setHeaderNames: [[UInt8]]
    /// The `proxy_set_header` lines, made once where they depend on nothing of the request.
    let setHeaderLines: [SetHeaderLine]
    /// `Keep-Alive: timeout=N\r\n`, or empty when none is sent.
    let keepAliveHeader: [UInt8]
    let pathBytes: [UInt8]
    let match: Location.Match

    /// The `server` block it belongs to.
    let serverIndex: Int
    /// Some `access_log` of its settings writes a file (checked per request).
    let logsAccess: Bool
    /// The upstream pool this location's requests use: the upstream's name, plus the TLS
    /// settings for `proxy_pass https://` (connections are reused only under the same ones).
    let poolKey: String
    let upstreamTLS: TLSContext?
    /// `proxy_http_version 1.0` (checked per request, so not a string comparison each time).
    let proxyHTTP10: Bool
    /// `real_ip_header`: the header's lowercased name, whether it is `X-Forwarded-For` (a list),
    /// or `proxy_protocol` (the PROXY protocol header's client).
    let realIPHeaderName: [UInt8]
    let realIPForwardedFor: Bool
    let realIPFromProxyProtocol: Bool
    /// `set_real_ip_from` names some peer (checked per request).
    let realIP: Bool
    /// `ssl_verify_client` of the server (checked per request on TLS connections).
    let verifyClient: SSLSettings.VerifyClient
    /// From `proxy_pass`, taken out once so that a request does not copy the whole `ProxyPass`
    /// (several strings to retain and release): the upstream's name and the URI part.
    let upstreamName: String
    let proxyURI: String?
    /// `proxy_pass http://b/$1`: the upstream request's whole URI, expanded per request.
    let proxyURITemplate: Template?
    /// `proxy_pass` has a URI part (with or without variables): the request line is rewritten.
    let rewritesURI: Bool

    init(location: Location?, settings: HTTPSettings, action: Location.Action, serverIndex: Int, poolKey: String? = nil, upstreamTLS: TLSContext? = nil) {
        self.location = location
        self.serverIndex = serverIndex
        logsAccess = settings.accessLog.contains { if case .file = $0 { true } else { false } }
        if case .proxy(let pass) = action {
            self.poolKey = poolKey ?? pass.upstream
            upstreamName = pass.upstream
            proxyURI = pass.uri
            proxyURITemplate = pass.uriTemplate
        } else {
            self.poolKey = ""
            upstreamName = ""
            proxyURI = nil
            proxyURITemplate = nil
        }
        self.upstreamTLS = upstreamTLS
        rewritesURI = proxyURI != nil || proxyURITemplate != nil
        proxyHTTP10 = settings.proxyHTTPVersion == "1.0"
        realIPHeaderName = Array(settings.realIPHeader.utf8)
        realIPForwardedFor = settings.realIPHeader == "x-forwarded-for"
        realIPFromProxyProtocol = settings.realIPHeader == "proxy_protocol"
        realIP = !settings.realIPFrom.isEmpty
        verifyClient = settings.ssl.verifyClient
        pathBytes = Array((location?.path ?? "").utf8)
        match = location?.match ?? .prefix
        self.settings = settings
        self.action = action
        setHeaderNames = settings.proxySetHeaders.map { Array($0.name.lowercased().utf8) }
        setHeaderLines = settings.proxySetHeaders.compactMap { h in
            var value = ""
            for part in h.value.parts {
                switch part {
                case .literal(let text): value += text
                case .variable(.proxyHost): if case .proxy(let pass) = action { value += pass.proxyHost }
                case .variable: return .template(prefix: Array("\(h.name): ".utf8), value: h.value)
                }
            }
            // An empty value means the header is not sent (as nginx).
            return value.isEmpty ? nil : .constant(Array("\(h.name): \(value)\r\n".utf8))
        }
        if let t = settings.keepaliveHeaderTimeoutMs {
            keepAliveHeader = Array("Keep-Alive: timeout=\(t / 1000)\r\n".utf8)
        } else {
            keepAliveHeader = []
        }
    }
}

final class CompiledServer: Sendable {
    let server: Server
    /// Position in the configuration, for per-server counters.
    let index: Int
    let locations: [CompiledLocation]
    /// For requests no location matches: the server's settings, its `return` or a 404.
    let fallback: CompiledLocation
    /// The `location ~` ones, in configuration order (searched after the prefixes, as nginx).
    let regexLocations: [CompiledLocation]

    init(_ server: Server, index: Int, tls: TLSSetup) {
        self.server = server
        self.index = index
        let keys = tls.locationKeys[index] ?? [:]
        locations = server.locations.enumerated().map { j, l in
            CompiledLocation(location: l, settings: l.settings, action: l.action, serverIndex: index,
                             poolKey: keys[j], upstreamTLS: keys[j].flatMap { tls.upstreams[$0] })
        }
        fallback = CompiledLocation(location: nil, settings: server.settings, action: server.returnAction.map { .respond($0) } ?? .none, serverIndex: index)
        regexLocations = locations.filter { $0.match == .regex }
    }

    /// The path locations are matched against (and regex captures refer to): the normalised
    /// path, or the target's own path when normalising changed nothing.
    static func withMatchedPath<R>(_ head: HeadLayout, _ bytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        if let m = head.path.match ?? head.path.uri { return m.withUnsafeBytes(body) }
        return body(UnsafeRawBufferPointer(rebasing: bytes[head.pathStart..<head.pathEnd]))
    }

    /// nginx's location choice for the request's normalised path (see `NormalizedPath`): an
    /// exact match wins; otherwise the longest matching prefix, if it is `^~`; otherwise the
    /// first regex that matches, in configuration order (its groups left in `regex`); otherwise
    /// the longest prefix (`bytes`: the head's bytes).
    func route(_ head: HeadLayout, _ bytes: UnsafeRawBufferPointer, regex: RegexMatches?) -> CompiledLocation {
        if server.returnAction != nil { return fallback }
        if let m = head.path.match ?? head.path.uri { return m.withUnsafeBytes { route(path: $0, regex: regex) } }
        return route(path: UnsafeRawBufferPointer(rebasing: bytes[head.pathStart..<head.pathEnd]), regex: regex)
    }

    private func route(path: UnsafeRawBufferPointer, regex: RegexMatches?) -> CompiledLocation {
        var best: CompiledLocation?
        var bestLength = -1
        for c in locations {
            let lp = c.pathBytes
            switch c.match {
            case .exact:
                if path.count == lp.count && path.elementsEqual(lp) { return c }
            case .prefix, .prefixStop:
                if lp.count > bestLength && path.count >= lp.count && UnsafeRawBufferPointer(rebasing: path[0..<lp.count]).elementsEqual(lp) {
                    best = c
                    bestLength = lp.count
                }
            case .regex:
                break
            }
        }
        // `regex` comes only for a server with regex locations.
        guard let regex else { return best ?? fallback }
        if let best, best.match == .prefixStop { return best }
        do {
            for c in regexLocations {
                switch c.location!.regex!.match(path, regex.data) {
                case .match:
                    regex.route = c
                    return c
                case .noMatch:
                    continue
                case .failed(let why):
                    // A match that gave up (its limits): the request gets 500, as from nginx.
                    regex.failure = "pcre2_match() failed: \(why) in location \"\(c.location!.regex!)\""
                    return c
                }
            }
        }
        return best ?? fallback
    }
}


struct ServerKey: Hashable, Sendable {
    var upstream: String
    var index: Int
}

/// One loop's figures, summed by `StatsSnapshot.combining`.
struct SnapshotPart: Sendable {
    struct Server: Sendable {
        var up: Bool
        var active: Int
        var idle: Int
        var counters: ServerCounters
        var learnedIdleMs: Int64?
        var advertisedTimeoutMs: Int64?
        var health: StatsSnapshot.Health?

        /// Nothing yet: what `add` starts from.
        static let none = Server(up: true, active: 0, idle: 0, counters: ServerCounters())

        /// Adds another pool's figures for the same server (another loop's, or another TLS
        /// variant's): up only if up everywhere, the shortest learned window.
        mutating func add(_ o: Server) {
            up = up && o.up
            active += o.active
            idle += o.idle
            counters.add(o.counters)
            if let l = o.learnedIdleMs { learnedIdleMs = min(learnedIdleMs ?? .max, l) }
            if let a = o.advertisedTimeoutMs { advertisedTimeoutMs = a }
            // The same process-wide figures from every loop: taken once, not summed.
            if health == nil { health = o.health }
        }
    }

    var index: Int
    var stats: LoopStats
    var reading = 0
    var writing = 0
    var waiting = 0
    /// HTTP/2 streams open now on this loop's connections.
    var http2StreamsActive = 0
    var servers: [ServerKey: Server] = [:]
    /// Each upstream's queue on this loop, and the requests refused for want of a connection.
    struct Queue: Sendable {
        var waiting = 0
        var wait = Histogram()
        var refused = ReasonCounts<UpstreamFailedReason>()
    }
    var queues: [String: Queue] = [:]
    var buffered = StatsSnapshot.Buffered()

    init(index: Int, stats: LoopStats) {
        self.index = index
        self.stats = stats
    }
}

extension StatsSnapshot {
    static func combining(_ parts: [SnapshotPart], upstreams: [TetherConfig.Upstream], servers: [TetherConfig.Server]) -> StatsSnapshot {
        var s = StatsSnapshot()
        s.servers = servers.map { VirtualServer(names: $0.names.map(\.description), listen: $0.listens.map(\.addressText)) }
        for p in parts {
            s.acceptedConnections += p.stats.downstreamAccepted
            s.handledConnections += p.stats.downstreamHandled
            s.activeConnections += p.stats.downstreamActive
            s.requests += p.stats.downstreamRequests
            s.reading += p.reading
            s.http2StreamsActive += p.http2StreamsActive
            s.writing += p.writing
            s.waiting += p.waiting
            for i in s.responsesByClass.indices { s.responsesByClass[i] += p.stats.responses(class: i) }
            s.downstreamClosed.merge(p.stats.downstreamClosed.byLabel, uniquingKeysWith: +)
            s.acceptFailures.merge(p.stats.acceptFailures, uniquingKeysWith: +)
            s.otherUpstreamFailures.merge(p.stats.upstreamFailures.byLabel, uniquingKeysWith: +)
            s.tlsHandshakes.merge(p.stats.tlsHandshakes, uniquingKeysWith: +)
            s.tlsSessionsReused += p.stats.tlsResumed
            s.buffered.add(p.buffered)
            s.proxyProtocolHeaders += p.stats.proxyProtocolHeaders
            s.http2Connections += p.stats.http2Connections
            s.http2Streams += p.stats.http2Streams
            s.http2Resets.merge(p.stats.http2Resets, uniquingKeysWith: +)
            s.http2Errors.merge(p.stats.http2Errors, uniquingKeysWith: +)
            s.http2GoawaysReceived += p.stats.http2GoawaysReceived
            s.http2GoawaysSent += p.stats.http2GoawaysSent
            s.clientCertificatesRefused["none", default: 0] += p.stats.clientCertificatesMissing
            s.clientCertificatesRefused["invalid", default: 0] += p.stats.clientCertificatesInvalid
            s.tlsHandshakeFailures.merge(p.stats.tlsFailures, uniquingKeysWith: +)
            for i in s.servers.indices where i < p.stats.servers {
                s.servers[i].requests += p.stats.requests(server: i)
                for c in 0..<6 { s.servers[i].responsesByClass[c] += p.stats.responses(server: i, class: c) }
            }
            let ups = p.servers.values
            s.loops.append(.init(index: p.index, activeConnections: p.stats.downstreamActive, requests: p.stats.downstreamRequests,
                                 upstreamIdle: ups.reduce(0) { $0 + $1.idle }, upstreamActive: ups.reduce(0) { $0 + $1.active }))
        }
        for u in upstreams {
            var servers: [Server] = []
            for (i, spec) in u.servers.enumerated() {
                var sum = SnapshotPart.Server.none
                sum.up = !spec.down
                for p in parts { if let x = p.servers[ServerKey(upstream: u.name, index: i)] { sum.add(x) } }
                var srv = Server(address: spec.addressText, up: sum.up && (sum.health?.healthy ?? true), active: sum.active, idle: sum.idle,
                                 counters: sum.counters, learnedIdleMs: sum.learnedIdleMs, advertisedTimeoutMs: sum.advertisedTimeoutMs)
                srv.health = sum.health
                servers.append(srv)
            }
            var up = Upstream(name: u.name, keepalive: u.keepalive, servers: servers)
            for (i, spec) in u.servers.enumerated() { up.servers[i].maxConns = spec.maxConns }
            up.queueSize = u.queue?.size ?? 0
            for p in parts {
                guard let q = p.queues[u.name] else { continue }
                up.queueLength += q.waiting
                up.queueWait.add(q.wait)
                up.refused.add(q.refused)
            }
            s.upstreams.append(up)
        }
        return s
    }
}

extension TetherConfig.Upstream {
    /// Whether a reloaded upstream can keep the old pools: same servers, same pool settings.
    /// `max_conns` and `queue` may differ: they change in place (`UpstreamLimits.apply`), so that
    /// neither warm connections nor queued requests are dropped.
    func sameDefinition(as o: TetherConfig.Upstream) -> Bool {
        // Where a server line stands in the file does not matter, only what it says.
        func placeless(_ list: [UpstreamServer]) -> [UpstreamServer] {
            list.map { var s = $0; s.location = SourceLocation(file: "", line: 0); s.maxConns = 0; return s }
        }
        return placeless(servers) == placeless(o.servers)
            && balancing == o.balancing && keepalive == o.keepalive && keepaliveTimeoutMs == o.keepaliveTimeoutMs
            && keepaliveRequests == o.keepaliveRequests && keepaliveTimeMs == o.keepaliveTimeMs
            && tcpKeepalive == o.tcpKeepalive && tcpUserTimeout == o.tcpUserTimeout
    }
}

public let tetherVersion = "0.1.0"

/// One loop's regex matching: PCRE2's match data (not shared between threads), the location
/// whose regex matched the request being handled (its groups are `$1`…, named ones by name),
/// and why a match gave up, if one did. Reset for each request.
final class RegexMatches {
    let data = Regex.MatchData()
    var route: CompiledLocation?
    var failure: String?

    /// Group `i`'s bytes in the matched path, for the request the match was made for.
    func group(_ i: Int, of route: CompiledLocation) -> Range<Int>? {
        guard self.route === route else { return nil }
        return data.group(i)
    }
}
