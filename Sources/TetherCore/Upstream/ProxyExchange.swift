#if canImport(Glibc)
import Glibc
#endif
import TetherConfig
import TetherHTTP
import TetherIO
import TetherTLS
import TetherPool

/// One request on its way through an upstream connection and its answer on the way back, on
/// Tether's own loop, as its location says: the balancer picks a server, the server's pool
/// lends a connection, the request head goes upstream as `HeadWriter` writes it (hop-by-hop
/// lines dropped, `proxy_set_header` applied, the body's framing canonical), the response
/// head comes back parsed and rewritten, and the body is relayed as `ResponsePlan` says:
/// Content-Length and close-delimited bodies by moving the upstream's buffers to the client
/// (no copy), chunked ones re-framed canonically (their data copied into the client's queue:
/// the size lines sit between the data), a close-delimited body chunked to an HTTP/1.1 client
/// so that it can stay alive. Failures go through `NextUpstream` (pure decisions, tested on
/// their own): a reused connection that failed before any response byte is retried once on
/// a fresh one, `proxy_next_upstream` sends the request to another server, otherwise 502/504,
/// and a response cut after its head ends the client connection (with a reset where a FIN
/// would make the cut look complete). The connection goes back to the pool when the response
/// ended cleanly.
final class ProxyExchange: UpstreamLinkOwner {
    /// What the exchange knows of its request, fixed when it starts.
    struct Request {
        var isHEAD: Bool
        var idempotent: Bool
        var minorVersion: Int
        /// nginx's keep-alive rules allow the client connection to stay after the answer.
        var clientKeepAlive: Bool
        /// How the body goes upstream.
        var framing: BodyFraming
    }

    /// The protocols of the request's `Upgrade` the location allows, as they go upstream; a 101
    /// must switch to one of them. (Kept out of `Request`, which is copied on every request: an
    /// array in it cost a retain and a release each time.)
    var upgradeOffer: [UInt8]?

    /// The client connection: not counted (it holds the exchange while the exchange is its
    /// current one, and the exchange stops calling it when it goes: `clientGone`). The hot
    /// paths call it through `client { … }`, which retains nothing around the call;
    /// `connection` is the counted object, for the rest.
    private var client: Unretained<ClientConnection>
    private var connection: ClientConnection { client.object }
    /// The client's queue has room (a read through `client`: no retain).
    private var clientTakesMore: Bool { client { $0.clientTakesMore } }
    /// Fixed for the object's life: spare exchanges are kept per upstream (`LoopUpstream.exchange`).
    let upstream: LoopUpstream
    private(set) var route: CompiledLocation
    /// `route.serverIndex`, read on every answer without retaining the route.
    private(set) var serverIndex: Int
    private var request: Request
    /// The location's settings this exchange reads on every event, copied out of `route` (a
    /// variable since exchanges are reused: reading through it costs a retain each time).
    // The location's settings, read where they are needed (not copied per request: the set
    // of conditions would cost a retain and a release each time).
    private var readTimeoutMs: Int64 { route.settings.proxyReadTimeoutMs }
    private var sendTimeoutMs: Int64 { route.settings.proxySendTimeoutMs }
    private var nextUpstream: Set<NextUpstreamCondition> { route.settings.proxyNextUpstream }
    private var nextUpstreamTries: Int { route.settings.proxyNextUpstreamTries }
    /// The request head as written for the upstream, kept while the request may be sent again
    /// (until a response head arrives, or the first body byte goes).
    private var savedHead: IOBuffer?
    private var link: UpstreamLink?
    private var server = -1
    /// The balancer counts this exchange as active on `server`.
    private var active = false
    private var tried = PeerSet()
    private var tries = 0
    private var reused = false
    /// How long the reused connection had idled (the window a failure on it teaches).
    private var idleMsAtLease: Int64 = 0
    private var retriedFresh = false
    /// Some byte of a response arrived on the current connection (so it did not fail stale).
    private var responseBytes = false
    private var bodyStarted = false
    private(set) var requestBodyDone: Bool
    private var plan: ResponsePlan?
    private var remaining: Int64 = 0
    private var decoder = ChunkedDecoder()
    private var upstreamReusable = true
    private var headSent = false
    private var finished = false
    /// A 101 switched the connection to the offered protocol: bytes flow both ways untouched
    /// until either side closes.
    private(set) var isTunnel = false
    /// The client left after its whole request was sent: the answer is read and dropped so that
    /// its upstream connection can be kept, if it ends within `drainBudget` more bytes (and
    /// `proxy_read_timeout`). Nothing touches the client connection from then on.
    private var draining = false
    private var drainBudget = 0
    /// The client connection is gone (it may be freed): nothing may call it any more.
    private var clientGone = false
    static let drainLimit = 64 * 1024
    /// When the request went to the current connection (the loop's clock): the response time.
    private var sentAt: UInt64 = 0
    /// For the access log: the request's drafted part (its capacity kept from one request to the
    /// next), when the request started, and the answer's facts as they come.
    var logDraft: [UInt8] = []
    var logStartedAt: UInt64 = 0
    /// The location logs this request (`access_log`).
    var logging = false
    private(set) var status = 0
    /// The response's `Keep-Alive: timeout=, max=`, for the pool (the backend's own limits).
    private var backendKeepAlive: ConnectionPool<Handle>.BackendKeepAlive?
    /// Request body data bytes sent (for `client_max_body_size` of a chunked body).
    private(set) var requestBodyBytes: Int64 = 0
    private(set) var headBytes = 0
    private(set) var bodyBytes = 0
    private var connectNs: Int64 = -1
    private var headerNs: Int64 = -1
    /// The loop pass in which it was retired (`LoopUpstream.retire`).
    var retiredPass: UInt64 = 0
    /// Waiting in the upstream's `queue` for a server below its `max_conns`, since `queuedAt`.
    var isQueued = false
    var queuedAt: UInt64 = 0

