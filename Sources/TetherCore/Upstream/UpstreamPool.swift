#if canImport(Glibc)
import Glibc
#endif
import CTether
import TetherHTTP
import TetherIO
import TetherConfig
import TetherPool
import TetherTLS

/// Who a leased upstream link reports to (an exchange). Called on the loop's thread.
protocol UpstreamLinkOwner: AnyObject {
    /// A new connection is up: the request can be written.
    func upstreamConnected(_ link: UpstreamLink)
    /// The connect failed (`errno`, or ETIMEDOUT for `proxy_connect_timeout`); the link is gone.
    func upstreamConnectFailed(_ link: UpstreamLink, errno: Int32)
    /// Bytes arrived (in `link.inbound`), or the backend closed its side (`link.peerClosed`).
    func upstreamReadable(_ link: UpstreamLink)
    /// The link failed or closed while leased; it is gone.
    func upstreamClosed(_ link: UpstreamLink, errno: Int32?)
    /// What was queued for the backend fell below the queue's limit: more may be written.
    func upstreamDrained(_ link: UpstreamLink)
    /// The timer the owner armed (`armTimer`) on a leased link fired: `proxy_read_timeout`.
    func upstreamTimedOut(_ link: UpstreamLink)
}

extension UpstreamLinkOwner {
    func upstreamDrained(_ link: UpstreamLink) {}
    func upstreamTimedOut(_ link: UpstreamLink) {}
}

/// One connection to an upstream server, on one loop: connecting, leased to an exchange, or
/// idle in its pool. Idle, it is watched: any byte or EOF from the backend closes it at once (no
/// CLOSE_WAIT is left behind), and its one timer is the pool's idle expiry.
final class UpstreamLink: IOHandler {
    enum Phase: Equatable { case connecting, leased, idle, closed }

    private unowned let pool: UpstreamPool
    /// The pool's loop and buffers, held here so that the per-request paths (read, flush, timers)
    /// reach them without going through `pool`: an unowned reference costs a checked load, and
    /// a retain and a release, per use; so would an `unowned(unsafe)` one (Swift retains what it
    /// loads from one around each call). A strong `let` of `self` needs neither. The loop holds
    /// a link only while it is registered (until `close`), so these make no lasting cycle.
    private let loop: IOLoop
    private let buffers: BufferPool
    fileprivate(set) var handle = Handle(token: UInt64(UInt32.max))
    fileprivate(set) var phase = Phase.connecting
    /// The exchange it serves while leased (cleared at release: no cycle outlives the exchange).
    fileprivate var owner: UpstreamLinkOwner?
    /// What the backend sent and the owner has not consumed (`takeInbound`, `putBack`).
    private(set) var inbound: IOBuffer?

    /// Takes what was read (the owner moves or consumes it, and puts back what it leaves).
    func takeInbound() -> IOBuffer? { inbound.take() }

    func putBack(_ buffer: consuming IOBuffer) { inbound = consume buffer }

    /// Bytes read and not consumed.
    var inboundBytes: Int {
        guard let b = inbound.take() else { return 0 }
        let n = b.readableBytes
        inbound = consume b
        return n
    }
    private var outbound: OutboundQueue
    private(set) var peerClosed = false
    /// The socket reported readable and was not read to EAGAIN yet.
    private var readable = false
    /// An event reported the backend's half-close: read until the EOF.
    private var hangupReported = false
    /// A read failed after bytes came (a reset after a response's start): reported by the next read.
    private var pendingError: Int32 = 0
    /// `proxy_pass https://`: the TLS session over the socket, its handshake after the connect.
    fileprivate var tls: TLSSocket?
    /// It holds one of its server's `max_conns` slots (given back when its socket closes).
    fileprivate var holdsSlot = false
    /// The TCP connect is done (with TLS, the handshake may still be under way).
    private var tcpConnected = false
    /// The link ends on an error: no close_notify.
    private var failed = false
    /// The pool's entry for this connection while it is leased (the pool holds it while idle).
    fileprivate var entry: ConnectionPool<Handle>.Entry?
    /// Set by `lease` for a warm connection: how long it had idled.
    fileprivate(set) var idleMsAtLease: Int64 = 0
    fileprivate(set) var reused = false
    /// When its connect began (the loop's clock): the connect time.
    fileprivate(set) var connectStarted: UInt64 = 0

    fileprivate init(pool: UpstreamPool) {
        self.pool = pool
        loop = pool.loop
        buffers = pool.buffers
        outbound = OutboundQueue(pool: pool.buffers)
    }

    var isOpen: Bool { phase != .closed }

    // MARK: For the owner

    /// Queues `buffer` and writes what the socket takes; while connecting, it waits for the connect.
    func write(_ buffer: consuming IOBuffer) {
        outbound.enqueue(buffer)
        if phase != .connecting { flush() }
    }

