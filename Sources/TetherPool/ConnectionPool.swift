import DequeModule

/// Why a pooled connection was closed. The names are the `reason` label of
/// `tether_upstream_cx_closed_total`.
public enum CloseReason: String, Sendable, CaseIterable {
    case idleTimeout = "idle_timeout"
    case peerClosed = "peer_closed"
    case keepaliveRequests = "keepalive_requests"
    case keepaliveTime = "keepalive_time"
    case keepaliveHeader = "keepalive_header"
    case learnedIdle = "learned_idle"
    case trimmed = "trimmed"
    case notReusable = "not_reusable"
    case tcpKeepalive = "tcp_keepalive"
    case error = "error"
    case shutdown = "shutdown"
    /// The client left mid-exchange and the rest of the response could not be waited for.
    case clientAbort = "client_abort"
    /// Idle, and its `max_conns` slot was wanted by a request waiting on another event loop.
    case slotWanted = "slot_wanted"
}

/// The limits a pool keeps to; times in milliseconds.
public struct PoolPolicy: Sendable, Equatable {
    /// `keepalive N`: idle connections kept per pool however long they sit (up to the idle timeout).
    public var keepalive: Int
    public var idleTimeoutMs: Int64
    public var maxRequests: Int
    public var maxLifetimeMs: Int64
    /// Idle connections beyond `keepalive` are closed once idle this long, and only as many as
    /// the recent peak of connections in use does not need: surplus is trimmed gradually, never
    /// at release, so a steady load above `keepalive` does not churn. It is also the length of the
    /// windows the peak is taken over.
    public var trimAfterMs: Int64 = 2_000
    /// Learned idle windows never go below this.
    public var learnedFloorMs: Int64 = 250

    public init(keepalive: Int, idleTimeoutMs: Int64, maxRequests: Int, maxLifetimeMs: Int64) {
        self.keepalive = keepalive
        self.idleTimeoutMs = idleTimeoutMs
        self.maxRequests = maxRequests
        self.maxLifetimeMs = maxLifetimeMs
    }
}

/// The pool of one upstream server on one event loop, as a value: it takes events with the
/// current time and answers what to do. It knows nothing of sockets or HTTP.
///
/// Idle connections are kept most-recently-used first, so a steady load keeps reusing the same
/// warm set while the rest age out and are trimmed. A leased connection's `Entry` is held by
/// whoever leased it, and handed back with `release`: the pool keeps no table of leased
/// connections (looking one up by its ID on every lease and release cost about 350
/// instructions per proxied request).
public struct ConnectionPool<ID: Hashable & Sendable>: Sendable {
    /// What the pool remembers of a connection: its age, its requests, what its backend said.
    public struct Entry: Equatable, Sendable {
        public let id: ID
        var createdAt: Int64
        var requests: Int
        var idleSince: Int64
        /// The backend's `Keep-Alive: timeout=`, less a margin, if it sent one.
        var headerIdleLimitMs: Int64?
        /// The backend's `Keep-Alive: max=`: requests it still allows.
        var headerRemaining: Int?
    }

    public private(set) var policy: PoolPolicy
    /// Idle connections, most recently released last.
    private var idle: Deque<Entry> = []
    /// Connections in use (their entries are with whoever leased them).
    public private(set) var leasedCount = 0
    /// Connects under way.
    public private(set) var connecting = 0
    /// The backend's idle window as learned from connections it closed, if any.
    public private(set) var learnedIdleMs: Int64?
    /// What the backend last advertised in `Keep-Alive: timeout=`, in milliseconds.
    public private(set) var advertisedTimeoutMs: Int64?
    private var warnedAboutTimeout = false
    /// The most connections in use at once in each of the last `peakWindows` windows of
    /// `trimAfterMs` (the current one first): what a load has recently needed, which trimming
    /// leaves in place. (HAProxy's idle pool purge works from recent usage in the same way.)
    /// Taking the peak rather than idle time alone keeps the least recently used connections,
    /// which a load only reaches at its peaks, from being closed and opened again at every peak.
    private var currentPeak = 0
    /// The peaks of the windows before, the latest first.
    private var pastPeaks = [Int](repeating: 0, count: ConnectionPool.peakWindows - 1)
    private var windowStart: Int64 = 0
    /// With 2 s windows, peaks are remembered for 8 to 10 s.
    static var peakWindows: Int { 5 }

