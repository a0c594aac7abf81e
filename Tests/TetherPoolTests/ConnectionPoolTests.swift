import Testing
@testable import TetherPool

/// A pool and the entries of its leased connections, held by ID as the upstream links hold
/// theirs: `lease` and `connected` take an entry, `release` gives it back.
@dynamicMemberLookup
struct HeldPool {
    var pool: ConnectionPool<Int>
    var held: [Int: ConnectionPool<Int>.Entry] = [:]

    enum Leased: Equatable {
        case reuse(Int, idleMs: Int64)
        case connect
    }

    subscript<T>(dynamicMember path: KeyPath<ConnectionPool<Int>, T>) -> T { pool[keyPath: path] }

    mutating func lease(now: Int64) -> (Leased, close: [(Int, CloseReason)]) {
        let (lease, close) = pool.lease(now: now)
        switch lease {
        case .reuse(let e, let idleMs):
            #expect(held[e.id] == nil, "an entry leased twice")
            held[e.id] = e
            return (.reuse(e.id, idleMs: idleMs), close)
        case .connect:
            return (.connect, close)
        }
    }

    mutating func connected(_ id: Int, now: Int64) { held[id] = pool.connected(id, now: now) }

    mutating func release(_ id: Int, now: Int64, reusable: Bool, backend: ConnectionPool<Int>.BackendKeepAlive? = nil)
        -> (ConnectionPool<Int>.Release, warnShorterTimeoutMs: Int64?) {
        pool.release(held.removeValue(forKey: id)!, now: now, reusable: reusable, backend: backend)
    }

    mutating func tick(now: Int64) -> [(Int, CloseReason)] { pool.tick(now: now) }
    mutating func idleClosed(_ id: Int, now: Int64, byPeer: Bool) -> Int64? { pool.idleClosed(id, now: now, byPeer: byPeer) }
    mutating func reusedConnectionFailed(idleMs: Int64) -> Int64? { pool.reusedConnectionFailed(idleMs: idleMs) }
    mutating func drainIdle() -> [Int] { pool.drainIdle() }
    func nextExpiry() -> Int64? { pool.nextExpiry() }
}

@Suite struct ConnectionPoolTests {
    func pool(keepalive: Int = 2, idle: Int64 = 60_000, requests: Int = 1000, lifetime: Int64 = 3_600_000) -> HeldPool {
        HeldPool(pool: ConnectionPool(policy: PoolPolicy(keepalive: keepalive, idleTimeoutMs: idle, maxRequests: requests, maxLifetimeMs: lifetime)))
    }

    /// The pool keeps a count of leased connections, not their entries: a leased connection that
    /// closes is counted out, and the peak it made is still remembered.
    @Test func leasedConnectionsAreCountedAndTheirEntriesGoBackOnRelease() {
        var p = pool()
        _ = p.lease(now: 0); p.connected(1, now: 0)
        _ = p.lease(now: 0); p.connected(2, now: 0)
        #expect(p.leasedCount == 2 && p.recentPeak == 2)
        p.held[2] = nil
        p.pool.leasedClosed()
        #expect(p.leasedCount == 1 && p.idleCount == 0)
        #expect(p.release(1, now: 5, reusable: true).0 == .keep)
        #expect(p.leasedCount == 0 && p.idleCount == 1 && p.recentPeak == 2)
        // The entry that comes back with the next lease is the one released: one request more.
        guard case .reuse(let e, idleMs: 5) = p.pool.lease(now: 10).0 else { Issue.record("not reused"); return }
        #expect(e.id == 1 && e.requests == 2 && e.createdAt == 0)
    }

    @Test func firstLeaseConnectsThenReusesMostRecent() {
        var p = pool()
        #expect(p.lease(now: 0).0 == .connect)
        p.connected(1, now: 0)
        #expect(p.lease(now: 0).0 == .connect)
        p.connected(2, now: 0)
        #expect(p.release(1, now: 10, reusable: true).0 == .keep)
        #expect(p.release(2, now: 20, reusable: true).0 == .keep)
        #expect(p.lease(now: 30).0 == .reuse(2, idleMs: 10))
        #expect(p.lease(now: 30).0 == .reuse(1, idleMs: 20))
        #expect(p.leasedCount == 2 && p.idleCount == 0)
    }