    /// Queues a copy of `bytes` (into the queue's last buffer and fresh pool buffers) and
    /// writes what the socket takes, as `write`.
    func write(copying bytes: UnsafeRawBufferPointer) {
        outbound.append(bytes)
        if phase != .connecting { flush() }
    }

    /// The queue to the backend is at its limit: the owner holds what it would write until
    /// `upstreamDrained`.
    var isBackedUp: Bool { outbound.isFull }

    /// Request bytes queued and not yet written.
    var outboundBytes: Int { outbound.queuedBytes }

    /// Arms the link's one timer for the owner (`upstreamTimedOut`); only while leased and
    /// connected (a connecting link's timer is the connect timeout).
    func armTimer(milliseconds ms: Int64) {
        guard phase == .leased else { return }
        loop.arm(handle, afterNanoseconds: UInt64(max(1, ms)) * 1_000_000)
    }

    /// Stops the owner's timer (while the other side holds things up).
    func cancelTimer() {
        guard phase == .leased else { return }
        loop.cancelTimer(handle)
    }

    /// Reads what the backend sent into `inbound`, as far as there is room; the owner consumes
    /// from `inbound` and calls this again until it returns false.
    @discardableResult
    func read() -> Bool {
        if pendingError != 0 {
            // The bytes that came before a reset were handed over; now the reset.
            let e = pendingError
            pendingError = 0
            fail(e)
            return false
        }
        guard readable, !peerClosed, let fd = loop.fd(handle) else { return false }
        var buf = inbound.take() ?? buffers.take()
        if buf.writableBytes == 0 { buf.compact() }
        guard buf.writableBytes > 0 else { inbound = consume buf; return false }
        let before = buf.readableBytes
        let result = tls?.read(into: &buf, raggedEndIsError: true) ?? buf.read(from: fd, shortReadDrains: !hangupReported)
        let drained = buf.writableBytes > 0
        let arrived = buf.readableBytes > before
        inbound = consume buf
        switch result {
        case .bytes(_, let eof):
            // A short read took what there was (see `IOBuffer.read`): the next event says when more came.
            if eof { peerClosed = true; readable = false } else if drained { readable = false }
            return true
        case .wouldBlock:
            readable = false
            return false
        case .eof:
            peerClosed = true
            readable = false
            return true
        case .error(let e):
            // Bytes read before the error (a response, then a reset) go to the owner first: the
            // error is reported by the next read. (A second read would not see it: the kernel
            // reports a reset once, then an end of file that would pass for an orderly close.)
            if arrived {
                pendingError = e
                return true
            }
            fail(e)
            return false
        }
    }

    // MARK: Events

