import CTether
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TetherConfig
import TetherTLS

/// A running proxy: event loops, their listeners, and the per-loop state.
public final class TetherServer: Sendable {
    /// What a reload replaces: the configuration, what is derived from it, and the listeners.
    struct Generation {
        var configuration: Configuration
        var setup: ProxySetup
        var accessLog: AccessLogSink?
        /// Listening sockets by bound address (`127.0.0.1:8080`), one channel per loop.
        var listeners: [String: (listen: Listen, channels: [Channel])] = [:]
        var order: [String] = []
        var shutDown = false
    }

    private let group: MultiThreadedEventLoopGroup
    private let loops: [NIOLoopBound<LoopContext>]
    private let current: NIOLockedValueBox<Generation>
    private let logger: Logger
    /// Reads /proc for the admin endpoint, off the event loops.
    private let helper: NIOThreadPool
    /// Gives memory back after a burst (see `giveBackMemory`).
    private let trimmer: RepeatedTask
    static let trimInterval = TimeAmount.seconds(5)
    /// Free memory malloc may keep in its arenas before it is asked to give it back.
    static let trimThreshold = 8 << 20

    /// The configuration in force.
    public var configuration: Configuration { current.withLockedValue { $0.configuration } }

    /// The bound address of each listening socket, in configuration order (useful with port 0).
    public var boundAddresses: [(configured: String, port: Int)] {
        current.withLockedValue { g in g.order.map { (g.listeners[$0]!.listen.addressText, Int($0.split(separator: ":").last!)!) } }
    }

