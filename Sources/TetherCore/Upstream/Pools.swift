import Logging
import NIOCore
import NIOPosix
import TetherConfig
import TetherPool
import TetherTLS

/// Milliseconds on the monotonic clock, as the pool state machines take time.
@inline(__always) func nowMs() -> Int64 { ms(.now()) }
/// `time` in the pool state machines' milliseconds.
@inline(__always) func ms(_ time: NIODeadline) -> Int64 { Int64(time.uptimeNanoseconds / 1_000_000) }
/// Monotonic nanoseconds, as the lifecycle values take time.
@inline(__always) func nanos(_ time: NIODeadline) -> Int64 { Int64(time.uptimeNanoseconds) }

/// The pool of one upstream server on one event loop: runs the `ConnectionPool` state machine's
/// answers. Confined to its loop; no locks.
final class ServerPool {
    let address: SocketAddress
    let spec: UpstreamServer
    let index: Int
    unowned let group: UpstreamGroup
    var state: ConnectionPool<ObjectIdentifier>
    var counters = ServerCounters()
    private var connections: [ObjectIdentifier: UpstreamConnection] = [:]
    private var tickScheduled = false
    /// The TLS session the next connection resumes (`proxy_ssl_session_reuse`).
    private lazy var tlsSession = TLSSessionSlot()

    /// `host:port` as configured, made once (logs and `$upstream_addr` use it per request).
    let addressText: String

    init(address: SocketAddress, spec: UpstreamServer, index: Int, group: UpstreamGroup, policy: PoolPolicy) {
        self.address = address
        self.spec = spec
        self.addressText = spec.addressText
        self.index = index
        self.group = group
        self.state = ConnectionPool(policy: policy)
    }

    var loop: LoopContext { group.loop }

    /// A warm connection, or nil when a new one must be opened (the pool then counts a connect under way).
    func lease(now: NIODeadline = .now()) -> (UpstreamConnection, idleMs: Int64)? {
        let (lease, expired) = state.lease(now: ms(now))
        closeAll(expired)
        switch lease {
        case .reuse(let id, let idleMs):
            return (connections[id]!, idleMs)
        case .connect:
            return nil
        }
    }

    /// Opens a connection. `socketKeepalive` is the location's `proxy_socket_keepalive`, used when
    /// neither the server line nor the upstream block sets `tcp_keepalive`.
    func connect(timeoutMs: Int64, socketKeepalive: Bool) -> EventLoopFuture<UpstreamConnection> {
        let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
        let started = NIODeadline.now()
        let upstream = group.upstream
        let keepalive = spec.tcpKeepalive ?? upstream.tcpKeepalive ?? (socketKeepalive ? TCPKeepalive(enabled: true) : nil)
        let tuning = SocketTuning(keepalive: keepalive, userTimeout: spec.tcpUserTimeout ?? upstream.tcpUserTimeout, host: loop.setup.hostKeepalive)
        let what = "upstream \"\(group.name)\" server \(spec.addressText)"
        return ClientBootstrap(group: loop.eventLoop)
            .connectTimeout(.milliseconds(timeoutMs))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pool = bound.value
                    tuning.apply(to: channel, loop: pool.loop, what: what)
                    if let tls = pool.group.tls {
                        try channel.pipeline.syncOperations.addHandler(TLSHandler(client: tls, session: pool.tlsSession, observer: pool))
                    }
                    try channel.pipeline.syncOperations.addHandler(UpstreamConnection(pool: pool))
                }
            }
            .connect(to: address)
            .assumeIsolated()
            .flatMapThrowing { channel -> UpstreamConnection in
                let conn = try channel.pipeline.syncOperations.handler(type: UpstreamConnection.self)
                let pool = bound.value
                pool.connections[conn.id] = conn
                pool.state.connected(conn.id, now: nowMs())
                pool.counters.connects += 1
                pool.counters.connectTime.observe(nanoseconds: (NIODeadline.now() - started).nanoseconds)
                return conn
            }
            .flatMapErrorThrowing { error in
                bound.value.state.connectFailed()
                throw error
            }
            .nonisolated()
    }

    /// The exchange on `conn` ended; keep it warm if the pool's rules allow.
    func release(_ conn: UpstreamConnection, reusable: Bool, backend: ConnectionPool<ObjectIdentifier>.BackendKeepAlive?, now: NIODeadline = .now()) {
        conn.delegate = nil
        if group.retired {
            // The upstream changed or vanished in a reload: its connections are not kept.
            discard(conn, reason: .shutdown)
            return
        }
        let (decision, warn) = state.release(conn.id, now: ms(now), reusable: reusable && conn.isOpen, backend: backend)
        if let warn {
            loop.logger.warning("upstream \"\(group.name)\" server \(spec.addressText) advertises Keep-Alive: timeout=\(warn / 1000), shorter than its keepalive_timeout \(Units.formatTime(state.policy.idleTimeoutMs)); Tether expires its connections before the backend does")
        }
        switch decision {
        case .keep:
            conn.resumeReading()
            scheduleTick()
        case .close(let reason):
            connections.removeValue(forKey: conn.id)
            counters.closed[reason.rawValue, default: 0] += 1
            conn.close()
        }
    }

    /// A leased connection failed or was closed while in use.
    func discard(_ conn: UpstreamConnection, reason: CloseReason) {
        state.leasedClosed(conn.id)
        if connections.removeValue(forKey: conn.id) != nil { counters.closed[reason.rawValue, default: 0] += 1 }
        conn.close()
    }

    /// An idle connection saw EOF (`peerClosed`), data or an error.
    func idleConnectionClosed(_ conn: UpstreamConnection, reason: CloseReason) {
        guard connections.removeValue(forKey: conn.id) != nil else { return }
        counters.closed[reason.rawValue, default: 0] += 1
        if reason == .tcpKeepalive {
            loop.logger.notice("upstream \"\(group.name)\" server \(spec.addressText): an idle connection was dropped by TCP keepalive (the peer stopped answering)")
        }
        if let learned = state.idleClosed(conn.id, now: nowMs(), byPeer: reason == .peerClosed) {
            loop.logger.notice("upstream \"\(group.name)\" server \(spec.addressText) closed an idle connection; its idle window is now taken as \(Units.formatTime(learned))")
        }
    }

    /// A reused connection failed before any response byte: learn that the backend's window is shorter.
    func reusedConnectionFailed(idleMs: Int64) {
        if let learned = state.reusedConnectionFailed(idleMs: idleMs) {
            loop.logger.notice("upstream \"\(group.name)\" server \(spec.addressText) dropped a connection idle for \(Units.formatTime(idleMs)); its idle window is now taken as \(Units.formatTime(learned))")
        }
    }

    private func closeAll(_ list: [(ObjectIdentifier, CloseReason)]) {
        for (id, reason) in list {
            if let c = connections.removeValue(forKey: id) {
                counters.closed[reason.rawValue, default: 0] += 1
                c.close()
            }
        }
    }

    /// Keeps a timer running while there are idle connections, for expiry and trimming.
    private func scheduleTick() {
        guard !tickScheduled, let next = state.nextExpiry() else { return }
        tickScheduled = true
        let delay = max(10, next - nowMs())
        let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
        loop.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(delay)) {
            let pool = bound.value
            pool.tickScheduled = false
            pool.closeAll(pool.state.tick(now: nowMs()))
            pool.scheduleTick()
        }
    }

    func drain() {
        for id in state.drainIdle() {
            if let c = connections.removeValue(forKey: id) {
                counters.closed[CloseReason.shutdown.rawValue, default: 0] += 1
                c.close()
            }
        }
    }
}

