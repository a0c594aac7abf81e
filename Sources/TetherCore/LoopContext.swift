#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import TetherHTTP
import TetherConfig
import TetherTLS

/// Everything the proxy derives from a configuration once, shared read-only by every loop.
final class ProxySetup: Sendable {
    let configuration: Configuration
    let upstreams: [String: ResolvedUpstream]
    let servers: [CompiledServer]
    let hostKeepalive: HostKeepalive
    let tls: TLSSetup

    init(_ configuration: Configuration, hostKeepalive: HostKeepalive = .read()) throws {
        self.configuration = configuration
        self.hostKeepalive = hostKeepalive
        var ups: [String: ResolvedUpstream] = [:]
        for u in configuration.upstreams { ups[u.name] = try ResolvedUpstream(u) }
        upstreams = ups
        let tls = try TLSSetup(configuration)
        self.tls = tls
        servers = configuration.servers.enumerated().map { CompiledServer($1, index: $0, tls: tls) }
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
    /// Some `access_log` of its settings writes a file (checked per request on the own loop).
    let logsAccess: Bool
    /// The upstream pool this location's requests use: the upstream's name, plus the TLS
    /// settings for `proxy_pass https://` (connections are reused only under the same ones).
    let poolKey: String
    let upstreamTLS: TLSContext?
    /// `proxy_http_version 1.0` (checked per request, so not a string comparison each time).
    let proxyHTTP10: Bool
    /// From `proxy_pass`, taken out once so that a request does not copy the whole `ProxyPass`
    /// (several strings to retain and release): the upstream's name and the URI part.
    let upstreamName: String
    let proxyURI: String?

    init(location: Location?, settings: HTTPSettings, action: Location.Action, serverIndex: Int, poolKey: String? = nil, upstreamTLS: TLSContext? = nil) {
        self.location = location
        self.serverIndex = serverIndex
        logsAccess = settings.accessLog.contains { if case .file = $0 { true } else { false } }
        if case .proxy(let pass) = action {
            self.poolKey = poolKey ?? pass.upstream
            upstreamName = pass.upstream
            proxyURI = pass.uri
        } else {
            self.poolKey = ""
            upstreamName = ""
            proxyURI = nil
        }
        self.upstreamTLS = upstreamTLS
        proxyHTTP10 = settings.proxyHTTPVersion == "1.0"
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

    init(_ server: Server, index: Int, tls: TLSSetup) {
        self.server = server
        self.index = index
        let keys = tls.locationKeys[index] ?? [:]
        locations = server.locations.enumerated().map { j, l in
            CompiledLocation(location: l, settings: l.settings, action: l.action, serverIndex: index,
                             poolKey: keys[j], upstreamTLS: keys[j].flatMap { tls.upstreams[$0] })
        }
        fallback = CompiledLocation(location: nil, settings: server.settings, action: server.returnAction.map { .respond($0) } ?? .none, serverIndex: index)
    }

    /// nginx's location choice for the request's normalised path (see `NormalizedPath`): an
    /// exact match wins, otherwise the longest matching prefix.
    func route(_ head: ParsedHead) -> CompiledLocation {
        head.bytes.withUnsafeReadableBytes { route(head.layout, $0) }
    }

    /// The same for a head parsed on Tether's own loop (`bytes`: the head's bytes).
    func route(_ head: HeadLayout, _ bytes: UnsafeRawBufferPointer) -> CompiledLocation {
        if server.returnAction != nil { return fallback }
        if let m = head.path.match ?? head.path.uri { return m.withUnsafeBytes { route(path: $0) } }
        return route(path: UnsafeRawBufferPointer(rebasing: bytes[head.pathStart..<head.pathEnd]))
    }

    private func route(path: UnsafeRawBufferPointer) -> CompiledLocation {
        var best: CompiledLocation?
        var bestLength = -1
        for c in locations {
            let lp = c.pathBytes
            switch c.match {
            case .exact:
                if path.count == lp.count && path.elementsEqual(lp) { return c }
            case .prefix:
                if lp.count > bestLength && path.count >= lp.count && UnsafeRawBufferPointer(rebasing: path[0..<lp.count]).elementsEqual(lp) {
                    best = c
                    bestLength = lp.count
                }
            }
        }
        return best ?? fallback
    }
}

extension LoopContext: TLSObserver {
    func tlsHandshakeCompleted(version: String, resumed: Bool) {
        stats.tlsHandshakes[version, default: 0] += 1
        if resumed { stats.tlsResumed += 1 }
    }

    /// Client handshake failures are the client's business: logged at info, as nginx does.
    func tlsHandshakeFailed(_ failure: TLSHandshakeFailure, detail: String) {
        stats.tlsFailures[failure.rawValue, default: 0] += 1
        logger.info("TLS handshake failed (\(failure.rawValue)): \(detail)")
    }
}

/// The state of one event loop: its pools, counters and connections. Touched only on that loop.
final class LoopContext {
    let eventLoop: EventLoop
    /// For the buffers handlers build (heads, chunk sizes): asking a channel for its allocator
    /// is a call through the `Channel` existential and a thread check each time.
    let allocator = ByteBufferAllocator()
    private(set) var setup: ProxySetup
    let logger: Logger
    private(set) var accessLog: AccessLogSink?
    /// Each listener's routing, by bound address; replaced whole on reload.
    private(set) var routes: [String: Route] = [:]
    /// Bumped on every reload, so connections refresh their routing at their next request.
    private(set) var generation = 0
    var stats: LoopStats
    private var groups: [String: UpstreamGroup] = [:]
    var connections: [ObjectIdentifier: DownstreamHandler] = [:]
    var draining = false
    let dateCache = DateCache()
    /// Serves `stub_status` and `stats` locations; nil when no renderer was given.
    var admin: AdminService?
    /// Header arrays for request heads, lent to connections while they handle a request: no
    /// request allocates one once the loop has a few, and idle connections keep none.
    private var spareHeaderArrays: [[HeaderField]] = []
    /// Response heads are parsed and used within one event, so one array serves the loop.
    var responseHeaderScratch: [HeaderField] = []

    func borrowHeaderArray() -> [HeaderField] {
        spareHeaderArrays.popLast() ?? []
    }

    /// Keeps no more spare header arrays than the open connections could borrow (at least 16).
    func trimSpares() {
        let keep = max(16, stats.downstreamActive)
        if spareHeaderArrays.count > keep { spareHeaderArrays.removeLast(spareHeaderArrays.count - keep) }
    }

    /// Takes the array back (leaving `array` empty), keeping at most 1,024 spare.
    func returnHeaderArray(_ array: inout [HeaderField]) {
        if array.capacity > 0 && spareHeaderArrays.count < 1024 {
            array.removeAll(keepingCapacity: true)
            spareHeaderArrays.append(array)
        }
        array = []
    }

    init(eventLoop: EventLoop, setup: ProxySetup, logger: Logger, accessLog: AccessLogSink?) {
        self.eventLoop = eventLoop
        self.setup = setup
        self.logger = logger
        self.accessLog = accessLog
        stats = LoopStats(servers: setup.servers.count)
    }

    /// Client connections' deadlines (keep-alive, header, body, read, send timeouts) are checked
    /// by a sweep over all connections every `sweepInterval`. That sweep also notes the
    /// connections whose deadline falls before the next one, and short sweeps over just those run
    /// at their deadlines (at most every `sweepFloor`). So a deadline known at a full sweep fires
    /// within a few ms of its time, and one set after it (a timeout shorter than the interval) up
    /// to `sweepInterval` late; never early. Work stays one pass over all connections per
    /// interval, however many expire.
    static let sweepInterval = TimeAmount.milliseconds(100)
    static let sweepFloor = TimeAmount.milliseconds(5)
    private var sweeper: Scheduled<Void>?
    private var nextFullSweep = NIODeadline.uptimeNanoseconds(0)
    /// Connections whose deadline falls before `nextFullSweep`, as the last full sweep found.
    private var dueSoon: [DownstreamHandler] = []

    /// When the next sweep runs, `earliest` being the earliest deadline the last one left ahead.
    static func nextSweep(now: NIODeadline, earliest: NIODeadline?, fullSweepAt: NIODeadline) -> NIODeadline {
        guard let earliest, earliest < fullSweepAt else { return fullSweepAt }
        return min(fullSweepAt, max(earliest, now + sweepFloor))
    }

    /// One sweep at `now` (a full one when it is time): acts on the deadlines that passed and
    /// returns when the next sweep should run.
    func sweepConnections(now: NIODeadline) -> NIODeadline {
        var earliest: NIODeadline?
        if now >= nextFullSweep {
            nextFullSweep = now + Self.sweepInterval
            dueSoon.removeAll(keepingCapacity: true)
            for c in connections.values {
                guard let d = c.sweep(now: now), d < nextFullSweep else { continue }
                dueSoon.append(c)
                if d < earliest ?? .distantFuture { earliest = d }
            }
        } else {
            let full = nextFullSweep
            dueSoon.removeAll { c in
                guard let d = c.sweep(now: now), d < full else { return true }
                if d < earliest ?? .distantFuture { earliest = d }
                return false
            }
        }
        return Self.nextSweep(now: now, earliest: earliest, fullSweepAt: nextFullSweep)
    }

    /// Starts the deadline checks; called on this loop.
    func startSweeping(at when: NIODeadline = .now() + LoopContext.sweepInterval) {
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        sweeper = eventLoop.assumeIsolated().scheduleTask(deadline: when) {
            let me = bound.value
            let next = me.sweepConnections(now: .now())
            me.flushAccessLog()
            me.startSweeping(at: next)
        }
    }

    func stopSweeping() {
        sweeper?.cancel()
        sweeper = nil
        flushAccessLog()
    }

    /// accept4() failed on a listener of this loop: counted, and logged at most once a second (as
    /// nginx's "accept4() failed (24: Too many open files)"), so that a process out of descriptors
    /// does not flood its log.
    func acceptFailed(_ error: IOError, listen: String) {
        let reason = error.errnoCode == EMFILE ? "emfile" : error.errnoCode == ENFILE ? "enfile" : "other"
        stats.acceptFailures[reason, default: 0] += 1
        acceptFailuresUnlogged += 1
        let now = NIODeadline.now()
        if now >= nextAcceptLog {
            let text = String(cString: strerror(error.errnoCode))
            logger.error("accept4() failed (\(error.errnoCode): \(text)) on \(listen) (\(acceptFailuresUnlogged) failures since the last message)")
            acceptFailuresUnlogged = 0
            nextAcceptLog = now + .seconds(1)
        }
    }
    private var nextAcceptLog = NIODeadline.uptimeNanoseconds(0)
    private var acceptFailuresUnlogged = 0

    private var warned = Set<String>()

    /// Logs a warning the first time it is seen on this loop.
    func warnOnce(_ message: String) {
        if warned.insert(message).inserted { logger.warning("\(message)") }
    }

    /// Access log lines of this loop not yet handed to the writer thread, by file.
    private var pendingLog: [String: ByteBuffer] = [:]

    /// Queues a line; lines go to the writer thread in batches (every sweep, or at 32 KiB), so the
    /// request path takes no lock per line.
    func log(path: String, _ line: ByteBuffer) {
        var l = line
        pendingLog[path, default: ByteBuffer()].writeBuffer(&l)
        if pendingLog[path]!.readableBytes >= 32 * 1024 {
            accessLog?.submit(path: path, pendingLog.removeValue(forKey: path)!)
        }
    }

    func flushAccessLog() {
        guard !pendingLog.isEmpty else { return }
        for (path, buffer) in pendingLog { accessLog?.submit(path: path, buffer) }
        pendingLog.removeAll(keepingCapacity: true)
    }

    /// Takes a reloaded configuration: new requests route with it; pools of upstreams that changed
    /// or are gone are retired (idle connections closed now, leased ones when released).
    func install(setup new: ProxySetup, routes: [String: Route], accessLog: AccessLogSink?) {
        if new !== setup {
            for (key, g) in groups where new.upstreams[g.name].map({ !$0.config.sameDefinition(as: g.upstream) }) ?? true
                || g.tls != nil && new.tls.upstreams[key] == nil {
                g.retire()
                groups.removeValue(forKey: key)
            }
            // Kept TLS pools keep their warm connections; new ones use the reloaded context
            // (trusted certificates re-read from disk).
            for (key, g) in groups where g.tls != nil { g.tls = new.tls.upstreams[key] }
            if new.servers.count != setup.servers.count { stats.resizeServers(new.servers.count) }
            setup = new
            generation += 1
        }
        self.routes = routes
        lastRoute = nil
        lastGroup = nil
        swapAccessLog(accessLog)
    }

    func swapAccessLog(_ sink: AccessLogSink?) {
        flushAccessLog()
        accessLog = sink
    }

    /// The pools of a location's upstream (one group per pool key: plain, or each TLS variant).
    func group(for route: CompiledLocation, upstream name: String) -> UpstreamGroup {
        // The last location asked about, answered without hashing its pool key (most requests
        // on a loop go to the same location); `install` forgets it.
        if route === lastRoute, let g = lastGroup { return g }
        let g: UpstreamGroup
        if let existing = groups[route.poolKey] {
            g = existing
        } else {
            g = UpstreamGroup(upstream: setup.upstreams[name]!, loop: self, tls: route.upstreamTLS)
            groups[route.poolKey] = g
        }
        lastRoute = route
        lastGroup = g
        return g
    }
    private var lastRoute: CompiledLocation?
    private var lastGroup: UpstreamGroup?

    var allGroups: [UpstreamGroup] { Array(groups.values) }

    /// This loop's share of the admin figures.
    func snapshotPart(index: Int) -> SnapshotPart {
        var part = SnapshotPart(index: index, stats: stats)
        for c in connections.values {
            switch c.activity {
            case .reading: part.reading += 1
            case .writing: part.writing += 1
            case .waiting: part.waiting += 1
            }
        }
        let now = nowMs()
        for g in groups.values {
            for s in g.servers {
                let entry = SnapshotPart.Server(
                    up: g.balancer.isAvailable(s.index, now: now), active: s.state.leasedCount, idle: s.state.idleCount,
                    counters: s.counters, learnedIdleMs: s.state.learnedIdleMs, advertisedTimeoutMs: s.state.advertisedTimeoutMs)
                // The same upstream reached over plain and TLS, or with other TLS settings: one figure.
                part.servers[ServerKey(upstream: g.name, index: s.index), default: .none].add(entry)
            }
        }
        return part
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
        }
    }

    var index: Int
    var stats: LoopStats
    var reading = 0
    var writing = 0
    var waiting = 0
    var servers: [ServerKey: Server] = [:]

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
            s.writing += p.writing
            s.waiting += p.waiting
            for i in s.responsesByClass.indices { s.responsesByClass[i] += p.stats.responses(class: i) }
            s.downstreamClosed.merge(p.stats.downstreamClosed.byLabel, uniquingKeysWith: +)
            s.acceptFailures.merge(p.stats.acceptFailures, uniquingKeysWith: +)
            s.otherUpstreamFailures.merge(p.stats.upstreamFailures.byLabel, uniquingKeysWith: +)
            s.tlsHandshakes.merge(p.stats.tlsHandshakes, uniquingKeysWith: +)
            s.tlsSessionsReused += p.stats.tlsResumed
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
                servers.append(Server(address: spec.addressText, up: sum.up, active: sum.active, idle: sum.idle, counters: sum.counters,
                                      learnedIdleMs: sum.learnedIdleMs, advertisedTimeoutMs: sum.advertisedTimeoutMs))
            }
            s.upstreams.append(.init(name: u.name, keepalive: u.keepalive, servers: servers))
        }
        return s
    }
}

/// What a client connection needs to route its requests: its listener's virtual hosts.
struct Route: Sendable {
    var hosts: VirtualHosts
    var servers: [CompiledServer]
    var port: Int
    /// The listener's TLS (certificates by SNI), when it listens with `ssl`.
    var tls: TLSServerNames?
}

extension TetherConfig.Upstream {
    /// Whether a reloaded upstream can keep the old pools: same servers, same pool settings.
    func sameDefinition(as o: TetherConfig.Upstream) -> Bool {
        // Where a server line stands in the file does not matter, only what it says.
        func placeless(_ list: [UpstreamServer]) -> [UpstreamServer] {
            list.map { var s = $0; s.location = SourceLocation(file: "", line: 0); return s }
        }
        return placeless(servers) == placeless(o.servers)
            && balancing == o.balancing && keepalive == o.keepalive && keepaliveTimeoutMs == o.keepaliveTimeoutMs
            && keepaliveRequests == o.keepaliveRequests && keepaliveTimeMs == o.keepaliveTimeMs
            && tcpKeepalive == o.tcpKeepalive && tcpUserTimeout == o.tcpUserTimeout
    }
}
