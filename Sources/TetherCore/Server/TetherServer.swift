#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TetherConfig
import TetherHTTP
import TetherIO
import TetherTLS

/// A configuration served on Tether's event loops (issue 15). One loop per worker, each on its own thread with its own
/// `SO_REUSEPORT` socket per listening address, its own buffer pool and its own upstream pools;
/// nothing is shared between loops, so the request path takes no lock. TLS at both ends through
/// `TLSSocket`; the admin pages gather every loop's counters through `AdminPages`; access log lines
/// are made on the loops and written by a thread of their own (`AccessLogWriter`); a helper
/// thread (`AdminPages`'s) gathers scrapes and gives memory back after a burst.
public final class TetherServer: @unchecked Sendable {
    /// The running configuration and what was made of it (`reload` replaces both).
    private let current: Mutex<(configuration: Configuration, setup: ProxySetup)>
    /// Each upstream's process-wide `max_conns` and `queue`, by name: kept across reloads that
    /// keep its servers (the caps change in place), made anew otherwise.
    private(set) var limits: [String: UpstreamLimits] = [:]
    /// `health_check`: run on the admin helper's loop, once per process.
    private var healthChecks: HealthChecks?
    /// `server … resolve`: the names' addresses, kept fresh on a thread of their own.
    private var resolver: ResolverThread?
    /// `ssl_stapling` responses fetched from the responders, on a thread of its own.
    private let stapler: Stapler
    /// Reloads and the resolver's changes take turns (each reads and replaces the setup).
    private let changing = Mutex<Int>(0)

    /// What the resolver thread reaches the server through (it is made before the server is).
    private final class Forward: @unchecked Sendable { weak var server: TetherServer? }
    private let forward = Forward()

    /// `configuration` as the loops run it: each `resolve` line expanded into its addresses now.
    private static func expanded(_ configuration: Configuration, _ resolver: ResolverThread?) -> Configuration {
        guard let resolver else { return configuration }
        var c = configuration
        c.upstreams = c.upstreams.map { u in u.expanded { resolver.addresses(upstream: u.name, server: $0) } }
        return c
    }

    /// Looks up the configuration's `resolve` names (on the calling thread) and keeps them fresh.
    private static func prepareResolver(_ existing: ResolverThread?, _ configuration: Configuration, log: LoopErrorLog,
                                        forward: Forward) -> ResolverThread? {
        guard existing != nil || configuration.upstreams.contains(where: \.resolves) else { return nil }
        let r = existing ?? ResolverThread(log: log) { [forward] name in forward.server?.resolvedChanged(name) }
        r.configure(configuration.upstreams)
        return r
    }

    /// The resolver found new addresses for `name`: each loop remakes that upstream's group,
    /// keeping the pools of the addresses that stay; removed ones finish what they carry and
    /// close (their idle connections at once). On the resolver's thread.
    private func resolvedChanged(_ name: String) {
        changing.withLock { _ in
            guard let resolver, let u = current.withLock({ $0.configuration.upstream(named: name) }) else { return }
            let e = u.expanded { resolver.addresses(upstream: name, server: $0) }
            let setup = current.withLock { c -> ProxySetup in
                c.setup = ProxySetup(replacing: c.setup, upstream: e)
                return c.setup
            }
            let l = UpstreamLimits(e)
            limits[name] = l
            for w in workers { w.loop.execute { _ in w.resolved(e, limits: l) } }
            admin?.reconfigure(setup.configuration, listenPorts: Set(boundPorts.map { Int($0.port) }))
        }
    }

    /// For `tether -T`: looks up the configuration's `resolve` names once, and says for each
    /// line (its upstream and index) what it resolves to now.
    public static func resolvedNow(_ configuration: Configuration) -> (Upstream, Int) -> String? {
        guard configuration.upstreams.contains(where: \.resolves) else { return { _, _ in nil } }
        let r = ResolverThread(log: LoopErrorLog(level: .emerg)) { _ in }
        r.configure(configuration.upstreams, keepFresh: false)
        return { u, i in r.describe(upstream: u.name, server: i) }
    }

