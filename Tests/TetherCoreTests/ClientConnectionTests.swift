#if canImport(Glibc)
import Glibc
#endif
import CTether
import Foundation
import Testing
import TetherHTTP
import TetherIO
import TetherTestSupport
@testable import TetherCore

/// Answers `ok:<target>`; `/big` gets 2,000,000 bytes, `/close` a forced close.
final class OKHandler: ClientRequestHandler {
    var seen: [String] = []
    func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
        let target = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[head.targetStart..<head.targetEnd]), as: UTF8.self)
        seen.append(target)
        switch target {
        case "/big": connection.respond(status: 200, body: [UInt8](repeating: 0x61, count: 2_000_000), head: head)
        case "/close": connection.respond(status: 200, body: Array("bye".utf8), head: head, close: true)
        default: connection.respond(status: 200, body: Array("ok:\(target)".utf8), head: head)
        }
    }
}

/// One loop with client connections over socketpairs: the test holds the client ends and runs
/// the loop itself, so every step is an event, never a sleep.
final class ClientRig {
    let loop: IOLoop
    let pool = BufferPool(bufferSize: 16 * 1024)
    let handler = OKHandler()
    let clients: ClientLoop

    init(_ configure: (inout ClientSettings) -> Void = { _ in }) throws {
        loop = try IOLoop()
        var s = ClientSettings()
        configure(&s)
        clients = ClientLoop(loop: loop, pool: pool, settings: s, handler: handler)
    }

    /// A new client connection; returns the client's end (non-blocking).
    func connect() throws -> Int32 { try open().0 }

    /// A new client connection: the client's end and Tether's connection.
    func open() throws -> (Int32, ClientConnection) {
        var fds: [Int32] = [0, 0]
        precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        Sockets.setNonBlocking(fds[0])
        Sockets.setNonBlocking(fds[1])
        let c = try clients.adopt(fds[0])
        return (fds[1], c)
    }

    func send(_ fd: Int32, _ text: String) {
        let b = Array(text.utf8)
        precondition(b.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == b.count)
    }

    /// Runs the loop until `done` says so (or `passes` run out); reads what the client got into `got`.
    func run(_ fd: Int32, into got: inout [UInt8], passes: Int = 400, timeoutMs: Int32 = 50, until done: ([UInt8], Bool) -> Bool) throws -> Bool {
        var eof = false
        for _ in 0..<passes {
            try loop.runOnce(timeoutMs: timeoutMs)
            eof = readAll(fd, into: &got) || eof
            if done(got, eof) { return true }
        }
        return false
    }

    /// Reads what is there; true at EOF.
    func readAll(_ fd: Int32, into got: inout [UInt8]) -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, 65536) }
            if n > 0 { got += chunk[0..<n]; continue }
            return n == 0 || (n < 0 && errno != EAGAIN)
        }
    }
}

/// Splits a stream of responses (Content-Length bodies) into (status line, headers, body).
func responses(_ bytes: [UInt8]) -> [(status: String, head: String, body: String)] {
    var out: [(String, String, String)] = []
    var rest = bytes[...]
    while let r = rest.firstRange(of: Array("\r\n\r\n".utf8)) {
        let head = String(decoding: rest[rest.startIndex..<r.lowerBound], as: UTF8.self)
        let length = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
            .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
        guard rest.distance(from: r.upperBound, to: rest.endIndex) >= length else { break }
        let body = rest[r.upperBound..<rest.index(r.upperBound, offsetBy: length)]
        out.append((String(head.split(separator: "\r\n")[0]), head, String(decoding: body, as: UTF8.self)))
        rest = rest[body.endIndex...]
    }
    return out
}

@Suite struct ClientConnectionTests {
    static let get = "GET /a HTTP/1.1\r\nHost: t\r\nUser-Agent: test\r\n\r\n"

