#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TetherConfig
import TetherIO

/// What the loops share of one upstream, process-wide: each server's connections (idle and busy)
/// against its `max_conns`, and the requests waiting in its `queue`. Touched when a connection
/// opens or closes and when requests queue, never for a request on a warm connection, so the
/// request path takes no lock; a loop with requests waiting is woken through its eventfd when a
/// slot frees elsewhere.
///
/// A reload that keeps the upstream's servers keeps this object and changes the caps and the
/// queue in place (`apply`): no warm connection and no queued request is dropped.
final class UpstreamLimits: Sendable {
    final class Server: Sendable {
        /// `max_conns`; 0: no cap.
        let maxConns: Atomic<Int>
        /// Connections open to the server from every loop (connecting, busy or idle), and the
        /// most there were at once.
        let open = Atomic<Int>(0)
        let peak = Atomic<Int>(0)
        /// `health_check`: whether the server passes its checks (true until it fails `fails` in
        /// a row), the checks and transitions so far, and how long the last check took.
        let healthy = Atomic<Bool>(true)
        let checksPassed = Atomic<Int>(0)
        let checksFailed = Atomic<Int>(0)
        let transitions = Atomic<Int>(0)
        let lastCheckNs = Atomic<Int>(-1)

        init(maxConns: Int) { self.maxConns = Atomic(maxConns) }

        /// Takes a connection slot; false when the server is at its cap.
        func acquire() -> Bool {
            let max = maxConns.load(ordering: .relaxed)
            var n = open.load(ordering: .relaxed)
            while max == 0 || n < max {
                let (done, now) = open.compareExchange(expected: n, desired: n + 1, ordering: .relaxed)
                if done {
                    peak.max(n + 1, ordering: .relaxed)
                    return true
                }
                n = now
            }
            return false
        }

        func release() { open.subtract(1, ordering: .relaxed) }

        var isFull: Bool {
            let max = maxConns.load(ordering: .relaxed)
            return max > 0 && open.load(ordering: .relaxed) >= max
        }
    }

    /// A loop's group of this upstream, for the wake-ups: used only on that loop's thread, where
    /// the group also ends (`group` is cleared by its deinit). Not a weak reference: a weak
    /// reference to the group would put every retain and release of it on the runtime's slow path.
    final class Waker: @unchecked Sendable {
        unowned(unsafe) var group: LoopUpstream?
        /// Strong: a wake-up may come after the server stopped and let its loops go.
        let loop: IOLoop
        init(_ group: LoopUpstream) {
            self.group = group
            loop = group.loop
        }
    }

    let name: String
    let servers: [Server]
    /// `queue N`: at most N requests wait, over all loops; 0: no queue.
    let queueSize: Atomic<Int>
    let queueTimeoutMs: Atomic<Int>
    /// Requests waiting now, over all loops.
    let queued = Atomic<Int>(0)
    private let wakers = Mutex<[Waker]>([])

    init(_ u: Upstream) {
        name = u.name
        servers = u.servers.map { Server(maxConns: $0.maxConns) }
        queueSize = Atomic(u.queue?.size ?? 0)
        queueTimeoutMs = Atomic(Int(u.queue?.timeoutMs ?? 60_000))
        isChecked.store(u.healthCheck != nil, ordering: .relaxed)
    }

    /// Whether `u` (a reloaded definition) can keep this object: the same number of servers.
    func fits(_ u: Upstream) -> Bool { u.servers.count == servers.count }

    /// A reload's new caps and queue.
    func apply(_ u: Upstream) {
        for (s, spec) in zip(servers, u.servers) { s.maxConns.store(spec.maxConns, ordering: .relaxed) }
        queueSize.store(u.queue?.size ?? 0, ordering: .relaxed)
        queueTimeoutMs.store(Int(u.queue?.timeoutMs ?? 60_000), ordering: .relaxed)
        isChecked.store(u.healthCheck != nil, ordering: .relaxed)
        if u.healthCheck == nil { for s in servers { s.healthy.store(true, ordering: .relaxed) } }
        wake()
    }

    var isCapped: Bool { servers.contains { $0.maxConns.load(ordering: .relaxed) > 0 } }

    /// `health_check` is configured (the loops then pass over servers that fail theirs).
    let isChecked = Atomic<Bool>(false)

    /// Takes a place in the queue; false when it is full (or there is none).
    func enqueue() -> Bool {
        let size = queueSize.load(ordering: .relaxed)
        var n = queued.load(ordering: .relaxed)
        while n < size {
            let (done, now) = queued.compareExchange(expected: n, desired: n + 1, ordering: .relaxed)
            if done { return true }
            n = now
        }
        return false
    }

    func dequeued() { queued.subtract(1, ordering: .relaxed) }

    func register(_ waker: Waker) {
        wakers.withLock { $0.append(waker) }
    }

    func unregister(_ waker: Waker) {
        wakers.withLock { $0.removeAll { $0 === waker } }
    }

    /// A slot freed or a cap changed: every loop with requests waiting looks at its queue (on
    /// its own thread, after the pass under way). Nothing happens while nothing waits.
    func wake() {
        guard queued.load(ordering: .relaxed) > 0 else { return }
        for w in wakers.withLock({ $0 }) { w.loop.execute { _ in w.group?.serveQueue() } }
    }

    /// A loop queued a request for want of a slot: the other loops close an idle connection to
    /// `server` if they hold one and have no request waiting themselves, so that the slot goes
    /// where a request needs it.
    func askForSlot(server: Int, from loop: IOLoop) {
        for w in wakers.withLock({ $0 }) where w.loop !== loop {
            w.loop.execute { _ in w.group?.shedIdle(server: server) }
        }
    }
}