    /// Hands the health checks `setup`'s upstreams (start and reload).
    private func configureHealthChecks(_ setup: ProxySetup, _ limits: [String: UpstreamLimits]) {
        guard let loop = admin?.helperLoop else { return }
        if healthChecks == nil { healthChecks = HealthChecks(loop: loop, log: log) }
        let list = setup.upstreams.values.compactMap { u in limits[u.name].map { (u, $0) } }
        // An upstream reached over TLS is checked over TLS, with a proxying location's settings.
        var tls: [String: TLSContext] = [:]
        for server in setup.servers {
            for l in server.locations {
                if case .proxy(let p) = l.action, let ctx = l.upstreamTLS, tls[p.upstream] == nil { tls[p.upstream] = ctx }
            }
        }
        let checks = UncheckedBox(healthChecks!)
        loop.execute { [tls] _ in checks.value.configure(list, tls: tls) }
    }

    /// `ssl_stapling` (start and reload): contexts that staple nothing (no responder, a revoked
    /// or stale file) go on without a staple, and the error log says why; those that fetch their
    /// response are handed to the stapler's thread.
    private func configureStapling(_ setup: ProxySetup) {
        var seen = Set<ObjectIdentifier>()
        var fetching: [(TLSContext, Upstream.Resolver?)] = []
        for (i, ctx) in setup.tls.servers.sorted(by: { $0.key < $1.key }).map({ ($0.key, $0.value) })
        where seen.insert(ObjectIdentifier(ctx)).inserted {
            if let p = ctx.staplingProblem { log(.warn, p) }
            if ctx.ocspQuery != nil { fetching.append((ctx, setup.configuration.servers[i].settings.ssl.resolver)) }
        }
        stapler.configure(fetching)
    }

    /// The limits for `setup`'s upstreams (the start's or a reload's thread).
    private func limits(for setup: ProxySetup) -> [String: UpstreamLimits] {
        var next: [String: UpstreamLimits] = [:]
        for (name, u) in setup.upstreams {
            if let old = limits[name], old.fits(u) {
                old.apply(u)
                next[name] = old
            } else {
                next[name] = UpstreamLimits(u)
            }
        }
        limits = next
        return next
    }
    public var configuration: Configuration { current.withLock { $0.configuration } }
    private var loops: [IOLoop] = []
    private var workers: [LoopThread] = []
    private var threads: [pthread_t] = []
    /// The admin pages' gathering (and `stats`); its helper thread runs from `init` to `stop`.
    private var admin: AdminPages?
    /// The error log, at `error_log`'s level.
    public let log: LoopErrorLog
    /// The access log files, when some location has one; opened at `start`.
    private var accessLog: AccessLogWriter?
    /// The address and port each listening address was bound to (port 0 in the configuration:
    /// the one the kernel chose), in `ProxySetup.virtualHosts` order.
    public private(set) var boundPorts: [(address: String, port: UInt16)] = []
    /// `address:port` of each listening address, in the same order.
    private var listenKeys: [String] = []

    /// `admin` renders the admin pages (TetherAdmin's `Renderer`); without one they answer 501.
    public init(_ configuration: Configuration, admin: AdminRenderer? = nil, log: LoopErrorLog? = nil) throws(TetherServerError) {
        let log = log ?? LoopErrorLog(level: configuration.errorLog.level)
        self.log = log
        resolver = Self.prepareResolver(nil, configuration, log: log, forward: forward)
        let stapler = Stapler(log: log)
        self.stapler = stapler
        do {
            current = Mutex((configuration, try ProxySetup(Self.expanded(configuration, resolver))))
            self.admin = try AdminPages(renderer: admin, configuration: configuration, stapling: { stapler.fetches })
        } catch {
            throw TetherServerError(lines: ["\(error)"])
        }
        forward.server = self
    }

    public var workerCount: Int {
        if !loops.isEmpty { return loops.count }
        switch configuration.workerProcesses {
        case .auto: return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        case .count(let n): return max(1, n)
        }
    }

    /// Binds every listening address on every loop, then runs each loop on a thread of its own.
    public func start() throws(TetherServerError) {
        // The resolver's changes wait until the loops have the setup this start reads.
        try changing.withLock { _ throws(TetherServerError) in try startLocked() }
    }

