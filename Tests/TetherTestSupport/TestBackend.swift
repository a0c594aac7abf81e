import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A scriptable HTTP/1.1 backend for tests, written on raw bytes so that it shares nothing with
/// Tether's own parser. It counts what it sees and misbehaves on request.
///
/// Paths: `/bytes/N[?mode=length|chunked|close]` answers N bytes of `Pattern`; `/echo` answers the
/// request body; `/sum` answers `"<count> <checksum>"` of the request body; `/slow/MS` answers after
/// MS milliseconds; `/healthz` answers 200 or 503 (`setHealthy`); `/garbage` answers bytes that are not HTTP; `/status/N` answers status N; anything
/// else answers "ok".
public final class TestBackend: Sendable {
    public struct Options: Sendable {
        /// Close a connection that has been idle this long.
        public var closeIdleAfterMs: Int64?
        /// Close, without answering, a request that arrives on a connection idle at least this long.
        public var dropRequestsIdleForMs: Int64?
        /// Send `Keep-Alive: <value>` with every response.
        public var keepAliveHeader: String?
        /// Close the connection after this many requests (with `Connection: close`).
        public var closeAfterRequests: Int?
        /// Serve HTTPS with this certificate (chain file) and key, through a `TLSFront`.
        public var tls: (certificate: String, key: String)?
        /// Where to listen: any 127.x.y.z address is loopback on Linux (several backends can
        /// share a port, as the addresses of one DNS name do).
        public var host = "127.0.0.1"
        public var port = 0
        public init() {}
    }

    public struct Request: Sendable {
        public var method: String
        public var target: String
        public var headers: [(String, String)]
        public var bodyCount: Int
        public var bodySum: UInt64
        /// How long the connection had been idle before this request (0 for a new connection's first).
        public var idleMs: Int64
        public var connection: Int

        public func header(_ name: String) -> String? {
            headers.first { $0.0.lowercased() == name.lowercased() }?.1
        }
    }

    struct State {
        var connections = 0
        var open = 0
        var peakOpen = 0
        var requests: [Request] = []
        var dropped = 0
        var healthy = true
    }

    let group: MultiThreadedEventLoopGroup
    let channel: Channel
    let state: NIOLockedValueBox<State>
    /// HTTPS in front, when `options.tls` asks for it: `port` is its.
    let front: TLSFront?
    public let port: Int
    public let options: Options

