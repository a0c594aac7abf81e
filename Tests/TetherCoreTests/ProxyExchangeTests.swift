#if canImport(Glibc)
import Glibc
#endif
import Testing
import TetherHTTP
import TetherIO
import TetherPool
@testable import TetherCore

/// Hands every request to one upstream pool.
final class ProxyAll: ClientRequestHandler {
    var pool: UpstreamPool!
    func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
        connection.proxy(through: pool, head: head, bytes: bytes)
    }
}

/// Client → Tether's client connection → its upstream pool → a backend (Tether's own client
/// connection answering `ok:<target>`), all on one loop.
final class ProxyRig {
    let backend: PoolRig
    let handler = ProxyAll()
    let front: ClientLoop
    let pool: UpstreamPool
    var loop: IOLoop { backend.loop }

    init(backendPort: UInt16? = nil, front configure: (inout ClientSettings) -> Void = { _ in }) throws {
        backend = try PoolRig()
        var settings = ClientSettings()
        configure(&settings)
        front = ClientLoop(loop: backend.loop, pool: backend.rig.pool, settings: settings, handler: handler)
        pool = backend.pool(port: backendPort)
        handler.pool = pool
    }

    func connect() throws -> Int32 {
        var fds: [Int32] = [0, 0]
        precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        Sockets.setNonBlocking(fds[0])
        Sockets.setNonBlocking(fds[1])
        try front.adopt(fds[0])
        return fds[1]
    }

    func run(_ fd: Int32, into got: inout [UInt8], until done: ([UInt8], Bool) -> Bool) throws -> Bool {
        var eof = false
        for _ in 0..<500 {
            try loop.runOnce(timeoutMs: 20)
            eof = backend.rig.readAll(fd, into: &got) || eof
            if done(got, eof) { return true }
        }
        return false
    }
}

@Suite struct ProxyExchangeTests {
    @Test func keptAliveRequestsShareOneWarmUpstreamConnection() throws {
        let r = try ProxyRig()
        let c = try r.connect()
        var got: [UInt8] = []
        for i in 1...20 {
            r.backend.rig.send(c, "GET /\(i) HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
            #expect(try r.run(c, into: &got) { got, _ in responses(got).count == i })
        }
        let answers = responses(got)
        #expect(answers.map(\.body) == (1...20).map { "ok:/\($0)" })
        // The hop-by-hop header did not reach the backend's answer path, and ours carries none.
        #expect(answers.allSatisfy { !$0.head.lowercased().contains("connection:") })
        #expect(r.backend.backend.accepted == 1, "one upstream connection for 20 requests")
        #expect(r.pool.connects == 1 && r.pool.reusedLeases == 19, "\(r.pool.closed) \(r.backend.backend.closed.byLabel)")
        #expect(r.backend.rig.pool.outstanding == 0, "nothing holds a buffer between requests")
    }

    @Test func pipelinedProxiedRequestsAreAnsweredInOrderAndBodiesForwarded() throws {
        let r = try ProxyRig()
        let c = try r.connect()
        // The POST's body must reach the backend whole: otherwise the backend would read the
        // next request from the middle of it and answer 400.
        r.backend.rig.send(c, "GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
            + "POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n" + String(repeating: "b", count: 20000)
            + "GET /3 HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 3 })
        #expect(responses(got).map(\.body) == ["ok:/1", "ok:/2", "ok:/3"])
        #expect(r.backend.backend.accepted == 1)
        #expect(r.backend.rig.handler.seen == ["/1", "/2", "/3"])
    }

    @Test func aRefusedUpstreamGets502() throws {
        let (fd, free) = try Sockets.listenTCP()
        Glibc.close(fd)
        let r = try ProxyRig(backendPort: free)
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { _, eof in eof })
        #expect(responses(got).map(\.status) == ["HTTP/1.1 502 Bad Gateway"])
        #expect(r.pool.openCount == 0)
    }

    @Test func aClientThatLeavesMidExchangeTakesItsUpstreamConnectionWithIt() throws {
        let r = try ProxyRig()
        let c = try r.connect()
        r.backend.rig.send(c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        // Run until the upstream answer is flowing, then leave.
        for _ in 0..<5 { try r.loop.runOnce(timeoutMs: 20) }
        Glibc.close(c)
        for _ in 0..<50 where r.pool.openCount > 0 { try r.loop.runOnce(timeoutMs: 20) }
        #expect(r.pool.openCount == 0, "a half-read answer's connection is not pooled")
        #expect(r.pool.closed[.clientAbort] == 1)
        #expect(r.front.closed[.clientClose] == 1)
    }

    /// Head limits may allow more than one pool buffer holds: such a head is refused whole (431),
    /// never sent upstream cut, and the connection does not hang waiting for room.
    @Test func aHeadLargerThanABufferIsRefusedNotCut() throws {
        let r = try ProxyRig { $0.headLimits = .init(lineLimit: 32768, headLimit: 65536) }
        let c = try r.connect()
        r.backend.rig.send(c, "GET /big-head HTTP/1.1\r\nHost: t\r\nX-Big: \(String(repeating: "a", count: 20000))\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { _, eof in eof })
        #expect(responses(got).map(\.status) == ["HTTP/1.1 431 Request Header Fields Too Large"])
        #expect(r.backend.rig.handler.seen.isEmpty && r.pool.connects == 0)
    }
}