    private func startLocked() throws(TetherServerError) {
        let setup = current.withLock { $0.setup }
        var made: [IOLoop] = []
        var bound: Bound
        do {
            try Self.check(setup)
            for _ in 0..<workerCount { made.append(try IOLoop()) }
            bound = try bind(setup, loops: made, keeping: [:])
        } catch {
            for l in made { l.closeAll() }
            throw TetherServerError(lines: ["\(error)"])
        }
        let writer: AccessLogWriter?
        do {
            let paths = Self.accessLogPaths(setup.configuration)
            writer = paths.isEmpty ? nil : try AccessLogWriter(paths: paths)
        } catch {
            bound.closeAll()
            for l in made { l.closeAll() }
            throw TetherServerError(lines: [error.description])
        }
        accessLog = writer
        let workers = made.enumerated().map { i, loop in LoopThread(loop: loop, log: log, admin: admin) }
        let upstreamLimits = limits(for: setup)
        configureHealthChecks(setup, upstreamLimits)
        configureStapling(setup)
        for (i, w) in workers.enumerated() {
            // Before the loop's thread runs: nothing else touches it yet.
            w.install(setup, limits: upstreamLimits, sockets: bound.sockets(loop: i), accessLog: writer)
        }
        boundPorts = bound.listens.map { ($0.address, $0.port) }
        listenKeys = bound.listens.map(\.key)
        loops = made
        self.workers = workers
        for work in workers {
            let box = Unmanaged.passRetained(work)
            var t = pthread_t()
            let rc = pthread_create(&t, nil, { arg in
                let work = Unmanaged<LoopThread>.fromOpaque(arg!).takeRetainedValue()
                work.run()
                return nil
            }, box.toOpaque())
            guard rc == 0 else {
                box.release()
                throw TetherServerError(lines: ["pthread_create failed (\(rc))"])
            }
            threads.append(t)
        }
        admin?.serve(workers.map { w in AdminPages.Source(loop: w.loop, part: { w.snapshotPart(index: $0) }) },
                     configuration: setup.configuration, listenPorts: Set(boundPorts.map { Int($0.port) }))
    }

    /// Swaps in `configuration` without dropping a connection, as nginx's reload does but within
    /// the process: requests in flight finish under the old one, new requests (also on kept-alive
    /// connections) are routed by the new one; listening addresses that stay keep their sockets
    /// and accept queues, new ones are bound on every loop, removed ones close; upstreams whose
    /// definition is unchanged keep their warm connections, changed or removed ones close their
    /// idle connections now and the others as their exchanges end; certificates and TLS settings
    /// are read again (the files may have been replaced), and the access log files are opened
    /// anew. All or nothing: a configuration that cannot be set up (a certificate OpenSSL refuses,
    /// a port that cannot be bound) is refused whole, and what it opened is closed again.
    /// `worker_processes` changes take effect at the next start (`error_log` is the binary's: it
    /// applies the new level and file).
    public func reload(_ configuration: Configuration) throws {
        try changing.withLock { _ throws in try reloadLocked(configuration) }
    }

    private func reloadLocked(_ configuration: Configuration) throws {
        resolver = Self.prepareResolver(resolver, configuration, log: log, forward: forward)
        let setup = try ProxySetup(Self.expanded(configuration, resolver))
        try Self.check(setup)
        let keep = Dictionary(uniqueKeysWithValues: listenKeys.map { ($0, true) })
        var bound = try bind(setup, loops: loops, keeping: keep)
        let writer: AccessLogWriter?
        do {
            let paths = Self.accessLogPaths(configuration)
            writer = paths.isEmpty ? nil : try AccessLogWriter(paths: paths)
        } catch {
            bound.closeAll()
            throw TetherServerError(lines: [error.description])
        }
        let upstreamLimits = limits(for: setup)
        configureHealthChecks(setup, upstreamLimits)
        configureStapling(setup)
        // Each loop takes the new configuration between two of its passes; this waits for all.
        let pending = Atomic<Int>(workers.count)
        for (i, w) in workers.enumerated() {
            let sockets = bound.sockets(loop: i)
            w.loop.execute { _ in
                w.install(setup, limits: upstreamLimits, sockets: sockets, accessLog: writer)
                pending.subtract(1, ordering: .releasing)
            }
        }
        // Polled, on the thread that reloads (never a loop's).
        while pending.load(ordering: .acquiring) > 0 && workers.allSatisfy({ !$0.finished.load(ordering: .acquiring) }) { usleep(1_000) }
        current.withLock { $0 = (configuration, setup) }
        boundPorts = bound.listens.map { ($0.address, $0.port) }
        listenKeys = bound.listens.map(\.key)
        admin?.reconfigure(setup.configuration, listenPorts: Set(boundPorts.map { Int($0.port) }))
        // The loops handed the old writer their last lines as they switched.
        let old = accessLog
        accessLog = writer
        old?.stop()
        for w in configuration.warnings { log(.warn, "\(w)") }
        log(.notice, "configuration reloaded from \(configuration.file)")
    }