    func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {
        switch phase {
        case .connecting:
            if !tcpConnected {
                guard events.contains(.writable) || events.contains(.error) || events.contains(.hangup) else { return }
                var err: Int32 = 0
                var len = socklen_t(MemoryLayout<Int32>.size)
                if let fd = loop.fd(handle) { getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) }
                if err != 0 || events.contains(.error) { return pool.connectFailed(self, errno: err != 0 ? err : ECONNREFUSED) }
                tcpConnected = true
            }
            if let tls {
                // The handshake, under the connect timeout, as nginx's proxy_connect_timeout covers it.
                switch tls.handshake() {
                case .done:
                    pool.handshakeDone(tls)
                case .wantRead, .wantWrite:
                    return
                case .failed(let failure, let detail):
                    return pool.handshakeFailed(self, failure, detail)
                }
            }
            pool.connected(self)
            // A request queued while connecting goes now; an owner held back by the full queue
            // (a body) goes on once it empties, as after any writable edge.
            let wasFull = outbound.isFull
            flush()
            if wasFull && !outbound.isFull && phase == .leased { owner?.upstreamDrained(self) }
            guard phase == .leased else { return }
            if events.contains(.readHangup) { hangupReported = true }
            if events.contains(.readable) || events.contains(.readHangup) { readable = true; owner?.upstreamReadable(self) }
        case .idle:
            // A writable edge is the kernel freeing send buffer space: nothing to act on.
            guard events.contains(.readable) || events.contains(.readHangup) || events.contains(.hangup) || events.contains(.error) else { return }
            if let tls, !events.contains(.readHangup), !events.contains(.hangup), !events.contains(.error) {
                // TLS 1.3 servers send session tickets after the handshake: OpenSSL takes them
                // and they are no bytes out of step. Anything else ends the idle connection.
                var b = buffers.take()
                let result = tls.read(into: &b)
                buffers.recycle(b)
                if result == .wouldBlock { return }
            }
            // Anything from the backend on an idle connection ends it: a close, or bytes out of step.
            if events.contains(.error) || events.contains(.hangup), let fd = loop.fd(handle) {
                // The kernel gave up on the peer (TCP keepalive probes, TCP_USER_TIMEOUT).
                var err: Int32 = 0
                var len = socklen_t(MemoryLayout<Int32>.size)
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                if err == ETIMEDOUT { return pool.idleLinkDied(self) }
            }
            pool.idleLinkStirred(self, byPeer: events.contains(.readable) || events.contains(.readHangup) || events.contains(.hangup))
        case .leased:
            if events.contains(.writable) {
                let wasFull = outbound.isFull
                flush()
                if wasFull && !outbound.isFull && phase == .leased { owner?.upstreamDrained(self) }
            }
            guard phase == .leased else { return }
            // An error (a reset) is read like an end: what arrived before it is still in the
            // socket and goes to the owner first, then the read reports the error.
            if events.contains(.readHangup) || events.contains(.hangup) || events.contains(.error) { hangupReported = true }
            if events.contains(.readable) || events.contains(.readHangup) || events.contains(.hangup) || events.contains(.error) {
                readable = true
                owner?.upstreamReadable(self)
            }
        case .closed:
            break
        }
    }

    func timerFired(handle: Handle, loop: IOLoop) {
        switch phase {
        case .connecting: pool.connectFailed(self, errno: ETIMEDOUT)
        case .idle: pool.expire(now: Int64(loop.now / 1_000_000))
        case .leased: owner?.upstreamTimedOut(self)
        case .closed: break
        }
    }

    private func flush() {
        guard !outbound.isEmpty, let fd = loop.fd(handle) else { return }
        if let tls {
            // Before the handshake is done the request waits in the queue.
            guard tls.handshakeDone else { return }
            if case .error(let e) = tls.flush(&outbound) { fail(e) }
            return
        }
        if case .error(let e) = outbound.flush(to: fd) { fail(e) }
    }

    private func fail(_ e: Int32) {
        failed = true
        let o = owner
        pool.leasedLinkFailed(self)
        o?.upstreamClosed(self, errno: e)
    }

    /// Gives up the socket and the buffers.
    fileprivate func closeSocket() {
        guard phase != .closed else { return }
        phase = .closed
        owner = nil
        if let b = inbound.take() { buffers.recycle(b) }
        outbound = OutboundQueue(pool: pool.buffers)
        // close_notify on an orderly close (an idle connection expiring, a pool trim).
        if let tls, !failed, !peerClosed { tls.shutdown() }
        tls = nil
        loop.close(handle)
        if holdsSlot {
            holdsSlot = false
            pool.slotFreed()
        }
    }

    /// Ready for the next lease: no buffer held, nothing queued.
    fileprivate func becomeIdle() {
        phase = .idle
        owner = nil
        readable = false
        if let b = inbound.take() { buffers.recycle(b) }
    }

    fileprivate func becomeLeased(by owner: UpstreamLinkOwner) {
        phase = .leased
        self.owner = owner
    }

    fileprivate func start(_ fd: Int32) throws(IOError) {
        handle = try loop.register(fd, handler: self)
    }
}

/// One upstream server's connections on one loop, run by `ConnectionPool` (TetherPool's pure
/// pool: which to reuse, which to close and why). No lock, no thread: everything happens on the
/// loop that owns the exchanges.
final class UpstreamPool {
    let loop: IOLoop
    let buffers: BufferPool
    let address: InetAddress
    /// `host:port` (`[host]:port` for IPv6), for log lines.
    let addressText: String
    let connectTimeoutMs: Int64
    private(set) var state: ConnectionPool<Handle>
    private var links: [Handle: UpstreamLink] = [:]
    private(set) var connects = 0
    private(set) var reusedLeases = 0
    private(set) var closed: [CloseReason: Int] = [:]
    private(set) var connectFailures = 0
    /// Requests sent on this server's connections (each try: a lease), and the requests that
    /// failed or were sent again, by reason (counted by the exchanges).
    private(set) var requests = 0
    /// Responses read to their end after the client left, their connections kept.
    var drained = 0
    var failures = ReasonCounts<UpstreamFailedReason>()
    var retries = ReasonCounts<UpstreamRetryReason>()
    /// Connect times, and times from sending a request to the end of its response.
    private(set) var connectTime = Histogram()
    var responseTime = Histogram()
    private var warnedTuning = false

