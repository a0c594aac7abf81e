#if canImport(Glibc)
import Glibc
#endif
import Testing
import TetherIO
import TetherPool
@testable import TetherCore

/// An exchange as far as the pool sees it: writes one request when its link is ready and
/// collects the response.
final class PoolUser: UpstreamLinkOwner {
    var link: UpstreamLink?
    var got: [UInt8] = []
    var connectError: Int32?
    var closedWith: Int32??
    let buffers: BufferPool
    init(buffers: BufferPool) { self.buffers = buffers }

    var answered: Bool { responses(got).count == 1 }

    func send(on link: UpstreamLink) {
        var b = buffers.take()
        b.append(contentsOf: Array("GET /up HTTP/1.1\r\nHost: backend\r\n\r\n".utf8))
        link.write(b)
    }

    func upstreamConnected(_ link: UpstreamLink) { send(on: link) }
    func upstreamConnectFailed(_ link: UpstreamLink, errno: Int32) { connectError = errno }
    func upstreamClosed(_ link: UpstreamLink, errno: Int32?) { closedWith = .some(errno) }
    func upstreamReadable(_ link: UpstreamLink) {
        while link.read() {}
        if var b = link.takeInbound() {
            b.withReadableBytes { got += $0 }
            b.consume(b.readableBytes)
            link.putBack(b)
        }
    }
}

/// A pool on one loop in front of a backend on the same loop (Tether's own client connection
/// answering `ok:<target>`), so that every step is an event of one loop.
final class PoolRig {
    let rig: ClientRig
    let port: UInt16
    let listener: Listener
    var loop: IOLoop { rig.loop }
    var backend: ClientLoop { rig.clients }

    init(backend configure: (inout ClientSettings) -> Void = { _ in }) throws {
        rig = try ClientRig(configure)
        let (fd, port) = try Sockets.listenTCP()
        self.port = port
        let clients = rig.clients
        listener = Listener(fd: fd, accepted: { c, _ in _ = try? clients.adopt(c) }, failed: { _, _ in })
        try listener.start(on: rig.loop)
    }

    func pool(idleTimeoutMs: Int64 = 60_000, keepalive: Int = 32, port: UInt16? = nil) -> UpstreamPool {
        UpstreamPool(loop: loop, buffers: rig.pool, host: "127.0.0.1", port: port ?? self.port,
                     policy: PoolPolicy(keepalive: keepalive, idleTimeoutMs: idleTimeoutMs, maxRequests: 1000, maxLifetimeMs: 3_600_000))!
    }

    /// Runs the loop until `done` (bounded: passes of at most 20 ms).
    func run(passes: Int = 500, until done: () -> Bool) throws -> Bool {
        for _ in 0..<passes {
            if done() { return true }
            try loop.runOnce(timeoutMs: 20)
        }
        return done()
    }

    /// One exchange through `pool`: lease, request, response, release.
    func exchange(_ pool: UpstreamPool) throws -> (PoolUser, reused: Bool) {
        let user = PoolUser(buffers: rig.pool)
        let (link, e) = pool.lease(for: user)
        precondition(link != nil, "lease failed: \(e)")
        user.link = link
        let reused = link!.reused
        if reused { user.send(on: link!) }
        #expect(try run { user.answered })
        pool.release(link!, reusable: true)
        return (user, reused)
    }
}

@Suite struct UpstreamPoolTests {
    @Test func aReleasedConnectionCarriesTheNextRequest() throws {
        let r = try PoolRig()
        let pool = r.pool()
        let (first, reusedFirst) = try r.exchange(pool)
        #expect(responses(first.got).first?.body == "ok:/up")
        #expect(!reusedFirst)
        for _ in 0..<5 {
            let (u, reused) = try r.exchange(pool)
            #expect(reused && responses(u.got).first?.body == "ok:/up")
        }
        #expect(r.backend.stats.downstreamAccepted == 1, "the backend saw one connection for six requests")
        #expect(pool.connects == 1 && pool.reusedLeases == 5 && pool.idleCount == 1)
        #expect(r.rig.pool.outstanding == 0, "an idle pooled connection holds no buffer")
    }

    @Test func anIdleConnectionTheBackendClosesIsDroppedAtOnce() throws {
        let r = try PoolRig { $0.keepaliveTimeoutMs = 50 }
        let pool = r.pool()
        _ = try r.exchange(pool)
        #expect(pool.idleCount == 1)
        // The backend's keep-alive timeout closes its side: the pooled end closes at once, so no
        // socket is left in CLOSE_WAIT, and the backend's idle window is learned.
        #expect(try r.run { pool.openCount == 0 })
        #expect(pool.closed[.peerClosed] == 1 && pool.idleCount == 0)
        #expect(pool.state.learnedIdleMs != nil)
        let (_, reused) = try r.exchange(pool)
        #expect(!reused && pool.connects == 2)
    }

    @Test func anIdleConnectionPastTheIdleTimeoutIsClosed() throws {
        let r = try PoolRig()
        let pool = r.pool(idleTimeoutMs: 60)
        _ = try r.exchange(pool)
        let released = r.loop.now
        #expect(try r.run { pool.openCount == 0 })
        #expect(r.loop.now - released >= 60_000_000)
        #expect(pool.closed[.idleTimeout] == 1)
        // The backend sees our close as a plain client close.
        #expect(try r.run { r.backend.stats.downstreamClosed[.clientClose] == 1 })
    }

    @Test func aRefusedConnectIsReportedAndLeavesNothingBehind() throws {
        let r = try PoolRig()
        // A port nothing listens on: bind one, note it, close it.
        let (fd, free) = try Sockets.listenTCP()
        Glibc.close(fd)
        let pool = r.pool(port: free)
        let user = PoolUser(buffers: r.rig.pool)
        let (link, _) = pool.lease(for: user)
        #expect(link != nil)
        #expect(try r.run { user.connectError != nil })
        #expect(user.connectError == ECONNREFUSED)
        #expect(pool.openCount == 0 && pool.state.leasedCount == 0 && pool.state.connecting == 0)
        #expect(r.loop.registered == 1, "only the backend's listener")
    }

    @Test func aConnectionNotCleanAtReleaseIsClosedNotPooled() throws {
        let r = try PoolRig()
        let pool = r.pool()
        let user = PoolUser(buffers: r.rig.pool)
        let (link, _) = pool.lease(for: user)
        #expect(try r.run { user.answered })
        pool.release(link!, reusable: false)
        #expect(pool.idleCount == 0 && pool.openCount == 0 && pool.closed[.notReusable] == 1)
    }
}