    /// The checks that need more than the configuration's text: TLS certificates, keys, cipher
    /// lists and curves, as OpenSSL reads them (for `tether -t` and before a start or reload).
    public static func validate(_ configuration: Configuration) throws(ConfigErrors) {
        _ = try TLSSetup(configuration)
    }

    /// What cannot be set up on a loop, found before any loop is touched: an upstream server
    /// that is not a numeric address (names are resolved when the configuration is read).
    static func check(_ setup: ProxySetup) throws(SetupError) {
        for (_, u) in setup.upstreams {
            guard !u.servers.isEmpty else { throw SetupError("\(u.location): upstream \"\(u.name)\" has no server") }
            for s in u.servers where UInt16(exactly: s.port) == nil || InetAddress(host: s.address, port: UInt16(clamping: s.port)) == nil {
                throw SetupError("\(u.location): server \(s.host):\(s.port) of upstream \"\(u.name)\": not a numeric address")
            }
        }
    }

    /// The listening sockets of a configuration: for each listening address its key
    /// (`address:port`, the bound port for port 0) and, per loop, a socket made for it, or none
    /// where the running configuration has that address already (its sockets stay).
    struct Bound {
        struct Listen {
            var address: String
            var port: UInt16
            var key: String
        }
        var listens: [Listen] = []
        /// [listen][loop]: a new socket, or -1 for a kept one.
        var fds: [[Int32]] = []

        /// Loop `i`'s sockets, with each listening address's key.
        func sockets(loop i: Int) -> [(fd: Int32, key: String)] { zip(fds, listens).map { ($0[i], $1.key) } }

        mutating func closeAll() {
            for row in fds { for fd in row where fd >= 0 { Glibc.close(fd) } }
            fds = []
        }
    }

    /// Binds the listening addresses of `setup` that `keeping` does not name, on every loop
    /// (a `SO_REUSEPORT` socket each); on a failure, closes what it bound and throws nginx's words.
    private func bind(_ setup: ProxySetup, loops: [IOLoop], keeping: [String: Bool]) throws(SetupError) -> Bound {
        var b = Bound()
        for (listen, _, _) in setup.virtualHosts() {
            let key = "\(listen.address):\(listen.port)"
            if listen.port != 0, keeping[key] != nil {
                b.listens.append(.init(address: listen.address, port: UInt16(clamping: listen.port), key: key))
                b.fds.append([Int32](repeating: -1, count: loops.count))
                continue
            }
            var port = UInt16(clamping: listen.port)
            var row: [Int32] = []
            for _ in loops {
                do {
                    let (fd, p) = try Sockets.listenTCP(address: listen.address, port: port, backlog: Int32(listen.backlog))
                    row.append(fd)
                    // Port 0: the first loop's port is every other loop's too.
                    port = p
                } catch {
                    for fd in row { Glibc.close(fd) }
                    b.closeAll()
                    // As nginx: bind() to [::1]:8080 failed (98: Address already in use).
                    throw SetupError("\(listen.location): \(error.call)() to \(listen.addressText) failed (\(error.errno): \(String(cString: strerror(error.errno))))")
                }
            }
            b.listens.append(.init(address: listen.address, port: port, key: "\(listen.address):\(port)"))
            b.fds.append(row)
        }
        return b
    }

    /// Runs `body` on every loop's thread, between two of its passes (tests hold a loop busy this way).
    func executeOnEachLoop(_ body: @escaping @Sendable () -> Void) {
        for l in loops { l.execute { _ in body() } }
    }

    /// Every loop's counters, summed (for tests and tools; a scrape gets them without waiting).
    public func stats() -> StatsSnapshot {
        guard let admin else { return StatsSnapshot() }
        let result = Mutex<StatsSnapshot?>(nil)
        admin.snapshot { s in result.withLock { $0 = s } }
        // Polled: a test's or a tool's wait, never a loop's.
        while result.withLock({ $0 == nil }) { usleep(1_000) }
        return result.withLock { $0! }
    }

    /// Stops every loop after its pass under way, waits for their threads, and closes every
    /// listener and connection at once (a fast stop: answers under way are cut).
    public func stop() {
        resolver?.stop()
        stapler.stop()
        for l in loops { l.stop() }
        for t in threads { pthread_join(t, nil) }
        for l in loops { l.closeAll() }
        threads = []
        loops = []
        workers = []
        if let checks = healthChecks, let loop = admin?.helperLoop {
            let box = UncheckedBox(checks)
            loop.execute { _ in box.value.stop() }
        }
        healthChecks = nil
        admin?.stop()
        admin = nil
        // After the loops, which handed it their last lines as they stopped.
        accessLog?.stop()
        accessLog = nil
    }