    // MARK: Buffering (proxy_request_buffering, proxy_buffering)

    /// The buffering state's flags, in one byte (`reuse` clears them with one store).
    private struct Flags: OptionSet {
        let rawValue: UInt8
        static let bodyBuffered = Flags(rawValue: 1 << 0)
        static let bodyUnsent = Flags(rawValue: 1 << 1)
        static let responseBuffered = Flags(rawValue: 1 << 2)
        static let spooled = Flags(rawValue: 1 << 3)
        static let spoolReady = Flags(rawValue: 1 << 4)
        mutating func set(_ f: Flags, _ on: Bool) { if on { insert(f) } else { remove(f) } }
    }
    private var flags = Flags()

    /// The request body held until it is whole, then the response held while the client is
    /// slower than the upstream: made on first use and kept with the exchange (spares reuse it).
    private var spool: Spool?
    /// `proxy_request_buffering`: the body goes into the spool, and a server is chosen once it is whole.
    private var bodyBuffered: Bool { get { flags.contains(.bodyBuffered) } set { flags.set(.bodyBuffered, newValue) } }
    /// Buffered body bytes not handed to the upstream connection yet.
    private var bodyUnsent: Bool { get { flags.contains(.bodyUnsent) } set { flags.set(.bodyUnsent, newValue) } }
    /// `proxy_buffering`: response bytes the client cannot take now go into the spool, and the
    /// upstream is read on.
    private var responseBuffered: Bool { get { flags.contains(.responseBuffered) } set { flags.set(.responseBuffered, newValue) } }
    /// The spool holds response bytes the client has not taken yet.
    private var spooled: Bool { get { flags.contains(.spooled) } set { flags.set(.spooled, newValue) } }
    /// The spool was configured for this response (`spoolHasRoom`).
    private var spoolReady: Bool { get { flags.contains(.spoolReady) } set { flags.set(.spoolReady, newValue) } }
    /// `server … proxy_protocol`: the PROXY protocol v2 header for this request's client, made
    /// while the client connection is sure to be there, written first on such a server's connection.
    private var proxyHeader: [UInt8]?
    /// A temp file failed; the exchange fails with it (the request: 500; a response: cut).
    private(set) var spoolFailure: IOError?

    init(connection: ClientConnection, upstream: LoopUpstream, route: CompiledLocation, request: Request) {
        client = Unretained(connection)
        self.upstream = upstream
        self.route = route
        serverIndex = route.serverIndex
        self.request = request
        requestBodyDone = request.framing == .none
    }

    /// Makes an ended exchange (from the upstream's spares: see `LoopUpstream.exchange`) new for
    /// another request: every field as `init` leaves it.
    func reuse(connection: ClientConnection, route: CompiledLocation, request: Request) {
        precondition(link == nil && savedHead == nil && !active, "reuse of an exchange still under way")
        client = Unretained(connection)
        self.route = route
        serverIndex = route.serverIndex
        self.request = request
        requestBodyDone = request.framing == .none
        server = -1
        tried = PeerSet()
        isQueued = false
        tries = 0
        reused = false
        retriedFresh = false
        responseBytes = false
        bodyStarted = false
        plan = nil
        remaining = 0
        decoder = ChunkedDecoder()
        upstreamReusable = true
        headSent = false
        finished = false
        isTunnel = false
        if upgradeOffer != nil { upgradeOffer = nil }
        draining = false
        clientGone = false
        logging = false
        status = 0
        backendKeepAlive = nil
        requestBodyBytes = 0
        headBytes = 0
        bodyBytes = 0
        connectNs = -1
        headerNs = -1
        sentAt = 0
        flags = []
        if spoolFailure != nil { spoolFailure = nil }
        if proxyHeader != nil { proxyHeader = nil }
    }

    /// Whether a failure before any response byte may send the request again (RFC 9110 9.2.2,
    /// and nginx's `non_idempotent`): nothing of a body was sent, and the method allows it.
    private var mayRetry: Bool {
        !bodyStarted && request.framing == .none && (request.idempotent || nextUpstream.contains(.nonIdempotent))
    }

    // MARK: From the client connection

    /// Writes the upstream request head (with the request's variables, which are valid during
    /// this call only) and sends it to a server. False when the head does not fit one pool
    /// buffer: the caller refuses the request (431) before anything was sent.
    func start<V: VariableSource>(_ head: HeadLayout, _ bytes: UnsafeRawBufferPointer, variables: V) -> Bool {
        var sink = BufferSink(IOBuffer.take(from: upstream.bufferRef))
        let r = HeadWriter.UpstreamRequest(framing: request.framing, upgradeOffer: upgradeOffer)
        HeadWriter.upstreamHead(head, bytes, route: route, request: r, variables: variables, into: &sink)
        let overflowed = sink.overflowed
        let written = sink.take()
        guard !overflowed else {
            written.recycle(to: upstream.bufferRef)
            return false
        }
        savedHead = consume written
        if upstream.sendsProxyProtocol, let (source, destination) = connection.clientAddresses() {
            proxyHeader = ProxyProtocol.v2Header(source: source, destination: destination)
        }
        if request.framing != .none && route.settings.proxyRequestBuffering {
            // The body is read whole before a connection is taken for it (`requestBodyFinished`).
            bodyBuffered = true
            bodyUnsent = true
            useSpool(memory: route.settings.clientBodyBufferSize, file: .max, directory: route.settings.clientBodyTempPath)
            return true
        }
        connectNext()
        return true
    }

    /// The spool, configured for its next use.
    private func useSpool(memory: Int, file: Int64, directory: String) {
        if spool == nil { spool = Spool(pool: upstream.buffers) }
        spool!.configure(memoryLimit: memory, fileLimit: file, directory: directory)
    }

    /// Empties the spool (the exchange is over, or its request body is no longer wanted).
    func dropSpool() {
        spooled = false
        if let spool, !spool.isEmpty || spool.hasFile { spool.reset() }
    }