    public init(configuration: Configuration, logger: Logger, admin: AdminRenderer? = nil) throws {
        self.logger = logger
        let setup = try ProxySetup(configuration)
        let threads: Int
        switch configuration.workerProcesses {
        case .auto: threads = System.coreCount
        case .count(let n): threads = n
        }
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let log = try TetherServer.accessLogSink(for: configuration)
        loops = try group.makeIterator().map { el in
            try el.submit {
                let lc = LoopContext(eventLoop: el, setup: setup, logger: logger, accessLog: log)
                lc.startSweeping()
                return NIOLoopBound(lc, eventLoop: el)
            }.wait()
        }
        current = NIOLockedValueBox(Generation(configuration: configuration, setup: setup, accessLog: log))
        helper = NIOThreadPool(numberOfThreads: 1)
        helper.start()
        trimmer = loops[0].eventLoop.scheduleRepeatedTask(initialDelay: Self.trimInterval, delay: Self.trimInterval) { [loops, helper, logger] _ in
            TetherServer.giveBackMemory(loops: loops, helper: helper, logger: logger)
        }
        if let admin {
            // Loops reach the whole server's figures through this; it holds the server weakly.
            let weakSelf = WeakServer(self)
            let failLoop = group.next()
            let service = AdminService(renderer: admin) { withHost in
                guard let server = weakSelf.server else { return failLoop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
                return server.snapshot().and(withHost ? server.hostSnapshot() : failLoop.makeSucceededFuture(HostSnapshot()))
            }
            for b in loops { try b.eventLoop.submit { b.value.admin = service }.wait() }
        }
    }

    static func accessLogSink(for configuration: Configuration) throws -> AccessLogSink? {
        var paths = Set<String>()
        for s in configuration.servers {
            for a in s.settings.accessLog { if case .file(let p, _) = a { paths.insert(p) } }
            for l in s.locations { for a in l.settings.accessLog { if case .file(let p, _) = a { paths.insert(p) } } }
        }
        return paths.isEmpty ? nil : try AccessLogSink(paths: paths)
    }

    /// The checks that need more than the configuration's text: TLS certificates, keys, cipher
    /// lists and curves, as OpenSSL reads them (for `tether -t` and before a start or reload).
    public static func validate(_ configuration: Configuration) throws(ConfigErrors) {
        _ = try TLSSetup(configuration)
    }

    /// Binds every listening address on every loop: each loop has its own SO_REUSEPORT socket and
    /// accepts its own connections, so nothing crosses threads. (Measured against one shared socket
    /// handing connections to the loops in turn: 11-17 % more requests/s, 12-17 % less CPU per
    /// request with two loops at 256 connections; so `reuseport` is always on.)
    public func start() throws {
        var g = current.withLockedValue { $0 }
        try openListeners(&g)
        current.withLockedValue { $0 = g }
        publishRoutes(g)
        for w in g.configuration.warnings { logger.warning("\(w)") }
    }

    /// Opens the listeners of `g`'s configuration that are not open yet, and closes those it no
    /// longer has. Listeners that stay keep their sockets (and their accept queues).
    ///
    /// All or nothing: when one cannot be bound, every socket this call opened is closed again
    /// before the error is thrown, so a refused reload leaves the listeners as they were.
    private func openListeners(_ g: inout Generation) throws {
        var keep: [String: (listen: Listen, channels: [Channel])] = [:]
        var order: [String] = []
        var opened: [Channel] = []
        do {
            for (listen, hosts, servers) in g.setup.virtualHosts() {
                let wanted = "\(listen.address):\(listen.port)"
                if listen.port != 0, let existing = g.listeners[wanted] {
                    keep[wanted] = (listen, existing.channels)
                    order.append(wanted)
                    continue
                }
                var port = listen.port
                var channels: [Channel] = []
                // Known once the first socket is bound when the port is 0.
                let keyBox = NIOLockedValueBox(wanted)
                let initial = Route(hosts: hosts, servers: servers, port: port, tls: g.setup.tls.names(hosts: hosts, servers: servers))
                for el in loops.map(\.eventLoop) {
                    let channel = try ServerBootstrap(group: el)
                        .serverChannelOption(.backlog, value: Int32(listen.backlog))
                        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                        .serverChannelOption(ChannelOptions.socket(SocketOptionLevel(SOL_SOCKET), SO_REUSEPORT), value: 1)
                    .serverChannelInitializer(acceptErrors(listen: listen))
                        // No child channel options: NIO applies those through a chain of futures
                        // per accepted connection (13% of the user CPU of a connection-per-request
                        // load). TCP_NODELAY is set on the listening socket by NIO and Linux
                        // copies it to accepted ones; the rest is set in the initializer.
                        .childChannelInitializer(childInitializer(listen: listen, key: keyBox, initial: initial, hostKeepalive: g.setup.hostKeepalive))
                        .bind(host: listen.address, port: port)
                        .wait()
                    opened.append(channel)
                    if port == 0 {
                        port = channel.localAddress?.port ?? 0
                        let bound = "\(listen.address):\(port)"
                        keyBox.withLockedValue { $0 = bound }
                    }
                    channels.append(channel)
                }
                let key = "\(listen.address):\(port)"
                keep[key] = (listen, channels)
                order.append(key)
                logger.info("listening on \(key) with \(loops.count) event loops (a SO_REUSEPORT socket each)")
            }
        } catch {
            for ch in opened { try? ch.close().wait() }
            if !opened.isEmpty { logger.info("closed the \(opened.count) listening sockets opened for the refused configuration") }
            throw error
        }
        for (key, old) in g.listeners where keep[key] == nil {
            logger.info("no longer listening on \(key)")
            for ch in old.channels { try? ch.close().wait() }
        }
        g.listeners = keep
        g.order = order
    }

    /// Hands every loop the routing of `g`: connections pick it up at their next request.
    private func publishRoutes(_ g: Generation) {
        var routes: [String: Route] = [:]
        let vhosts = g.setup.virtualHosts()
        for (i, key) in g.order.enumerated() where i < vhosts.count {
            routes[key] = Route(hosts: vhosts[i].1, servers: vhosts[i].2, port: Int(key.split(separator: ":").last!)!,
                                tls: g.setup.tls.names(hosts: vhosts[i].1, servers: vhosts[i].2))
        }
        let published = routes
        for b in loops {
            try? b.eventLoop.submit { b.value.install(setup: g.setup, routes: published, accessLog: g.accessLog) }.wait()
        }
    }

    /// Swaps in a new, already validated configuration without dropping connections: requests in
    /// flight finish under the old one, new requests (also on kept-alive connections) use the new
    /// one, listeners are opened and closed as needed, and the pools of upstreams that changed or
    /// vanished drain while unchanged ones keep their warm connections.
    public func reload(_ configuration: Configuration) throws {
        let setup = try ProxySetup(configuration)
        let log = try TetherServer.accessLogSink(for: configuration)
        var g = current.withLockedValue { $0 }
        let oldLog = g.accessLog
        g.configuration = configuration
        g.setup = setup
        g.accessLog = log
        do {
            try openListeners(&g)
        } catch {
            // Nothing of the refused configuration stays open: its access log files neither.
            log?.shutdown()
            throw error
        }
        current.withLockedValue { $0 = g }
        publishRoutes(g)
        oldLog?.shutdown()
        for w in configuration.warnings { logger.warning("\(w)") }
        logger.notice("configuration reloaded from \(configuration.file)")
    }

    /// Reopens the log files (for logrotate): the access logs here; the error log is the caller's.
    public func reopenLogs() throws {
        var g = current.withLockedValue { $0 }
        let old = g.accessLog
        g.accessLog = try TetherServer.accessLogSink(for: g.configuration)
        let log = g.accessLog
        current.withLockedValue { $0.accessLog = log }
        for b in loops { try? b.eventLoop.submit { b.value.swapAccessLog(log) }.wait() }
        old?.shutdown()
    }

    /// A listener's accept errors (out of descriptors) go to its loop, to be counted and logged.
    private func acceptErrors(listen: Listen) -> @Sendable (Channel) -> EventLoopFuture<Void> {
        let loops = self.loops
        let name = listen.addressText
        return { channel in
            channel.eventLoop.makeCompletedFuture {
                guard let bound = loops.first(where: { $0.eventLoop === channel.eventLoop }) else { return }
                try channel.pipeline.syncOperations.addHandler(AcceptErrorHandler(loop: bound.value, listen: name))
            }
        }
    }

    /// Sets up an accepted connection on the loop that accepted it.
    private func childInitializer(listen: Listen, key keyBox: NIOLockedValueBox<String>, initial: Route, hostKeepalive: HostKeepalive) -> @Sendable (Channel) -> EventLoopFuture<Void> {
        let loops = self.loops
        let tuning = SocketTuning(keepalive: listen.soKeepalive, userTimeout: listen.tcpUserTimeout, host: hostKeepalive)
        let what = "client connection (listen \(listen.addressText))"
        return { channel in
            // Set up synchronously; the loop's cached succeeded future saves a future (and a
            // Result) per accepted connection.
            do {
                guard let bound = loops.first(where: { $0.eventLoop === channel.eventLoop }) else {
                    preconditionFailure("connection accepted on a loop Tether does not own")
                }
                let lc = bound.value
                lc.stats.downstreamAccepted += 1
                let maxConnections = lc.setup.configuration.workerConnections
                let key = keyBox.withLockedValue { $0 }
                let route = lc.routes[key] ?? initial
                guard lc.stats.downstreamActive < maxConnections, !lc.draining else {
                    if !lc.draining { lc.logger.warning("\(maxConnections) worker_connections are not enough") }
                    channel.close(promise: nil)
                    return channel.eventLoop.makeSucceededVoidFuture()
                }
                if let options = channel.syncOptions {
                    // NIO keeps up to maxMessagesPerRead receive buffers per channel for reuse,
                    // of the adaptive allocator's current size: one buffer, starting small,
                    // keeps an idle keep-alive connection cheap while bulk transfers still grow it.
                    try options.setOption(.maxMessagesPerRead, value: 1)
                    try options.setOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 256, initial: 512, maximum: 65536))
                }
                tuning.apply(to: channel, loop: lc, what: what)
                if let tls = route.tls {
                    try channel.pipeline.syncOperations.addHandler(TLSHandler(server: tls, observer: lc))
                }
                try channel.pipeline.syncOperations.addHandler(DownstreamHandler(loop: lc, listenKey: key, route: route))
                return channel.eventLoop.makeSucceededVoidFuture()
            } catch {
                return channel.eventLoop.makeFailedFuture(error)
            }
        }
    }

    /// Runs `body` on every event loop (tests hold the loops still with it while events queue up).
    func executeOnEachLoop(_ body: @escaping @Sendable () -> Void) {
        for bound in loops { bound.eventLoop.execute(body) }
    }

    /// Stops accepting, lets requests in flight finish (their responses say `Connection: close`),
    /// closes idle connections on both sides, and force-closes what is left after `timeout`.
    public func shutdown(timeout: TimeAmount = .seconds(10)) {
        // Only the first call does anything; later ones return at once.
        guard current.withLockedValue({ g -> Bool in let first = !g.shutDown; g.shutDown = true; return first }) else { return }
        let listeners = current.withLockedValue { g -> [Channel] in
            let l = g.listeners.values.flatMap(\.channels)
            g.listeners = [:]
            g.order = []
            return l
        }
        for ch in listeners { try? ch.close().wait() }
        for bound in loops {
            try? bound.eventLoop.submit {
                let lc = bound.value
                lc.draining = true
                for c in lc.connections.values { c.drainIfIdle() }
                for g in lc.allGroups { for s in g.servers { s.drain() } }
            }.wait()
        }
        let deadline = NIODeadline.now() + timeout
        while NIODeadline.now() < deadline {
            let active = loops.map { b in (try? b.eventLoop.submit { b.value.connections.count }.wait()) ?? 0 }.reduce(0, +)
            if active == 0 { break }
            usleep(20_000)
        }
        for bound in loops {
            try? bound.eventLoop.submit {
                bound.value.stopSweeping()
                for c in bound.value.connections.values { c.close() }
                for g in bound.value.allGroups { for s in g.servers { s.drain() } }
            }.wait()
        }
        trimmer.cancel()
        try? group.syncShutdownGracefully()
        try? helper.syncShutdownGracefully()
        current.withLockedValue { $0.accessLog }?.shutdown()
    }

    /// A proxy sized for its steady load should not stay sized for its worst minute. After a
    /// burst, malloc keeps what the burst's connections freed in its per-thread arenas (the
    /// resident size stays at its peak, as nginx's does); every `trimInterval` the loops drop
    /// spare header arrays beyond what their open connections could use, and when more than
    /// `trimThreshold` bytes lie free in the arenas, `malloc_trim` gives them back to the system.
    /// Off the loops: the trim runs on the helper thread.
    static func giveBackMemory(loops: [NIOLoopBound<LoopContext>], helper: NIOThreadPool, logger: Logger) {
        for b in loops { b.eventLoop.execute { b.value.trimSpares() } }
        helper.submit { state in
            guard case .active = state else { return }
            let free = tether_malloc_free_bytes()
            guard free > TetherServer.trimThreshold else { return }
            _ = tether_malloc_trim()
            logger.debug("gave back \(free >> 10) KiB that malloc held free (\(tether_malloc_free_bytes() >> 10) KiB free after malloc_trim)")
        }
    }

    /// Every loop's counters, summed, gathered without blocking any loop: one hop to each.
    public func snapshot() -> EventLoopFuture<StatsSnapshot> {
        let parts = loops.enumerated().map { (i, b) in b.eventLoop.submit { b.value.snapshotPart(index: i) } }
        let configuration = self.configuration
        let upstreams = configuration.upstreams
        let servers = configuration.servers
        return EventLoopFuture.whenAllSucceed(parts, on: loops[0].eventLoop).map { parts in
            StatsSnapshot.combining(parts, upstreams: upstreams, servers: servers)
        }
    }

    /// `snapshot()`, waited for (for tests and tools off the event loops).
    public func stats() -> StatsSnapshot {
        (try? snapshot().wait()) ?? StatsSnapshot()
    }

    /// The kernel's socket table and the process's own figures, read on a helper thread.
    public func hostSnapshot() -> EventLoopFuture<HostSnapshot> {
        let ports = Set(boundAddresses.map(\.port))
        let configuration = self.configuration
        let peers = Set(configuration.upstreams.flatMap { u in u.servers.map { HostProbe.Peer(address: $0.address, port: $0.port) } })
        return helper.runIfActive(eventLoop: loops[0].eventLoop) {
            HostProbe.read(listenPorts: ports, upstreamPeers: peers)
        }
    }
}


/// Counts and logs what accept4() fails with on a listener. SwiftNIO keeps the listener registered
/// (level-triggered) after a failed accept, so while the process is out of descriptors the loop
/// retries at once, and NIO's `AcceptBackoffHandler` cannot pause it; pausing accepts needs
/// Tether's own loop.
final class AcceptErrorHandler: ChannelInboundHandler {
    typealias InboundIn = Channel
    let loop: LoopContext
    let listen: String

    init(loop: LoopContext, listen: String) {
        self.loop = loop
        self.listen = listen
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard let e = error as? IOError else { return context.fireErrorCaught(error) }
        loop.acceptFailed(e, listen: listen)
    }
}

final class WeakServer: @unchecked Sendable {
    weak var server: TetherServer?
    init(_ s: TetherServer) { server = s }
}