    /// SIGUSR1: the access log files are opened again by their names (after logrotate moved
    /// them); one that cannot be is logged and keeps its old file.
    public func reopenLogs() {
        let log = self.log
        accessLog?.reopen { log(.alert, "reopening access log failed: \($0)") }
    }

    /// The files the configuration's `access_log` lines write, each once.
    static func accessLogPaths(_ configuration: Configuration) -> [String] {
        var paths: [String] = []
        func add(_ entries: [AccessLog]) {
            for case .file(let p, _) in entries where !paths.contains(p) { paths.append(p) }
        }
        for s in configuration.servers {
            add(s.settings.accessLog)
            for l in s.locations { add(l.settings.accessLog) }
        }
        return paths
    }

    /// Stops gracefully, as nginx does on SIGQUIT: every loop closes its listening sockets and
    /// its idle client connections at once; a connection with a request under way gets its
    /// answer (`Connection: close` unless its head went out already) and closes after it; a loop
    /// stops when its last client connection has closed. Whatever is still open after
    /// `timeoutMs` is closed (`stop`). Returns once every loop has stopped.
    public func shutdown(timeoutMs: Int64 = 10_000) {
        for w in workers { w.loop.execute { _ in w.drain() } }
        let deadline = IOLoop.monotonicNanoseconds() + UInt64(max(0, timeoutMs)) * 1_000_000
        // The main thread waits; the loops do not. (Polled: a shutdown is not a hot path, and a
        // loop ends on its own thread without anyone to signal but its own exit.)
        while workers.contains(where: { !$0.finished.load(ordering: .acquiring) }) && IOLoop.monotonicNanoseconds() < deadline {
            usleep(5_000)
        }
        stop()
    }


    /// What a client connection needs of the server's settings.
    static func clientSettings(_ s: HTTPSettings) -> ClientSettings {
        var c = ClientSettings()
        let (count, size) = s.largeClientHeaderBuffers
        c.headLimits = HeadParser.Limits(lineLimit: size, headLimit: count * size, mergeSlashes: s.mergeSlashes)
        c.headerTimeoutMs = s.clientHeaderTimeoutMs
        c.bodyTimeoutMs = s.clientBodyTimeoutMs
        c.sendTimeoutMs = s.sendTimeoutMs
        c.keepaliveTimeoutMs = s.keepaliveTimeoutMs
        c.keepaliveRequests = s.keepaliveRequests
        c.keepaliveTimeMs = s.keepaliveTimeMs
        c.http2.maxConcurrentStreams = s.ssl.http2MaxConcurrentStreams
        c.http2.maxHeaderListSize = count * size
        c.http2ChunkSize = s.ssl.http2ChunkSize
        c.http2RecvBufferSize = s.ssl.http2RecvBufferSize
        return c
    }
}

/// `worker_connections` on one loop: the client connections its listening addresses hold
/// together. One accepted beyond them is closed at once, and that is logged as nginx words it,
/// at most once a second (with the count since the last line).
private final class Admission {
    var limit: Int
    var clients: [ClientLoop] = []
    /// Since the start (accepted, closed at once).
    private(set) var refusedTotal = 0
    private let limiter = LogLimiter()

    let log: LoopErrorLog

    init(limit: Int, log: LoopErrorLog) {
        self.limit = limit
        self.log = log
    }

    func admits(now: UInt64) -> Bool {
        var open = 0
        for c in clients { open += c.open }
        guard open >= limit else { return true }
        refusedTotal += 1
        if let since = limiter.due(now: now) {
            let extra = since > 1 ? " (\(since) connections closed since the last line)" : ""
            log(.alert, "\(limit) worker_connections are not enough\(extra)")
        }
        return false
    }
}

/// A line for a repeating event at most once a second (on one loop): `due` counts the event and
/// says, when a line is due, how many events it stands for.
private final class LogLimiter {
    private var since = 0
    private var last: UInt64 = 0

    func due(now: UInt64) -> Int? {
        since += 1
        guard last == 0 || now &- last >= 1_000_000_000 else { return nil }
        defer { since = 0; last = now }
        return since
    }
}