    static func withoutDate(_ bytes: [UInt8]) -> String {
        String(decoding: bytes, as: UTF8.self).split(separator: "\r\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("Date: ") }.joined(separator: "\r\n")
    }

    @Test func aRequestSplitAtEveryByteGetsTheSameAnswer() throws {
        let rig = try ClientRig()
        var whole: [UInt8] = []
        let c0 = try rig.connect()
        rig.send(c0, Self.get)
        #expect(try rig.run(c0, into: &whole) { got, _ in responses(got).count == 1 })
        #expect(responses(whole).first?.body == "ok:/a")
        let bytes = Array(Self.get.utf8)
        for k in 1..<bytes.count {
            let c = try rig.connect()
            var got: [UInt8] = []
            rig.send(c, String(decoding: bytes[..<k], as: UTF8.self))
            // The first part alone gets no answer, however often the loop runs.
            #expect(try !rig.run(c, into: &got, passes: 3, timeoutMs: 0) { got, _ in !got.isEmpty })
            rig.send(c, String(decoding: bytes[k...], as: UTF8.self))
            #expect(try rig.run(c, into: &got) { got, _ in responses(got).count == 1 }, "split at \(k)")
            // The same bytes but the Date line's second, which may have turned meanwhile.
            #expect(Self.withoutDate(got) == Self.withoutDate(whole), "split at \(k)")
            Glibc.close(c)
        }
        #expect(rig.handler.seen.count == bytes.count)
    }

    @Test func pipelinedRequestsAreAnsweredInOrderAndTheirBodiesDropped() throws {
        let rig = try ClientRig()
        let c = try rig.connect()
        rig.send(c, "GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
            + "POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world"
            + "POST /3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            + "GET /4 HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try rig.run(c, into: &got) { got, _ in responses(got).count == 4 })
        #expect(responses(got).map(\.body) == ["ok:/1", "ok:/2", "ok:/3", "ok:/4"])
        #expect(rig.handler.seen == ["/1", "/2", "/3", "/4"])
    }

    @Test func aBigAnswerToAClientThatDoesNotReadHoldsBackTheNextOne() throws {
        let rig = try ClientRig()
        let c = try rig.connect()
        rig.send(c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        // The client reads nothing: the loop writes what the socket takes and parses no further.
        for _ in 0..<5 { try rig.loop.runOnce(timeoutMs: 0) }
        #expect(rig.handler.seen == ["/big"])
        var got: [UInt8] = []
        #expect(try rig.run(c, into: &got) { got, _ in responses(got).count == 2 })
        let r = responses(got)
        #expect(r[0].body.utf8.count == 2_000_000 && r[1].body == "ok:/after")
        #expect(rig.pool.outstanding == 0, "an idle connection holds no buffer")
    }

    @Test func anIdleConnectionClosesAfterKeepaliveTimeoutNotBefore() throws {
        let rig = try ClientRig { $0.keepaliveTimeoutMs = 60 }
        let c = try rig.connect()
        rig.send(c, Self.get)
        var got: [UInt8] = []
        #expect(try rig.run(c, into: &got) { got, _ in responses(got).count == 1 })
        let answered = rig.loop.now
        #expect(rig.pool.outstanding == 0, "an idle connection holds no buffer")
        #expect(try rig.run(c, into: &got) { _, eof in eof })
        // `answered` is read when the client has seen the answer, which may be a pass after the
        // one that wrote it and armed the timer: a millisecond is allowed for that.
        #expect(rig.loop.now - answered >= 59_000_000)
        #expect(rig.clients.stats.downstreamClosed[.keepaliveTimeout] == 1)
        #expect(rig.loop.registered == 0)
    }

    @Test func aHeadThatStopsHalfWayGets408AndSilenceGetsAQuietClose() throws {
        let rig = try ClientRig { $0.headerTimeoutMs = 50 }
        let half = try rig.connect()
        rig.send(half, "GET / HTTP/1.1\r\nHo")
        var got: [UInt8] = []
        #expect(try rig.run(half, into: &got) { _, eof in eof })
        #expect(responses(got).first?.status == "HTTP/1.1 408 Request Time-out")
        let silent = try rig.connect()
        var none: [UInt8] = []
        #expect(try rig.run(silent, into: &none) { _, eof in eof })
        #expect(none.isEmpty)
        #expect(rig.clients.stats.downstreamClosed[.error] == 1 && rig.clients.stats.downstreamClosed[.clientHeaderTimeout] == 1)
    }

    @Test(arguments: [
        ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ("GET / HTTP/2.0\r\nHost: t\r\n\r\n", "HTTP/1.1 505 HTTP Version Not Supported"),
        ("GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ("GET / HTTP/1.1\r\nHost: t\r\nX: \(String(repeating: "a", count: 9000))\r\n\r\n", "HTTP/1.1 431 Request Header Fields Too Large"),
    ])
    func aMalformedHeadIsRefusedAndTheConnectionClosed(_ request: String, _ status: String) throws {
        let rig = try ClientRig()
        let c = try rig.connect()
        rig.send(c, request + "GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try rig.run(c, into: &got) { _, eof in eof })
        #expect(responses(got).map(\.status) == [status])
        #expect(rig.handler.seen.isEmpty)
    }

    @Test func aClientThatHalfClosesGetsItsAnswerThenTheClose() throws {
        let rig = try ClientRig()
        let c = try rig.connect()
        rig.send(c, Self.get)
        shutdown(c, Int32(SHUT_WR))
        var got: [UInt8] = []
        #expect(try rig.run(c, into: &got) { _, eof in eof })
        #expect(responses(got).map(\.body) == ["ok:/a"])
        #expect(rig.clients.stats.downstreamClosed[.clientClose] == 1)
    }

    @Test func keepaliveRequestsAndConnectionCloseEndTheConnectionAfterTheAnswer() throws {
        let rig = try ClientRig { $0.keepaliveRequests = 2 }
        let c = try rig.connect()
        rig.send(c, "GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\nGET /3 HTTP/1.1\r\nHost: t\r\n\r\n")
        var got: [UInt8] = []
        #expect(try rig.run(c, into: &got) { _, eof in eof })
        let r = responses(got)
        #expect(r.map(\.body) == ["ok:/1", "ok:/2"])
        #expect(!r[0].head.contains("Connection: close") && r[1].head.contains("Connection: close"))
        #expect(rig.clients.stats.downstreamClosed[.keepaliveRequests] == 1)

        let d = try rig.connect()
        rig.send(d, "GET /x HTTP/1.0\r\n\r\n")
        var got10: [UInt8] = []
        #expect(try rig.run(d, into: &got10) { _, eof in eof })
        #expect(responses(got10).first?.head.contains("Connection: close") == true)
        #expect(rig.clients.stats.downstreamClosed[.clientClose] == 1)
    }

    /// An answer that closes while the client is still sending a body: Tether's FIN, then it
    /// reads and drops what comes (so the answer is not destroyed by a reset), then closes.
    @Test func aCloseWithTheBodyStillComingLingers() throws {
        let rig = try ClientRig { $0.lingerMs = 5_000 }
        let c = try rig.connect()
        rig.send(c, "POST /close HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + String(repeating: "x", count: 1000))
        var got: [UInt8] = []
        // The answer arrives; the connection waits for the rest (or the client's close).
        #expect(try rig.run(c, into: &got) { got, _ in responses(got).count == 1 })
        #expect(responses(got).first?.body == "bye")
        rig.send(c, String(repeating: "y", count: 5000))
        shutdown(c, Int32(SHUT_WR))
        #expect(try rig.run(c, into: &got) { _, eof in eof })
        #expect(rig.loop.registered == 0)
        #expect(rig.pool.outstanding == 0)
    }

    /// 2,000 kept-alive idle connections: each holds no buffer and no queue storage, and less heap
    /// than nginx's 952 bytes per idle keep-alive connection (520 pool + 432 preallocated
    /// connection slot, ../shared/io-floor). Kernel memory (socket, epoll entry) is not counted
    /// on either side.
    @Test func anIdleKeptAliveConnectionHoldsLessMemoryThanNginxs() throws {
        let rig = try ClientRig()
        var ends: [(Int32, ClientConnection)] = []
        for _ in 0..<2_000 {
            let (fd, conn) = try rig.open()
            rig.send(fd, Self.get + Self.get)
            ends.append((fd, conn))
        }
        for _ in 0..<50 { try rig.loop.runOnce(timeoutMs: 0) }
        var answered = 0
        for (fd, _) in ends {
            var g: [UInt8] = []
            _ = rig.readAll(fd, into: &g)
            if responses(g).count == 2 { answered += 1 }
        }
        #expect(answered == 2_000)
        #expect(rig.pool.outstanding == 0, "idle connections hold no buffer")
        // malloc may hand an object a slightly larger free chunk: the largest counts.
        let largest = ends.map { $0.1.heapBytes }.max()!
        #expect(largest <= 952, "\(largest) bytes per idle connection")
        print("TetherIO client connection: at most \(largest) heap bytes per idle keep-alive connection (nginx: 952)")
        for (fd, _) in ends { Glibc.close(fd) }
    }
}

/// Real TCP connections from another process (so that both ends fit the descriptor limit).
@Suite struct ClientConnectionTCPTests {
    /// 10,000 clients each ask once and then idle: every connection is closed by the keep-alive
    /// timeout (4 s), none before it, none more than a second late, and the loop holds nothing after.
    @Test func tenThousandIdleConnectionsExpireOnTime() throws {
        // 4 s: long enough for all 10,000 to be open and idle at once while the client opens them.
        let rig = try ClientRig { $0.keepaliveTimeoutMs = 4_000 }
        let (fd, port) = try Sockets.listenTCP(backlog: 4096)
        let listener = Listener(fd: fd, accepted: { c, _ in _ = try? rig.clients.adopt(c) }, failed: { _, _ in })
        try listener.start(on: rig.loop)
        let script = """
        import resource, selectors, socket, sys, time
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        n, port = int(sys.argv[1]), int(sys.argv[2])
        sel = selectors.DefaultSelector()
        answered, sent, closed, early, late = {}, {}, 0, 0, 0
        for i in range(n):
            sent[i] = time.monotonic()
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            s.sendall(b"GET /idle HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
            sel.register(s, selectors.EVENT_READ, i)
        deadline = time.monotonic() + 60
        got = {}
        while closed < n and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s, i = key.fileobj, key.data
                try:
                    data = s.recv(65536)
                except ConnectionError:
                    data = b""
                if data:
                    got[i] = got.get(i, b"") + data
                    if i not in answered and got[i].endswith(b"ok:/idle"):
                        answered[i] = time.monotonic()
                    continue
                # The timer starts at the answer, which comes after the request went out:
                # the close is early if it came within 4 s of the request, late if 1 s past
                # 4 s after this script read the answer (it reads 10,000 sockets in turn).
                now = time.monotonic()
                if now - sent[i] < 3.99: early += 1
                if now - answered.get(i, sent[i]) > 5.0: late += 1
                closed += 1
                sel.unregister(s)
                s.close()
        print(f"answered={len(answered)} closed={closed} early={early} late={late}")
        """
        let p = try Spawn.start("/usr/bin/env", ["python3", "-c", script, "10000", String(port)], stdout: .pipe)
        var peak = 0
        let started = IOLoop.monotonicNanoseconds()
        while p.isRunning && IOLoop.monotonicNanoseconds() - started < 90_000_000_000 {
            try rig.loop.runOnce(timeoutMs: 20)
            peak = max(peak, rig.loop.registered - 1)
        }
        p.terminate()
        p.wait()
        let report = p.readToEnd()
        #expect(report.contains("answered=10000 closed=10000 early=0 late=0"), "\(report)")
        #expect(peak == 10_000)
        #expect(rig.clients.stats.downstreamClosed[.keepaliveTimeout] == 10_000)
        #expect(rig.loop.registered == 1, "only the listener is left")
        #expect(rig.pool.outstanding == 0)
    }
}