    public init(options: Options = Options()) throws {
        self.options = options
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let state = NIOLockedValueBox(State())
        self.state = state
        let opts = options
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // Tests open hundreds of upstream connections at once (a proxy's burst): NIO's
            // default backlog of 256 would overflow, and the kernel reset the surplus.
            .serverChannelOption(.backlog, value: 4096)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    let id = state.withLockedValue { s -> Int in s.connections += 1; s.open += 1; s.peakOpen = max(s.peakOpen, s.open); return s.connections }
                    try ch.pipeline.syncOperations.addHandler(BackendHandler(id: id, options: opts, state: state))
                }
            }
            .bind(host: options.host, port: options.port).wait()
        if let tls = options.tls {
            front = try TLSFront(certificate: tls.certificate, key: tls.key, target: channel.localAddress!.port!)
            port = front!.port
        } else {
            front = nil
            port = channel.localAddress!.port!
        }
    }

    /// Connections accepted so far.
    public var connectionCount: Int { state.withLockedValue { $0.connections } }
    public var openConnections: Int { state.withLockedValue { $0.open } }
    /// What `/healthz` answers: 200 while healthy, 503 otherwise (every other path is unaffected).
    public func setHealthy(_ healthy: Bool) { state.withLockedValue { $0.healthy = healthy } }

    /// The most connections open at once so far.
    public var peakOpenConnections: Int { state.withLockedValue { $0.peakOpen } }
    public var requests: [Request] { state.withLockedValue { $0.requests } }
    public var requestCount: Int { state.withLockedValue { $0.requests.count } }
    /// Requests closed unanswered by `dropRequestsIdleForMs`.
    public var droppedCount: Int { state.withLockedValue { $0.dropped } }

    public func stop() {
        front?.stop()
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

final class BackendHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let id: Int
    let options: TestBackend.Options
    let state: NIOLockedValueBox<TestBackend.State>
    var buffer = ByteBuffer()
    var served = 0
    var lastActivity = NIODeadline.now()
    var idleTimer: Scheduled<Void>?
    // The request being read.
    var head: (method: String, target: String, headers: [(String, String)])?
    var remaining = 0
    var chunked = false
    var chunkState = 0  // 0 size line, 1 data, 2 trailer
    var sum = Checksum()
    var echo: [ByteBuffer] = []
    var busy = false
    var closing = false

    init(id: Int, options: TestBackend.Options, state: NIOLockedValueBox<TestBackend.State>) {
        self.id = id
        self.options = options
        self.state = state
    }

    func channelActive(context: ChannelHandlerContext) { armIdle(context) }

    func channelInactive(context: ChannelHandlerContext) {
        idleTimer?.cancel()
        state.withLockedValue { $0.open -= 1 }
    }

    func armIdle(_ context: ChannelHandlerContext) {
        idleTimer?.cancel()
        guard let ms = options.closeIdleAfterMs else { return }
        let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
        idleTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) { ctx.value.close(promise: nil) }
    }

    var tunnel = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        if tunnel {
            context.writeAndFlush(wrapOutboundOut(b), promise: nil)
            return
        }
        if buffer.readerIndex > 65536 { buffer.discardReadBytes() }
        buffer.writeBuffer(&b)
        idleTimer?.cancel()
        process(context)
    }

    func process(_ context: ChannelHandlerContext) {
        while !closing && !busy && !tunnel {
            if head == nil {
                guard let view = buffer.readableBytesView.firstRange(of: "\r\n\r\n".utf8) else { return }
                let len = view.upperBound - buffer.readerIndex
                let text = buffer.readString(length: len)!
                var lines = text.components(separatedBy: "\r\n").filter { !$0.isEmpty }
                let first = lines.removeFirst().split(separator: " ")
                var headers: [(String, String)] = []
                for l in lines {
                    let i = l.firstIndex(of: ":")!
                    headers.append((String(l[..<i]), String(l[l.index(after: i)...]).trimmingCharacters(in: " ")))
                }
                head = (String(first[0]), String(first[1]), headers)
                chunked = headers.contains { $0.0.lowercased() == "transfer-encoding" && $0.1.lowercased() == "chunked" }
                remaining = Int(headers.first { $0.0.lowercased() == "content-length" }?.1 ?? "0") ?? 0
                chunkState = 0
                sum = Checksum()
                echo = []
                let idle = served == 0 ? 0 : (NIODeadline.now() - lastActivity).nanoseconds / 1_000_000
                if let drop = options.dropRequestsIdleForMs, served > 0, idle >= drop {
                    state.withLockedValue { $0.dropped += 1 }
                    closing = true
                    context.close(promise: nil)
                    return
                }
                idleMsOfRequest = idle
            }
            guard readBody() else { return }
            let h = head!
            head = nil
            served += 1
            state.withLockedValue {
                $0.requests.append(.init(method: h.method, target: h.target, headers: h.headers, bodyCount: sum.count,
                                         bodySum: sum.value, idleMs: idleMsOfRequest, connection: id))
            }
            respond(context, method: h.method, target: h.target)
        }
    }

    var idleMsOfRequest: Int64 = 0

    /// Reads the body of the current request; true when it is complete.
    func readBody() -> Bool {
        if !chunked {
            let take = min(remaining, buffer.readableBytes)
            let slice = buffer.readSlice(length: take)!
            sum.add(slice)
            if head?.target == "/echo" { echo.append(slice) }
            remaining -= take
            return remaining == 0
        }
        while true {
            switch chunkState {
            case 0:
                guard let r = buffer.readableBytesView.firstRange(of: "\r\n".utf8) else { return false }
                let line = buffer.readString(length: r.lowerBound - buffer.readerIndex)!
                buffer.moveReaderIndex(forwardBy: 2)
                let size = Int(line.split(separator: ";")[0], radix: 16)!
                if size == 0 { chunkState = 2 } else { remaining = size; chunkState = 1 }
            case 1:
                let take = min(remaining, buffer.readableBytes)
                let slice = buffer.readSlice(length: take)!
                sum.add(slice)
                if head?.target == "/echo" { echo.append(slice) }
                remaining -= take
                guard remaining == 0, buffer.readableBytes >= 2 else { return false }
                buffer.moveReaderIndex(forwardBy: 2)
                chunkState = 0
            default:
                guard let r = buffer.readableBytesView.firstRange(of: "\r\n".utf8) else { return false }
                let empty = r.lowerBound == buffer.readerIndex
                buffer.moveReaderIndex(to: r.upperBound)
                if empty { return true }
            }
        }
    }

    func respond(_ context: ChannelHandlerContext, method: String, target: String) {
        let close = options.closeAfterRequests.map { served >= $0 } ?? false
        var extra = ""
        if let ka = options.keepAliveHeader { extra += "Keep-Alive: \(ka)\r\n" }
        if close { extra += "Connection: close\r\n" }
        let path = target.split(separator: "?").first.map(String.init) ?? target
        let query = target.contains("?") ? String(target.split(separator: "?")[1]) : ""
        if path.hasPrefix("/slow/"), let ms = Int64(path.dropFirst(6)) {
            busy = true
            let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
            let me = NIOLoopBound(self, eventLoop: context.eventLoop)
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) {
                me.value.busy = false
                let framed = query == "mode=chunked" ? "Transfer-Encoding: chunked\r\n\(extra)\r\n4\r\nslow\r\n0\r\n\r\n" : "Content-Length: 4\r\n\(extra)\r\nslow"
                me.value.send(ctx.value, "HTTP/1.1 200 OK\r\n" + framed, close: close)
                me.value.process(ctx.value)
            }
            return
        }
        if path == "/upgrade" {
            // 101, then every byte that arrives is echoed back.
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")), promise: nil)
            tunnel = true
            if buffer.readableBytes > 0 { context.writeAndFlush(wrapOutboundOut(buffer.readSlice(length: buffer.readableBytes)!), promise: nil) }
            return
        }
        if path == "/garbage" {
            send(context, "HTP/9 nonsense\r\n\r\n", close: true)
            return
        }
        if path == "/healthz" {
            let ok = state.withLockedValue { $0.healthy }
            send(context, ok ? "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\(extra)\r\nok" : "HTTP/1.1 503 Unhealthy\r\nContent-Length: 4\r\n\(extra)\r\nsick", close: close)
            return
        }
        if path.hasPrefix("/status/"), let code = Int(path.dropFirst(8)) {
            send(context, "HTTP/1.1 \(code) Status\r\nContent-Length: 6\r\n\(extra)\r\nstatus", close: close)
            return
        }
        if path == "/sum" {
            let body = "\(sum.count) \(sum.value)"
            send(context, "HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\n\(extra)\r\n\(body)", close: close)
            return
        }
        if path == "/echo" {
            let n = echo.reduce(0) { $0 + $1.readableBytes }
            context.write(wrapOutboundOut(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: \(n)\r\n\(extra)\r\n")), promise: nil)
            for b in echo { context.write(wrapOutboundOut(b), promise: nil) }
            echo = []
            finish(context, close: close)
            return
        }
        if path.hasPrefix("/bytes/"), let n = Int(path.dropFirst(7)) {
            let mode = query.hasPrefix("mode=") ? String(query.dropFirst(5)) : "length"
            streamBytes(context, total: n, mode: mode, method: method, extra: extra, close: close)
            return
        }
        let body = method == "HEAD" ? "" : "ok"
        send(context, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\(extra)\r\n\(body)", close: close)
    }

    /// Writes N pattern bytes in 64 KiB pieces, waiting for writability so memory stays bounded.
    func streamBytes(_ context: ChannelHandlerContext, total: Int, mode: String, method: String, extra: String, close: Bool) {
        var headText = "HTTP/1.1 200 OK\r\n"
        switch mode {
        case "chunked": headText += "Transfer-Encoding: chunked\r\n"
        case "close": headText += "Connection: close\r\n"
        default: headText += "Content-Length: \(total)\r\n"
        }
        context.write(wrapOutboundOut(ByteBuffer(string: headText + extra + "\r\n")), promise: nil)
        if method == "HEAD" { finish(context, close: close || mode == "close"); return }
        busy = true
        pending = (total, 0, mode, close || mode == "close")
        pump(context)
    }

    var pending: (total: Int, sent: Int, mode: String, close: Bool)?

    var pumping = false

    func pump(_ context: ChannelHandlerContext) {
        // A write can change writability synchronously and call back in here.
        guard !pumping, var p = pending else { return }
        pumping = true
        defer { pumping = false }
        while p.sent < p.total && context.channel.isWritable {
            let n = min(65536, p.total - p.sent)
            var b = context.channel.allocator.buffer(capacity: n + 16)
            if p.mode == "chunked" { b.writeString(String(n, radix: 16) + "\r\n") }
            b.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { ptr in
                Pattern.fill(ptr, offset: p.sent, count: n)
                return n
            }
            if p.mode == "chunked" { b.writeString("\r\n") }
            p.sent += n
            pending = p
            context.writeAndFlush(wrapOutboundOut(b), promise: nil)
        }
        pending = p
        if p.sent == p.total {
            pending = nil
            pumping = false  // the next pipelined request may stream too
            if p.mode == "chunked" { context.write(wrapOutboundOut(ByteBuffer(string: "0\r\n\r\n")), promise: nil) }
            busy = false
            finish(context, close: p.close)
            process(context)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { pump(context) }
    }

    func send(_ context: ChannelHandlerContext, _ text: String, close: Bool) {
        context.write(wrapOutboundOut(ByteBuffer(string: text)), promise: nil)
        finish(context, close: close)
    }

    func finish(_ context: ChannelHandlerContext, close: Bool) {
        lastActivity = .now()
        if close {
            closing = true
            // Close only once everything written has gone out.
            let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in ctx.value.close(promise: nil) }
        } else {
            context.flush()
            armIdle(context)
        }
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
    func components(separatedBy sep: String) -> [String] {
        var out: [String] = []
        var rest = Substring(self)
        while let r = rest.firstRange(of: sep) {
            out.append(String(rest[..<r.lowerBound]))
            rest = rest[r.upperBound...]
        }
        out.append(String(rest))
        return out
    }
}