    /// TCP keepalive and TCP_USER_TIMEOUT for this server's sockets, set before each connect.
    let tuning: SocketTuning?
    let log: LoopErrorLog
    /// The `upstream` block's name, for log lines.
    var upstreamName = ""
    /// `proxy_pass https://`: the client context (a reload may give a new one, for the next
    /// connections), and the session the next connection resumes.
    var tls: TLSContext?
    /// A reload changed or removed the upstream: no connection is kept any more.
    private(set) var retired = false
    /// The server's share of `max_conns` (process-wide), and the group to tell when a slot frees
    /// or a connection goes idle while requests wait.
    var slot: UpstreamLimits.Server?
    /// Its group (which owns it: never gone while the pool is in use).
    unowned(unsafe) var group: LoopUpstream?
    /// The group's limits, read directly where a request's release looks at the queue.
    var limits: UpstreamLimits?
    /// Its index in the group (the balancer's peer).
    var index = 0
    /// `lease` and `connectFresh` give this errno when the server is at its `max_conns`.
    static let atCapacity: Int32 = -1
    private let session = TLSSessionSlot()
    /// TLS handshakes done (of which resumed) and failed.
    private(set) var tlsHandshakes = 0
    private(set) var tlsResumed = 0
    private(set) var tlsFailures = 0

    /// `host` is a numeric IPv4 or IPv6 address (names are resolved before a pool is made).
    /// `server … proxy_protocol`: each connection starts with a PROXY protocol v2 header naming
    /// its client, serves one request and is closed (never pooled).
    var sendsProxyProtocol = false

    init?(loop: IOLoop, buffers: BufferPool, host: String, port: UInt16, policy: PoolPolicy, log: LoopErrorLog = .all,
          connectTimeoutMs: Int64 = 60_000, tuning: SocketTuning? = nil, tls: TLSContext? = nil) {
        self.log = log
        self.tls = tls
        guard let a = InetAddress(host: host, port: port) else { return nil }
        addressText = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        self.loop = loop
        self.buffers = buffers
        address = a
        self.connectTimeoutMs = connectTimeoutMs
        self.tuning = tuning.flatMap { $0.isEmpty ? nil : $0 }
        state = ConnectionPool(policy: policy)
    }

    var idleCount: Int { state.idleCount }
    var openCount: Int { links.count }

    /// This pool's figures as the admin pages count them.
    var counters: ServerCounters {
        var c = ServerCounters()
        c.connects = connects
        c.requests = requests
        c.reused = reusedLeases
        c.drained = drained
        for (reason, n) in closed { c.closed[reason.rawValue] = n }
        c.retries = retries
        c.failures = failures
        c.connectTime = connectTime
        c.responseTime = responseTime
        c.tlsHandshakes = tlsHandshakes
        c.tlsResumed = tlsResumed
        c.tlsFailures = tlsFailures
        return c
    }

    private var now: Int64 { Int64(loop.now / 1_000_000) }

    /// A connection for `owner`: a warm one (`link.reused`; write the request now), or a new one
    /// being connected (`owner.upstreamConnected` follows, or `upstreamConnectFailed`). Nil when
    /// no socket could be made (the errno is in the return's second part).
    func lease(for owner: UpstreamLinkOwner) -> (UpstreamLink?, errno: Int32) {
        // `proxy_protocol`: a connection carries its first client's header, so none is reused.
        if sendsProxyProtocol { return connectFresh(for: owner) }
        let (lease, expired) = state.lease(now: now)
        for (h, reason) in expired { close(h, reason) }
        switch lease {
        case .reuse(let e, let idleMs):
            let h = e.id
            let link = links[h]!
            link.entry = e
            link.becomeLeased(by: owner)
            link.reused = true
            link.idleMsAtLease = idleMs
            loop.cancelTimer(h)
            reusedLeases += 1
            requests += 1
            return (link, 0)
        case .connect:
            return connect(for: owner)
        }
    }

    /// A new connection for `owner` whatever the pool holds idle: the retry of a request whose
    /// reused connection failed before any response byte must not meet another stale one.
    func connectFresh(for owner: UpstreamLinkOwner) -> (UpstreamLink?, errno: Int32) {
        state.connectFresh()
        return connect(for: owner)
    }

    private func connect(for owner: UpstreamLinkOwner) -> (UpstreamLink?, errno: Int32) {
        if let slot, !slot.acquire() {
            state.connectFailed()
            return (nil, Self.atCapacity)
        }
        let (link, e) = openConnection(for: owner)
        if link == nil, let slot { slot.release() }
        link?.holdsSlot = slot != nil
        return (link, e)
    }

    /// A slot of `max_conns` came back (a connection closed): requests waiting anywhere may go.
    fileprivate func slotFreed() {
        slot?.release()
        limits?.wake()
    }

