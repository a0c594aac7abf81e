#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import TetherHTTP
import TetherConfig
import TetherPool
import TetherTLS

/// What a TLS client connection's handshake settled, for `$ssl_*`: boxed, so that plain
/// connections pay one pointer for it.
final class TLSInfo {
    let info: TLSHandshakeCompleted
    init(_ info: TLSHandshakeCompleted) { self.info = info }
}

/// A client connection: parses requests, routes them, forwards them over pooled upstream
/// connections of its own event loop and streams the responses back, in order, keeping the
/// connection alive as nginx's keep-alive rules allow.
final class DownstreamHandler: ChannelDuplexHandler, UpstreamDelegate, VariableSource {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let loop: LoopContext
    private var hosts: VirtualHosts
    private var servers: [CompiledServer]
    private var serverPort: Int
    /// The listener this connection came from, and the configuration generation its routing is of.
    private let listenKey: String
    private var generation: Int
    private var context: ChannelHandlerContext!
    /// Where the connection is between requests (a value: see `ClientConnectionState`).
    private var conn: ClientConnectionState
    private var inbound: ByteBuffer?
    /// Storage for the request head's header array, borrowed from the loop while a request is
    /// read and handled, and given back after: an idle connection holds none.
    private var headerStorage: [HeaderField] = []
    private var ex: Exchange?
    /// The client's address as text (`$remote_addr`) and as 4 or 16 bytes (`allow` / `deny`),
    /// made from the channel's address the first time a request needs them: a connection whose
    /// requests use neither formats nothing and allocates nothing for them.
    private var remoteAddrCache: [UInt8]?
    private var remoteIPCache: [UInt8]?
    private var remoteAddr: [UInt8] {
        if let a = remoteAddrCache { return a }
        let a = Array((context?.channel.remoteAddress?.ipAddress ?? "").utf8)
        remoteAddrCache = a
        return a
    }
    private var remoteIP: [UInt8] {
        if let a = remoteIPCache { return a }
        var a: [UInt8] = []
        switch context?.channel.remoteAddress {
        case .v4(let v4): a = withUnsafeBytes(of: v4.address.sin_addr) { Array($0) }
        case .v6(let v6): a = withUnsafeBytes(of: v6.address.sin6_addr) { Array($0) }
        default: break
        }
        remoteIPCache = a
        return a
    }
    private var remotePort: Int { context?.channel.remoteAddress?.port ?? 0 }
    // Reading is paused (a `read` was held back) for bounded read-ahead or backpressure.
    private var readPaused = false
    private var pendingRead = false
    /// What was written to the client since the last flush.
    private var clientWrites = WriteCoalescer()
    /// Only for the lingering close after our FIN; deadlines are swept by the loop.
    private var timer: Scheduled<Void>?
    private var lastClientRead = NIODeadline.now()
    private var unwritableSince: NIODeadline?
    /// Since when the upstream has not been taking the request body (proxy_send_timeout).
    private var upstreamUnwritableSince: NIODeadline?
    /// When the upstream read timer last restarted for a reason other than a read from it: the
    /// request finished or its head went out, the client or the upstream took data again.
    private var readTimerRestart = NIODeadline.uptimeNanoseconds(0)
    /// Whether the client connection is TLS (`$scheme` is `https`), and what its handshake
    /// settled (for `$ssl_*`).
    private let isTLS: Bool
    private var tlsInfo: TLSInfo?

    init(loop: LoopContext, listenKey: String, route: Route) {
        self.loop = loop
        self.listenKey = listenKey
        isTLS = route.tls != nil
        hosts = route.hosts
        servers = route.servers
        serverPort = route.port
        generation = loop.generation
        conn = ClientConnectionState(acceptedAt: nanos(.now()), headerTimeoutMs: 60_000)
        adoptDefaults()
    }

    /// The default server's settings: they apply until a request has been routed (head limits,
    /// header timeout). Read on error paths only; the hot path uses the values cached below.
    private var defaultSettings: HTTPSettings { servers[hosts.defaultIndex].server.settings }
    /// From the default server, cached so that no read copies the settings.
    private var headLimits = HeadParser.Limits(lineLimit: 8192, headLimit: 32768)
    private var readAheadLimit = 65536

    /// Caches what the read path needs from the default server's settings.
    private func adoptDefaults() {
        let s = servers[hosts.defaultIndex].server
        let (count, size) = s.settings.largeClientHeaderBuffers
        headLimits = HeadParser.Limits(lineLimit: size, headLimit: count * size, mergeSlashes: s.settings.mergeSlashes)
        readAheadLimit = max(count * size, 65536)
        conn.headerTimeoutMs = s.settings.clientHeaderTimeoutMs
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    /// The context refers to this handler: keeping it past removal would keep both alive for
    /// ever (one leaked pair per closed connection). Nothing reaches this handler after
    /// `channelInactive` (upstreams are detached there, the sweep forgets it), and `close()`
    /// checks for the context.
    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        loop.stats.downstreamHandled += 1
        loop.stats.downstreamActive += 1
        loop.connections[ObjectIdentifier(self)] = self
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        loop.stats.downstreamActive -= 1
        loop.connections.removeValue(forKey: ObjectIdentifier(self))
        if let r = conn.close() { loop.stats.downstreamClosed[r] += 1 }
        if let e = ex { balancerEnded(e) }
        if let e = ex, let up = e.upstream, let server = e.server {
            // The client left mid-exchange. A response that will end soon and cleanly is read
            // to its end and the connection kept; otherwise it is closed.
            e.upstream = nil
            if let rest = AbandonedResponse(exchange: e, connection: up, server: server) {
                rest.start(timeoutMs: e.route.settings.proxyReadTimeoutMs)
            } else {
                server.discard(up, reason: .clientAbort)
            }
        }
        ex = nil
    }