    /// Keeps request body or response bytes in the spool (the buffer itself while memory takes
    /// them); a failure is kept for `spoolFailure`, and the bytes are dropped with it.
    private func spoolAppend(_ chunk: consuming IOBuffer, request: Bool) {
        guard spoolFailure == nil else { return chunk.recycle(to: upstream.bufferRef) }
        let hadFile = spool!.hasFile
        do throws(IOError) { try spool!.append(chunk) } catch { return spoolFailed(error, request: request) }
        if !hadFile && spool!.hasFile { noteTempFile(request: request) }
    }

    private func spoolAppend(copying bytes: UnsafeRawBufferPointer, request: Bool) {
        guard spoolFailure == nil else { return }
        let hadFile = spool!.hasFile
        do throws(IOError) { try spool!.append(copying: bytes) } catch { return spoolFailed(error, request: request) }
        if !hadFile && spool!.hasFile { noteTempFile(request: request) }
    }

    /// nginx's warning when a body goes to a temp file (it tells to raise the memory buffers).
    @inline(never)
    private func noteTempFile(request: Bool) {
        upstream.log(.warn, request ? "a client request body is buffered to a temporary file in \"\(route.settings.clientBodyTempPath)\""
                                    : "an upstream response is buffered to a temporary file in \"\(route.settings.proxyTempPath)\" while talking to upstream \"\(upstream.name)\"")
    }

    @inline(never)
    private func spoolFailed(_ e: IOError, request: Bool) {
        spoolFailure = e
        upstream.log(.crit, "\(e) on a temporary file in \"\(request ? route.settings.clientBodyTempPath : route.settings.proxyTempPath)\"")
    }

    /// Request body bytes, already in the framing the upstream gets. Dropped when no connection
    /// carries the request any more (it failed; the client is being answered).
    func sendBody(_ chunk: consuming IOBuffer) {
        if bodyBuffered && !finished { return spoolAppend(chunk, request: true) }
        guard let l = link, !finished else { return chunk.recycle(to: upstream.bufferRef) }
        bodyStarted = true
        dropSavedHead()
        l.write(chunk)
        // The backend stopped taking the request: proxy_send_timeout runs from now.
        if l.isBackedUp { armTimer(l) }
    }

    func sendBody(copying bytes: UnsafeRawBufferPointer) {
        if bodyBuffered && !finished { return spoolAppend(copying: bytes, request: true) }
        guard let l = link, !finished else { return }
        bodyStarted = true
        dropSavedHead()
        l.write(copying: bytes)
        if l.isBackedUp { armTimer(l) }
    }

    /// The response head went to the client: nothing else may answer this request now.
    var responseStarted: Bool { headSent }

    /// nginx's keep-alive rules allowed the client connection to stay after this request, and
    /// its body was read whole: an answer made here (a 502) need not close it.
    var clientKeepAlive: Bool { request.clientKeepAlive && requestBodyDone }
    var clientMinor: Int { request.minorVersion }

    /// The request body was read to its end: the wait for the answer begins (proxy_read_timeout).
    func requestBodyFinished() {
        requestBodyDone = true
        if bodyBuffered {
            // A temp file failed: the client connection answers 500 (`spoolFailure`).
            if spoolFailure != nil || finished { return }
            return connectNext()
        }
        if let l = link { armTimer(l) }
    }

    /// Hands the buffered body to the upstream connection as far as it takes it (the rest
    /// follows on `upstreamDrained`).
    private func sendSpooledBody(_ l: UpstreamLink) {
        guard let spool else { return }
        while !l.isBackedUp {
            let front: IOBuffer?
            do throws(IOError) { front = try spool.takeFront() } catch {
                spoolFailed(error, request: true)
                return failed(.error, "the buffered request body could not be read back")
            }
            guard let b = front else { break }
            if !bodyStarted {
                bodyStarted = true
                dropSavedHead()
            }
            l.write(b)
        }
        if spool.isEmpty {
            bodyUnsent = false
            spool.reset()
        }
        armTimer(l)
    }

    /// `n` bytes of a chunked body's data went upstream (framing not counted).
    func countRequestBody(_ n: Int) { requestBodyBytes += Int64(n) }

    /// A length-framed answer with more left than a drain may read.
    private var remainingBeyondDrain: Bool {
        if case .length? = plan?.framing { return remaining > Int64(Self.drainLimit) }
        return false
    }

    /// The drain did not end cleanly (too long, a failure, a timeout): the connection closes.
    private func abandonDrain() {
        draining = false
        finished = true
        if let l = link { pool.discard(l, reason: .clientAbort) }
        link = nil
        endOnBalancer()
    }

    /// The link's one timer, for whichever side holds things up now (`ExchangeTimer`'s rules):
    /// proxy_send_timeout while the backend does not take the request, proxy_read_timeout once
    /// the request is sent and the client takes the answer; none while the client is still
    /// sending its body (that is client_body_timeout's) or not reading the answer.
    private func armTimer(_ l: UpstreamLink) {
        if !requestBodyDone || bodyUnsent {
            if l.isBackedUp { l.armTimer(milliseconds: sendTimeoutMs) } else if bodyUnsent { l.armTimer(milliseconds: readTimeoutMs) } else { l.cancelTimer() }
        } else if headSent && !clientGone && !clientTakesMore && !(responseBuffered && spoolHasRoom) {
            l.cancelTimer()
        } else {
            l.armTimer(milliseconds: readTimeoutMs)
        }
    }

    /// The upstream takes no more body now (its queue is at the limit); `upstreamDrained` tells
    /// the client connection to go on.
    var bodyBlocked: Bool { !bodyBuffered && (isQueued || (link?.isBackedUp ?? false)) }

    /// The client's socket took what was queued: read on from the upstream.
    func clientDrained() {
        if spooled {
            guard pumpSpool() else { return }
            if finished {
                // The upstream's part ended before the client took the rest: the answer ends
                // once the spool is empty.
                if !spooled { connection.exchangeEnded(keepAlive: plan?.clientKeepAlive ?? false) }
                return
            }
        }
        if let l = link, headSent {
            armTimer(l)
            upstreamReadable(l)
        }
    }