/// A loop, its listeners and its client connections, run on one thread until the loop is stopped.
/// `install` gives it a configuration (at start, and at each reload, between two passes).
private final class LoopThread: @unchecked Sendable {
    let loop: IOLoop
    let log: LoopErrorLog
    let admin: AdminPages?
    let buffers = BufferPool()
    let admission: Admission
    /// The listening addresses of the running configuration, by `address:port`.
    private var listening: [String: (listener: Listener, clients: ClientLoop)] = [:]
    /// Every client side of this loop, those of listening addresses a reload removed included
    /// (their connections go on; their counters stay in the totals).
    private(set) var clients: [ClientLoop] = []
    /// The upstream groups by pool key (an upstream's name; with its TLS settings for https).
    private(set) var upstreams: [String: LoopUpstream] = [:]
    /// What the last `install` made the groups with (a group remade by `resolved` needs them).
    private var socketKeepalive = Set<String>()
    private var hostKeepalive = HostKeepalive()
    /// The configuration's `server` blocks.
    private(set) var servers = 0
    private(set) var accessLog: LoopAccessLog?
    /// `run` has returned (read by the thread that shuts the server down).
    let finished = Atomic<Bool>(false)
    /// Gives back what a burst left behind (`keepHouse`).
    private var housekeeping: LoopTimer?
    static let housekeepingNanoseconds: UInt64 = 5_000_000_000
    /// Spare buffers a loop keeps however long they lie unused (1 MiB of 16 KiB buffers).
    static let keptSpares = 64

    init(loop: IOLoop, log: LoopErrorLog, admin: AdminPages?) {
        self.loop = loop
        self.log = log
        self.admin = admin
        admission = Admission(limit: 512, log: log)
    }

    /// Takes `setup` on this loop's thread (or before the thread runs). `sockets`: for each of
    /// its listening addresses a new listening socket, or -1 where the address is listened on
    /// already (that listener stays, with its accept queue).
    func install(_ setup: ProxySetup, limits: [String: UpstreamLimits], sockets: [(fd: Int32, key: String)], accessLog writer: AccessLogWriter?) {
        let configuration = setup.configuration
        if housekeeping == nil {
            do {
                housekeeping = try LoopTimer.repeating(loop: loop, intervalNanoseconds: Self.housekeepingNanoseconds) { [unowned self] in keepHouse() }
            } catch {
                log(.alert, "housekeeping: \(error)")
            }
        }
        // Upstreams: an unchanged definition keeps its pools and their warm connections (TLS
        // ones take the new context for their next connections); the others are made anew, and
        // the replaced ones close what is idle and the rest as their exchanges end.
        var socketKeepaliveGroups = Set<String>()
        var groups: [String: (upstream: String, context: TLSContext?)] = [:]
        for server in setup.servers {
            for l in server.locations {
                guard case .proxy(let p) = l.action else { continue }
                if l.settings.proxySocketKeepalive { socketKeepaliveGroups.insert(p.upstream) }
                groups[l.poolKey] = (p.upstream, l.upstreamTLS)
            }
        }
        for name in setup.upstreams.keys where groups[name] == nil { groups[name] = (name, nil) }
        var next: [String: LoopUpstream] = [:]
        for (key, g) in groups {
            guard let u = setup.upstreams[g.upstream] else { continue }
            if let old = upstreams[key], old.config.sameDefinition(as: u), (old.tls == nil) == (g.context == nil) {
                old.useTLS(g.context)
                old.limitsChanged()
                next[key] = old
                continue
            }
            do {
                next[key] = try LoopUpstream.make(u, loop: loop, buffers: buffers, log: log, socketKeepalive: socketKeepaliveGroups.contains(g.upstream),
                                                  host: setup.hostKeepalive, tls: g.context, limits: limits[g.upstream])
            } catch {
                // `TetherServer.check` refused such a configuration before any loop was touched.
                log(.alert, "\(error)")
            }
        }
        for (key, old) in upstreams where next[key] !== old { old.retire() }
        upstreams = next
        socketKeepalive = socketKeepaliveGroups
        hostKeepalive = setup.hostKeepalive
        servers = configuration.servers.count
        // The access log: lines from now on go to the new files.
        accessLog?.flush()
        accessLog?.close()
        accessLog = writer.flatMap { try? LoopAccessLog(writer: $0, formats: configuration.logFormats, loop: loop) }
        admission.limit = configuration.workerConnections
        // Listening addresses: a kept one takes the new routing for its next requests (also on
        // kept-alive connections); a new one starts accepting; a removed one stops.
        var nextListening: [String: (listener: Listener, clients: ClientLoop)] = [:]
        for (i, (listen, vhosts, compiled)) in setup.virtualHosts().enumerated() {
            let router = Router(hosts: vhosts, servers: compiled, upstreams: upstreams, admin: admin)
            var settings = TetherServer.clientSettings(compiled[vhosts.defaultIndex].server.settings)
            // `http2 on` on a plain address: HTTP/2 with prior knowledge (h2c), told by its preface.
            settings.h2c = !listen.ssl && compiled[vhosts.defaultIndex].server.settings.ssl.http2
            let tls = listen.ssl ? setup.tls.names(hosts: vhosts, servers: compiled) : nil
            let (fd, key) = i < sockets.count ? sockets[i] : (-1, "")
            if fd < 0, let kept = listening.removeValue(forKey: key) {
                kept.clients.reconfigure(handler: router, settings: settings, servers: servers, tls: tls)
                kept.clients.accessLog = accessLog
                kept.clients.proxyProtocol = listen.proxyProtocol
                nextListening[key] = kept
                continue
            }
            guard fd >= 0 else { continue }
            let clients = ClientLoop(loop: loop, pool: buffers, settings: settings, handler: router, servers: servers)
            clients.accessLog = accessLog
            clients.log = log
            clients.tls = tls
            clients.proxyProtocol = listen.proxyProtocol
            clients.emptied = { [unowned self] in self.stopIfEmpty() }
            // Set once on the listening socket: accepted sockets inherit TCP_NODELAY and the
            // keepalive options (Linux copies them), so no setsockopt per connection.
            Sockets.setNoDelay(fd)
            let tuning = SocketTuning(keepalive: listen.soKeepalive, userTimeout: listen.tcpUserTimeout, host: setup.hostKeepalive)
            for failure in tuning.apply(toSocket: fd) { log(.warn, "\(failure) on listen \(listen.addressText)") }
            let listener = makeListener(fd: fd, clients: clients, name: listen.addressText)
            do {
                try listener.start(on: loop)
            } catch {
                log(.alert, "listen \(listen.addressText): \(error)")
                Glibc.close(fd)
                continue
            }
            self.clients.append(clients)
            nextListening[key] = (listener, clients)
        }
        for (_, removed) in listening { removed.listener.stop(on: loop) }
        listening = nextListening
        admission.clients = self.clients
    }