    private func openConnection(for owner: UpstreamLinkOwner) -> (UpstreamLink?, errno: Int32) {
        let fd = address.tcpSocket()
        guard fd >= 0 else { state.connectFailed(); connectFailures += 1; return (nil, errno) }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        if let tuning {
            let failures = tuning.apply(toSocket: fd)
            if !failures.isEmpty && !warnedTuning {
                // The connection goes on without them; said once per pool.
                warnedTuning = true
                log(.warn, "\(failures.joined(separator: ", ")) on upstream sockets")
            }
        }
        let rc = address.withSockaddr { Glibc.connect(fd, $0, $1) }
        if rc < 0 && errno != EINPROGRESS {
            let e = errno
            Glibc.close(fd)
            state.connectFailed()
            connectFailures += 1
            return (nil, e)
        }
        let link = UpstreamLink(pool: self)
        if let tls {
            guard let session = TLSSocket(client: tls, fd: fd, session: session) else {
                Glibc.close(fd)
                state.connectFailed()
                connectFailures += 1
                return (nil, ENOMEM)
            }
            link.tls = session
        }
        do {
            try link.start(fd)
        } catch {
            Glibc.close(fd)
            state.connectFailed()
            connectFailures += 1
            return (nil, error.errno)
        }
        link.becomeLeased(by: owner)
        link.phase = .connecting
        links[link.handle] = link
        link.connectStarted = loop.now
        connects += 1
        requests += 1
        loop.arm(link.handle, afterNanoseconds: UInt64(connectTimeoutMs) * 1_000_000)
        return (link, 0)
    }

    fileprivate func connected(_ link: UpstreamLink) {
        loop.cancelTimer(link.handle)
        connectTime.observe(nanoseconds: Int64(loop.now &- link.connectStarted))
        link.entry = state.connected(link.handle, now: now)
        link.phase = .leased
        link.reused = false
        link.owner?.upstreamConnected(link)
    }

    fileprivate func handshakeDone(_ tls: TLSSocket) {
        tlsHandshakes += 1
        if tls.resumed { tlsResumed += 1 }
    }

    /// The TLS handshake with the server failed: a connect that failed, as nginx counts it (the
    /// request goes to the next server or gets 502), said in the error log with OpenSSL's reason.
    fileprivate func handshakeFailed(_ link: UpstreamLink, _ failure: TLSHandshakeFailure, _ detail: String) {
        tlsFailures += 1
        log(.error, "TLS handshake with upstream server \(addressText) failed (\(failure.rawValue)): \(detail)")
        connectFailed(link, errno: EPROTO)
    }

    fileprivate func connectFailed(_ link: UpstreamLink, errno: Int32) {
        let owner = link.owner
        links.removeValue(forKey: link.handle)
        state.connectFailed()
        connectFailures += 1
        link.closeSocket()
        owner?.upstreamConnectFailed(link, errno: errno)
    }

    /// A reused connection failed before any response byte after idling `idleMs`: the backend's
    /// idle window is shorter than that, and is learned (said once in the error log).
    func reusedConnectionFailed(idleMs: Int64) {
        if let learned = state.reusedConnectionFailed(idleMs: idleMs) {
            log(.notice, "upstream server \(addressText) dropped a connection idle for \(Units.formatTime(idleMs)); its idle window is now taken as \(Units.formatTime(learned))")
        }
    }

    /// The exchange on `link` ended. `reusable`: the response was read to its end and nothing
    /// past it, neither side said close, not an upgrade.
    func release(_ link: UpstreamLink, reusable: Bool, backend: ConnectionPool<Handle>.BackendKeepAlive? = nil) {
        precondition(link.phase == .leased, "release of a link that is \(link.phase)")
        // A request still being written (an answer that came before the whole body) leaves the
        // connection mid-request: never pooled.
        let clean = reusable && !sendsProxyProtocol && !link.peerClosed && link.inboundBytes == 0 && link.outboundBytes == 0
        if retired {
            // The upstream changed or vanished in a reload: its connections are not kept.
            links.removeValue(forKey: link.handle)
            state.leasedClosed()
            link.entry = nil
            count(.shutdown)
            link.closeSocket()
            return
        }
        let (decision, shorterTimeoutMs) = state.release(link.entry.take()!, now: now, reusable: clean, backend: backend)
        if let warn = shorterTimeoutMs {
            // Said once per pool (the pool's state returns it the first time only).
            log(.warn, "upstream \"\(upstreamName)\" server \(addressText) advertises Keep-Alive: timeout=\(warn / 1000), shorter than its keepalive_timeout \(Units.formatTime(state.policy.idleTimeoutMs)); Tether expires its connections before the backend does")
        }
        switch decision {
        case .keep where (limits?.queued.load(ordering: .relaxed) ?? 0) > 0 && (slot?.isFull ?? false) && group?.waitingCount == 0:
            // Requests wait on another loop for a slot this connection holds: it goes, and the
            // slot with it, rather than idling here.
            state.idleClosed(link.handle, now: now, byPeer: false)
            close(link.handle, .slotWanted)
        case .keep:
            link.becomeIdle()
            armIdleCheck(link.handle)
            // A request waiting on this loop takes it (after this pass).
            if let g = group, g.waitingCount > 0 { g.scheduleServe() }
        case .close(let reason):
            links.removeValue(forKey: link.handle)
            count(reason)
            link.closeSocket()
        }
    }