    /// The client went away. When its whole request went upstream and the answer can end soon
    /// and cleanly (length or chunked framing, at most 64 KiB more), the rest of the answer is
    /// read and dropped so that the connection goes back to the pool; otherwise the upstream
    /// connection cannot be trusted with a half-read answer and is closed (`client_abort`).
    func clientLeft() {
        dropSpool()
        clientGone = true
        guard !finished else { return }
        // A client that leaves while its request waits leaves the queue at once.
        if isQueued { upstream.leaveQueue(self) }
        if let l = link, l.phase == .leased, requestBodyDone, !bodyUnsent, l.outboundBytes == 0, !isTunnel, !l.peerClosed,
           plan.map({ $0.framing != .untilClose }) ?? true, !(plan != nil && remainingBeyondDrain) {
            draining = true
            drainBudget = Self.drainLimit
            dropSavedHead()
            l.armTimer(milliseconds: readTimeoutMs)
            return
        }
        finished = true
        if let l = link { pool.discard(l, reason: .clientAbort) }
        link = nil
        endOnBalancer()
        dropSavedHead()
    }

    /// What the access log says of the answer so far: `status` is the client's if it differs from
    /// the upstream's (a 502 made here, a client that left: 499).
    func answerFacts(status answered: Int? = nil, headBytes localHead: Int = 0, bodyBytes localBody: Int = 0) -> AnswerFacts {
        let address = server >= 0 && server < upstream.pools.count ? upstream.pools[server].addressText : ""
        let u = UpstreamFacts(address: address, status: status, connectNs: connectNs, headerNs: headerNs,
                              responseNs: sentAt == 0 ? -1 : Int64(upstream.loop.now &- sentAt), reused: reused)
        return AnswerFacts(status: answered ?? status, headBytes: headBytes + localHead, bodyBytes: bodyBytes + localBody,
                           upstream: server >= 0 ? u : nil)
    }

    // MARK: Servers and connections

    private var pool: UpstreamPool { upstream.pools[server] }
    /// Calls on the server's pool, with nothing retained around them (the upstream holds its
    /// pools for its whole life, and the exchange holds the upstream).
    @inline(__always) private func onPool<R>(_ i: Int, _ body: (UpstreamPool) -> R) -> R { upstream.poolRef(i)(body) }

    /// Picks a server not tried yet and sends the request on a connection to it. Servers at
    /// their `max_conns` with no idle connection on this loop are passed over (as nginx's
    /// balancer does); when every candidate is, the request waits in the upstream's `queue`, or
    /// without one gets a 502 (no live upstreams).
    private func connectNext(front: Bool = false) {
        var full = PeerSet()
        var failing = PeerSet()
        if upstream.checked {
            // Servers that fail their health checks are not tried (as nginx Plus).
            for i in upstream.pools.indices where !upstream.isHealthy(i) { failing.insert(i) }
        }
        while true {
            let exclude = full.isEmpty && failing.isEmpty ? tried : tried.union(full).union(failing)
            guard let i = upstream.balancer.select(now: upstream.nowMs, exclude: exclude) else {
                if !full.isEmpty { return waitForRoom(full: full, front: front) }
                upstream.groupFailures[.noLiveUpstreams] += 1
                upstream.log(.error, "no live upstreams while connecting to upstream \"\(upstream.name)\"")
                return answer(502)
            }
            if !upstream.hasRoom(i) {
                full.insert(i)
                continue
            }
            upstream.balancer.started(i)
            let (l, e) = onPool(i) { $0.lease(for: self) }
            if l == nil && e == UpstreamPool.atCapacity {
                // Another loop took the last slot meanwhile.
                upstream.balancer.ended(i)
                full.insert(i)
                continue
            }
            server = i
            tried.insert(i)
            tries += 1
            active = true
            guard let l else { return failed(e == ETIMEDOUT ? .timeout : .error, Self.callFailed("connect", e)) }
            return send(on: l)
        }
    }

    /// Every server it may go to is at its cap: it waits in the queue, or is refused.
    private func waitForRoom(full: PeerSet, front: Bool) {
        guard let limits = upstream.limits, limits.queueSize.load(ordering: .relaxed) > 0 else {
            upstream.groupFailures[.noLiveUpstreams] += 1
            upstream.log(.error, "no live upstreams while connecting to upstream \"\(upstream.name)\" (every server is at its max_conns)")
            return answer(502)
        }
        guard upstream.enqueue(self, full: full, front: front) else {
            upstream.groupFailures[.queueFull] += 1
            return refuseFromQueue(timedOut: false)
        }
    }

    /// Taken out of the queue because a server has room: it goes now (or, having lost the slot
    /// to another loop, waits again at the front).
    func dequeuedToGo() {
        guard !finished else { return }
        connectNext(front: true)
        // The client connection held the body back while the request waited.
        if link != nil && !requestBodyDone && !clientGone { client { $0.upstreamTakesBody() } }
    }

    /// A 503 with `Retry-After`, as nginx Plus and HAProxy answer an overflowing queue: the
    /// queue is full, or the request waited its whole `timeout`.
    func refuseFromQueue(timedOut: Bool) {
        let timeoutMs = Int64(upstream.limits?.queueTimeoutMs.load(ordering: .relaxed) ?? 0)
        upstream.log(.error, timedOut ? "request waited \(Units.formatTime(timeoutMs)) in the queue of upstream \"\(upstream.name)\" (every server at its max_conns), answering 503"
                                      : "the queue of upstream \"\(upstream.name)\" is full (every server at its max_conns), answering 503")
        if clientGone { return abandonDrain() }
        finished = true
        dropSavedHead()
        connection.exchangeFailed(status: 503, responseStarted: false, retryAfter: 1)
    }

