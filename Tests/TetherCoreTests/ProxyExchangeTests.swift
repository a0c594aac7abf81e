#if canImport(Glibc)
import Glibc
#endif
import CTether
import Foundation
import Testing
import TetherHTTP
import TetherIO
import TetherPool
@testable import TetherCore

/// Hands every request to one upstream through one `proxy_pass` location.
final class ProxyAll: ClientRequestHandler {
    var upstream: LoopUpstream!
    var route: CompiledLocation!
    func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
        connection.proxy(to: upstream, route: route, head: head, bytes: bytes, serverName: Array("front".utf8))
    }
}

/// A backend on raw sockets, polled by the test's run loop: it records what each connection
/// sent, and answers as `script` says (the bytes to send, whether to close after), given the
/// connection's number, what it sent so far and how many answers it got.
final class RawBackend {
    let fd: Int32
    let port: UInt16
    private(set) var connections: [Int32] = []
    private(set) var received: [[UInt8]] = []
    private(set) var answered: [Int] = []
    var script: (_ connection: Int, _ received: [UInt8], _ answered: Int) -> (reply: String, close: Bool)?

    init(script: @escaping (_ connection: Int, _ received: [UInt8], _ answered: Int) -> (reply: String, close: Bool)?) throws {
        (fd, port) = try Sockets.listenTCP()
        self.script = script
    }

    deinit {
        Glibc.close(fd)
        for c in connections where c >= 0 { Glibc.close(c) }
    }

    /// Requests whose head is complete in `bytes` (bodiless requests).
    static func heads(_ bytes: [UInt8]) -> Int {
        var n = 0, i = 0
        while i + 3 < bytes.count {
            if bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 { n += 1; i += 4 } else { i += 1 }
        }
        return n
    }

    func poll() {
        while true {
            let c = accept(fd, nil, nil)
            guard c >= 0 else { break }
            Sockets.setNonBlocking(c)
            connections.append(c)
            received.append([])
            answered.append(0)
        }
        var chunk = [UInt8](repeating: 0, count: 65536)
        for (i, c) in connections.enumerated() where c >= 0 {
            while true {
                let n = chunk.withUnsafeMutableBytes { Glibc.read(c, $0.baseAddress, 65536) }
                guard n > 0 else { break }
                received[i] += chunk[0..<n]
            }
            while let (reply, close) = script(i, received[i], answered[i]) {
                answered[i] += 1
                let b = Array(reply.utf8)
                _ = b.withUnsafeBytes { Glibc.write(c, $0.baseAddress, $0.count) }
                if close {
                    Glibc.close(c)
                    connections[i] = -1
                    break
                }
            }
        }
    }

    func text(_ connection: Int) -> String { String(decoding: received[connection], as: UTF8.self) }
}

/// Client → Tether's client connection → a `proxy_pass` location's upstream (a pool per
/// server) → backends (by default Tether's own client connection answering `ok:<target>`), all
/// on one loop; `raw` backends are polled between the loop's passes.
final class ProxyRig {
    let backend: PoolRig
    let handler = ProxyAll()
    let front: ClientLoop
    let upstream: LoopUpstream
    var raw: [RawBackend] = []
    var pool: UpstreamPool { upstream.pools[0] }

    /// `ports`: the upstream's servers (default: the `ok:` backend); `location`: directives
    /// added to `location / { proxy_pass http://backend; ... }`.
    init(backendPorts: [UInt16]? = nil, location: String = "", front configure: (inout ClientSettings) -> Void = { _ in }) throws {
        let backend = try PoolRig()
        self.backend = backend
        var settings = ClientSettings()
        configure(&settings)
        front = ClientLoop(loop: backend.loop, pool: backend.rig.pool, settings: settings, handler: handler)
        let ports = backendPorts ?? [backend.port]
        upstream = LoopUpstream(name: "backend", pools: ports.map { backend.pool(port: $0) })
        handler.upstream = upstream
        handler.route = try LocalAnswerBench.proxyLocation(upstreamPort: ports[0], extra: location)
    }