    /// The time the event being handled began (a read from the client or the upstream), or nil
    /// between events: the dozen timestamps a proxied request takes share two clock reads, as
    /// nginx reads the clock once per loop iteration. Never kept past the event.
    private var eventClock: NIODeadline?
    private var now: NIODeadline { eventClock ?? .now() }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        guard !conn.isClosed else { return }
        let outer = eventClock
        eventClock = outer ?? .now()
        defer { eventClock = outer }
        lastClientRead = now
        if inbound == nil || inbound!.readableBytes == 0 {
            inbound = bytes
        } else {
            // Leftover bytes (a pipelined request, a partial head): append behind them, without
            // letting already consumed bytes pile up in front.
            if inbound!.readerIndex > 16384 { inbound!.discardReadBytes() }
            var b = bytes
            inbound!.writeBuffer(&b)
        }
        drive()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfNeeded()
        ex?.upstream?.flush()
    }

    func read(context: ChannelHandlerContext) {
        if readPaused { pendingRead = true } else { context.read() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            unwritableSince = nil
            readTimerRestart = .now()
            ex?.upstream?.resumeReading()
        } else {
            unwritableSince = .now()
            ex?.upstream?.pauseReading()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let info = event as? TLSHandshakeCompleted { tlsInfo = TLSInfo(info) }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch error {
        case TLSError.uncleanShutdown:
            // A client that leaves without close_notify has left; the close that follows says so.
            return
        case is TLSError:
            close(.tlsError)
        default:
            close(isKernelTimeout(error) ? .tcpKeepalive : .error)
        }
    }

    // MARK: Driving requests

    /// Processes what the client sent, as far as the current state allows.
    private func drive() {
        while !conn.isClosed {
            switch conn.phase {
            case .awaitingHead:
                guard let buf = inbound, buf.readableBytes > 0 else {
                    updateReadInterest()
                    return
                }
                conn.headBytesArrived(now: nanos(now))
                if headerStorage.capacity == 0 { headerStorage = loop.borrowHeaderArray() }
                switch HeadParser.parse(buf, kind: .request, limits: headLimits, headers: &headerStorage) {
                case .incomplete:
                    updateReadInterest()
                    return
                case .error(let e):
                    loop.logger.info("client \(String(decoding: remoteAddr, as: UTF8.self)) sent an invalid request: \(e.reason)")
                    respondAndClose(status: e.status, settings: defaultSettings)
                    return
                case .complete(let head, let consumed):
                    inbound!.moveReaderIndex(forwardBy: consumed)
                    start(head)
                }
            case .exchange:
                if let e = ex, e.phase == .tunnel, let up = e.upstream, let b = inbound, b.readableBytes > 0 {
                    // After 101 Switching Protocols the client's bytes go through untouched.
                    up.write(b)
                    inbound = nil
                } else {
                    pumpRequestBody()
                }
                updateReadInterest()
                return
            case .closed:
                return
            }
        }
    }

    private func start(_ head: consuming ParsedHead) {
        if generation != loop.generation {
            // A reload happened: this and later requests use the new configuration.
            generation = loop.generation
            if let r = loop.routes[listenKey] {
                hosts = r.hosts
                servers = r.servers
                adoptDefaults()
            }
        }
        let number = conn.headParsed()
        loop.stats.downstreamRequests += 1
        // With one server on the address there is no Host to look at; routing reads bytes.
        let server = servers.count == 1 ? servers[0] : servers[hosts.server(forHost: hostValue(head))]
        let route = server.route(head)
        let clientKeepAlive = head.clientWantsKeepAlive
        let tooLarge = head.contentLength.map { $0 > route.settings.clientMaxBodySize && route.settings.clientMaxBodySize > 0 } ?? false
        let isCONNECT = head.methodIs("CONNECT")
        let chunked = head.chunked
        // The head moves into the exchange (no copy of it per request).
        let e = Exchange(head: head, route: route, number: number, clientKeepAlive: clientKeepAlive, now: now)
        ex = e
        if e.head.upgradeIndex != nil { e.upgradeOffer = Self.upgradeOffer(e.head, allowed: route.settings.proxyAllowUpgrade) }
        if tooLarge {
            respondLocal(status: 413, closeAfter: true)
            return
        }
        if isCONNECT {
            respondLocal(status: 405, closeAfter: true)
            return
        }
        if let rule = route.settings.accessRules.first(where: { $0.matches(remoteIP) }), !rule.allow {
            e.discardBody = true
            loop.logger.info("access forbidden by rule \"\(rule)\", client: \(String(decoding: remoteAddr, as: UTF8.self))")
            respondLocal(status: 403)
            return
        }
        switch route.action {
        case .stubStatus, .stats:
            guard e.head.methodIs("GET") || e.head.isHEAD else {
                e.discardBody = true
                respondLocal(status: 405, allow: true)
                return
            }
            if case .stats(let format) = route.action { adminPage(format == .prometheus ? .prometheus : .json) } else { adminPage(.stubStatus) }
        case .respond(let r):
            e.discardBody = true
            if r.code == 444 { close(.error); return }
            var text: ByteBuffer?
            if let t = r.text {
                var b = loop.allocator.buffer(capacity: 64)
                writeTemplate(t, into: &b)
                text = b
            }
            respondLocal(status: r.code, text: text)
        case .proxy:
            if chunked && route.proxyHTTP10 {
                // An HTTP/1.0 backend cannot read a chunked body, and Tether does not buffer
                // bodies to learn their length.
                respondLocal(status: 411, closeAfter: true)
                return
            }
            proxy()
        case .none:
            e.discardBody = true
            respondLocal(status: 404)
        }
    }

    /// Answers with an admin page once every loop has given its figures (never blocking this one).
    private func adminPage(_ page: AdminPage) {
        guard let e = ex else { return }
        e.discardBody = true
        guard let admin = loop.admin else {
            respondLocal(status: 501)
            return
        }
        let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
        let number = conn.requests
        admin.page(page, on: loop.eventLoop).assumeIsolated().whenComplete { result in
            let me = bound.value
            guard me.conn.inExchange, me.conn.requests == number else { return }
            switch result {
            case .success(let (contentType, body)):
                me.respondLocal(status: 200, text: ByteBuffer(string: body), contentType: contentType)
            case .failure:
                me.respondLocal(status: 500)
            }
        }
    }

    /// What nginx's stub_status calls this connection (reading, writing, waiting).
    var activity: ClientConnectionState.Activity { conn.activity }

    // MARK: Upstream

    private func proxy() {
        guard let e = ex else { return }
        let group = e.group ?? loop.group(for: e.route, upstream: e.route.upstreamName)
        e.group = group
        let now = self.now
        guard let index = group.balancer.select(now: ms(now), exclude: e.tried) else {
            loop.stats.upstreamFailures[.noLiveUpstreams] += 1  // no server to charge it to
            loop.logger.error("no live upstreams while connecting to upstream \"\(group.name)\"")
            respondLocal(status: 502)
            return
        }
        e.tried.insert(index)
        e.tries += 1
        let server = group.servers[index]
        e.server = server
        e.phase = .head
        e.responseHeadBuffer = nil
        group.balancer.started(index)
        e.balancerActive = true
        if let (conn, idleMs) = server.lease(now: now) {
            e.reused = true
            e.idleMsAtLease = idleMs
            e.connectedAt = now
            attach(conn)
        } else {
            connect(server)
        }
    }

    /// The balancer stops counting the exchange as active on its server (once).
    private func balancerEnded(_ e: Exchange) {
        guard e.balancerActive, let server = e.server else { return }
        e.balancerActive = false
        e.group?.balancer.ended(server.index)
    }

    private func connect(_ server: ServerPool) {
        ex?.reused = false
        ex?.connectStartedAt = .now()
        let route = ex!.route
        let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
        let exchangeNumber = conn.requests
        server.connect(timeoutMs: route.settings.proxyConnectTimeoutMs, socketKeepalive: route.settings.proxySocketKeepalive).assumeIsolated().whenComplete { result in
            let me = bound.value
            switch result {
            case .success(let conn):
                guard me.conn.inExchange, me.conn.requests == exchangeNumber, me.ex?.upstream == nil else {
                    // The client went away while connecting: keep the new connection warm.
                    server.release(conn, reusable: true, backend: nil)
                    return
                }
                me.ex?.connectedAt = .now()
                me.attach(conn)
            case .failure(let error):
                guard me.conn.inExchange, me.conn.requests == exchangeNumber else { return }
                let timedOut = (error as? ChannelError).map { if case .connectTimeout = $0 { return true } else { return false } } ?? false
                me.upstreamFailed(timedOut ? .timeout : .error, detail: "connect() to \(server.spec.addressText) failed: \(error)")
            }
        }
    }

    private func attach(_ conn: UpstreamConnection) {
        guard let e = ex else { return }
        conn.delegate = self
        upstreamUnwritableSince = nil
        e.upstream = conn
        let now = self.now
        e.lastUpstreamActivity = now
        e.server?.counters.requests += 1
        if e.reused { e.server?.counters.reused += 1 }
        e.requestSentAt = now
        var head = loop.allocator.buffer(capacity: e.head.bytes.readableBytes + 128)
        writeUpstreamHead(e, into: &head)
        conn.write(head)
        if e.head.expectContinue && !e.requestBodyDone && (inbound?.readableBytes ?? 0) == 0 && e.head.minorVersion == 1 {
            writeClient(ByteBuffer(staticString: "HTTP/1.1 100 Continue\r\n\r\n"))
            flushIfNeeded()
        }
        pumpRequestBody()
        conn.flush()
        if !conn.isWritable { updateReadInterest() }
    }

    /// Moves request body bytes from the client's buffer to the upstream (or drops them for a
    /// local response), as far as the framing says the body goes.
    private func pumpRequestBody() {
        guard let e = ex, !e.requestBodyDone else { return }
        guard var buf = inbound, buf.readableBytes > 0 else { return }
        let sink = e.discardBody ? nil : e.upstream
        if !e.discardBody && sink == nil { return }  // still connecting: the bytes wait
        let limit = e.route.settings.clientMaxBodySize
        switch e.requestFraming {
        case .length:
            let take = Int(min(e.requestRemaining, Int64(buf.readableBytes)))
            let slice = buf.readSlice(length: take)!
            e.requestRemaining -= Int64(take)
            e.requestBodyBytes += Int64(take)
            if let sink { sink.write(slice); e.bodyStarted = true }
            if e.requestRemaining == 0 { e.requestBodyDone = true }
        case .chunked:
            // Re-framed on the way (never passed on as received); checked for size before any
            // of it is written.
            let consumed: Int
            do {
                if let sink {
                    consumed = try reframeChunked(buf, &e.requestChunks, dechunk: false, limit: limit) { sink.write($0) }
                    e.bodyStarted = true
                } else {
                    consumed = try buf.withUnsafeReadableBytes { p in try e.requestChunks.consume(p, data: { _, _ in }) }
                }
                if limit > 0 && e.requestChunks.announcedBytes > limit {
                    inbound = buf
                    failRequest(status: 413, why: "client intended to send too large chunked body")
                    return
                }
            } catch {
                inbound = buf
                failRequest(status: 400, why: "invalid chunked body: \((error as? ChunkedDecoder.Failure)?.reason ?? "\(error)")")
                return
            }
            e.requestBodyBytes = e.requestChunks.dataBytes
            buf.moveReaderIndex(forwardBy: consumed)
            if e.requestChunks.isDone { e.requestBodyDone = true }
        case .none, .untilClose:
            e.requestBodyDone = true
        }
        inbound = buf
        if e.requestBodyDone { requestBodyFinished() }
    }

    private func requestBodyFinished() {
        guard let e = ex else { return }
        readTimerRestart = now
        if e.responseDone { finishExchange() }
    }

    /// A request can no longer be served: answer if nothing was sent yet, and close.
    private func failRequest(status: Int, why: String) {
        loop.logger.info("\(why), client: \(String(decoding: remoteAddr, as: UTF8.self))")
        if let e = ex, e.responseStarted {
            close(.error)
            return
        }
        respondLocal(status: status, closeAfter: true)
    }

    /// What `NextUpstream` needs to know about the exchange.
    private func failureFacts(_ e: Exchange) -> NextUpstream.Facts {
        let s = e.route.settings
        return NextUpstream.Facts(
            responseStarted: e.responseStarted, closeDelimitedToClient: e.closeDelimitedToClient, reused: e.reused,
            retriedFresh: e.retriedFresh, replayable: e.mayRetry, tries: e.tries, conditions: s.proxyNextUpstream,
            maxTries: s.proxyNextUpstreamTries, requestBodyDone: e.requestBodyDone)
    }

    /// The upstream failed before the response was complete: carries out what `NextUpstream` decides.
    private func upstreamFailed(_ kind: UpstreamFailureKind, detail: String) {
        guard let e = ex, let server = e.server, let group = e.group else { return }
        if let up = e.upstream {
            e.upstream = nil
            server.discard(up, reason: .error)
        }
        balancerEnded(e)
        let action = NextUpstream.afterFailure(kind, failureFacts(e)) { group.balancer.hasCandidate(now: nowMs(), exclude: e.tried) }
        switch action {
        case .abort(let reset, let counted):
            // Part of the response went out: all we can do is end the connection, so the client
            // sees an incomplete message rather than a wrong one (a reset where a FIN would end
            // a close-delimited response as if it were complete).
            loop.logger.error("\(detail) while reading response from upstream \"\(group.name)\"")
            server.counters.failures[counted] += 1
            conn.pendingReason = .error
            if reset { self.reset() } else { close() }
        case .retryFresh:
            server.reusedConnectionFailed(idleMs: e.idleMsAtLease)
            server.counters.retries[.reusedConnectionClosed] += 1
            e.retriedFresh = true
            e.reused = false
            group.balancer.started(server.index)
            e.balancerActive = true
            server.state.connectFresh()
            connect(server)
        case .nextServer:
            group.balancer.failed(server.index, now: nowMs())
            loop.logger.warning("\(detail) while connecting to upstream \"\(group.name)\", trying the next server")
            server.counters.retries[.nextUpstream] += 1
            proxy()
        case .respond(let status, let closeAfter, let counted):
            group.balancer.failed(server.index, now: nowMs())
            loop.logger.error("\(detail), upstream \"\(group.name)\", request \"\(e.head.method) \(e.head.target)\"")
            server.counters.failures[counted] += 1
            respondLocal(status: status, closeAfter: closeAfter)
        }
    }

    // MARK: UpstreamDelegate

    func upstreamRead(_ buffer: ByteBuffer) {
        guard let e = ex else { return }
        let outer = eventClock
        eventClock = outer ?? .now()
        defer { eventClock = outer }
        e.lastUpstreamActivity = now
        switch e.phase {
        case .head:
            if e.responseHeadBuffer == nil {
                e.responseHeadBuffer = buffer
            } else {
                var b = buffer
                e.responseHeadBuffer!.writeBuffer(&b)
            }
            parseResponseHead()
        case .body:
            relayBody(buffer)
        case .tunnel:
            writeClient(buffer)
            if !context.channel.isWritable { e.upstream?.pauseReading() }
        case .done:
            // Bytes after the end of the response: the connection is out of step.
            ex?.upstreamReusable = false
        }
    }

    func upstreamReadComplete() {
        flushIfNeeded()
    }

    func upstreamClosed(_ connection: UpstreamConnection, error: Error?) {
        guard let e = ex, e.upstream === connection else { return }
        switch e.phase {
        case .body where e.responseFraming == .untilClose && error != nil:
            // The end of this response is the close, and only an orderly one (a FIN; over TLS,
            // close_notify) ends it: a reset, a read error or a TLS close without close_notify may
            // be a truncation, and the client must be able to tell.
            let why: String
            if case TLSError.uncleanShutdown = error! { why = "closed its TLS connection without close_notify" } else { why = "failed (\(error!))" }
            upstreamFailed(.error, detail: "upstream \(e.upstreamAddrText) \(why) in a response delimited by the close; the response may be truncated")
        case .body where e.responseFraming == .untilClose:
            if e.relay == .chunkify { writeClient(ByteBuffer(staticString: "0\r\n\r\n")) }
            e.upstreamReusable = false
            e.upstream = nil
            e.server?.discard(connection, reason: .peerClosed)
            responseFinished()
        case .tunnel:
            e.upstream = nil
            e.server?.discard(connection, reason: .peerClosed)
            close(.clientClose)
        case .done:
            break
        default:
            let detail = error.map { "upstream \(e.upstreamAddrText) failed (\($0))" } ?? "upstream \(e.upstreamAddrText) prematurely closed connection"
            upstreamFailed(.error, detail: detail)
        }
    }

    func upstreamWritabilityChanged(_ connection: UpstreamConnection) {
        upstreamUnwritableSince = connection.isWritable ? nil : .now()
        if connection.isWritable { readTimerRestart = .now() }
        updateReadInterest()
        if connection.isWritable, inbound.map({ $0.readableBytes > 0 }) == true {
            pumpRequestBody()
            connection.flush()
        }
    }

    // MARK: Response

    private func parseResponseHead() {
        while let e = ex, e.phase == .head, let buf = e.responseHeadBuffer {
            switch HeadParser.parse(buf, kind: .response, limits: .response, headers: &loop.responseHeaderScratch) {
            case .incomplete:
                return
            case .error(let err):
                upstreamFailed(.invalidHeader, detail: "upstream \(e.upstreamAddrText) sent an invalid response: \(err.reason)")
                return
            case .complete(var head, let consumed):
                // The parser moved the loop's scratch storage into the head; it goes back when the
                // head is done (nothing keeps a response head past this).
                defer { swap(&loop.responseHeaderScratch, &head.headers) }
                var rest = buf
                rest.moveReaderIndex(forwardBy: consumed)
                e.responseHeadBuffer = nil
                if head.status < 200 && head.status != 101 {
                    // 100 Continue and other interim responses: Tether answers Expect itself.
                    e.responseHeadBuffer = rest.readableBytes > 0 ? rest : nil
                    continue
                }
                e.headerAt = e.lastUpstreamActivity  // set by this read
                e.upstreamStatus = head.status
                if shouldTryNext(status: head.status) { return }
                startResponse(head, rest: rest)
                return
            }
        }
    }

    /// `proxy_next_upstream http_502` and the like: try another server instead of relaying this.
    private func shouldTryNext(status: Int) -> Bool {
        // Most statuses name no condition: no facts are gathered for them.
        guard NextUpstream.condition(forStatus: status) != nil, let e = ex, let group = e.group, let server = e.server,
              let condition = NextUpstream.afterStatus(status, failureFacts(e), hasCandidate: { group.balancer.hasCandidate(now: nowMs(), exclude: e.tried) })
        else { return false }
        if let up = e.upstream { e.upstream = nil; server.discard(up, reason: .notReusable) }
        balancerEnded(e)
        if NextUpstream.countsAsServerFailure(condition) { group.balancer.failed(server.index, now: nowMs()) }
        server.counters.retries[NextUpstream.retryReason(condition)] += 1
        proxy()
        return true
    }

    private func startResponse(_ head: ParsedHead, rest: ByteBuffer) {
        guard let e = ex else { return }
        let upgrading = head.status == 101
        if upgrading {
            // A tunnel opens only to a protocol this request offered: anything else would let
            // the client's next bytes reach the backend unparsed.
            guard let offer = e.upgradeOffer else {
                upstreamFailed(.invalidHeader, detail: "upstream \(e.upstreamAddrText) sent 101 to a request that did not ask to upgrade")
                return
            }
            guard let u = head.upgradeIndex, Upgrade.offered(offer, answer: Substring(head.value(head.headers[u]))) else {
                upstreamFailed(.invalidHeader, detail: "upstream \(e.upstreamAddrText) sent 101 switching to a protocol the request did not offer")
                return
            }
        }
        let framing = head.responseFraming(requestIsHEAD: e.head.isHEAD, upgrading: upgrading)
        let plan = ResponsePlan(
            framing: framing, upgrading: upgrading, headKeepsConnection: head.keepsConnection,
            request: .init(minorVersion: e.head.minorVersion, keepAliveAllowed: clientKeepAliveAllowed(e),
                           bodyDone: e.requestBodyDone, upstreamHTTP10: e.route.proxyHTTP10))
        e.responseFraming = framing
        if case .length(let n) = framing { e.responseRemaining = n }
        e.upstreamReusable = plan.upstreamReusable
        if let ka = head.backendKeepAlive { e.backendKeepAlive = ka }
        e.relay = plan.relay
        e.closeAfter = !plan.clientKeepAlive
        e.status = head.status
        switch plan.phase {
        case .done: e.phase = .done
        case .body: e.phase = .body
        case .tunnel: e.phase = .tunnel
        }
        e.responseStarted = true
        // Room for a small body that came with the head: it is gathered behind it (writeClient).
        let smallBody = rest.readableBytes <= WriteCoalescer.limit ? rest.readableBytes : 0
        var out = loop.allocator.buffer(capacity: head.bytes.readableBytes + 64 + smallBody)
        writeClientHead(head, exchange: e, upgrading: upgrading, into: &out)
        e.bytesSent += out.readableBytes
        writeClient(out)
        if upgrading {
            // From here on both directions are raw bytes.
            if rest.readableBytes > 0 { writeClient(rest) }
            if let b = inbound, b.readableBytes > 0 { e.upstream?.write(b); inbound = nil }
            e.upstream?.flush()
            flushIfNeeded()
            return
        }
        if e.phase == .done {
            if rest.readableBytes > 0 { e.upstreamReusable = false }
            responseFinished()
        } else if rest.readableBytes > 0 {
            relayBody(rest)
        }
    }

    private func relayBody(_ buffer: ByteBuffer) {
        guard let e = ex else { return }
        var buf = buffer
        var finished = false
        switch e.responseFraming {
        case .length:
            let take = Int(min(e.responseRemaining, Int64(buf.readableBytes)))
            let slice = buf.readSlice(length: take)!
            e.responseRemaining -= Int64(take)
            e.bodyBytesSent += take
            writeClient(slice)
            if e.responseRemaining == 0 { finished = true }
        case .chunked:
            let consumed: Int
            do {
                consumed = try reframeChunked(buf, &e.responseChunks, dechunk: e.relay == .dechunk) { writeClient($0) }
            } catch {
                upstreamFailed(.error, detail: "upstream \(e.upstreamAddrText) sent invalid chunked response: \(error.reason)")
                return
            }
            e.bodyBytesSent = Int(e.responseChunks.dataBytes)
            buf.moveReaderIndex(forwardBy: consumed)
            if e.responseChunks.isDone { finished = true }
        case .untilClose:
            let n = buf.readableBytes
            if e.relay == .chunkify {
                var h = loop.allocator.buffer(capacity: 12)
                h.writeString(String(n, radix: 16))
                h.writeStaticString("\r\n")
                writeClient(h)
                writeClient(buf)
                writeClient(ByteBuffer(staticString: "\r\n"))
            } else {
                writeClient(buf)
            }
            e.bodyBytesSent += n
            buf.moveReaderIndex(forwardBy: n)
        case .none:
            finished = true
        }
        if finished && buf.readableBytes > 0 { e.upstreamReusable = false }
        if !context.channel.isWritable { e.upstream?.pauseReading() }
        if finished { responseFinished() }
    }

    /// Writes the chunked body bytes at the start of `buf` out again: in canonical framing
    /// (lowercase hex sizes, no extensions, only the trailers the decoder kept), or only their
    /// data for an HTTP/1.0 client. Data is passed on as slices, never copied. Returns how many
    /// bytes of `buf` belong to the body.
    /// With a `limit`, nothing is written from the chunk that would take the body's data past it on.
    private func reframeChunked(_ buf: ByteBuffer, _ decoder: inout ChunkedDecoder, dechunk: Bool, limit: Int64 = 0,
                                write: (ByteBuffer) -> Void) throws(ChunkedDecoder.Failure) -> Int {
        let base = buf.readerIndex
        let allocator = loop.allocator
        var announced = decoder.announcedBytes
        var over = limit > 0 && announced > limit
        let consumed = try buf.withUnsafeReadableBytes { p throws(ChunkedDecoder.Failure) in
            try decoder.consume(p, events: { event in
                if over { return }
                switch event {
                case .chunk(let n):
                    announced += n
                    if limit > 0 && announced > limit { over = true; return }
                    guard !dechunk else { return }
                    var line = allocator.buffer(capacity: 18)
                    ChunkedDecoder.writeSize(n, into: &line)
                    write(line)
                case .data(let a, let b):
                    if b > a { write(buf.getSlice(at: base + a, length: b - a)!) }
                case .chunkEnd:
                    if !dechunk { write(ByteBuffer(staticString: "\r\n")) }
                case .end:
                    break
                }
            })
        }
        if decoder.isDone && !dechunk && !over {
            var last = allocator.buffer(capacity: 5 + decoder.trailers.count)
            last.writeStaticString("0\r\n")
            last.writeBytes(decoder.trailers)
            last.writeStaticString("\r\n")
            write(last)
        }
        return consumed
    }

    /// The whole response was read from the upstream.
    private func responseFinished() {
        guard let e = ex else { return }
        e.phase = .done
        e.responseDone = true
        if let server = e.server, let sent = e.requestSentAt {
            server.counters.responseTime.observe(nanoseconds: (now - sent).nanoseconds)
        }
        if let up = e.upstream, let server = e.server {
            e.upstream = nil
            // Not reusable while the request body is still being sent.
            server.release(up, reusable: e.upstreamReusable && e.requestBodyDone, backend: e.backendKeepAlive, now: now)
        }
        if let server = e.server {
            balancerEnded(e)
            e.group?.balancer.succeeded(server.index)
        }
        // The response head set closeAfter whenever the request body was not finished, so the
        // exchange ends here (and finishExchange flushes: the upstream's readComplete will not
        // reach us once the connection is released).
        finishExchange()
    }

    /// Both the request and the response are complete: log, then close or wait for the next request.
    private func finishExchange() {
        guard let e = ex else { return }
        loop.stats.countResponse(status: e.status, server: e.route.serverIndex)
        accessLog(e)
        ex = nil
        // The header array goes back to the loop: an idle connection holds none.
        swap(&headerStorage, &e.head.headers)
        loop.returnHeaderArray(&headerStorage)
        // One flush per response, whichever side's event finished it.
        flushIfNeeded()
        if e.closeAfter {
            if let r = conn.close() { loop.stats.downstreamClosed[r] += 1 }
            if e.requestBodyDone && (inbound?.readableBytes ?? 0) == 0 {
                // Nothing more is expected from the client: close once the response is written,
                // as nginx does, instead of a half-close and a lingering wait.
                closeWhenWritten()
            } else {
                flushAndClose()
            }
            return
        }
        conn.exchangeFinished(keepaliveTimeoutMs: e.route.settings.keepaliveTimeoutMs, now: nanos(now))
        if inbound?.readableBytes == 0 { inbound = nil }
        // A pipelined request may already be waiting.
        drive()
    }

    // MARK: Local responses


    private func respondAndClose(status: Int, settings: HTTPSettings) {
        ex = nil
        respond(status: status, text: nil, serverTokens: settings.serverTokens, keepAlive: false, head: nil)
        if let r = conn.close(.error) { loop.stats.downstreamClosed[r] += 1 }
        flushAndClose()
    }

    /// nginx's client keep-alive rules for the response to `e` (`keepalive_requests`,
    /// `keepalive_time`, `keepalive_timeout 0`, draining, what the client asked for); when they
    /// say close, the reason is kept for the close counter.
    private func clientKeepAliveAllowed(_ e: Exchange) -> Bool {
        let s = e.route.settings
        let policy = KeepAlivePolicy(maxRequests: s.keepaliveRequests, maxLifetimeMs: s.keepaliveTimeMs, draining: loop.draining)
        return conn.keepsAlive(requestNumber: e.number, clientWants: e.clientKeepAlive, policy: policy,
                               keepaliveTimeoutMs: s.keepaliveTimeoutMs, now: nanos(now))
    }

    /// Answers the current request from Tether itself: `return`, or an error page.
    /// `allow`: the answer says `Allow: GET, HEAD` (a 405 from an admin page).
    private func respondLocal(status: Int, text: ByteBuffer? = nil, contentType: String = "text/plain", closeAfter: Bool = false, allow: Bool = false) {
        guard let e = ex else { return }
        let allowed = clientKeepAliveAllowed(e)
        if closeAfter { conn.pendingReason = .error }
        // An unread body of unknown size makes the connection unusable after an error.
        let keepAlive = allowed && !closeAfter && (e.requestBodyDone || e.discardBody)
        e.status = status
        e.closeAfter = !keepAlive
        e.responseStarted = true
        e.responseDone = true
        e.phase = .done
        e.discardBody = true
        if let up = e.upstream, let server = e.server {
            e.upstream = nil
            server.discard(up, reason: .notReusable)
        }
        balancerEnded(e)
        e.bytesSent = respond(status: status, text: text, contentType: contentType, serverTokens: e.route.settings.serverTokens, keepAlive: keepAlive, head: e.head, allow: allow)
        if !keepAlive {
            finishExchange()
            return
        }
        // The answer goes out now, even while the rest of the request body is read and dropped.
        flushIfNeeded()
        pumpRequestBody()
        if ex?.requestBodyDone == true { finishExchange() }
    }

    @discardableResult
    private func respond(status: Int, text: ByteBuffer?, contentType: String = "text/plain", serverTokens: Bool, keepAlive: Bool, head: ParsedHead?, allow: Bool = false) -> Int {
        loop.dateCache.refresh()
        var out = loop.allocator.buffer(capacity: 512)
        var answer = LocalAnswer(status: status, text: nil, contentType: contentType, serverTokens: serverTokens, allow: allow,
                                 keepAlive: keepAlive, clientMinor: head?.minorVersion ?? 1, isHEAD: head?.isHEAD == true,
                                 keepAliveHeader: ex?.route.keepAliveHeader ?? [])
        if let text {
            text.withUnsafeReadableBytes { p in
                answer.text = p
                answer.write(date: loop.dateCache.httpDate, into: &out)
            }
        } else {
            answer.write(date: loop.dateCache.httpDate, into: &out)
        }
        let n = out.readableBytes
        writeClient(out)
        return n
    }

    // MARK: Writing

    private func writeClient(_ buffer: ByteBuffer) {
        guard !conn.isClosed || ex != nil else { return }
        clientWrites.write(buffer, on: context)
    }

    /// Sends what was written; `promise` completes once all of it reached the socket.
    private func flushClient(promise: EventLoopPromise<Void>? = nil) {
        clientWrites.flush(on: context, promise: promise)
    }

    private func flushIfNeeded() {
        if clientWrites.pending { flushClient() }
    }

    private func flushAndClose() {
        timer?.cancel()
        timer = nil
        let ctx = context!
        flushClient()
        ctx.close(mode: .output, promise: nil)
        // After our FIN, wait briefly for the client's (lingering close, as nginx), then close.
        let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
        timer = loop.eventLoop.assumeIsolated().scheduleTask(in: .seconds(5)) { bound.value.close() }
    }

    /// Closes after what was written reaches the socket (a close at once would drop writes still
    /// queued). Small responses are written within the flush, so this closes at once then.
    private func closeWhenWritten() {
        timer?.cancel()
        timer = nil
        let ctx = context!
        let written = ctx.eventLoop.makePromise(of: Void.self)
        flushClient(promise: written)
        written.futureResult.assumeIsolated().whenComplete { _ in ctx.close(promise: nil) }
    }

    /// Closes now; `reason` (or the reason pending, see `ClientConnectionState.pendingReason`)
    /// is counted unless the connection was marked closed already.
    func close(_ reason: DownstreamCloseReason? = nil) {
        guard let ctx = context, ctx.channel.isActive else { return }
        if let r = conn.close(reason) { loop.stats.downstreamClosed[r] += 1 }
        clientWrites.discard()
        ctx.close(promise: nil)
    }

    /// Ends the connection with a reset (SO_LINGER 0): the client sees an error, not an end.
    private func reset() {
        guard let ctx = context, ctx.channel.isActive else { return }
        guard let provider = ctx.channel as? SocketOptionProvider else { close(); return }
        if let r = conn.close() { loop.stats.downstreamClosed[r] += 1 }
        clientWrites.discard()
        // Over TLS, a close_notify would tell the client the stream ended as it should.
        ctx.triggerUserOutboundEvent(TLSAbort(), promise: nil)
        provider.setSoLinger(linger(l_onoff: 1, l_linger: 0)).assumeIsolated().whenComplete { _ in ctx.close(promise: nil) }
    }

    /// Ends the connection now if it is between requests; otherwise after the current response.
    func drainIfIdle() {
        if conn.closesOnDrain(bufferedBytes: (inbound?.readableBytes ?? 0) > 0) {
            close(.shutdown)
        }
    }

    // MARK: Read interest and timers

    /// Pauses reading while the upstream cannot take more or too much is buffered; resumes otherwise.
    private func updateReadInterest() {
        let buffered = inbound?.readableBytes ?? 0
        var pause = buffered > readAheadLimit
        if let e = ex, !e.requestBodyDone || e.phase == .tunnel, let up = e.upstream, !up.isWritable { pause = true }
        if let e = ex, !e.requestBodyDone, e.upstream == nil, !e.discardBody, buffered > 0 { pause = buffered > 65536 }
        if pause {
            readPaused = true
        } else if readPaused {
            readPaused = false
            // The client was not to blame while Tether was not reading.
            lastClientRead = now
            if pendingRead {
                pendingRead = false
                context.read()
            }
        }
    }

    /// The exchange's earliest deadline and which timer it is (see `ExchangeTimer.next`).
    private func exchangeDeadline(_ e: Exchange) -> (timer: ExchangeTimer, deadline: Int64)? {
        let s = e.route.settings
        let facts = ExchangeTimer.Facts(
            requestBodyDone: e.requestBodyDone, readPaused: readPaused, lastClientRead: nanos(lastClientRead),
            clientUnwritableSince: unwritableSince.map(nanos), upstreamUnwritableSince: upstreamUnwritableSince.map(nanos),
            waitingForUpstream: e.upstream != nil && (e.phase == .head || e.phase == .body),
            lastUpstreamActivity: nanos(e.lastUpstreamActivity), readTimerRestart: nanos(readTimerRestart))
        return ExchangeTimer.next(facts, .init(clientBodyMs: s.clientBodyTimeoutMs, sendMs: s.sendTimeoutMs,
                                               proxySendMs: s.proxySendTimeoutMs, proxyReadMs: s.proxyReadTimeoutMs))
    }

    /// The next time something may expire on this connection: its own timer between requests,
    /// the exchange's during one.
    private func nextDeadline() -> NIODeadline? {
        let d: Int64?
        if conn.inExchange {
            d = ex.flatMap { exchangeDeadline($0)?.deadline }
        } else {
            d = conn.deadline
        }
        return d.map { NIODeadline.uptimeNanoseconds(UInt64(max(0, $0))) }
    }

    /// Called by the loop's sweep (see `LoopContext.sweepInterval`): acts on whatever deadline
    /// has passed, and returns the next one still ahead. There is no timer per connection, so
    /// nothing is scheduled or cancelled per request.
    func sweep(now: NIODeadline) -> NIODeadline? {
        guard !conn.isClosed, let deadline = nextDeadline() else { return nil }
        guard deadline <= now else { return deadline }
        timerFired()
        guard !conn.isClosed, let next = nextDeadline(), next > now else { return nil }
        return next
    }

    private func timerFired() {
        let now = nanos(.now())
        if conn.awaitingHead {
            switch conn.expired(bufferedBytes: (inbound?.readableBytes ?? 0) > 0) {
            case .requestTimeout:
                loop.logger.info("client timed out reading request head, client: \(String(decoding: remoteAddr, as: UTF8.self))")
                respondAndClose(status: 408, settings: defaultSettings)
            case .close(let reason):
                close(reason)
            case nil:
                break
            }
            return
        }
        guard conn.inExchange, let e = ex, let (timer, deadline) = exchangeDeadline(e), deadline <= now else { return }
        let s = e.route.settings  // only when a deadline passed, not per request
        switch timer {
        case .send:
            loop.logger.info("client timed out receiving the response, client: \(String(decoding: remoteAddr, as: UTF8.self))")
            close(.error)
        case .proxySend:
            upstreamFailed(.timeout, detail: "upstream timed out (not taking the request for \(Units.formatTime(s.proxySendTimeoutMs)))")
        case .clientBody:
            failRequest(status: 408, why: "client timed out sending the request body")
        case .proxyRead:
            upstreamFailed(.timeout, detail: "upstream timed out (no data for \(Units.formatTime(s.proxyReadTimeoutMs)))")
        }
    }

    // MARK: Head writing

    /// The request head for the upstream (see `HeadWriter.upstreamHead`).
    private func writeUpstreamHead(_ e: Exchange, into out: inout ByteBuffer) {
        let request = HeadWriter.UpstreamRequest(framing: e.requestFraming, upgradeOffer: e.upgradeOffer)
        e.head.bytes.withUnsafeReadableBytes { p in
            HeadWriter.upstreamHead(e.head.layout, p, route: e.route, request: request, variables: self, into: &out)
        }
    }

    /// The protocols of the request's `Upgrade` (with `Connection: upgrade`) that `allowed` names.
    static func upgradeOffer(_ head: ParsedHead, allowed: [String]) -> [UInt8]? {
        guard head.connectionUpgrade, let u = head.upgradeIndex else { return nil }
        return Upgrade.offer(Substring(head.value(head.headers[u])), allowed: allowed)
    }

    /// The response head for the client (see `HeadWriter.clientHead`).
    private func writeClientHead(_ head: ParsedHead, exchange e: Exchange, upgrading: Bool, into out: inout ByteBuffer) {
        let r = HeadWriter.ClientResponse(
            dropContentLength: e.relay != .verbatim, chunked: e.relay == .rechunk || e.relay == .chunkify, upgrading: upgrading,
            closeAfter: e.closeAfter, clientMinor: e.head.minorVersion, keepAliveHeader: e.route.keepAliveHeader)
        head.bytes.withUnsafeReadableBytes { p in HeadWriter.clientHead(head.layout, p, r, into: &out) }
    }

    // MARK: Variables

    /// The host the request is for, lowercase and without port: an absolute-form target's
    /// authority, else the Host field's (both validated by the parser).
    private func hostValue(_ head: ParsedHead) -> String? {
        guard head.hostStart >= 0 else { return nil }
        return head.string(head.hostStart, head.hostEnd).lowercased()
    }

    /// `$uri`: the normalised path.
    private func writeURI<S: HeadSink & ~Copyable>(_ head: ParsedHead, into out: inout S) {
        if let uri = head.path.uri {
            out.put(uri)
        } else {
            head.bytes.withUnsafeReadableBytes { p in out.put(UnsafeRawBufferPointer(rebasing: p[head.pathStart..<head.pathEnd])) }
        }
    }

    func writeTemplate<S: HeadSink & ~Copyable>(_ t: Template, into out: inout S) {
        HeadWriter.template(t, self, into: &out)
    }

    private static func millis(_ t: TimeAmount) -> Int64 { t.nanoseconds / 1_000_000 }

    func writeVariable<S: HeadSink & ~Copyable>(_ v: Variable, into out: inout S) {
        guard let e = ex else { return }
        let h = e.head
        switch v {
        case .host:
            out.put(hostValue(h) ?? servers[hosts.defaultIndex].server.names.first?.description ?? "")
        case .remoteAddr: out.put(remoteAddr)
        case .remotePort: out.putDecimal(remotePort)
        case .scheme: if isTLS { out.put("https") } else { out.put("http") }
        case .https: if isTLS { out.put("on") }
        case .sslProtocol: if let t = tlsInfo { out.put(t.info.version) }
        case .sslCipher: if let t = tlsInfo { out.put(t.info.cipher) }
        case .sslServerName: if let n = tlsInfo?.info.serverName { out.put(n) }
        case .sslSessionReused: if let t = tlsInfo { out.put(t.info.resumed ? "r" : ".") }
        case .requestURI: out.put(h.target)
        case .uri: writeURI(h, into: &out)
        case .args:
            let t = h.target
            if let q = t.firstIndex(of: "?") { out.put(t[t.index(after: q)...]) }
        case .requestMethod: out.put(h.method)
        case .request:
            out.put(h.method); out.put(" "); out.put(h.target); out.put(" HTTP/1."); out.putDecimal(h.minorVersion)
        case .proxyAddXForwardedFor:
            if let xff = h.value(named: "x-forwarded-for") {
                out.put(xff)
                out.put(", ")
            }
            out.put(remoteAddr)
        case .proxyHost:
            if case .proxy(let p) = e.route.action { out.put(p.proxyHost) }
        case .requestID:
            if e.requestID == nil {
                var g = SystemRandomNumberGenerator()
                e.requestID = (0..<2).map { _ in String(g.next() as UInt64, radix: 16).leftPad(16) }.joined()
            }
            out.put(e.requestID!)
        case .serverPort: out.putDecimal(serverPort)
        case .serverName: out.put(servers[hosts.server(forHost: hostValue(h))].server.names.first?.description ?? "")
        case .serverProtocol: out.put("HTTP/1."); out.putDecimal(h.minorVersion)
        case .status: out.putDecimal(e.status)
        case .bodyBytesSent: out.putDecimal(e.bodyBytesSent)
        case .bytesSent: out.putDecimal(e.bytesSent + e.bodyBytesSent)
        case .requestTime: out.putSeconds(milliseconds: Self.millis(NIODeadline.now() - e.startedAt))
        case .timeLocal: loop.dateCache.refresh(); out.put(loop.dateCache.localTime)
        case .timeISO8601: loop.dateCache.refresh(); out.put(loop.dateCache.iso8601)
        case .msec:
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            out.putSeconds(milliseconds: Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec / 1_000_000))
        case .remoteUser: out.put("-")
        case .upstreamAddr: out.put(e.upstreamAddrText.isEmpty ? "-" : e.upstreamAddrText)
        case .upstreamStatus: if e.upstreamStatus == 0 { out.put("-") } else { out.putDecimal(e.upstreamStatus) }
        case .upstreamConnectTime:
            if let s = e.connectStartedAt, let c = e.connectedAt { out.putSeconds(milliseconds: Self.millis(c - s)) }
            else if e.reused { out.put("0.000") } else { out.put("-") }
        case .upstreamHeaderTime:
            if let a = e.headerAt { out.putSeconds(milliseconds: Self.millis(a - e.startedAt)) } else { out.put("-") }
        case .upstreamResponseTime:
            if e.upstreamStatus != 0 { out.putSeconds(milliseconds: Self.millis(NIODeadline.now() - e.startedAt)) } else { out.put("-") }
        case .upstreamReused: out.put(e.server == nil ? "-" : e.reused ? "1" : "0")
        case .connection: out.putDecimal(UInt(bitPattern: ObjectIdentifier(self).hashValue) % 1_000_000_000)
        case .connectionRequests: out.putDecimal(conn.requests)
        case .httpHeader(let name):
            if let v = h.value(named: name) { out.put(v) }
        case .sentHTTPHeader: break
        }
    }

    private func accessLog(_ e: Exchange) {
        guard loop.accessLog != nil else { return }
        for entry in e.route.settings.accessLog {
            guard case .file(let path, let formatName) = entry else { continue }
            let format = formatName == "combined" ? LogFormat.combined : loop.setup.configuration.logFormats[formatName]
            guard let format else { continue }
            var line = loop.allocator.buffer(capacity: 256)
            for part in format.template.parts {
                switch part {
                case .literal(let s): line.writeString(s)
                case .variable(let v):
                    let mark = line.writerIndex
                    writeVariable(v, into: &line)
                    if line.writerIndex == mark { line.writeStaticString("-") }
                }
            }
            line.writeStaticString("\n")
            loop.log(path: path, line)
        }
    }
}

extension String {
    func leftPad(_ n: Int, _ c: Character = "0") -> String {
        count >= n ? self : String(repeating: c, count: n - count) + self
    }
}

public let tetherVersion = "0.1.0"