    private func send(on l: UpstreamLink) {
        link = l
        reused = l.reused
        idleMsAtLease = l.reused ? l.idleMsAtLease : 0
        responseBytes = false
        sentAt = upstream.loop.now
        connectNs = l.reused ? 0 : -1
        headerNs = -1
        guard let head = savedHead.take() else { return }
        if let h = proxyHeader, pool.sendsProxyProtocol { h.withUnsafeBytes { l.write(copying: $0) } }
        if mayRetry {
            head.withReadableBytes { l.write(copying: $0) }
            savedHead = consume head
        } else {
            l.write(head)
        }
        // A connection still connecting runs the connect timeout; the read timeout starts once it is up.
        if bodyUnsent { return sendSpooledBody(l) }
        armTimer(l)
    }

    private func dropSavedHead() {
        if let h = savedHead.take() { h.recycle(to: upstream.bufferRef) }
    }

    private func endOnBalancer() {
        guard active else { return }
        active = false
        upstream.balancer.ended(server)
    }

    /// `connect() failed (111: Connection refused)`, as nginx words a failed call.
    static func callFailed(_ call: String, _ e: Int32) -> String {
        "\(call)() failed (\(e): \(String(cString: strerror(e))))"
    }

    /// The error-log line of a failure (`why`, then where, then what follows), as nginx's.
    private func log(_ level: Configuration.LogLevel, _ why: @autoclosure () -> String, _ then: String) {
        let address = server >= 0 && server < upstream.pools.count ? upstream.pools[server].addressText : "?"
        upstream.log(level, "\(why()) while talking to upstream \"\(upstream.name)\" server \(address)\(then)")
    }

    /// The upstream failed before the response was complete: `NextUpstream` decides what follows,
    /// and the error log says why (`why` is made only then: nothing is formatted on the way).
    private func failed(_ kind: UpstreamFailureKind, _ why: @autoclosure () -> String) {
        guard !finished else { return }
        if draining { return abandonDrain() }
        if let l = link {
            link = nil
            pool.discard(l, reason: .error)
        }
        endOnBalancer()
        let facts = NextUpstream.Facts(
            responseStarted: headSent, closeDelimitedToClient: plan?.closeDelimitedToClient ?? false,
            reused: reused && !responseBytes, retriedFresh: retriedFresh, replayable: mayRetry && savedHead != nil, tries: tries,
            conditions: nextUpstream, maxTries: nextUpstreamTries, requestBodyDone: requestBodyDone)
        let now = upstream.nowMs
        let action = NextUpstream.afterFailure(kind, facts) { upstream.balancer.hasCandidate(now: now, exclude: tried) }
        switch action {
        case .abort(let reset, let counted):
            // Part of the response went out: the client sees an incomplete message, never a
            // wrong or complete-looking one.
            pool.failures[counted] += 1
            log(.error, why(), ", after part of the response was sent: the client connection is cut")
            finished = true
            dropSavedHead()
            dropSpool()
            connection.exchangeAborted(reset: reset)
        case .retryFresh:
            pool.reusedConnectionFailed(idleMs: idleMsAtLease)
            pool.retries[.reusedConnectionClosed] += 1
            retriedFresh = true
            upstream.balancer.started(server)
            active = true
            let (l, e) = pool.connectFresh(for: self)
            guard let l else {
                let why = e == UpstreamPool.atCapacity ? "no connection slot left under max_conns for the retry" : Self.callFailed("connect", e)
                return failed(e == ETIMEDOUT ? .timeout : .error, why)
            }
            send(on: l)
        case .nextServer:
            log(.warn, why(), ", trying the next server")
            upstream.balancer.failed(server, now: now)
            pool.retries[.nextUpstream] += 1
            connectNext()
        case .respond(let status, _, let counted):
            log(.error, why(), ", answering \(status)")
            upstream.balancer.failed(server, now: now)
            pool.failures[counted] += 1
            answer(status)
        }
    }

    /// Answers the client with `status` (nothing of a response was sent) and ends.
    private func answer(_ status: Int) {
        // A drain that went to another server (proxy_next_upstream) and found none: there is
        // no client to answer any more.
        if clientGone { return abandonDrain() }
        finished = true
        dropSavedHead()
        connection.exchangeFailed(status: status, responseStarted: false)
    }

    // MARK: UpstreamLinkOwner

    func upstreamConnected(_ link: UpstreamLink) {
        connectNs = Int64(upstream.loop.now &- link.connectStarted)
        armTimer(link)
    }

    func upstreamConnectFailed(_ link: UpstreamLink, errno: Int32) {
        self.link = nil
        // EPROTO: the TLS handshake failed (its reason is logged by the pool, with OpenSSL's words).
        failed(errno == ETIMEDOUT ? .timeout : .error, errno == EPROTO ? "TLS handshake with upstream failed" : Self.callFailed("connect", errno))
    }

    func upstreamClosed(_ link: UpstreamLink, errno: Int32?) {
        self.link = nil
        switch errno {
        case TLSSocket.raggedEnd?: failed(.error, "upstream closed the TLS connection without close_notify: the response may be truncated")
        case let e?: failed(.error, Self.callFailed("recv", e))
        case nil: failed(.error, "upstream prematurely closed connection")
        }
    }

    func upstreamTimedOut(_ link: UpstreamLink) {
        if !requestBodyDone {
            return failed(.timeout, "upstream timed out (the request was not taken for \(Units.formatTime(sendTimeoutMs)))")
        }
        failed(.timeout, "upstream timed out (no data for \(Units.formatTime(Int64(readTimeoutMs))))")
    }

    /// The request body may flow again.
    func upstreamDrained(_ link: UpstreamLink) {
        if bodyUnsent { return sendSpooledBody(link) }
        guard !clientGone else { return }
        armTimer(link)
        client { $0.upstreamTakesBody() }
    }