extension ServerPool: TLSObserver {
    func tlsHandshakeCompleted(version: String, resumed: Bool) {
        counters.tlsHandshakes += 1
        if resumed { counters.tlsResumed += 1 }
    }

    func tlsHandshakeFailed(_ failure: TLSHandshakeFailure, detail: String) {
        counters.tlsFailures += 1
        loop.logger.error("TLS handshake with upstream \"\(group.name)\" server \(spec.addressText) failed (\(failure.rawValue)): \(detail)")
    }
}

/// One upstream on one event loop: its balancer and a pool per server.
final class UpstreamGroup {
    let name: String
    let upstream: Upstream
    /// Set by a reload that changed or removed this upstream.
    private(set) var retired = false

    func retire() {
        retired = true
        for s in servers { s.drain() }
    }

    unowned let loop: LoopContext
    var balancer: Balancer
    var servers: [ServerPool] = []

    /// For `proxy_pass https://`: the TLS every connection of this group speaks (replaced by a
    /// reload with the same settings, for the connections opened after it).
    var tls: TLSContext?

    init(upstream: ResolvedUpstream, loop: LoopContext, tls: TLSContext?) {
        self.name = upstream.config.name
        self.upstream = upstream.config
        self.loop = loop
        self.tls = tls
        let u = upstream.config
        balancer = Balancer(
            u.servers.map { PeerSpec(weight: $0.weight, maxFails: $0.maxFails, failTimeoutMs: $0.failTimeoutMs, backup: $0.backup, down: $0.down) },
            method: u.balancing == .leastConn ? .leastConn : .roundRobin
        )
        let policy = PoolPolicy(keepalive: u.keepalive, idleTimeoutMs: u.keepaliveTimeoutMs, maxRequests: u.keepaliveRequests, maxLifetimeMs: u.keepaliveTimeMs)
        for (i, s) in u.servers.enumerated() {
            servers.append(ServerPool(address: upstream.addresses[i], spec: s, index: i, group: self, policy: policy))
        }
    }
}

/// An upstream with its servers' socket addresses, made once at start-up.
struct ResolvedUpstream: Sendable {
    var config: Upstream
    var addresses: [SocketAddress]

    init(_ u: Upstream) throws {
        config = u
        addresses = try u.servers.map { try SocketAddress(ipAddress: $0.address, port: $0.port) }
    }
}
