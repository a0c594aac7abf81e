import Logging
import NIOCore
import NIOEmbedded
import Testing
import TetherConfig
@testable import TetherCore

/// The downstream handler on an `EmbeddedChannel`, for what needs no upstream: local answers,
/// pipelining order, refusal and closing.
@Suite struct DownstreamHandlerTests {
    func channel(_ conf: String) throws -> EmbeddedChannel { try handlerOnChannel(conf).channel }

    func handlerOnChannel(_ conf: String) throws -> (channel: EmbeddedChannel, handler: DownstreamHandler, loop: LoopContext) {
        let config = try Configuration.parse(conf, file: "t.conf", resolver: { Builder.isNumeric($0) ? $0 : nil }).get()
        let setup = try ProxySetup(config)
        let loop = EmbeddedEventLoop()
        let lc = LoopContext(eventLoop: loop, setup: setup, logger: Logger(label: "test"), accessLog: nil)
        let (_, hosts, servers) = setup.virtualHosts()[0]
        let handler = DownstreamHandler(loop: lc, listenKey: "127.0.0.1:80", route: Route(hosts: hosts, servers: servers, port: 80))
        let ch = EmbeddedChannel(handler: handler, loop: loop)
        try ch.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 80)).wait()
        return (ch, handler, lc)
    }

    func output(_ ch: EmbeddedChannel) throws -> String {
        var out = ""
        while let b = try ch.readOutbound(as: ByteBuffer.self) { out += String(buffer: b) }
        return out
    }

    static let conf = """
        http {
            keepalive_timeout 30s;
            server {
                listen 127.0.0.1:80;
                location = /a { return 200 "A"; }
                location /b { return 201 "B"; }
            }
        }
        """

    @Test func pipelinedLocalAnswersInOrderInOneRead() throws {
        let ch = try channel(Self.conf)
        try ch.writeInbound(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /zzz HTTP/1.1\r\nHost: x\r\n\r\n"))
        let out = try output(ch)
        let statuses = out.components(separatedBy: "HTTP/1.1 ").dropFirst().map { $0.prefix(3) }
        #expect(statuses == ["200", "201", "404"])
        #expect(out.contains("Keep-Alive: timeout=30\r\n"))
        #expect(out.contains("\r\n\r\nA"))
        #expect(ch.isActive)
    }

    @Test func requestSplitByteByByteIsStillOneRequest() throws {
        let ch = try channel(Self.conf)
        for b in "GET /a HTTP/1.1\r\nHost: x\r\n\r\n".utf8 {
            var buf = ByteBuffer()
            buf.writeInteger(b)
            try ch.writeInbound(buf)
        }
        let out = try output(ch)
        #expect(out.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(out.hasSuffix("\r\n\r\nA"))
    }

    @Test func malformedRequestIsAnsweredThenTheOutputCloses() throws {
        let ch = try channel(Self.conf)
        try ch.writeInbound(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"))
        let out = try output(ch)
        #expect(out.hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
        #expect(out.contains("Connection: close\r\n"))
        #expect(!out.contains("200 OK"), "nothing after a refused request is answered")
    }

    /// The loop's sweep relies on this: before the keep-alive deadline a connection reports it
    /// (so the next sweep can run then), at the deadline it closes and reports nothing.
    @Test func sweepReportsTheKeepAliveDeadlineThenClosesAtIt() throws {
        let (ch, handler, lc) = try handlerOnChannel(Self.conf)
        let before = NIODeadline.now()
        try ch.writeInbound(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"))
        let after = NIODeadline.now()
        #expect(try output(ch).hasPrefix("HTTP/1.1 200 OK\r\n"))
        let deadline = try #require(handler.sweep(now: after))
        #expect(deadline >= before + .seconds(30) && deadline <= after + .seconds(30), "keepalive_timeout 30s from the response")
        #expect(handler.sweep(now: deadline - .milliseconds(1)) == deadline)
        #expect(ch.isActive)
        #expect(handler.sweep(now: deadline) == nil)
        #expect(!ch.isActive)
        #expect(lc.stats.downstreamClosed["keepalive_timeout"] == 1)
    }

    @Test func sweepRunsAtTheEarliestDeadlineBeforeTheNextFullSweepButNotSoonerThanTheFloor() {
        let now = NIODeadline.uptimeNanoseconds(10_000_000_000)
        let full = now + LoopContext.sweepInterval
        #expect(LoopContext.nextSweep(now: now, earliest: nil, fullSweepAt: full) == full)
        #expect(LoopContext.nextSweep(now: now, earliest: now + .seconds(30), fullSweepAt: full) == full)
        #expect(LoopContext.nextSweep(now: now, earliest: now + .milliseconds(40), fullSweepAt: full) == now + .milliseconds(40))
        #expect(LoopContext.nextSweep(now: now, earliest: now + .milliseconds(1), fullSweepAt: full) == now + LoopContext.sweepFloor)
        #expect(LoopContext.nextSweep(now: now, earliest: now - .seconds(1), fullSweepAt: full) == now + LoopContext.sweepFloor)
        #expect(LoopContext.nextSweep(now: now, earliest: now + .milliseconds(1), fullSweepAt: now + .milliseconds(2)) == now + .milliseconds(2))
    }

    /// A full sweep shortly before a connection's keep-alive deadline schedules the next sweep at
    /// that deadline, and that short sweep (over the connections due before the next full one)
    /// closes it.
    @Test func loopSweepClosesAnIdleConnectionAtItsDeadline() throws {
        let (ch, handler, lc) = try handlerOnChannel(Self.conf)
        try ch.writeInbound(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"))
        _ = try output(ch)
        let deadline = try #require(handler.sweep(now: .now()))
        let fullAt = deadline - .milliseconds(60)
        #expect(lc.sweepConnections(now: fullAt) == deadline)
        #expect(ch.isActive)
        #expect(lc.sweepConnections(now: deadline - .milliseconds(10)) == deadline, "a short sweep before it changes nothing")
        #expect(ch.isActive)
        #expect(lc.sweepConnections(now: deadline) == fullAt + LoopContext.sweepInterval, "nothing else is due before the next full sweep")
        #expect(!ch.isActive)
        #expect(lc.stats.downstreamClosed["keepalive_timeout"] == 1)
    }

    @Test func localAnswerReadsAndDropsTheBody() throws {
        let ch = try channel(Self.conf)
        try ch.writeInbound(ByteBuffer(string: "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234"))
        try ch.writeInbound(ByteBuffer(string: "56789GET /b HTTP/1.1\r\nHost: x\r\n\r\n"))
        let out = try output(ch)
        #expect(out.components(separatedBy: "HTTP/1.1 ").count == 3)
        #expect(out.contains("HTTP/1.1 201 Created"))
    }
}

extension String {
    func components(separatedBy sep: String) -> [Substring] {
        var out: [Substring] = []
        var rest = self[...]
        while let r = rest.firstRange(of: sep) {
            out.append(rest[..<r.lowerBound])
            rest = rest[r.upperBound...]
        }
        out.append(rest)
        return out
    }
}