    func upstreamReadable(_ link: UpstreamLink) {
        var progressed = false
        while !finished {
            // Backpressure: while the client is not taking the answer, the upstream's bytes wait
            // in its socket (`clientDrained` resumes, on the client's next writable edge). Write
            // first: a socket that takes the whole queue gives no edge, and nothing would resume.
            if !draining && (spooled || !clientTakesMore) {
                if spooled && clientTakesMore {
                    guard pumpSpool() else { return }
                }
                if !clientTakesMore {
                    client { $0.flushFromUpstream() }
                    guard !finished else { break }
                }
                // proxy_buffering: the upstream is read on into the spool while it has room.
                if spooled || !clientTakesMore {
                    guard responseBuffered, spoolHasRoom else { break }
                }
            }
            let more = link.read()
            guard link.isOpen, self.link === link else { return }
            if link.inboundBytes > 0 { responseBytes = true; progressed = true }
            if !headSent, !parseHead(link) {
                // parseHead may have failed the exchange or sent it to another connection.
                guard !finished, self.link === link else { break }
                if link.peerClosed {
                    // Closed before a whole head: a stale reused connection (retried where
                    // safe) or a backend that gave up.
                    failed(.error, "upstream prematurely closed connection before a whole response head")
                    break
                }
                if !more { break }
                continue
            }
            if headSent && !finished { relayBody(link) }
            if spoolFailure != nil && !finished {
                failed(.error, "a temporary file of the response failed")
                break
            }
            if draining && drainBudget < 0 { abandonDrain() }
            if finished { break }
            if link.peerClosed {
                endOfStream(link)
                break
            }
            if !more { break }
        }
        if clientGone { return }
        if progressed && !finished { armTimer(link) }
        client { $0.flushFromUpstream() }
        // The client took everything queued without a full socket: no writable edge will come
        // for what waits in the spool.
        if spooled && !clientGone && clientTakesMore { clientDrained() }
    }

    // MARK: Response

    /// `proxy_next_upstream http_NNN`: whether this status sends the request to another server
    /// (the facts are gathered only for such a status: the set of conditions costs a retain).
    @inline(never)
    private func retryOnStatus(_ status: Int) -> NextUpstreamCondition? {
        let facts = NextUpstream.Facts(
            responseStarted: false, closeDelimitedToClient: false, reused: reused, retriedFresh: retriedFresh,
            replayable: mayRetry && savedHead != nil, tries: tries, conditions: nextUpstream,
            maxTries: nextUpstreamTries, requestBodyDone: requestBodyDone)
        let now = upstream.nowMs
        return NextUpstream.afterStatus(status, facts, hasCandidate: { upstream.balancer.hasCandidate(now: now, exclude: tried) })
    }

    /// Parses the response head in the link's buffer and writes the client's; false while incomplete.
    private func parseHead(_ link: UpstreamLink) -> Bool {
        guard var buf = link.takeInbound() else { return false }
        var layout = HeadLayout()
        // The header index lives in the upstream's scratch storage (no allocation per response)
        // and goes back to it whichever way this returns (its fields are cleared by the next parse).
        var headers: [HeaderField] = []
        swap(&headers, &upstream.headerScratch)
        defer {
            if layout.headers.capacity > headers.capacity { swap(&layout.headers, &upstream.headerScratch) } else { swap(&headers, &upstream.headerScratch) }
        }
        let outcome = buf.withReadableBytes { p in HeadParser.parse(p, kind: .response, limits: .response, headers: &headers, into: &layout) }
        guard case .complete(let start, let consumed) = outcome else {
            link.putBack(buf)
            if case .error(let e) = outcome { failed(.invalidHeader, "upstream sent an invalid response head (\(e))") }
            return false
        }
        let upgrading = layout.status == 101
        if upgrading {
            if let refusal = buf.withReadableBytes({ p in refusesUpgrade(layout, UnsafeRawBufferPointer(rebasing: p[start..<consumed])) }) {
                link.putBack(buf)
                failed(.invalidHeader, refusal)
                return false
            }
        } else if layout.status < 200 {
            // 100 Continue and other interim answers are not relayed.
            buf.consume(consumed)
            link.putBack(buf)
            return parseHead(link)
        }
        if !draining, NextUpstream.condition(forStatus: layout.status) != nil, let c = retryOnStatus(layout.status) {
            // proxy_next_upstream http_NNN: this answer is not relayed; another server gets the request.
            link.putBack(buf)
            self.link = nil
            pool.discard(link, reason: .notReusable)
            endOnBalancer()
            if NextUpstream.countsAsServerFailure(c) { upstream.balancer.failed(server, now: upstream.nowMs) }
            pool.retries[NextUpstream.retryReason(c)] += 1
            connectNext()
            return false
        }
        upstream.balancer.succeeded(server)
        dropSavedHead()
        if bodyUnsent {
            // Answered before the whole body went: the rest is not sent (and the connection is
            // not kept, `finish`).
            dropSpool()
        }
        let framing = layout.responseFraming(requestIsHEAD: request.isHEAD, upgrading: upgrading)
        if draining { return drainHead(layout, framing: framing, upgrading: upgrading, consumed: consumed, buf, link) }
        let plan = ResponsePlan(framing: framing, upgrading: upgrading, headKeepsConnection: layout.keepsConnection,
                                request: .init(minorVersion: request.minorVersion, keepAliveAllowed: client { $0.keepsAliveAtResponse(request.clientKeepAlive) },
                                               bodyDone: requestBodyDone, upstreamHTTP10: route.proxyHTTP10))
        self.plan = plan
        upstreamReusable = plan.upstreamReusable
        if case .length(let n) = framing { remaining = n }
        // (The spool is configured when the client first falls behind: `spoolHasRoom`.)
        responseBuffered = plan.phase == .body && route.settings.proxyBuffering
        let response = HeadWriter.ClientResponse(
            dropContentLength: plan.relay != .verbatim, chunked: plan.relay == .rechunk || plan.relay == .chunkify, upgrading: upgrading,
            closeAfter: !plan.clientKeepAlive, clientMinor: request.minorVersion, keepAliveHeader: route.keepAliveHeader)
        status = layout.status
        headerNs = Int64(upstream.loop.now &- sentAt)
        if layout.keepAliveTimeout != nil || layout.keepAliveMax != nil {
            backendKeepAlive = .init(timeoutSeconds: layout.keepAliveTimeout, max: layout.keepAliveMax)
        }
        let queued = logging ? client { $0.queuedBytes } : 0
        buf.withReadableBytes { p in
            client { $0.writeResponseHead(layout, UnsafeRawBufferPointer(rebasing: p[start..<consumed]), response, server: serverIndex) }
        }
        if logging { headBytes = client { $0.queuedBytes } - queued }
        buf.consume(consumed)
        link.putBack(buf)
        headSent = true
        if plan.phase == .tunnel {
            isTunnel = true
            // What the client sent after its head (and sends from now on) goes to the backend.
            client { $0.tunnelOpened() }
        } else if plan.phase == .done {
            finish(link)
        }
        return true
    }

