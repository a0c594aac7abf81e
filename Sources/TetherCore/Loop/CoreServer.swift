#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TetherConfig
import TetherHTTP
import TetherIO
import TetherTLS

/// A configuration served on Tether's own loop (issue 15), beside the SwiftNIO path until the
/// switch: `tether --event-loop own`. One loop per worker, each on its own thread with its own
/// `SO_REUSEPORT` socket per listening address, its own buffer pool and its own upstream pools;
/// nothing is shared between loops, so the request path takes no lock. TLS at both ends through
/// `TLSSocket`; the admin pages gather every loop's counters through `CoreAdmin`; access log lines
/// are made on the loops and written by a thread of their own (`AccessLogWriter`). Not yet here:
/// reload and upgrade tunnels.
public final class CoreServer: @unchecked Sendable {
    public let configuration: Configuration
    private let setup: ProxySetup
    private var loops: [IOLoop] = []
    private var workers: [LoopThread] = []
    private var threads: [pthread_t] = []
    /// The admin pages' gathering (and `stats`); its helper thread runs from `init` to `stop`.
    private var admin: CoreAdmin?
    /// The error log, at `error_log`'s level.
    public let log: LoopErrorLog
    /// The access log files, when some location has one; opened at `start`.
    private var accessLog: AccessLogWriter?
    /// The address and port each listening address was bound to (port 0 in the configuration:
    /// the one the kernel chose), in `ProxySetup.virtualHosts` order.
    public private(set) var boundPorts: [(address: String, port: UInt16)] = []

    /// `admin` renders the admin pages (TetherAdmin's `Renderer`); without one they answer 501.
    public init(_ configuration: Configuration, admin: AdminRenderer? = nil, log: LoopErrorLog? = nil) throws(CoreServerError) {
        self.log = log ?? LoopErrorLog(level: configuration.errorLog.level)
        self.configuration = configuration
        do {
            setup = try ProxySetup(configuration)
            self.admin = try CoreAdmin(renderer: admin, configuration: configuration)
        } catch {
            throw CoreServerError(lines: ["\(error)"])
        }
    }

    public var workerCount: Int {
        switch configuration.workerProcesses {
        case .auto: max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        case .count(let n): max(1, n)
        }
    }

    /// Binds every listening address on every loop, then runs each loop on a thread of its own.
    public func start() throws(CoreServerError) {
        let hosts = setup.virtualHosts()
        // Upstreams some location reaches with proxy_socket_keepalive on.
        var socketKeepalive = Set<String>()
        for server in setup.servers {
            for l in server.locations {
                if case .proxy(let p) = l.action, l.settings.proxySocketKeepalive { socketKeepalive.insert(p.upstream) }
            }
        }
        // `proxy_pass https://` locations: a pool group per upstream and TLS settings (the
        // location's pool key), so that connections are reused only under the same settings.
        var tlsGroups: [String: (upstream: String, context: TLSContext)] = [:]
        for server in setup.servers {
            for l in server.locations {
                if case .proxy(let p) = l.action, let context = l.upstreamTLS { tlsGroups[l.poolKey] = (p.upstream, context) }
            }
        }
        var ports = hosts.map { UInt16(clamping: $0.0.port) }
        var workers: [LoopThread] = []
        // Loops made so far: on a failure their listening sockets are closed again.
        var made: [IOLoop] = []
        do {
            let paths = Self.accessLogPaths(configuration)
            if !paths.isEmpty { accessLog = try AccessLogWriter(paths: paths) }
            for _ in 0..<workerCount {
                let loop = try IOLoop()
                made.append(loop)
                let buffers = BufferPool()
                var upstreams: [String: LoopUpstream] = [:]
                for (name, u) in setup.upstreams {
                    upstreams[name] = try LoopUpstream.make(u.config, loop: loop, buffers: buffers, log: log,
                                                            socketKeepalive: socketKeepalive.contains(name), host: setup.hostKeepalive)
                }
                for (key, g) in tlsGroups {
                    guard let u = setup.upstreams[g.upstream] else { continue }
                    upstreams[key] = try LoopUpstream.make(u.config, loop: loop, buffers: buffers, log: log,
                                                           socketKeepalive: socketKeepalive.contains(g.upstream), host: setup.hostKeepalive,
                                                           tls: g.context)
                }
                var listeners: [Listener] = []
                var clientLoops: [ClientLoop] = []
                let loopLog = try accessLog.map { try LoopAccessLog(writer: $0, formats: configuration.logFormats, loop: loop) }
                let admission = Admission(limit: configuration.workerConnections, log: log)
                let acceptLog = LogLimiter()
                let log = self.log
                for (i, (listen, vhosts, servers)) in hosts.enumerated() {
                    let router = CoreRouter(hosts: vhosts, servers: servers, upstreams: upstreams, admin: admin)
                    let clients = ClientLoop(loop: loop, pool: buffers, settings: Self.clientSettings(servers[vhosts.defaultIndex].server.settings),
                                             handler: router, servers: configuration.servers.count)
                    clients.accessLog = loopLog
                    clients.log = log
                    if listen.ssl { clients.tls = setup.tls.names(hosts: vhosts, servers: servers) }
                    clientLoops.append(clients)
                    admission.clients.append(clients)
                    let fd: Int32, port: UInt16
                    do {
                        (fd, port) = try Sockets.listenTCP(address: listen.address, port: ports[i], backlog: Int32(listen.backlog))
                    } catch {
                        // As nginx: bind() to [::1]:8080 failed (98: Address already in use).
                        throw CoreSetupError("\(listen.location): \(error.call)() to \(listen.addressText) failed (\(error.errno): \(String(cString: strerror(error.errno))))")
                    }
                    // Set once on the listening socket: accepted sockets inherit TCP_NODELAY and
                    // the keepalive options (Linux copies them), so no setsockopt per connection.
                    Sockets.setNoDelay(fd)
                    let tuning = SocketTuning(keepalive: listen.soKeepalive, userTimeout: listen.tcpUserTimeout, host: setup.hostKeepalive)
                    for failure in tuning.apply(toSocket: fd) { log(.warn, "\(failure) on listen \(listen.addressText)") }
                    // Port 0: the first loop's port is every other loop's too.
                    ports[i] = port
                    let where_ = listen.addressText
                    let listener = Listener(fd: fd, accepted: { c, loop in
                        guard admission.admits(now: loop.now) else { Glibc.close(c); return }
                        _ = try? clients.adopt(c)
                    }, failed: { e, loop in
                        clients.stats.acceptFailures[e.errno == EMFILE ? "emfile" : e.errno == ENFILE ? "enfile" : "other", default: 0] += 1
                        // A back-off of 100 ms follows each failure; the line at most once a second,
                        // with the count since the last one, as the SwiftNIO path logs it.
                        if let since = acceptLog.due(now: loop.now) {
                            log(.crit, "\(e) on \(where_) (\(since) failures since the last message), accepting again in 100 ms")
                        }
                    })
                    try listener.start(on: loop)
                    listeners.append(listener)
                }
                workers.append(LoopThread(loop: loop, listeners: listeners, clients: clientLoops, upstreams: upstreams,
                                          admission: admission, servers: configuration.servers.count, log: log, accessLog: loopLog))
            }
        } catch let e as CoreSetupError {
            for l in made { l.closeAll() }
            accessLog?.stop()
            accessLog = nil
            throw CoreServerError(lines: [e.description])
        } catch {
            for l in made { l.closeAll() }
            accessLog?.stop()
            accessLog = nil
            throw CoreServerError(lines: ["\(error)"])
        }
        boundPorts = zip(hosts, ports).map { ($0.0.address, $1) }
        loops = workers.map(\.loop)
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
                throw CoreServerError(lines: ["pthread_create failed (\(rc))"])
            }
            threads.append(t)
        }
        admin?.serve(workers.map { w in CoreAdmin.Source(loop: w.loop, part: { w.snapshotPart(index: $0) }) },
                     listenPorts: Set(ports.map(Int.init)))
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
        for l in loops { l.stop() }
        for t in threads { pthread_join(t, nil) }
        for l in loops { l.closeAll() }
        threads = []
        loops = []
        workers = []
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
        c.keepaliveTimeoutMs = s.keepaliveTimeoutMs
        c.keepaliveRequests = s.keepaliveRequests
        c.keepaliveTimeMs = s.keepaliveTimeMs
        return c
    }
}