    /// `u`'s `resolve` names have new addresses (`u` expanded with them): each group of it is
    /// remade, keeping the pools of the servers that stay; the others finish what they carry and
    /// close, their idle connections at once. Requests from now on go to the new group.
    func resolved(_ u: Upstream, limits: UpstreamLimits) {
        for (key, old) in upstreams where old.config.name == u.name && !old.config.sameDefinition(as: u) {
            var reuse: [String: UpstreamPool] = [:]
            for p in old.pools where reuse[p.addressText] == nil { reuse[p.addressText] = p }
            let group: LoopUpstream
            do {
                group = try LoopUpstream.make(u, loop: loop, buffers: buffers, log: log, socketKeepalive: socketKeepalive.contains(u.name),
                                              host: hostKeepalive, tls: old.tls, limits: limits, reusing: reuse)
            } catch {
                log(.alert, "\(error)")
                continue
            }
            for p in old.pools where !group.pools.contains(where: { $0 === p }) { p.retire() }
            old.letGo()
            upstreams[key] = group
            for (_, l) in listening { (l.clients.handler as? Router)?.replace(key, with: group) }
        }
    }

    private func makeListener(fd: Int32, clients: ClientLoop, name: String) -> Listener {
        let admission = self.admission
        let acceptLog = LogLimiter()
        let log = self.log
        return Listener(fd: fd, accepted: { c, loop in
            guard admission.admits(now: loop.now) else { Glibc.close(c); return }
            _ = try? clients.adopt(c)
        }, failed: { e, loop in
            clients.stats.acceptFailures[e.errno == EMFILE ? "emfile" : e.errno == ENFILE ? "enfile" : "other", default: 0] += 1
            // A back-off of 100 ms follows each failure; the line at most once a second, with
            // the count since the last one.
            if let since = acceptLog.due(now: loop.now) {
                log(.crit, "\(e) on \(name) (\(since) failures since the last message), accepting again in 100 ms")
            }
        })
    }