    public init(policy: PoolPolicy) { self.policy = policy }

    /// Connections in use now (leased, and being connected for a lease).
    private mutating func notePeak() {
        currentPeak = max(currentPeak, leasedCount + connecting)
    }

    /// The connections recent peaks needed.
    public var recentPeak: Int { max(currentPeak, pastPeaks.max() ?? 0) }

    public var idleCount: Int { idle.count }

    /// The longest a connection of this pool may sit idle, whatever the reason.
    public var effectiveIdleTimeoutMs: Int64 {
        min(policy.idleTimeoutMs, learnedIdleMs ?? .max)
    }

    public enum Lease: Equatable, Sendable {
        /// Use this warm connection; it had been idle this long. The entry goes back with `release`.
        case reuse(Entry, idleMs: Int64)
        /// No usable idle connection: open a new one and report it with `connected`.
        case connect
    }

    /// Takes a warm connection if one is usable now. Expired ones met on the way are returned to be closed.
    public mutating func lease(now: Int64) -> (Lease, close: [(ID, CloseReason)]) {
        var close: [(ID, CloseReason)] = []
        while let e = idle.popLast() {
            if let reason = expiry(of: e, now: now) {
                close.append((e.id, reason))
                continue
            }
            var e = e
            let idleMs = now - e.idleSince
            e.requests += 1
            if let r = e.headerRemaining { e.headerRemaining = r - 1 }
            leasedCount += 1
            notePeak()
            return (.reuse(e, idleMs: idleMs), close)
        }
        connecting += 1
        notePeak()
        return (.connect, close)
    }

    /// Starts a connect without looking at idle connections (a retry that must not reuse one).
    public mutating func connectFresh() {
        connecting += 1
        notePeak()
    }

    /// A connect asked for by `lease` finished: the connection is now leased for its first
    /// request; its entry goes back with `release`.
    public mutating func connected(_ id: ID, now: Int64) -> Entry {
        precondition(connecting > 0, "connected without a connect under way")
        connecting -= 1
        leasedCount += 1
        return Entry(id: id, createdAt: now, requests: 1, idleSince: now)
    }

    /// A connect asked for by `lease` failed.
    public mutating func connectFailed() {
        precondition(connecting > 0, "connect failure without a connect under way")
        connecting -= 1
    }

    /// What the backend said about keep-alive in its response on this connection.
    public struct BackendKeepAlive: Equatable, Sendable {
        public var timeoutSeconds: Int?
        public var max: Int?
        public init(timeoutSeconds: Int? = nil, max: Int? = nil) {
            self.timeoutSeconds = timeoutSeconds
            self.max = max
        }
    }

    public enum Release: Equatable, Sendable {
        case keep
        case close(CloseReason)
    }

    /// The exchange on a leased connection ended. `reusable` is false when anything made the
    /// connection unfit (unclean end, `Connection: close`, upgrade, bytes past the response).
    /// Returns what to do with it and, the first time the backend advertises a shorter idle
    /// timeout than the configured one, that timeout (to warn about once).
    public mutating func release(_ entry: Entry, now: Int64, reusable: Bool, backend: BackendKeepAlive? = nil) -> (Release, warnShorterTimeoutMs: Int64?) {
        precondition(leasedCount > 0, "release of a connection that is not leased")
        leasedCount -= 1
        var e = entry
        var warn: Int64?
        if let b = backend {
            if let t = b.timeoutSeconds {
                let ms = Int64(t) * 1000
                advertisedTimeoutMs = ms
                e.headerIdleLimitMs = ms - min(1000, ms / 4)
                if ms < policy.idleTimeoutMs && !warnedAboutTimeout {
                    warnedAboutTimeout = true
                    warn = ms
                }
            }
            if let m = b.max { e.headerRemaining = m }
        }
        guard reusable else { return (.close(.notReusable), warn) }
        if e.requests >= policy.maxRequests { return (.close(.keepaliveRequests), warn) }
        if now - e.createdAt >= policy.maxLifetimeMs { return (.close(.keepaliveTime), warn) }
        if let r = e.headerRemaining, r <= 0 { return (.close(.keepaliveHeader), warn) }
        if e.headerIdleLimitMs.map({ $0 <= 0 }) == true || effectiveIdleTimeoutMs <= 0 { return (.close(.idleTimeout), warn) }
        e.idleSince = now
        idle.append(e)
        return (.keep, warn)
    }

