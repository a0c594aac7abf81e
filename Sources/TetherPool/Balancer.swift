/// One server of an upstream, as the balancer sees it.
public struct PeerSpec: Sendable, Equatable {
    public var weight: Int
    public var maxFails: Int
    public var failTimeoutMs: Int64
    public var backup: Bool
    public var down: Bool

    public init(weight: Int = 1, maxFails: Int = 1, failTimeoutMs: Int64 = 10_000, backup: Bool = false, down: Bool = false) {
        self.weight = weight
        self.maxFails = maxFails
        self.failTimeoutMs = failTimeoutMs
        self.backup = backup
        self.down = down
    }
}

/// Peer selection for one upstream on one event loop: nginx's smooth weighted round robin or
/// least connections, with passive health (`max_fails` failures within `fail_timeout` make a
/// server unavailable for `fail_timeout`) and backup servers used only when no primary is.
public struct Balancer: Sendable {
    public enum Method: Sendable { case roundRobin, leastConn }

    struct Peer: Sendable {
        var spec: PeerSpec
        var currentWeight = 0
        var fails = 0
        var firstFailAt: Int64 = 0
        var downUntil: Int64 = .min
        var active = 0
    }

    private var peers: [Peer]
    public let method: Method

    public init(_ specs: [PeerSpec], method: Method = .roundRobin) {
        peers = specs.map { Peer(spec: $0) }
        self.method = method
    }

    public var count: Int { peers.count }

    /// Whether peer `i` may be chosen now (configured up, not failed recently).
    public func isAvailable(_ i: Int, now: Int64) -> Bool {
        let p = peers[i]
        if p.spec.down { return false }
        // As nginx: an upstream with a single server is always tried.
        if peers.count == 1 { return true }
        return now >= p.downUntil
    }

    /// Chooses a server, skipping those in `exclude` (already tried for this request).
    /// Nil when none is available: the request gets a 502. Allocates nothing.
    public mutating func select(now: Int64, exclude: PeerSet = PeerSet()) -> Int? {
        if let i = pick(now: now, exclude: exclude, backup: false) { return i }
        return pick(now: now, exclude: exclude, backup: true)
    }

    /// Whether `select` would find a server, without advancing the round robin.
    public func hasCandidate(now: Int64, exclude: PeerSet = PeerSet()) -> Bool {
        peers.indices.contains { i in !exclude.contains(i) && isAvailable(i, now: now) }
    }

    private func eligible(_ i: Int, _ now: Int64, _ exclude: PeerSet, _ backup: Bool) -> Bool {
        peers[i].spec.backup == backup && !exclude.contains(i) && isAvailable(i, now: now)
    }

    private mutating func pick(now: Int64, exclude: PeerSet, backup: Bool) -> Int? {
        // With least_conn, only the least loaded (active per weight) take part in the round robin.
        var bestLoad = Double.infinity
        if method == .leastConn {
            for i in peers.indices where eligible(i, now, exclude, backup) {
                bestLoad = min(bestLoad, Double(peers[i].active) / Double(peers[i].spec.weight))
            }
        }
        var total = 0
        var chosen = -1
        for i in peers.indices where eligible(i, now, exclude, backup) {
            if method == .leastConn && Double(peers[i].active) / Double(peers[i].spec.weight) != bestLoad { continue }
            peers[i].currentWeight += peers[i].spec.weight
            total += peers[i].spec.weight
            if chosen < 0 || peers[i].currentWeight > peers[chosen].currentWeight { chosen = i }
        }
        guard chosen >= 0 else { return nil }
        peers[chosen].currentWeight -= total
        return chosen
    }

    /// A request to peer `i` failed (connect error, timeout, or a status listed in proxy_next_upstream).
    public mutating func failed(_ i: Int, now: Int64) {
        let spec = peers[i].spec
        guard spec.maxFails > 0 else { return }
        if now - peers[i].firstFailAt > spec.failTimeoutMs { peers[i].fails = 0 }
        if peers[i].fails == 0 { peers[i].firstFailAt = now }
        peers[i].fails += 1
        if peers[i].fails >= spec.maxFails {
            peers[i].downUntil = now + spec.failTimeoutMs
            peers[i].fails = 0
        }
    }

    /// A request to peer `i` got a response: its failure count starts over.
    public mutating func succeeded(_ i: Int) {
        peers[i].fails = 0
    }

    public mutating func started(_ i: Int) { peers[i].active += 1 }
    public mutating func ended(_ i: Int) { peers[i].active -= 1 }
}

/// A set of server indexes, kept in one word for the first 64 servers (no allocation per request).
public struct PeerSet: Sendable, Equatable, ExpressibleByArrayLiteral {
    private var bits: UInt64 = 0
    private var more: Set<Int>?

    public init() {}

    public init(arrayLiteral elements: Int...) {
        for e in elements { insert(e) }
    }

    public func contains(_ i: Int) -> Bool {
        i < 64 ? bits & (1 << UInt64(i)) != 0 : more?.contains(i) == true
    }

    public mutating func insert(_ i: Int) {
        if i < 64 { bits |= 1 << UInt64(i) } else { more = (more ?? []).union([i]) }
    }

    public var isEmpty: Bool { bits == 0 && (more?.isEmpty ?? true) }

    public func union(_ o: PeerSet) -> PeerSet {
        var u = self
        u.bits |= o.bits
        if let m = o.more { u.more = (u.more ?? []).union(m) }
        return u
    }
}