    @Test func surplusIsNotClosedAtReleaseButTrimmedWhenIdle() {
        var p = pool(keepalive: 1)
        for id in 1...4 { _ = p.lease(now: 0); p.connected(id, now: 0) }
        for id in 1...4 { #expect(p.release(id, now: 100, reusable: true).0 == .keep) }
        #expect(p.idleCount == 4)
        // Still within the trim age: nothing closed, a steady load above keepalive does not churn.
        #expect(p.tick(now: 1_000).isEmpty)
        // Idle long enough, but the peak that needed four is recent: kept.
        #expect(p.tick(now: 2_100).isEmpty)
        #expect(p.tick(now: 8_000).isEmpty)
        // Five windows without that peak: the least recently used surplus goes.
        let closed = p.tick(now: 12_200)
        #expect(closed.map(\.0) == [1, 2, 3])
        #expect(closed.allSatisfy { $0.1 == .trimmed })
        #expect(p.idleCount == 1)
    }

    /// A load that needs N connections at its peaks and fewer in between keeps N: the least
    /// recently used ones sit idle between peaks but are not closed and opened again at each.
    @Test func connectionsTheRecentPeakNeededAreKeptThroughIdleStretches() {
        var p = pool(keepalive: 2)
        var now: Int64 = 0
        var connects = 0
        var nextID = 0
        // Every 3 s a burst of 10 at once; in between, one at a time.
        for _ in 0..<10 {
            var held: [Int] = []
            for _ in 0..<10 {
                switch p.lease(now: now).0 {
                case .reuse(let id, _): held.append(id)
                case .connect: nextID += 1; connects += 1; p.connected(nextID, now: now); held.append(nextID)
                }
            }
            now += 10
            for id in held { _ = p.release(id, now: now, reusable: true) }
            for _ in 0..<30 {
                now += 100
                switch p.lease(now: now).0 {
                case .reuse(let id, _): _ = p.release(id, now: now + 1, reusable: true)
                case .connect: nextID += 1; connects += 1; p.connected(nextID, now: now); _ = p.release(nextID, now: now + 1, reusable: true)
                }
                _ = p.tick(now: now)
            }
        }
        #expect(connects == 10, "only the first burst connects")
        // When the bursts stop, the surplus goes once the last peak is out of the remembered windows.
        for _ in 0..<40 { now += 100; _ = p.tick(now: now) }
        #expect(p.idleCount == 10, "7 s after the last burst it is still remembered")
        for _ in 0..<60 { now += 100; _ = p.tick(now: now) }
        #expect(p.idleCount == 2)
    }

    @Test func idleTimeoutExpiresAtLeaseAndTick() {
        var p = pool(idle: 1_000)
        _ = p.lease(now: 0); p.connected(1, now: 0)
        _ = p.release(1, now: 0, reusable: true)
        let (lease, close) = p.lease(now: 1_000)
        #expect(lease == .connect)
        #expect(close.map(\.0) == [1] && close[0].1 == .idleTimeout)
    }

    @Test func requestAndLifetimeLimits() {
        var p = pool(requests: 2, lifetime: 5_000)
        _ = p.lease(now: 0); p.connected(1, now: 0)
        #expect(p.release(1, now: 1, reusable: true).0 == .keep)
        #expect(p.lease(now: 2).0 == .reuse(1, idleMs: 1))
        #expect(p.release(1, now: 3, reusable: true).0 == .close(.keepaliveRequests))
        _ = p.lease(now: 10); p.connected(2, now: 10)
        #expect(p.release(2, now: 5_010, reusable: true).0 == .close(.keepaliveTime))
        _ = p.lease(now: 10); p.connected(3, now: 10)
        #expect(p.release(3, now: 11, reusable: false).0 == .close(.notReusable))
    }

    @Test func backendKeepAliveHeaderExpiresBeforeItsTimeout() {
        var p = pool(idle: 60_000)
        _ = p.lease(now: 0); p.connected(1, now: 0)
        let (r, warn) = p.release(1, now: 0, reusable: true, backend: .init(timeoutSeconds: 2))
        #expect(r == .keep)
        #expect(warn == 2_000)
        // timeout=2 means the connection is not used after 1.5 s idle.
        #expect(p.lease(now: 1_499).0 == .reuse(1, idleMs: 1_499))
        _ = p.release(1, now: 1_499, reusable: true, backend: .init(timeoutSeconds: 2))
        let (lease, close) = p.lease(now: 1_499 + 1_500)
        #expect(lease == .connect && close.map(\.1) == [.keepaliveHeader])
        // Warned only once.
        p.connected(2, now: 0)
        #expect(p.release(2, now: 0, reusable: true, backend: .init(timeoutSeconds: 2)).warnShorterTimeoutMs == nil)
    }

    @Test func backendKeepAliveMax() {
        var p = pool()
        _ = p.lease(now: 0); p.connected(1, now: 0)
        #expect(p.release(1, now: 0, reusable: true, backend: .init(max: 1)).0 == .keep)
        _ = p.lease(now: 1)
        #expect(p.release(1, now: 2, reusable: true).0 == .close(.keepaliveHeader))
    }

    @Test func learnsIdleWindowFromPeerClose() {
        var p = pool(idle: 60_000)
        _ = p.lease(now: 0); p.connected(1, now: 0)
        _ = p.release(1, now: 0, reusable: true)
        #expect(p.idleClosed(1, now: 4_000, byPeer: true) == 3_000)
        #expect(p.learnedIdleMs == 3_000)
        #expect(p.effectiveIdleTimeoutMs == 3_000)
        _ = p.lease(now: 10_000); p.connected(2, now: 10_000)
        _ = p.release(2, now: 10_000, reusable: true)
        let (lease, close) = p.lease(now: 13_000)
        #expect(lease == .connect && close.map(\.1) == [.learnedIdle])
    }

    @Test func learnsFromFailedReuseButNeverBelowTheFloorNorUpward() {
        var p = pool()
        #expect(p.reusedConnectionFailed(idleMs: 1_000) == 750)
        #expect(p.reusedConnectionFailed(idleMs: 2_000) == nil)
        #expect(p.learnedIdleMs == 750)
        #expect(p.reusedConnectionFailed(idleMs: 100) == 250)
        #expect(p.learnedIdleMs == 250)
    }

    @Test func idleCloseByUsDoesNotLearn() {
        var p = pool()
        _ = p.lease(now: 0); p.connected(1, now: 0)
        _ = p.release(1, now: 0, reusable: true)
        #expect(p.idleClosed(1, now: 10, byPeer: false) == nil)
        #expect(p.learnedIdleMs == nil && p.idleCount == 0)
    }

    @Test func nextExpiryAndDrain() {
        var p = pool(keepalive: 0, idle: 5_000)
        #expect(p.nextExpiry() == nil)
        _ = p.lease(now: 0); p.connected(1, now: 0)
        _ = p.release(1, now: 100, reusable: true)
        #expect(p.nextExpiry() == 2_100)
        #expect(p.drainIdle() == [1])
        #expect(p.idleCount == 0)
    }
}

@Suite struct BalancerTests {
    @Test func smoothWeightedRoundRobinAsNginx() {
        var b = Balancer([PeerSpec(weight: 5), PeerSpec(weight: 1), PeerSpec(weight: 1)])
        let picks = (0..<7).map { _ in b.select(now: 0)! }
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        #expect(picks == [0, 0, 1, 0, 2, 0, 0])
    }