/// `worker_connections` on one loop: the client connections its listening addresses hold
/// together. One accepted beyond them is closed at once, and that is logged as nginx words it,
/// at most once a second (with the count since the last line).
private final class Admission {
    let limit: Int
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
private final class LoopThread: @unchecked Sendable {
    let loop: IOLoop
    let listeners: [Listener]
    let clients: [ClientLoop]
    let upstreams: [String: LoopUpstream]
    let admission: Admission
    /// The configuration's `server` blocks.
    let servers: Int
    let log: LoopErrorLog
    let accessLog: LoopAccessLog?
    /// `run` has returned (read by the thread that shuts the server down).
    let finished = Atomic<Bool>(false)

    init(loop: IOLoop, listeners: [Listener], clients: [ClientLoop], upstreams: [String: LoopUpstream], admission: Admission, servers: Int, log: LoopErrorLog, accessLog: LoopAccessLog?) {
        self.log = log
        self.accessLog = accessLog
        self.loop = loop
        self.listeners = listeners
        self.clients = clients
        self.upstreams = upstreams
        self.admission = admission
        self.servers = servers
        for c in clients { c.emptied = { [unowned self] in self.stopIfEmpty() } }
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
        for h in loop.handlers {
            guard let c = h as? ClientConnection, c.isOpen else { continue }
            switch c.state.activity {
            case .reading: part.reading += 1
            case .writing: part.writing += 1
            case .waiting: part.waiting += 1
            }
        }
        let now = Int64(loop.now / 1_000_000)
        for u in upstreams.values {
            part.stats.upstreamFailures.add(u.groupFailures)
            for (i, p) in u.pools.enumerated() {
                // The same upstream over plain and TLS, or with other TLS settings: one figure.
                part.servers[ServerKey(upstream: u.name, index: i), default: .none].add(SnapshotPart.Server(
                    up: u.balancer.isAvailable(i, now: now), active: p.openCount - p.idleCount, idle: p.idleCount, counters: p.counters,
                    learnedIdleMs: p.state.learnedIdleMs, advertisedTimeoutMs: p.state.advertisedTimeoutMs))
            }
        }
        return part
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

    /// On the loop: the graceful shutdown's start (`CoreServer.shutdown`).
    func drain() {
        for l in listeners { l.stop(on: loop) }
        for c in clients { c.beginDrain() }
        for h in loop.handlers { (h as? ClientConnection)?.drain() }
        stopIfEmpty()
    }

    private func stopIfEmpty() {
        if clients.allSatisfy({ $0.open == 0 }) { loop.stop() }
    }
}

/// A configuration the own loop refuses, or a start that failed: one `file:line: message` per line.
public struct CoreServerError: Error, CustomStringConvertible {
    public let lines: [String]
    public var description: String { lines.joined(separator: "\n") }
}
