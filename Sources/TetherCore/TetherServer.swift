import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TetherConfig

/// A running proxy: event loops, their listeners, and the per-loop state.
public final class TetherServer: Sendable {
    public let configuration: Configuration
    private let group: MultiThreadedEventLoopGroup
    private let setup: ProxySetup
    private let loops: [NIOLoopBound<LoopContext>]
    private let channels: NIOLockedValueBox<[Channel]>
    private let accessLog: AccessLogSink?
    private let logger: Logger
    /// The bound port of each listening address, in configuration order (useful with port 0).
    public let boundAddresses: NIOLockedValueBox<[(configured: String, port: Int)]>
    /// Reads /proc for the admin endpoint, off the event loops.
    private let helper: NIOThreadPool

    public init(configuration: Configuration, logger: Logger, admin: AdminRenderer? = nil) throws {
        self.configuration = configuration
        self.logger = logger
        setup = try ProxySetup(configuration)
        let threads: Int
        switch configuration.workerProcesses {
        case .auto: threads = System.coreCount
        case .count(let n): threads = n
        }
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        var paths = Set<String>()
        for s in configuration.servers {
            for a in s.settings.accessLog { if case .file(let p, _) = a { paths.insert(p) } }
            for l in s.locations { for a in l.settings.accessLog { if case .file(let p, _) = a { paths.insert(p) } } }
        }
        accessLog = paths.isEmpty ? nil : try AccessLogSink(paths: paths)
        let setup = self.setup
        let log = self.accessLog
        loops = try group.makeIterator().map { el in
            try el.submit {
                let lc = LoopContext(eventLoop: el, setup: setup, logger: logger, accessLog: log)
                lc.startSweeping()
                return NIOLoopBound(lc, eventLoop: el)
            }.wait()
        }
        channels = NIOLockedValueBox([])
        boundAddresses = NIOLockedValueBox([])
        helper = NIOThreadPool(numberOfThreads: 1)
        helper.start()
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

    /// Binds every listening address on every loop: each loop has its own SO_REUSEPORT socket and
    /// accepts its own connections, so nothing crosses threads. (Measured against one shared socket
    /// handing connections to the loops in turn: 11-17 % more requests/s, 12-17 % less CPU per
    /// request with two loops at 256 connections; so `reuseport` is always on.)
    public func start() throws {
        for (listen, hosts, servers) in setup.virtualHosts() {
            var port = listen.port
            for el in loops.map(\.eventLoop) {
                let channel = try ServerBootstrap(group: el)
                    .serverChannelOption(.backlog, value: Int32(listen.backlog))
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(ChannelOptions.socket(SocketOptionLevel(SOL_SOCKET), SO_REUSEPORT), value: 1)
                    .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                    .childChannelOption(.maxMessagesPerRead, value: 4)
                    .childChannelInitializer(childInitializer(hosts: hosts, servers: servers, port: port, listen: listen))
                    .bind(host: listen.address, port: port)
                    .wait()
                if port == 0 { port = channel.localAddress?.port ?? 0 }
                channels.withLockedValue { $0.append(channel) }
            }
            let actual = port
            boundAddresses.withLockedValue { $0.append((listen.addressText, actual)) }
            logger.info("listening on \(listen.address):\(actual) with \(loops.count) event loops (a SO_REUSEPORT socket each)")
        }
        for w in configuration.warnings { logger.warning("\(w)") }
    }

    /// Sets up an accepted connection on the loop that accepted it.
    private func childInitializer(hosts: VirtualHosts, servers: [CompiledServer], port: Int, listen: Listen) -> @Sendable (Channel) -> EventLoopFuture<Void> {
        let loops = self.loops
        let maxConnections = configuration.workerConnections
        let tuning = SocketTuning(keepalive: listen.soKeepalive, userTimeout: listen.tcpUserTimeout, host: setup.hostKeepalive)
        let what = "client connection (listen \(listen.addressText))"
        return { channel in
            channel.eventLoop.makeCompletedFuture {
                guard let bound = loops.first(where: { $0.eventLoop === channel.eventLoop }) else {
                    preconditionFailure("connection accepted on a loop Tether does not own")
                }
                let lc = bound.value
                lc.stats.downstreamAccepted += 1
                if lc.stats.downstreamActive >= maxConnections || lc.draining {
                    if !lc.draining { lc.logger.warning("\(maxConnections) worker_connections are not enough") }
                    channel.close(promise: nil)
                    return
                }
                tuning.apply(to: channel, loop: lc, what: what)
                try channel.pipeline.syncOperations.addHandler(DownstreamHandler(loop: lc, hosts: hosts, servers: servers, serverPort: port))
            }
        }
    }

    /// Stops accepting, lets requests in flight finish (their responses say `Connection: close`),
    /// closes idle connections on both sides, and force-closes what is left after `timeout`.
    public func shutdown(timeout: TimeAmount = .seconds(10)) {
        let listeners = channels.withLockedValue { c -> [Channel] in let l = c; c = []; return l }
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
        try? group.syncShutdownGracefully()
        try? helper.syncShutdownGracefully()
        accessLog?.shutdown()
    }

    /// Every loop's counters, summed, gathered without blocking any loop: one hop to each.
    public func snapshot() -> EventLoopFuture<StatsSnapshot> {
        let parts = loops.enumerated().map { (i, b) in b.eventLoop.submit { b.value.snapshotPart(index: i) } }
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
        let ports = Set(boundAddresses.withLockedValue { $0.map(\.port) })
        let peers = Set(configuration.upstreams.flatMap { u in u.servers.map { HostProbe.Peer(address: $0.address, port: $0.port) } })
        return helper.runIfActive(eventLoop: loops[0].eventLoop) {
            HostProbe.read(listenPorts: ports, upstreamPeers: peers)
        }
    }
}


final class WeakServer: @unchecked Sendable {
    weak var server: TetherServer?
    init(_ s: TetherServer) { server = s }
}