    /// Ends a leased or connecting link that its exchange cannot finish (the client left, the
    /// response was refused): closed, not pooled.
    func discard(_ link: UpstreamLink, reason: CloseReason) {
        switch link.phase {
        case .connecting: state.connectFailed()
        case .leased: state.leasedClosed(); link.entry = nil
        case .idle, .closed: return
        }
        links.removeValue(forKey: link.handle)
        count(reason)
        link.closeSocket()
    }

    fileprivate func leasedLinkFailed(_ link: UpstreamLink) {
        guard link.phase == .leased || link.phase == .connecting else { return }
        if link.phase == .leased { state.leasedClosed(); link.entry = nil } else { state.connectFailed() }
        links.removeValue(forKey: link.handle)
        count(.error)
        link.closeSocket()
    }

    /// An idle link saw a close or bytes: it goes at once; a close by the backend teaches the
    /// pool the backend's idle window.
    /// An idle link's peer was found dead by TCP keepalive (or TCP_USER_TIMEOUT): it goes, and
    /// teaches nothing about the backend's idle window.
    fileprivate func idleLinkDied(_ link: UpstreamLink) {
        state.idleClosed(link.handle, now: now, byPeer: false)
        links.removeValue(forKey: link.handle)
        count(.tcpKeepalive)
        link.closeSocket()
    }

    fileprivate func idleLinkStirred(_ link: UpstreamLink, byPeer: Bool) {
        state.idleClosed(link.handle, now: now, byPeer: byPeer)
        links.removeValue(forKey: link.handle)
        count(byPeer ? .peerClosed : .error)
        link.closeSocket()
    }

    /// An idle link's timer: the pool's upkeep runs, and whatever expired or is surplus closes.
    fileprivate func expire(now: Int64) {
        for (h, reason) in state.tick(now: now) { close(h, reason) }
        for (h, l) in links where l.phase == .idle && !loop.isTimerArmed(h) { armIdleCheck(h) }
    }

    /// An idle link is looked at again after the shorter of the idle timeout and the trim
    /// period: one configured duration (the loop keeps a timer list per duration), so the
    /// pool's upkeep runs at that period while it has idle connections, as nginx's and HAProxy's do.
    private func armIdleCheck(_ h: Handle) {
        var ms = max(1, min(state.effectiveIdleTimeoutMs, state.policy.trimAfterMs))
        // A learned idle window is any value: in steps of 250 ms it makes a few lists, not many.
        if ms >= 250 { ms -= ms % 250 }
        loop.arm(h, afterNanoseconds: UInt64(ms) * 1_000_000)
    }

    /// Another loop waits for a slot of this server: one idle connection goes (its slot with it).
    func shedOneIdle() {
        if let h = state.takeOneIdle() { close(h, .slotWanted) }
    }

    /// A reload changed or removed this server's upstream: idle connections close now, leased
    /// ones when their exchange ends.
    func retire() {
        retired = true
        for h in state.drainIdle() { close(h, .shutdown) }
    }

    private func close(_ h: Handle, _ reason: CloseReason) {
        guard let l = links.removeValue(forKey: h) else { return }
        count(reason)
        l.closeSocket()
    }

    private func count(_ r: CloseReason) { closed[r, default: 0] += 1 }
}

/// One `upstream` block on one loop: a pool per server and the balancer that chooses among
/// them (round robin or least connections, `max_fails`/`fail_timeout`, backups), with the
/// loop's counts of failed and retried requests. Loop-local: no lock.
final class LoopUpstream {
    let name: String
    let pools: [UpstreamPool]
    /// Server `i`'s pool, for the exchanges' calls (`Unretained`: a call on an element read from
    /// `pools` retains it around the call).
    func poolRef(_ i: Int) -> Unretained<UpstreamPool> { Unretained(pools[i]) }
    var balancer: Balancer
    /// Some server has `proxy_protocol` (its requests carry their client's header).
    let sendsProxyProtocol: Bool
    /// The `upstream` block it was made from (a reload keeps the group when it is unchanged).
    var config: Upstream
    /// `proxy_pass https://`: the pools' TLS context.
    var tls: TLSContext? { pools[0].tls }
    /// Failures charged to no server (no live upstreams); the servers' own are in their pools.
    var groupFailures = ReasonCounts<UpstreamFailedReason>()
    /// Failed and retried requests by reason, over the whole group.
    var failures: ReasonCounts<UpstreamFailedReason> { pools.reduce(into: groupFailures) { $0.add($1.failures) } }
    var retries: ReasonCounts<UpstreamRetryReason> { pools.reduce(into: ReasonCounts()) { $0.add($1.retries) } }
    /// Storage for response heads' header index, lent to each parse in turn.
    var headerScratch: [HeaderField] = []