    /// Why a 101 cannot open a tunnel, or nil when it may: a tunnel opens only to a protocol
    /// this request offered, else the client's next bytes would reach the backend unparsed.
    @inline(never)
    private func refusesUpgrade(_ layout: HeadLayout, _ head: UnsafeRawBufferPointer) -> String? {
        guard let offer = upgradeOffer else { return "upstream sent 101 to a request that did not ask to upgrade" }
        guard let answer = Upgrade.value(layout, head), Upgrade.offered(offer, answer: answer) else {
            return "upstream sent 101 switching to a protocol the request did not offer"
        }
        return nil
    }

    /// The head of an answer whose client left (`clientLeft`): its body is read and dropped if it
    /// is short; anything else ends the drain. Returns as `parseHead` does.
    @inline(never)
    private func drainHead(_ layout: HeadLayout, framing: BodyFraming, upgrading: Bool, consumed: Int, _ buf: consuming IOBuffer,
                           _ link: UpstreamLink) -> Bool {
        var tooLong = false
        if case .length(let n) = framing { tooLong = n > Int64(drainBudget) }
        if upgrading || framing == .untilClose || tooLong {
            link.putBack(buf)
            abandonDrain()
            return false
        }
        status = layout.status
        if layout.keepAliveTimeout != nil || layout.keepAliveMax != nil {
            backendKeepAlive = .init(timeoutSeconds: layout.keepAliveTimeout, max: layout.keepAliveMax)
        }
        let plan = ResponsePlan(framing: framing, upgrading: false, headKeepsConnection: layout.keepsConnection,
                                request: .init(minorVersion: 1, keepAliveAllowed: false, bodyDone: true, upstreamHTTP10: route.proxyHTTP10))
        self.plan = plan
        upstreamReusable = plan.upstreamReusable
        if case .length(let n) = framing { remaining = n }
        buf.consume(consumed)
        link.putBack(buf)
        headSent = true
        if framing == .none { finish(link) }
        return true
    }

    /// Relays the body bytes the link holds, as the plan says.
    private func relayBody(_ link: UpstreamLink) {
        guard let plan, var buf = link.takeInbound() else { return }
        if buf.isEmpty { link.putBack(buf); return }
        if isTunnel {
            // Ends with either side's close (`endOfStream`, `clientLeft`).
            return relay(buf)
        }
        switch plan.relay {
        case .verbatim:
            if case .untilClose = plan.framing {
                // Ends with the upstream's close (`endOfStream`).
                relay(buf)
                return
            }
            let n = Int(min(remaining, Int64(buf.readableBytes)))
            if n < buf.readableBytes {
                // Bytes past the response: the connection is out of step.
                upstreamReusable = false
                buf.truncate(toReadable: n)
            }
            remaining -= Int64(n)
            relay(buf)
            if remaining == 0 { finish(link) }
        case .chunkify:
            // A close-delimited body to an HTTP/1.1 client: each buffer becomes a chunk.
            withUnsafeTemporaryAllocation(byteCount: 18, alignment: 1) { scratch in
                var line = ScratchSink(scratch)
                ChunkedDecoder.writeSize(Int64(buf.readableBytes), into: &line)
                relay(line.written)
            }
            relay(buf)
            relay("\r\n")
        case .rechunk, .dechunk:
            let dechunk = plan.relay == .dechunk
            let consumed: Int
            do {
                consumed = try buf.withReadableBytes { p throws(ChunkedDecoder.Failure) in
                    try decoder.consume(p, events: { event in
                        switch event {
                        case .chunk(let n):
                            guard !dechunk else { return }
                            withUnsafeTemporaryAllocation(byteCount: 18, alignment: 1) { scratch in
                                var line = ScratchSink(scratch)
                                ChunkedDecoder.writeSize(n, into: &line)
                                relay(line.written)
                            }
                        case .data(let a, let b):
                            if b > a { relay(UnsafeRawBufferPointer(rebasing: p[a..<b])) }
                        case .chunkEnd:
                            if !dechunk { relay("\r\n") }
                        case .end:
                            break
                        }
                    })
                }
            } catch {
                // Bad chunked syntax from the backend is never passed on.
                link.putBack(buf)
                return failed(.invalidHeader, "upstream sent invalid chunked response")
            }
            if consumed < buf.readableBytes { upstreamReusable = false }
            buf.consume(buf.readableBytes)
            link.putBack(buf)
            if decoder.isDone {
                if !dechunk {
                    relay("0\r\n")
                    decoder.trailers.withUnsafeBytes { relay($0) }
                    relay("\r\n")
                }
                finish(link)
            }
        }
    }