    /// This loop's figures for the admin pages (on the loop's thread): its listening addresses'
    /// counters, its client connections by what they do (nginx's reading, writing, waiting), and
    /// each upstream server's pool.
    func snapshotPart(index: Int) -> SnapshotPart {
        var stats = LoopStats(servers: servers)
        for c in clients {
            stats.add(c.stats)
            stats.addAnswers(c.answers)
            stats.downstreamActive += c.open
        }
        // Connections over worker_connections were accepted, then closed at once: not handled.
        stats.downstreamAccepted += admission.refusedTotal
        var part = SnapshotPart(index: index, stats: stats)
        let spools = buffers.spools
        part.buffered = .init(memoryBytes: spools.memoryBytes, fileBytes: spools.fileBytes, filesOpened: spools.filesOpened,
                              bytesWrittenToFiles: spools.bytesWrittenToFiles, fileErrors: spools.fileErrors)
        for h in loop.handlers {
            if let session = h as? H2Session {
                if session.streamCount > 0 { part.writing += 1 } else { part.waiting += 1 }
                part.http2StreamsActive += session.streamCount
                continue
            }
            guard let c = h as? ClientConnection, c.isOpen, !c.isStream else { continue }
            switch c.state.activity {
            case .reading: part.reading += 1
            case .writing: part.writing += 1
            case .waiting: part.waiting += 1
            }
        }
        let now = Int64(loop.now / 1_000_000)
        for u in upstreams.values {
            part.stats.upstreamFailures.add(u.groupFailures)
            part.queues[u.name, default: .init()].waiting += u.waitingCount
            part.queues[u.name, default: .init()].wait.add(u.queueWait)
            part.queues[u.name, default: .init()].refused.add(u.groupFailures)
            for (i, p) in u.pools.enumerated() {
                // The same upstream over plain and TLS, or with other TLS settings: one figure.
                var health: StatsSnapshot.Health?
                if u.checked, let slot = p.slot {
                    let ns = slot.lastCheckNs.load(ordering: .relaxed)
                    health = .init(healthy: slot.healthy.load(ordering: .relaxed), passed: slot.checksPassed.load(ordering: .relaxed),
                                   failed: slot.checksFailed.load(ordering: .relaxed), transitions: slot.transitions.load(ordering: .relaxed),
                                   lastCheckSeconds: ns < 0 ? nil : Double(ns) / 1e9)
                }
                part.servers[ServerKey(upstream: u.name, index: i), default: .none].add(SnapshotPart.Server(
                    up: u.balancer.isAvailable(i, now: now), active: p.openCount - p.idleCount, idle: p.idleCount, counters: p.counters,
                    learnedIdleMs: p.state.learnedIdleMs, advertisedTimeoutMs: p.state.advertisedTimeoutMs, health: health))
            }
        }
        return part
    }

    /// Every 5 s: the spare buffers that lay unused for a whole period (beyond a few) go back to
    /// malloc, and when they add up the helper asks malloc to hand free memory back to the
    /// system. A burst's buffers come back within two periods; a steady load keeps the spares it
    /// cycles through, so this costs the request path nothing.
    private func keepHouse() {
        let freed = buffers.trimUnused(keeping: Self.keptSpares)
        if freed > 0 { admin?.giveBackMemory() }
    }

    func run() {
        do {
            try loop.run()
        } catch {
            log(.emerg, "event loop stopped: \(error)")
        }
        // The lines of the requests answered so far go to the writer before the loop ends.
        accessLog?.flush()
        finished.store(true, ordering: .releasing)
    }

    /// On the loop: the graceful shutdown's start (`TetherServer.shutdown`).
    func drain() {
        for (_, l) in listening { l.listener.stop(on: loop) }
        for c in clients { c.beginDrain() }
        for h in loop.handlers {
            (h as? ClientConnection)?.drain()
            (h as? H2Session)?.drain()
        }
        stopIfEmpty()
    }

    private func stopIfEmpty() {
        if clients.allSatisfy({ $0.open == 0 }) { loop.stop() }
    }
}

/// A configuration the loops refuse, or a start that failed: one `file:line: message` per line.
public struct TetherServerError: Error, CustomStringConvertible {
    public let lines: [String]
    public var description: String { lines.joined(separator: "\n") }
}

/// A reference handed to the thread that alone uses it (the helper's loop).
struct UncheckedBox<T: AnyObject>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