    /// Where the group's exchanges say why they failed.
    let log: LoopErrorLog

    init(name: String, pools: [UpstreamPool], peers: [PeerSpec]? = nil, method: Balancer.Method = .roundRobin, log: LoopErrorLog = .all,
         config: Upstream? = nil, limits: UpstreamLimits? = nil) {
        self.log = log
        self.config = config ?? Upstream(name: name, location: SourceLocation(file: "", line: 0))
        precondition(!pools.isEmpty && (peers == nil || peers!.count == pools.count), "an upstream needs a pool per server")
        self.name = name
        self.pools = pools
        sendsProxyProtocol = pools.contains { $0.sendsProxyProtocol }
        loop = pools[0].loop
        balancer = Balancer(peers ?? pools.map { _ in PeerSpec() }, method: method)
        headerScratch.reserveCapacity(32)
        self.limits = limits
        capped = limits?.isCapped ?? false
        checked = limits?.isChecked.load(ordering: .relaxed) ?? false
        for (i, p) in pools.enumerated() {
            p.index = i
            p.group = self
            p.limits = limits
            p.slot = limits.map { $0.servers[i] }
        }
        if let limits {
            let w = UpstreamLimits.Waker(self)
            waker = w
            limits.register(w)
        }
    }

    deinit {
        queueTimer?.close()
        // On the loop's thread: jobs already posted for this group find it gone.
        if let waker {
            waker.group = nil
            limits?.unregister(waker)
        }
    }

    /// What the other loops post this group's wake-ups through.
    private var waker: UpstreamLimits.Waker?

    // MARK: max_conns and the queue

    /// The process-wide caps and queue of this upstream (shared with the other loops).
    let limits: UpstreamLimits?
    /// Some server has `max_conns` (read per request: kept here, refreshed at a reload).
    private(set) var capped: Bool
    /// `health_check` runs for this upstream (likewise).
    private(set) var checked: Bool
    /// Requests waiting on this loop for a connection, oldest first (from `waitHead` on).
    private var waiting: [ProxyExchange] = []
    private var waitHead = 0
    private var queueTimer: LoopTimer?
    private var serveScheduled = false
    /// Requests answered 503 from the queue, by reason, and how long requests waited.
    var queueWait = Histogram()

    var waitingCount: Int { waiting.count - waitHead }

    /// A reload changed `max_conns` or `queue` (on this loop).
    func limitsChanged() {
        capped = limits?.isCapped ?? false
        checked = limits?.isChecked.load(ordering: .relaxed) ?? false
        scheduleServe()
    }

    /// Whether server `i` passes its health checks (always, without `health_check`).
    func isHealthy(_ i: Int) -> Bool {
        !checked || (pools[i].slot?.healthy.load(ordering: .relaxed) ?? true)
    }

    /// Whether server `i` can take a request from this loop now: an idle connection here, or a
    /// free slot.
    func hasRoom(_ i: Int) -> Bool {
        !capped || pools[i].idleCount > 0 || !(pools[i].slot?.isFull ?? false)
    }

    /// Every server the balancer would try is at its cap: `x` waits if the queue has room
    /// (returns true), at the front when it had been taken out to go and lost its slot.
    func enqueue(_ x: ProxyExchange, full: PeerSet, front: Bool = false) -> Bool {
        guard let limits else { return false }
        if !front {
            guard limits.enqueue() else { return false }
            x.queuedAt = loop.now
        }
        if front && waitHead > 0 {
            waitHead -= 1
            waiting[waitHead] = x
        } else if front {
            waiting.insert(x, at: 0)
        } else {
            waiting.append(x)
        }
        x.isQueued = true
        armQueueTimer()
        // Idle connections of other loops hold the slots: one of them is asked to let one go.
        for i in pools.indices where full.contains(i) { limits.askForSlot(server: i, from: loop) }
        return true
    }

    /// `x` leaves the queue (it goes to a server, or its client left).
    func leaveQueue(_ x: ProxyExchange) {
        guard x.isQueued else { return }
        x.isQueued = false
        limits?.dequeued()
        queueWait.observe(nanoseconds: Int64(loop.now &- x.queuedAt))
        if let i = waiting[waitHead...].firstIndex(where: { $0 === x }) {
            if i == waitHead { waitHead += 1 } else { waiting.remove(at: i) }
        }
        if waitHead == waiting.count {
            waiting.removeAll(keepingCapacity: true)
            waitHead = 0
        }
    }

    /// Serves the queue after this pass (a connection went idle here).
    func scheduleServe() {
        guard waitingCount > 0, !serveScheduled else { return }
        guard let w = waker else { return }
        serveScheduled = true
        loop.execute { _ in
            w.group?.serveScheduled = false
            w.group?.serveQueue()
        }
    }