    /// Response body bytes to the client (the buffer itself, or a copy of framing and
    /// re-chunked data), counted for `$body_bytes_sent`.
    /// While draining, the bytes are dropped and counted against the drain's budget.
    @inline(__always)
    private func relay(_ buf: consuming IOBuffer) {
        if draining {
            drainBudget -= buf.readableBytes
            return buf.recycle(to: upstream.bufferRef)
        }
        bodyBytes += buf.readableBytes
        if spooled || responseBuffered && !clientTakesMore { return spoolResponse(buf) }
        // Through an optional: a closure cannot consume a noncopyable value it captures.
        var relayed: IOBuffer? = consume buf
        client { $0.sendFromUpstream(relayed.take()!) }
    }

    private func relay(_ bytes: UnsafeRawBufferPointer) {
        if draining { drainBudget -= bytes.count; return }
        bodyBytes += bytes.count
        if spooled || responseBuffered && !clientTakesMore { return spoolResponse(copying: bytes) }
        client { $0.sendBytes(bytes) }
    }

    private func relay(_ s: StaticString) {
        s.withUTF8Buffer { relay(UnsafeRawBufferPointer($0)) }
    }

    /// The response's spool has room, configured for it on the first call (most answers never
    /// need it: the client takes them as they come).
    private var spoolHasRoom: Bool {
        if !spoolReady {
            spoolReady = true
            let buffers = route.settings.proxyBuffers
            useSpool(memory: buffers.count * buffers.size, file: route.settings.proxyMaxTempFileSize, directory: route.settings.proxyTempPath)
        }
        return spool!.hasRoom
    }

    /// proxy_buffering: response bytes the client cannot take now wait in the spool.
    private func spoolResponse(_ buf: consuming IOBuffer) {
        _ = spoolHasRoom
        spooled = true
        spoolAppend(buf, request: false)
    }

    private func spoolResponse(copying bytes: UnsafeRawBufferPointer) {
        _ = spoolHasRoom
        spooled = true
        spoolAppend(copying: bytes, request: false)
    }

    /// Moves what the spool holds to the client while it takes more (and writes it). False when
    /// a temp file failed: the answer was cut, and the exchange is over.
    private func pumpSpool() -> Bool {
        guard spooled, let spool else { return true }
        // Until the spool is empty or the client's socket is full (a write that hit EAGAIN: its
        // writable edge brings `clientDrained`). A queue the socket took whole gives no edge.
        repeat {
        while clientTakesMore {
            let front: IOBuffer?
            do throws(IOError) { front = try spool.takeFront() } catch {
                spoolFailed(error, request: false)
                dropSpool()
                if finished {
                    connection.exchangeAborted(reset: plan?.closeDelimitedToClient ?? false)
                } else {
                    failed(.error, "a temporary file of the response could not be read back")
                }
                return false
            }
            guard let b = front else { break }
            connection.sendFromUpstream(b)
            if !clientTakesMore {
                client { $0.flushFromUpstream() }
                if clientGone { return false }
            }
        }
        client { $0.flushFromUpstream() }
        if clientGone { return false }
        } while !spool.isEmpty && clientTakesMore
        // An emptied file is truncated and kept for the rest of this answer (closed at `dropSpool`).
        if spool.isEmpty { spooled = false }
        return true
    }

    /// The upstream closed its side: the end of a close-delimited body, or a cut response.
    private func endOfStream(_ link: UpstreamLink) {
        if isTunnel {
            // The backend ended the tunnel: the client's connection ends after what is queued.
            upstreamReusable = false
            return finish(link)
        }
        if headSent, let plan, plan.framing == .untilClose {
            if plan.relay == .chunkify { relay("0\r\n\r\n") }
            upstreamReusable = false
            return finish(link)
        }
        failed(.error, "upstream prematurely closed connection before the response ended")
    }

    private func finish(_ link: UpstreamLink) {
        // A temp file failed on the way: part of the answer is lost, so it must not end as if complete.
        if spoolFailure != nil && !draining { return failed(.error, "a temporary file of the response failed") }
        finished = true
        self.link = nil
        // An answer that came before the whole request body (nginx's `return` with a body on the
        // way, an early 413): the rest of the body will not follow on this connection, so the
        // backend would read what comes next as the body's end.
        let elapsed = Int64(upstream.loop.now &- sentAt)
        let reusable = upstreamReusable && requestBodyDone && !bodyUnsent
        onPool(server) { pool in
            pool.responseTime.observe(nanoseconds: elapsed)
            pool.release(link, reusable: reusable, backend: backendKeepAlive)
            if draining && upstreamReusable { pool.drained += 1 }
        }
        endOnBalancer()
        if draining {
            // The answer of a client that left, read to its end: the connection was kept.
            draining = false
            return
        }
        // proxy_buffering: the connection went back to the pool; the client takes the rest
        // from the spool, and the answer ends when it has (`clientDrained`).
        if spooled { return }
        let keepAlive = plan?.clientKeepAlive ?? false
        client { $0.exchangeEnded(keepAlive: keepAlive) }
    }
}

/// `$request_id`: 128 random bits, written as 32 hex digits.
struct RequestID {
    var high: UInt64
    var low: UInt64

    static func make() -> RequestID {
        var g = SystemRandomNumberGenerator()
        return RequestID(high: g.next(), low: g.next())
    }

    func write<S: HeadSink & ~Copyable>(into out: inout S) {
        out.putHex(high, width: 16)
        out.putHex(low, width: 16)
    }
}

/// A few bytes written into stack memory (a chunk-size line).
struct ScratchSink: HeadSink, ~Copyable {
    let base: UnsafeMutableRawBufferPointer
    var count = 0

    init(_ base: UnsafeMutableRawBufferPointer) { self.base = base }

    mutating func put(_ bytes: UnsafeRawBufferPointer) {
        let n = min(bytes.count, base.count - count)
        if n > 0 { UnsafeMutableRawBufferPointer(rebasing: base[count..<(count + n)]).copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[0..<n])) }
        count += n
    }

    var mark: Int { count }
    mutating func rollback(to mark: Int) { count = mark }
    var written: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: base[0..<count]) }
}