    convenience init(raw backends: [RawBackend], location: String = "") throws {
        try self.init(backendPorts: backends.map(\.port), location: location)
        raw = backends
    }
}

/// A client connection on a rig's front loop (a socketpair), and the loop run with the rig's raw
/// backends polled between passes, until `done` says so (bounded: 500 passes).
protocol FrontRig: AnyObject {
    var backend: PoolRig { get }
    var front: ClientLoop { get }
    var raw: [RawBackend] { get }
}

extension FrontRig {
    var loop: IOLoop { backend.loop }

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
            try loop.runOnce(timeoutMs: raw.isEmpty ? 20 : 2)
            for b in raw { b.poll() }
            eof = backend.rig.readAll(fd, into: &got) || eof
            if done(got, eof) { return true }
        }
        return false
    }
}

extension ProxyRig: FrontRig {}

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
        #expect(r.backend.backend.stats.downstreamAccepted == 1, "one upstream connection for 20 requests")
        #expect(r.pool.connects == 1 && r.pool.reusedLeases == 19, "\(r.pool.closed) \(r.backend.backend.stats.downstreamClosed.byLabel)")
        #expect(r.backend.rig.pool.outstanding == 0, "nothing holds a buffer between requests")
        #expect(r.upstream.spareExchangeCount == 1, "one exchange object served all 20 requests")
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
        #expect(r.backend.backend.stats.downstreamAccepted == 1)
        #expect(r.backend.rig.handler.seen == ["/1", "/2", "/3"])
    }

    /// 2,000,000 bytes through the client's 64 KiB queue: backpressure stops the upstream reads
    /// and writing resumes them, also when the client's socket takes a whole queue at once (no
    /// writable edge follows then).
    @Test func aLargeAnswerReachesTheClientWhole() throws {
        let r = try ProxyRig()
        let c = try r.connect()
        r.backend.rig.send(c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 2 })
        let answers = responses(got)
        #expect(answers.first?.body.utf8.count == 2_000_000 && answers.last?.body == "ok:/after")
        #expect(r.pool.reusedLeases == 1)
    }

    @Test func aRefusedUpstreamGets502() throws {
        let (fd, free) = try Sockets.listenTCP()
        Glibc.close(fd)
        let r = try ProxyRig(backendPorts: [free])
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 1 })
        #expect(responses(got).map(\.status) == ["HTTP/1.1 502 Bad Gateway"])
        #expect(r.pool.openCount == 0)
        // As nginx: the 502 is an answer like another, and the client connection stays for the next.
        r.backend.rig.send(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 2 })
        #expect(responses(got).map(\.status) == ["HTTP/1.1 502 Bad Gateway", "HTTP/1.1 502 Bad Gateway"])
    }

    @Test func aClientThatLeavesMidExchangeTakesItsUpstreamConnectionWithIt() throws {
        // Streamed (with proxy_buffering on, the answer would be read whole and its connection kept).
        let r = try ProxyRig(location: "proxy_buffering off;")
        let c = try r.connect()
        r.backend.rig.send(c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        // Run until the upstream answer is flowing, then leave.
        for _ in 0..<5 { try r.loop.runOnce(timeoutMs: 20) }
        Glibc.close(c)
        for _ in 0..<50 where r.pool.openCount > 0 { try r.loop.runOnce(timeoutMs: 20) }
        #expect(r.pool.openCount == 0, "a half-read answer's connection is not pooled")
        #expect(r.pool.closed[.clientAbort] == 1)
        #expect(r.front.stats.downstreamClosed[.clientClose] == 1)
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

    // MARK: Framing, retries and failures, against backends that misbehave on purpose

    /// A backend that answers every complete request head on a connection with `reply`.
    static func answering(_ reply: String, close: Bool = false) throws -> RawBackend {
        try RawBackend { _, received, answered in
            RawBackend.heads(received) > answered ? (reply, close) : nil
        }
    }

    static let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n00005;ext=1\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"

    @Test func aChunkedAnswerIsRechunkedCanonicallyAndTheConnectionsStay() throws {
        let b = try Self.answering(Self.chunked)
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        var got: [UInt8] = []
        for i in 1...2 {
            r.backend.rig.send(c, "GET /\(i) HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try r.run(c, into: &got) { got, _ in String(decoding: got, as: UTF8.self).components(separatedBy: "0\r\nX-Sum: 1\r\n\r\n").count == i + 1 })
        }
        let text = String(decoding: got, as: UTF8.self)
        // Sizes without leading zeros or extensions; the valid trailer passes.
        #expect(text.components(separatedBy: "\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n").count == 3, "\(text.debugDescription)")
        #expect(text.components(separatedBy: "Transfer-Encoding: chunked\r\n").count == 3)
        #expect(!text.contains("ext=1"))
        #expect(b.connections.count == 1 && r.pool.reusedLeases == 1)
    }

    @Test func aChunkedAnswerToAnHTTP10ClientIsDechunkedAndEndsWithTheClose() throws {
        let b = try Self.answering(Self.chunked)
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { _, eof in eof })
        let text = String(decoding: got, as: UTF8.self)
        #expect(text.hasPrefix("HTTP/1.1 200 OK\r\n") && text.hasSuffix("\r\n\r\nhello"), "\(text.debugDescription)")
        #expect(!text.lowercased().contains("transfer-encoding"))
        // The upstream connection was read to the end of its answer: it stays pooled.
        #expect(r.pool.idleCount == 1)
    }

    @Test func aCloseDelimitedAnswerIsChunkedSoThatAnHTTP11ClientStays() throws {
        let b = try Self.answering("HTTP/1.1 200 OK\r\n\r\nabc", close: true)
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        var got: [UInt8] = []
        for i in 1...2 {
            r.backend.rig.send(c, "GET /\(i) HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try r.run(c, into: &got) { got, _ in String(decoding: got, as: UTF8.self).components(separatedBy: "3\r\nabc\r\n0\r\n\r\n").count == i + 1 })
        }
        #expect(String(decoding: got, as: UTF8.self).components(separatedBy: "Transfer-Encoding: chunked\r\n").count == 3)
        #expect(b.connections.count == 2, "a close-delimited answer's connection is not reused")
        #expect(r.front.stats.downstreamClosed.byLabel.isEmpty)
    }

    @Test func aCloseDelimitedAnswerToAnHTTP10ClientEndsWithTheClose() throws {
        let b = try Self.answering("HTTP/1.1 200 OK\r\n\r\nabc", close: true)
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { _, eof in eof })
        let text = String(decoding: got, as: UTF8.self)
        #expect(text.hasSuffix("\r\n\r\nabc") && !text.lowercased().contains("transfer-encoding"), "\(text.debugDescription)")
        #expect(r.upstream.failures.byLabel.isEmpty)
    }

    /// The race every keep-alive pool has: the backend closes an idle connection just as a
    /// request goes out on it. Nothing of an answer came, the method is idempotent: the
    /// request goes again on a fresh connection and the client never sees the failure.
    @Test func aReusedConnectionThatClosesBeforeAnsweringIsRetriedOnAFreshOne() throws {
        // Connection 0 answers its first request, then closes on the second without a byte.
        let b = try RawBackend { connection, received, answered in
            let heads = RawBackend.heads(received)
            guard heads > answered else { return nil }
            if connection == 0 && answered == 1 { return ("", true) }
            return ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
        }
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        var got: [UInt8] = []
        for i in 1...2 {
            r.backend.rig.send(c, "GET /\(i) HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try r.run(c, into: &got) { got, _ in responses(got).count == i })
        }
        #expect(responses(got).map(\.status) == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"])
        #expect(r.upstream.retries[.reusedConnectionClosed] == 1 && r.upstream.failures.byLabel.isEmpty)
        #expect(b.connections.count == 2 && b.text(1).hasPrefix("GET /2 "))
    }

    /// A POST is not sent twice (RFC 9110 9.2.2): the same race ends in 502.
    @Test func aNonIdempotentRequestIsNotRetried() throws {
        let b = try RawBackend { connection, received, answered in
            guard RawBackend.heads(received) > answered else { return nil }
            if answered == 1 { return ("", true) }
            return ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
        }
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        var got: [UInt8] = []
        r.backend.rig.send(c, "GET /1 HTTP/1.1\r\nHost: t\r\n\r\n")
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 1 })
        r.backend.rig.send(c, "POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 2 })
        #expect(responses(got).map(\.status) == ["HTTP/1.1 200 OK", "HTTP/1.1 502 Bad Gateway"])
        #expect(r.upstream.retries.byLabel.isEmpty && r.upstream.failures[.error] == 1)
        #expect(b.connections.count == 1)
    }

    @Test func aRefusedServerSendsTheRequestToTheNextOne() throws {
        let (fd, free) = try Sockets.listenTCP()
        Glibc.close(fd)
        let b = try Self.answering("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        let r = try ProxyRig(backendPorts: [free, b.port])
        r.raw = [b]
        let c = try r.connect()
        var got: [UInt8] = []
        for i in 1...3 {
            r.backend.rig.send(c, "GET /\(i) HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(try r.run(c, into: &got) { got, _ in responses(got).count == i })
        }
        #expect(responses(got).map(\.body) == ["ok", "ok", "ok"])
        // One try met the refusal; the failed server then sat out its fail_timeout.
        #expect(r.upstream.retries[.nextUpstream] == 1 && r.upstream.failures.byLabel.isEmpty)
        // (`connects` counts attempts begun: a refusal on loopback may come at once or as an event.)
        let refused = r.upstream.pools[0]
        #expect(refused.connectFailures == 1 && refused.connects <= 1 && refused.openCount == 0)
    }

    @Test func aBackendThatDoesNotAnswerGets504AfterProxyReadTimeout() throws {
        let b = try RawBackend { _, _, _ in nil }
        let r = try ProxyRig(raw: [b], location: "proxy_read_timeout 150ms;")
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 1 })
        #expect(responses(got).map(\.status) == ["HTTP/1.1 504 Gateway Time-out"])
        #expect(r.upstream.failures[.timeout] == 1 && r.pool.openCount == 0)
    }

    /// The backend promises 10 bytes and closes after 3: the client must not be able to take
    /// the answer for complete, so its connection ends (no keep-alive, no padding).
    @Test func aTruncatedAnswerEndsTheClientConnection() throws {
        let b = try Self.answering("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close: true)
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { _, eof in eof })
        let text = String(decoding: got, as: UTF8.self)
        #expect(text.hasPrefix("HTTP/1.1 200 OK\r\n") && text.hasSuffix("\r\n\r\nabc"), "\(text.debugDescription)")
        #expect(r.upstream.failures[.truncated] == 1)
    }

    @Test func badChunkedSyntaxFromTheBackendIsA502NotRelayed() throws {
        let b = try Self.answering("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n")
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { _, eof in eof })
        let text = String(decoding: got, as: UTF8.self)
        // The head had gone out: the answer is cut (no final chunk), never completed.
        #expect(!text.contains("hello") && !text.contains("0\r\n\r\n"), "\(text.debugDescription)")
        #expect(r.upstream.failures.byLabel == ["truncated": 1])
    }

    @Test func aChunkedRequestBodyGoesUpstreamInCanonicalFraming() throws {
        let b = try RawBackend { _, received, answered in
            guard answered == 0, String(decoding: received, as: UTF8.self).hasSuffix("0\r\n\r\n") else { return nil }
            return ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
        }
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0005;name=v\r\nhello\r\n00a\r\n0123456789\r\n0\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 1 })
        let sent = b.text(0)
        #expect(sent.hasSuffix("Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n"), "\(sent.debugDescription)")
    }

    /// The backend began its answer before the chunked body was complete, and the body turns
    /// out malformed: a 400 after a 200's head would be a second answer, so the connection ends.
    @Test func badChunkedSyntaxAfterTheAnswerBeganEndsTheConnectionWithoutA400() throws {
        let b = try RawBackend { _, received, answered in
            guard answered == 0, RawBackend.heads(received) > 0 else { return nil }
            return ("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", false)
        }
        // The body streams (with proxy_request_buffering on, nothing goes before it is whole).
        let r = try ProxyRig(raw: [b], location: "proxy_request_buffering off;")
        let c = try r.connect()
        r.backend.rig.send(c, "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in String(decoding: got, as: UTF8.self).hasSuffix("abc") })
        r.backend.rig.send(c, "zz\r\n")
        #expect(try r.run(c, into: &got) { _, eof in eof })
        let text = String(decoding: got, as: UTF8.self)
        #expect(text.hasPrefix("HTTP/1.1 200 OK\r\n") && text.hasSuffix("abc") && !text.contains("400"), "\(text.debugDescription)")
        #expect(r.pool.openCount == 0, "the half-answered upstream connection is not kept")
    }

    /// The backend answered before the request body was all sent (as nginx's `return` does): its
    /// connection is mid-request and must not serve the next request, which would otherwise be
    /// read as the rest of the body (a 400 from nginx, or worse, a smuggled request).
    @Test func anAnswerBeforeTheWholeBodyKeepsItsConnectionOutOfThePool() throws {
        let b = try RawBackend { _, received, answered in
            RawBackend.heads(received) > answered ? ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false) : nil
        }
        let r = try ProxyRig(raw: [b], location: "proxy_request_buffering off;")
        let c1 = try r.connect()
        r.backend.rig.send(c1, "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n" + String(repeating: "x", count: 100))
        var got: [UInt8] = []
        #expect(try r.run(c1, into: &got) { got, _ in responses(got).count == 1 })
        #expect(r.pool.idleCount == 0, "a connection mid-request went back to the pool")
        let c2 = try r.connect()
        r.backend.rig.send(c2, "GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        var got2: [UInt8] = []
        #expect(try r.run(c2, into: &got2) { got, _ in responses(got).count == 1 })
        #expect(b.connections.count == 2 && b.text(1).hasPrefix("GET /next "))
    }

    /// `Expect: 100-continue` is answered by Tether and not forwarded: a client that waits for
    /// the 100 before its body is not left waiting.
    @Test func expectContinueIsAnsweredHereAndNotForwarded() throws {
        let b = try RawBackend { _, received, answered in
            guard answered == 0, String(decoding: received, as: UTF8.self).hasSuffix("\r\n\r\nhello") else { return nil }
            return ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
        }
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in String(decoding: got, as: UTF8.self) == "HTTP/1.1 100 Continue\r\n\r\n" })
        r.backend.rig.send(c, "hello")
        #expect(try r.run(c, into: &got) { got, _ in String(decoding: got, as: UTF8.self).hasSuffix("\r\n\r\nok") })
        #expect(!b.text(0).lowercased().contains("expect"))
    }

    @Test func theUpstreamGetsProxyHostAndNoHopByHopFields() throws {
        let b = try Self.answering("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Up\r\nX-Up: 1\r\nKeep-Alive: timeout=5\r\n\r\nok")
        let r = try ProxyRig(raw: [b])
        let c = try r.connect()
        r.backend.rig.send(c, "GET /h HTTP/1.1\r\nHost: front.example\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 300\r\n"
            + "TE: trailers\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nProxy-Connection: keep-alive\r\nX-Keep: yes\r\n\r\n")
        var got: [UInt8] = []
        #expect(try r.run(c, into: &got) { got, _ in responses(got).count == 1 })
        let sent = b.text(0).lowercased()
        #expect(sent.hasPrefix("get /h http/1.1\r\n") && sent.contains("\r\nhost: backend\r\n"), "\(sent.debugDescription)")
        #expect(!sent.contains("front.example"))
        #expect(sent.contains("x-keep: yes\r\n"))
        for hop in ["x-hop", "keep-alive: 300", "te:", "upgrade", "http2-settings", "proxy-connection"] {
            #expect(!sent.contains(hop), "\(hop) went upstream: \(sent.debugDescription)")
        }
        let answer = responses(got)[0].head.lowercased()
        #expect(!answer.contains("x-up") && !answer.contains("keep-alive: timeout=5"), "\(answer.debugDescription)")
    }
}