    /// The oldest waiting requests go, as long as a server has room for them.
    func serveQueue() {
        while waitHead < waiting.count {
            let x = waiting[waitHead]
            guard pools.indices.contains(where: { hasRoom($0) && isHealthy($0) && balancer.isAvailable($0, now: nowMs) }) else { break }
            leaveQueue(x)
            x.dequeuedToGo()
            // It lost the race for the slot to another loop: it went back to the front.
            if x.isQueued { break }
        }
        armQueueTimer()
    }

    /// Another loop waits for a slot of server `i`: this loop lets an idle connection to it go,
    /// unless requests wait here too.
    func shedIdle(server i: Int) {
        guard waitingCount == 0 else { return }
        pools[i].shedOneIdle()
    }

    /// The queue's one timer, which looks at the oldest request every `queueCheckNanoseconds`
    /// while requests wait (a fixed period: the loop keeps a timer list per distinct duration,
    /// so a timer may not be armed for whatever time is left). A request is refused at most
    /// that much after its timeout.
    private func armQueueTimer() {
        guard waitHead < waiting.count, let limits else { queueTimer?.close(); queueTimer = nil; return }
        // Unowned: a weak reference would put every retain of the group on the slow path. The
        // group closes the timer in its deinit, so it never fires for a group that is gone.
        if queueTimer == nil { queueTimer = try? LoopTimer(loop: loop) { [unowned(unsafe) self] _ in self.queueTimedOut() } }
        guard let t = queueTimer, !t.isArmed else { return }
        let timeout = UInt64(limits.queueTimeoutMs.load(ordering: .relaxed)) * 1_000_000
        t.arm(afterNanoseconds: min(timeout, Self.queueCheckNanoseconds))
    }

    static let queueCheckNanoseconds: UInt64 = 100_000_000

    private func queueTimedOut() {
        guard let limits else { return }
        let timeout = UInt64(limits.queueTimeoutMs.load(ordering: .relaxed)) * 1_000_000
        while waitHead < waiting.count, loop.now &- waiting[waitHead].queuedAt >= timeout {
            let x = waiting[waitHead]
            leaveQueue(x)
            groupFailures[.queueTimeout] += 1
            x.refuseFromQueue(timedOut: true)
        }
        armQueueTimer()
    }

    /// Ended exchanges, kept for the next requests (no allocation per proxied request), at most
    /// `maximumSpareExchanges`.
    private var spareExchanges: [ProxyExchange] = []
    static let maximumSpareExchanges = 256

    /// An exchange for a request to this upstream: a spare one retired in an earlier pass of
    /// the loop (so no call on it can still be running: a pipelined request that starts while
    /// the exchange before it is still returning gets a new one), otherwise a new one.
    func exchange(connection: ClientConnection, route: CompiledLocation, request: ProxyExchange.Request) -> ProxyExchange {
        let pass = loop.passes
        if let last = spareExchanges.indices.last {
            if spareExchanges[last].retiredPass == pass, spareExchanges[0].retiredPass != pass {
                // The oldest spare is reusable; the newest just ended.
                spareExchanges.swapAt(0, last)
            }
            if spareExchanges[last].retiredPass != pass && isKnownUniquelyReferenced(&spareExchanges[last]) {
                let x = spareExchanges.removeLast()
                x.reuse(connection: connection, route: route, request: request)
                return x
            }
        }
        return ProxyExchange(connection: connection, upstream: self, route: route, request: request)
    }

    /// An exchange that ended (its upstream link released or closed) becomes a spare.
    func retire(_ x: ProxyExchange) {
        x.dropSpool()
        // A replaced group keeps no spares: each holds the group, which would never be freed.
        guard !replaced, spareExchanges.count < Self.maximumSpareExchanges else { return }
        x.retiredPass = loop.passes
        spareExchanges.append(x)
    }

    var spareExchangeCount: Int { spareExchanges.count }

    /// A reload kept this group: its next TLS connections use `context` (certificates read anew).
    func useTLS(_ context: TLSContext?) {
        for p in pools { p.tls = context }
    }

    /// A reload changed or removed this upstream: its pools close what is idle now and the rest
    /// as their exchanges end. Exchanges under way finish on it.
    func retire() {
        letGo()
        for p in pools { p.retire() }
    }

    /// Another group took this one's place (a reload, new addresses for its names): the requests
    /// under way finish here, and nothing is kept for more.
    func letGo() {
        replaced = true
        spareExchanges = []
    }

    private var replaced = false

    var buffers: BufferPool { pools[0].buffers }
    /// The same, for the exchanges' calls (`Unretained`).
    var bufferRef: Unretained<BufferPool> { Unretained(pools[0].buffers) }
    /// The pools' loop, held by them (read on every exchange: not counted).
    unowned(unsafe) let loop: IOLoop
    var nowMs: Int64 { Int64(loop.now / 1_000_000) }
}