    /// A leased connection was closed or failed while in use (the caller already closed it, and
    /// drops its entry).
    public mutating func leasedClosed() {
        precondition(leasedCount > 0, "a leased connection closed while none is leased")
        leasedCount -= 1
    }

    /// An idle connection saw EOF or data from the backend, or an error: drop it. When the
    /// backend closed it, its idle window is learned. Returns the learned window if it changed.
    @discardableResult
    public mutating func idleClosed(_ id: ID, now: Int64, byPeer: Bool) -> Int64? {
        guard let i = idle.firstIndex(where: { $0.id == id }) else { return nil }
        let e = idle.remove(at: i)
        guard byPeer else { return nil }
        let t = now - e.idleSince
        return learn(upperBound: t - min(1000, t / 4))
    }

    /// A reused connection failed before any response byte, after idling `idleMs`: the backend's
    /// window is shorter than that. Returns the learned window if it changed.
    @discardableResult
    public mutating func reusedConnectionFailed(idleMs: Int64) -> Int64? {
        learn(upperBound: idleMs * 3 / 4)
    }

    private mutating func learn(upperBound: Int64) -> Int64? {
        let value = max(policy.learnedFloorMs, upperBound)
        guard value < effectiveIdleTimeoutMs else { return nil }
        learnedIdleMs = value
        return value
    }

    /// Why an idle connection may no longer be used, if it may not.
    private func expiry(of e: Entry, now: Int64) -> CloseReason? {
        let idleMs = now - e.idleSince
        if idleMs >= policy.idleTimeoutMs { return .idleTimeout }
        if let l = e.headerIdleLimitMs, idleMs >= l { return .keepaliveHeader }
        if let l = learnedIdleMs, idleMs >= l { return .learnedIdle }
        if now - e.createdAt >= policy.maxLifetimeMs { return .keepaliveTime }
        return nil
    }

    /// Periodic upkeep: idle connections that expired, and surplus that has sat idle for
    /// `trimAfterMs`: beyond `keepalive` idle ones, and beyond what the recent peak needed.
    /// Returns those to close.
    public mutating func tick(now: Int64) -> [(ID, CloseReason)] {
        let elapsed = (now - windowStart) / max(1, policy.trimAfterMs)
        if elapsed > 0 {
            // Windows without a lease had what is in use now in use throughout.
            let inUse = leasedCount + connecting
            for _ in 0..<min(Int(elapsed), Self.peakWindows) {
                pastPeaks.removeLast()
                pastPeaks.insert(currentPeak, at: 0)
                currentPeak = inUse
            }
            windowStart += elapsed * max(1, policy.trimAfterMs)
        }
        var close: [(ID, CloseReason)] = []
        var kept: Deque<Entry> = []
        // Oldest first: the surplus to trim is the least recently used.
        var surplus = min(idle.count - policy.keepalive, idle.count + leasedCount + connecting - recentPeak)
        for e in idle {
            if let reason = expiry(of: e, now: now) {
                close.append((e.id, reason)); surplus -= 1
            } else if surplus > 0 && now - e.idleSince >= policy.trimAfterMs {
                close.append((e.id, .trimmed)); surplus -= 1
            } else {
                kept.append(e)
            }
        }
        idle = kept
        return close
    }

    /// Takes the least recently used idle connection out (to be closed), if there is one.
    public mutating func takeOneIdle() -> ID? {
        idle.popFirst()?.id
    }

    /// Closes every idle connection (shutdown or a removed upstream).
    public mutating func drainIdle() -> [ID] {
        let ids = idle.map(\.id)
        idle.removeAll()
        return ids
    }

    /// The earliest time an idle connection expires, for scheduling the next tick.
    public func nextExpiry() -> Int64? {
        idle.map { e in
            var t = e.idleSince + effectiveIdleTimeoutMs
            if let l = e.headerIdleLimitMs { t = min(t, e.idleSince + l) }
            if idle.count > policy.keepalive { t = min(t, e.idleSince + policy.trimAfterMs) }
            return min(t, e.createdAt + policy.maxLifetimeMs)
        }.min()
    }
}
