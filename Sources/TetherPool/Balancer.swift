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
    /// Nil when none is available: the request gets a 502.
    public mutating func select(now: Int64, exclude: Set<Int> = []) -> Int? {
        if let i = pick(now: now, exclude: exclude, backup: false) { return i }
        return pick(now: now, exclude: exclude, backup: true)
    }

    private mutating func pick(now: Int64, exclude: Set<Int>, backup: Bool) -> Int? {
        var candidates: [Int] = []
        for i in peers.indices where peers[i].spec.backup == backup && !exclude.contains(i) && isAvailable(i, now: now) {
            candidates.append(i)
        }
        guard !candidates.isEmpty else { return nil }
        if method == .leastConn {
            // Fewest active per weight; ties go to round robin among them.
            func load(_ i: Int) -> Double { Double(peers[i].active) / Double(peers[i].spec.weight) }
            let best = candidates.map(load).min()!
            candidates = candidates.filter { load($0) == best }
            if candidates.count == 1 { return candidates[0] }
        }
        var total = 0
        var chosen = candidates[0]
        for i in candidates {
            peers[i].currentWeight += peers[i].spec.weight
            total += peers[i].spec.weight
            if peers[i].currentWeight > peers[chosen].currentWeight { chosen = i }
        }
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
    public func active(_ i: Int) -> Int { peers[i].active }
}