    @Test func checkingForACandidateDoesNotAdvanceTheRoundRobin() {
        var b = Balancer([PeerSpec(weight: 5), PeerSpec(weight: 1), PeerSpec(weight: 1)])
        var picks: [Int] = []
        for _ in 0..<7 {
            #expect(b.hasCandidate(now: 0))
            picks.append(b.select(now: 0)!)
        }
        #expect(picks == [0, 0, 1, 0, 2, 0, 0])
        #expect(!b.hasCandidate(now: 0, exclude: [0, 1, 2]))
    }

    @Test func failedServerIsSkippedForFailTimeoutThenBack() {
        var b = Balancer([PeerSpec(maxFails: 2, failTimeoutMs: 1_000), PeerSpec()])
        b.failed(0, now: 0)
        #expect(b.isAvailable(0, now: 0))
        b.failed(0, now: 10)
        #expect(!b.isAvailable(0, now: 10))
        #expect((0..<4).map { _ in b.select(now: 500)! } == [1, 1, 1, 1])
        #expect(b.isAvailable(0, now: 1_010))
    }

    @Test func backupOnlyWhenPrimariesUnavailable() {
        var b = Balancer([PeerSpec(failTimeoutMs: 1_000), PeerSpec(backup: true)])
        #expect(b.select(now: 0) == 0)
        b.failed(0, now: 0)
        #expect(b.select(now: 1) == 1)
        #expect(b.select(now: 1, exclude: [1]) == nil)
    }

    @Test func singleServerIsAlwaysTriedButDownIsNever() {
        var one = Balancer([PeerSpec()])
        one.failed(0, now: 0)
        #expect(one.select(now: 1) == 0)
        var downs = Balancer([PeerSpec(down: true), PeerSpec(down: true)])
        #expect(downs.select(now: 0) == nil)
    }

    @Test func leastConnPicksFewestActive() {
        var b = Balancer([PeerSpec(), PeerSpec(), PeerSpec(weight: 2)], method: .leastConn)
        b.started(0); b.started(0); b.started(1); b.started(2); b.started(2)
        #expect(b.select(now: 0) == 2)  // 2 active / weight 2 = 1 < 2, ties with peer 1 (1/1) → round robin among the two
        b.ended(0); b.ended(0)
        #expect(b.select(now: 0) == 0)
    }

    @Test func keepAlivePolicyMatchesNginx() {
        let p = KeepAlivePolicy(maxRequests: 3, maxLifetimeMs: 1_000)
        #expect(p.decide(requestNumber: 1, clientWantsKeepAlive: true, connectionAgeMs: 0) == .keepAlive)
        #expect(p.decide(requestNumber: 3, clientWantsKeepAlive: true, connectionAgeMs: 0) == .close(.keepaliveRequests))
        #expect(p.decide(requestNumber: 1, clientWantsKeepAlive: true, connectionAgeMs: 1_000) == .close(.keepaliveTime))
        #expect(p.decide(requestNumber: 1, clientWantsKeepAlive: false, connectionAgeMs: 0) == .close(.clientClose))
        var d = p; d.draining = true
        #expect(d.decide(requestNumber: 1, clientWantsKeepAlive: true, connectionAgeMs: 0) == .close(.shutdown))
    }
}
