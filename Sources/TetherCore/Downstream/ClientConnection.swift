#if canImport(Glibc)
import Glibc
#endif
import CTether
import TetherConfig
import TetherH2
import TetherHTTP
import TetherIO
import TetherPool
import TetherTLS

/// What a client connection on a TetherIO loop needs from the configuration: head limits and
/// nginx's keep-alive rules.
struct ClientSettings {
    var headLimits = HeadParser.Limits(lineLimit: 8192, headLimit: 32768)
    var headerTimeoutMs: Int64 = 60_000
    var bodyTimeoutMs: Int64 = 60_000
    /// `send_timeout`: how long a client may take nothing of what is queued for it.
    var sendTimeoutMs: Int64 = 60_000
    var keepaliveTimeoutMs: Int64 = 75_000
    var keepaliveRequests = 1000
    var keepaliveTimeMs: Int64 = 3_600_000
    /// After Tether's FIN with request bytes still arriving, how long they are read and dropped
    /// before the connection is closed (nginx's `lingering_timeout`-like wait).
    var lingerMs: Int64 = 5_000
    /// HTTP/2 (`http2 on`): the connection's limits, and the largest DATA frame sent.
    var http2 = H2Connection.Settings()
    var http2ChunkSize = 8_192
    /// `http2_recv_buffer_size`: what one HTTP/2 connection reads and acts on in one pass.
    var http2RecvBufferSize = 256 * 1024
    /// A plain listener with `http2 on`: a connection that starts with HTTP/2's preface speaks it.
    var h2c = false
}

/// Answers the requests of client connections on one loop. Called on the loop's thread.
protocol ClientRequestHandler: AnyObject {
    /// A complete request head; `bytes` are the head's bytes, valid during the call only. The
    /// handler answers now, through `connection.respond` (exchanges that wait for an upstream
    /// come with the exchange glue).
    func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection)
}

/// What one loop's client connections share: the loop, its buffer pool, the header array they
/// borrow while parsing, the handler and the counters.
final class ClientLoop {
    /// Strong `let`s: a method of a class that calls through one of its own `let` references
    /// needs no retain around the call. (`unowned(unsafe)` ones cost a retain and a release per
    /// use, as a `var` does: Swift makes a strong copy of what it loads from them.)
    let loop: IOLoop
    let pool: BufferPool
    /// The same two, for the connections' calls on the hot paths: a chain of `let`s
    /// (`shared.loop.arm(…)`) is not always borrowed, an `Unretained` is (its doc says why).
    var loopRef: Unretained<IOLoop> { Unretained(loop) }
    var poolRef: Unretained<BufferPool> { Unretained(pool) }
    var settings: ClientSettings
    /// Replaced by a reload (`reconfigure`), between two requests of any connection.
    private(set) var handler: ClientRequestHandler
    /// Header storage lent to the connection parsing a head, and given back after: an idle
    /// connection holds none.
    var headerScratch: [HeaderField] = []
    /// Shutdown under way: no answer keeps its connection alive, and `emptied` is called when
    /// the last connection has closed.
    private(set) var draining = false
    var emptied: (() -> Void)?
    /// Connections open now (registered and not yet closed).
    private(set) var open = 0
    /// The counters of the admin pages (`TetherServer` sums each loop's at a scrape): connections,
    /// requests, close reasons, accept failures in `stats`; answers by status class and `server`
    /// block in `answers` (`LoopStats.answers`' layout), counted on every answer.
    var stats: LoopStats
    private(set) var answers: Counters

    /// Counts an answer of `status`; `server` is the `server` block that answered, if one did.
    @inline(__always)
    func countAnswer(status: Int, server: Int?) {
        let (c, r, sc) = LoopStats.answerIndices(status: status, server: server ?? -1, slots: answers.count)
        answers.increment(c)
        if r >= 0 {
            answers.increment(r)
            answers.increment(sc)
        }
    }
    /// `$time_local`, `$time_iso8601`: formatted once a second.
    let dateCache = DateCache()
    /// The same, for the refresh on every proxied request (`Unretained`).
    var dateRef: Unretained<DateCache> { Unretained(dateCache) }
    /// The loop's access log, when some location has one.
    var accessLog: LoopAccessLog?
    /// `listen ... ssl`: the listener's certificates by SNI; its connections speak TLS.
    var tls: TLSServerNames?
    /// Where failed handshakes are logged (at `info`, as nginx logs them).
    var log: LoopErrorLog = .all
    /// The access log's draft of the request being handled (`draftAccessLog`), its location and
    /// when it began, until its answer or its exchange takes it.
    var logDraft: [UInt8] = []
    var logRoute: CompiledLocation?
    var logStartedAt: UInt64 = 0
    /// A draft is waiting for its answer (checked on every request: a flag, not the reference).
    var drafted = false

    func dropDraft() {
        drafted = false
        logRoute = nil
    }
    /// `$request_id` of the request being handled, made when first asked for.
    var requestID: RequestID?
    /// `real_ip_header`: the client address a trusted peer gave for the request being handled
    /// (`$remote_addr`, `allow`/`deny`, logs and `X-Forwarded-For` see it); nil: the peer's own.
    var realAddress: ForwardedAddress?
    /// `listen … proxy_protocol`: connections start with a PROXY protocol header.
    var proxyProtocol = false
    /// `location ~`: the loop's match data and the last match, made on the first regex search.
    var regexMatches: RegexMatches?
    /// What the PROXY protocol header said, by connection (`Handle.token`), for those whose
    /// header named a client: kept here rather than in each connection, which would grow every
    /// connection's object by a malloc size class.
    var proxied: [UInt64: ProxiedAddresses] = [:]
    /// HTTP/2 streams' ports, by their connection's record (`Handle.token`).
    var streamPorts: [UInt64: H2StreamPort] = [:]

    /// `servers`: the configuration's `server` blocks (answers are counted per block).
    init(loop: IOLoop, pool: BufferPool, settings: ClientSettings, handler: ClientRequestHandler, servers: Int = 1) {
        stats = LoopStats(servers: servers)
        answers = Counters(count: LoopStats.answerSlots(servers: servers))
        self.loop = loop
        self.pool = pool
        self.settings = settings
        self.handler = handler
        headerScratch.reserveCapacity(32)
    }

    /// A reload: the next requests are routed by `handler` with the new settings; the counters
    /// by `server` block start over for the new blocks (the totals by status class go on).
    func reconfigure(handler: ClientRequestHandler, settings: ClientSettings, servers: Int, tls: TLSServerNames?) {
        self.handler = handler
        self.settings = settings
        self.tls = tls
        stats.resizeServers(servers)
        let resized = Counters(count: LoopStats.answerSlots(servers: servers))
        for i in 0..<6 { resized.add(answers[i], to: i) }
        answers = resized
    }

    /// Adopts an accepted, non-blocking socket.
    @discardableResult
    func adopt(_ fd: Int32) throws(IOError) -> ClientConnection {
        let c = ClientConnection(shared: self)
        do throws(IOError) {
            if let names = tls {
                guard let session = TLSSocket(server: names, fd: fd) else { throw IOError("SSL_new", errno: ENOMEM) }
                c.tls = session
            }
            try c.start(fd)
        } catch {
            Glibc.close(fd)
            throw error
        }
        stats.downstreamAccepted += 1
        stats.downstreamHandled += 1
        open += 1
        return c
    }

    /// Graceful shutdown (nginx's): no answer keeps its connection alive from now on; each of
    /// the loop's connections is then told (`ClientConnection.drain`), and `emptied` follows
    /// the last close.
    func beginDrain() {
        draining = true
    }

    func connectionClosed() {
        open -= 1
        if draining && open == 0 { emptied?() }
    }
}

/// An HTTP/1.1 client connection on a TetherIO loop: reads into a pool buffer only while there
/// is something to read (an idle connection holds no buffer), parses heads with `HeadParser`,
/// answers them in order (pipelining), drops request bodies of local answers, and keeps the
/// connection alive as `ClientConnectionState` and nginx's rules say. The glue of the design:
/// the decisions are the state value's, this class only does the I/O they call for.
final class ClientConnection: IOHandler {
    /// The loop's shared state. A strong `let`, so that calls through it (and through its own
    /// `let`s: the loop, the buffer pool) retain nothing: a counted `unowned` reference cost a
    /// retain and a release on every use, 11 % of a request, and an `unowned(unsafe)` one still
    /// a retain and a release per call. The loop's records hold the connection only while it is
    /// registered, so the reference makes no lasting cycle.
    private let shared: ClientLoop
    private var handle = Handle(token: UInt64(UInt32.max))
    private(set) var state: ClientConnectionState
    private var inbound: IOBuffer?
    private var outbound: OutboundQueue
    /// The socket reported readable and was not read to EAGAIN yet (edge triggering: no new
    /// event comes until it is).
    private var readable = false
    private var peerClosed = false
    /// An event reported the peer's half-close: read until the EOF (no short-read shortcut).
    private var hangupReported = false
    /// The answer said `Connection: close`: close once it is written.
    private var closeAfterWrite = false
    /// The socket while registered, -1 once closed: read here rather than through the loop's
    /// records, which cost a retain and a release of the loop on each of the many checks.
    private var socket: Int32 = -1
    /// The answering location's `keepalive_timeout` in milliseconds (nginx's rule), set with
    /// each answer. (32 bits beside the flags: the object stays in its malloc size class.)
    private var keepaliveTimeoutMs: Int32
    /// Our FIN went out with client bytes still coming: read and drop them until EOF or the timer.
    private var lingering = false
    /// The handler answered the current request (or handed it to an upstream).
    private var answered = false
    /// The answer comes later (`answerLater`): an admin page being gathered from every loop.
    private var answerPending = false
    /// An HTTP/2 stream's connection (`stream`); declared here, where the layout has room.
    private var streamed = false
    /// Request body bytes still to be read and dropped, or a chunked body's decoder.
    private var bodyLeft: Int64 = 0
    private var chunked: ChunkedDecoder?
    /// The request is with an upstream (`proxy`): its answer comes from there.
    private var exchange: ProxyExchange?
    /// `handleInput` is running: callbacks from an exchange must not re-enter it.
    private var handlingInput = false
    /// TLS (`listen ... ssl`): the session over the socket; nil on a plain connection.
    fileprivate(set) var tls: TLSSocket?
    /// The connection ends cut (an answer broken off): no `close_notify`, so that a client
    /// reading to the end does not take what it got for a complete answer.
    private var tlsAbort = false
    /// `listen … proxy_protocol`: the header is still to be read (before TLS and HTTP).
    private var awaitingProxyHeader = false
    /// The PROXY protocol header named a client: it is in `shared.proxied`.
    private var hasProxied = false
    /// An HTTP/2 stream's request (`H2Session`): its bytes come from the session and its answer
    /// goes back to it; the socket and TLS session are the session's, used here only for what
    /// they say of the client (addresses, certificates), never read or written.
    /// (A flag, in a padding hole above, and the port in `shared.streamPorts`: a reference
    /// would grow every connection's object past its malloc size class.)
    var isStream: Bool { streamed }
    private var stream: H2StreamPort? { streamed ? shared.streamPorts[handle.token] : nil }

    /// What the PROXY protocol header said, when it named a client (`$proxy_protocol_addr`,
    /// `real_ip_header proxy_protocol`).
    var proxied: ProxiedAddresses? { hasProxied ? shared.proxied[handle.token] : nil }

    init(shared: ClientLoop) {
        self.shared = shared
        state = ClientConnectionState(acceptedAt: Int64(shared.loop.now), headerTimeoutMs: shared.settings.headerTimeoutMs)
        outbound = OutboundQueue(pool: shared.pool)
        keepaliveTimeoutMs = Int32(clamping: shared.settings.keepaliveTimeoutMs)
    }

    /// Starts as the HTTP/1.1 side of an HTTP/2 stream: a record without a descriptor of its own
    /// (its timers are the client timeouts), `fd` and `tls` the session's.
    func startStream(_ port: H2StreamPort, socket fd: Int32, tls: TLSSocket?, proxied: ProxiedAddresses?) {
        handle = shared.loop.registerVirtual(handler: self)
        shared.streamPorts[handle.token] = port
        streamed = true
        // The PROXY protocol header of the connection the stream is on.
        if let proxied {
            shared.proxied[handle.token] = proxied
            hasProxied = true
        }
        socket = fd
        self.tls = tls
        armTimer()
    }

    fileprivate func start(_ fd: Int32) throws(IOError) {
        handle = try shared.loop.register(fd, handler: self)
        socket = fd
        awaitingProxyHeader = shared.proxyProtocol
        armTimer()
    }

    /// What the one timer is armed for. Each use arms it with one configured duration (the
    /// loop keeps a timer list per duration), at the transition into that use.
    private enum TimerUse: Equatable { case none, handshake, firstHead, head, keepalive, body, send, linger }
    private var timerUse = TimerUse.none
    /// Body bytes arrived since the body timer was armed.
    private var bodyProgress = false

    var isOpen: Bool { socket >= 0 }
    private var openSocket: Int32? { socket >= 0 ? socket : nil }

    var dateCache: DateCache { shared.dateCache }

    /// Bytes read and not yet handled (through take and put back: a noncopyable optional is
    /// only borrowed that way).
    private var inboundBytes: Int {
        guard let b = inbound.take() else { return 0 }
        let n = b.readableBytes
        inbound = consume b
        return n
    }

    private var hasInbound: Bool {
        guard let b = inbound.take() else { return false }
        inbound = consume b
        return true
    }

    /// The heap memory this connection holds: its object (as malloc sized it, with malloc's
    /// 8-byte chunk header), a read buffer and queue storage if it holds any, and its record in
    /// the loop. Deterministic, unlike a process-wide heap counter while other work runs.
    var heapBytes: Int {
        let object = tether_malloc_usable_size(Unmanaged.passUnretained(self).toOpaque()) + 8
        let buffer = hasInbound ? shared.pool.bufferSize : 0
        let queue = outbound.holdsStorage ? 2 * 64 : 0
        return object + buffer + queue + IOLoop.bytesPerRecord
    }

    // MARK: Events

    func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {
        if events.contains(.error) || events.contains(.hangup) && !events.contains(.readable) {
            if let tls, !tls.handshakeDone { handshakeFailed(.eof, "the peer closed the connection during the handshake") }
            // ETIMEDOUT: the kernel gave up on the client (so_keepalive probes, tcp_user_timeout).
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            if let fd = openSocket { getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) }
            return close(err == ETIMEDOUT ? .tcpKeepalive : .clientClose)
        }
        if events.contains(.readable) || events.contains(.readHangup) { readable = true }
        if events.contains(.readHangup) { hangupReported = true }
        if awaitingProxyHeader {
            guard readable, readProxyHeader() else { return }
        }
        if let tls, !tls.handshakeDone {
            guard continueHandshake(tls) else { return }
        }
        if events.contains(.writable) {
            flush()
            // The client took what the exchange relayed: the upstream may send more.
            if let x = exchange, !outbound.isFull { x.clientDrained() }
        }
        guard isOpen else { return }
        pump()
    }

    func timerFired(handle: Handle, loop: IOLoop) {
        if lingering { return close(nil) }
        if awaitingProxyHeader {
            shared.log(.error, "client timed out while reading PROXY protocol header")
            return close(.proxyProtocol)
        }
        if timerUse == .send {
            // send_timeout: the client took nothing of its answer for that long (nginx closes
            // too; over TLS without close_notify, since the answer is cut).
            shared.log(.info, "client timed out (send_timeout: the client took nothing of its answer for \(Units.formatTime(shared.settings.sendTimeoutMs)))")
            tlsAbort = true
            return close(.sendTimeout)
        }
        if let tls, !tls.handshakeDone {
            handshakeFailed(.timeout, "ssl_handshake_timeout passed")
            return close(.tlsError)
        }
        if state.inExchange {
            // client_body_timeout: the client stopped sending its body. Proxied, the client
            // gets 408 (the upstream is not blamed); a local answer went out already.
            guard let x = exchange else { return close(.error) }
            refuseBody(408, x)
            return settle()
        }
        switch state.expired(bufferedBytes: inboundBytes > 0) {
        case .requestTimeout:
            answerError(408)
            settle()
        case .close(let reason):
            close(reason)
        case nil:
            break
        }
    }

    // MARK: Reading and parsing

    /// Handles what is buffered, then reads while the socket has bytes, there is room and the
    /// answers are being taken (backpressure: otherwise the client's bytes wait in its socket);
    /// then writes and settles what the connection waits for.
    private func pump() {
        while isOpen {
            // Answers that went out make room for the pipelined requests behind them.
            while handleInput() && isOpen && inboundBytes > 0 && !outbound.isFull { flush() }
            flush()
            guard isOpen, readable, !peerClosed, !outbound.isFull, !state.isClosed || lingering else { break }
            var buf = inbound.take() ?? IOBuffer.take(from: shared.poolRef)
            if buf.writableBytes == 0 { buf.compact() }
            if buf.writableBytes == 0 && state.awaitingHead {
                // A head that does not fit one buffer (head limits set above its size): refused,
                // as one over the limits is.
                inbound = consume buf
                answerError(431)
                break
            }
            guard buf.writableBytes > 0, let fd = openSocket else { inbound = consume buf; break }
            let result = streamed ? stream!.read(into: &buf) : tls?.read(into: &buf) ?? buf.read(from: fd, shortReadDrains: !hangupReported)
            let drained = buf.writableBytes > 0
            inbound = consume buf
            switch result {
            case .bytes(_, let eof):
                bodyProgress = bodyProgress || state.inExchange
                // A short read took what there was: wait for the next event.
                if eof { peerClosed = true; readable = false } else if drained { readable = false }
            case .wouldBlock:
                readable = false
            case .eof:
                peerClosed = true
                readable = false
            case .error(let e):
                return close(e == EPROTO ? .tlsError : .clientClose)
            }
        }
        settle()
    }

    // MARK: PROXY protocol

    /// Reads the PROXY protocol header off the socket and leaves what follows (TLS or HTTP) in
    /// it: the bytes are peeked, and exactly the header's length is then read. True once it is
    /// read; false while more is awaited (the next readable edge comes back here) or after the
    /// connection was closed (a missing or malformed header never reaches TLS or HTTP).
    private func readProxyHeader() -> Bool {
        guard let fd = openSocket else { return false }
        return withUnsafeTemporaryAllocation(byteCount: ProxyProtocol.maximumLength, alignment: 16) { buf -> Bool in
            var n = 0
            repeat { n = recv(fd, buf.baseAddress, buf.count, Int32(MSG_PEEK)) } while n < 0 && errno == EINTR
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK { readable = false; return false }
                close(.clientClose)
                return false
            }
            if n == 0 {
                shared.log(.error, "the client closed the connection before a whole PROXY protocol header")
                close(.proxyProtocol)
                return false
            }
            switch ProxyProtocol.parse(UnsafeRawBufferPointer(rebasing: buf[0..<n])) {
            case .incomplete:
                readable = false
                return false
            case .invalid(let why):
                shared.log(.error, "broken header: \(why) while reading PROXY protocol")
                close(.proxyProtocol)
                return false
            case .complete(let h):
                var taken = 0
                while taken < h.length {
                    let k = recv(fd, buf.baseAddress! + taken, h.length - taken, 0)
                    if k < 0 && errno == EINTR { continue }
                    guard k > 0 else { close(.clientClose); return false }
                    taken += k
                }
                awaitingProxyHeader = false
                shared.stats.proxyProtocolHeaders += 1
                if h.source != nil {
                    shared.proxied[handle.token] = ProxiedAddresses(source: h.source, destination: h.destination)
                    hasProxied = true
                }
                // What follows (a ClientHello, a request) may be in the socket already.
                readable = true
                return true
            }
        }
    }

    // MARK: TLS

    /// Drives the handshake; true once it is done (the connection goes on to HTTP), false while
    /// it waits for the socket or after it failed (the connection is closed).
    private func continueHandshake(_ tls: TLSSocket) -> Bool {
        switch tls.handshake() {
        case .done:
            shared.stats.tlsHandshakes[tls.version, default: 0] += 1
            if tls.resumed { shared.stats.tlsResumed += 1 }
            if tls.selectedH2 {
                handOverToHTTP2(tls)
                return false
            }
            // The first request may have come with the handshake's last flight; the header
            // timeout runs from here.
            readable = true
            armTimer()
            return true
        case .wantRead, .wantWrite:
            return false
        case .failed(let failure, let detail):
            handshakeFailed(failure, detail)
            close(.tlsError)
            return false
        }
    }

    /// ALPN chose `h2`: the socket, its TLS session and its record go to an `H2Session`, and
    /// this object is done (it closes nothing: the connection goes on).
    /// `input`: what was read already (h2c's preface and what followed it).
    private func handOverToHTTP2(_ tls: TLSSocket?, input: UnsafeRawBufferPointer? = nil) {
        let session = H2Session(shared: shared, handle: handle, socket: socket, tls: tls)
        if let input { session.take(input) }
        self.tls = nil
        socket = -1
        if let b = inbound.take() { shared.pool.recycle(b) }
        shared.loop.replaceHandler(handle, with: session)
        session.start()
    }

    private func handshakeFailed(_ failure: TLSHandshakeFailure, _ detail: @autoclosure () -> String) {
        shared.stats.tlsFailures[failure.rawValue, default: 0] += 1
        shared.log(.info, "TLS handshake failed (\(failure.rawValue)): \(detail())")
    }


    /// Parses and answers the heads in the buffer and drops body bytes, as far as they go.
    /// Returns whether it consumed anything.
    @discardableResult
    private func handleInput() -> Bool {
        guard var buf = inbound.take() else { return false }
        handlingInput = true
        defer { handlingInput = false }
        let before = buf.readableBytes
        while isOpen && !buf.isEmpty {
            if lingering { buf.consume(buf.readableBytes); break }
            if state.inExchange {
                if let x = exchange {
                    // The body goes to the upstream; the next request waits for the answer.
                    forwardBody(&buf, to: x)
                    break
                }
                guard dropBody(&buf), !answerPending else { break }
                finishExchange()
                continue
            }
            guard state.awaitingHead, !outbound.isFull else { break }
            if shared.settings.h2c && state.requests == 0 {
                // Prior knowledge: the preface (or what came of it) instead of a request line.
                // Its request line ("PRI * HTTP/2.0"): the session checks the rest of the preface.
                let line = H2Write.preface.prefix(16)
                let preface = buf.withReadableBytes { p in line.starts(with: p.prefix(line.count)) }
                if preface {
                    guard buf.readableBytes >= line.count else { break }
                    buf.withReadableBytes { handOverToHTTP2(nil, input: $0) }
                    shared.pool.recycle(buf)
                    return true
                }
            }
            state.headBytesArrived(now: Int64(shared.loop.now))
            var layout = HeadLayout()
            var headers: [HeaderField] = []
            swap(&headers, &shared.headerScratch)
            let outcome = buf.withReadableBytes { p in
                HeadParser.parse(p, kind: .request, limits: shared.settings.headLimits, headers: &headers, into: &layout)
            }
            guard case .complete(let start, let consumed) = outcome else {
                swap(&headers, &shared.headerScratch)
                if case .error(let e) = outcome { answerError(e.status) }
                break
            }
            _ = state.headParsed()
            shared.stats.downstreamRequests += 1
            shared.requestID = nil
            if shared.realAddress != nil { shared.realAddress = nil }
            if layout.chunked { chunked = ChunkedDecoder() } else { bodyLeft = layout.contentLength ?? 0 }
            answered = false
            buf.withReadableBytes { p in
                shared.handler.request(layout, bytes: UnsafeRawBufferPointer(rebasing: p[start..<consumed]), connection: self)
            }
            // A handler that gave no answer is a bug; the client still gets one.
            if !answered { respond(status: 500, text: nil, head: layout, close: true) }
            if shared.drafted { shared.dropDraft() }
            // The header storage goes back to the loop (its fields are cleared by the next parse).
            swap(&layout.headers, &shared.headerScratch)
            buf.consume(consumed)
            if let x = exchange {
                forwardBody(&buf, to: x)
                continue
            }
            // A request without a body (or with all of it here) ends now, unless its answer comes later.
            if isOpen, state.inExchange, dropBody(&buf), !answerPending { finishExchange() }
        }
        let progressed = buf.readableBytes < before
        if isOpen { inbound = consume buf } else { shared.pool.recycle(buf) }
        return progressed
    }

    /// Drops the request body's bytes at the front of `buf`; true once the body is complete.
    private func dropBody(_ buf: inout IOBuffer) -> Bool {
        if var d = chunked {
            let n: Int
            do {
                n = try buf.withReadableBytes { p throws(ChunkedDecoder.Failure) in try d.consume(p, data: { _, _ in }) }
            } catch {
                chunked = nil
                closeAfterWrite = true
                state.pendingReason = .error
                return true
            }
            buf.consume(n)
            chunked = d.isDone ? nil : d
            return d.isDone
        }
        let n = Int(min(bodyLeft, Int64(buf.readableBytes)))
        buf.consume(n)
        bodyLeft -= Int64(n)
        return bodyLeft == 0
    }

    /// Sends what the buffer holds of the request body to the upstream, as far as it takes it
    /// (backpressure: the rest waits in the buffer, and the client's bytes in its socket, until
    /// `upstreamTakesBody`). A Content-Length body is copied out in pool buffers; a chunked one is
    /// re-framed canonically (lowercase hex sizes, no extensions, only valid trailers), never
    /// passed on as received. Bad chunked syntax ends the exchange with 400.
    private func forwardBody(_ buf: inout IOBuffer, to x: ProxyExchange) {
        if var d = chunked {
            guard !x.bodyBlocked else { return }
            let n: Int
            do {
                n = try buf.withReadableBytes { p throws(ChunkedDecoder.Failure) in
                    try d.consume(p, events: { event in
                        switch event {
                        case .chunk(let size):
                            withUnsafeTemporaryAllocation(byteCount: 18, alignment: 1) { scratch in
                                var line = ScratchSink(scratch)
                                ChunkedDecoder.writeSize(size, into: &line)
                                x.sendBody(copying: line.written)
                            }
                        case .data(let a, let b):
                            if b > a {
                                x.countRequestBody(b - a)
                                x.sendBody(copying: UnsafeRawBufferPointer(rebasing: p[a..<b]))
                            }
                        case .chunkEnd:
                            Self.send("\r\n", to: x)
                        case .end:
                            break
                        }
                    })
                }
            } catch {
                return refuseBody(400, x)
            }
            buf.consume(n)
            // proxy_request_buffering: a temp file that failed ends the request with 500, as nginx.
            if x.spoolFailure != nil { return refuseBody(500, x) }
            let limit = x.route.settings.clientMaxBodySize
            // A chunked body's size is known only as it comes: client_max_body_size is held to it here.
            if limit > 0 && x.requestBodyBytes > limit { return refuseBody(413, x) }
            if d.isDone {
                Self.send("0\r\n", to: x)
                d.trailers.withUnsafeBytes { x.sendBody(copying: $0) }
                Self.send("\r\n", to: x)
                chunked = nil
                x.requestBodyFinished()
            } else {
                chunked = d
            }
            return
        }
        guard bodyLeft > 0 else { return }
        while bodyLeft > 0 && !buf.isEmpty && !x.bodyBlocked {
            let n = Int(min(bodyLeft, Int64(buf.readableBytes), Int64(shared.pool.bufferSize)))
            var chunk = IOBuffer.take(from: shared.poolRef)
            buf.withReadableBytes { p in _ = chunk.append(contentsOf: UnsafeRawBufferPointer(rebasing: p[0..<n])) }
            buf.consume(n)
            bodyLeft -= Int64(n)
            x.sendBody(chunk)
        }
        if x.spoolFailure != nil { return refuseBody(500, x) }
        if bodyLeft == 0 { x.requestBodyFinished() }
    }

    /// The request body cannot go on (bad chunked syntax: 400, over client_max_body_size: 413,
    /// client_body_timeout: 408): the exchange is abandoned, the client gets `status` unless an
    /// answer is under way (then the connection just ends), and the connection closes after it
    /// (the rest of the body is not waited for).
    private func refuseBody(_ status: Int, _ x: ProxyExchange) {
        chunked = nil
        bodyLeft = 0
        let answering = x.responseStarted
        let server = x.serverIndex
        x.clientLeft()
        if answering {
            retireExchange()
            tlsAbort = true
            return close(.error)
        }
        retireExchange(answered: writeError(status, server: server))
        state.pendingReason = .error
        closeAfterWrite = true
        finishExchange()
    }

    private static func send(_ s: StaticString, to x: ProxyExchange) {
        s.withUTF8Buffer { x.sendBody(copying: UnsafeRawBufferPointer($0)) }
    }

    // MARK: Proxying

    /// Hands the current request to `upstream` as `route` (a `proxy_pass` location) says: the
    /// upstream head is written from this one (`HeadWriter`), the body follows as it arrives,
    /// and the answer comes back through `ProxyExchange`. `serverName` is the server block's
    /// first name (`$server_name`, and `$host` for a request without Host).
    func proxy(to upstream: LoopUpstream, route: CompiledLocation, head: HeadLayout, bytes: UnsafeRawBufferPointer,
               serverName: [UInt8] = []) {
        precondition(state.inExchange && !answered, "proxy outside an exchange or twice: \(state.phase)")
        // An HTTP/1.0 upstream cannot be sent a body of unknown length (nginx answers 411 too).
        if head.chunked && route.proxyHTTP10 { return respond(status: 411, text: nil, head: head, close: true) }
        let framing: BodyFraming = head.chunked ? .chunked : (head.contentLength ?? 0) > 0 ? .length(head.contentLength!) : .none
        let request = ProxyExchange.Request(
            isHEAD: head.methodIs("HEAD", in: bytes), idempotent: head.isIdempotent(in: bytes), minorVersion: head.minorVersion,
            clientKeepAlive: clientKeepAlive(head: head, close: false, route: route), framing: framing)
        let x = upstream.exchange(connection: self, route: route, request: request)
        if head.connectionUpgrade, let value = Upgrade.value(head, bytes) {
            x.upgradeOffer = Upgrade.offer(value, allowed: route.settings.proxyAllowUpgrade)
        }
        answered = true
        exchange = x
        shared.dateRef { $0.refresh() }
        let started = ClientVariables.with(head: head, bytes: bytes, connection: self, route: route, serverName: serverName) {
            x.start(head, bytes, variables: $0)
        }
        if !started {
            // A head larger than a buffer once written for the upstream: refused whole rather
            // than sent cut (heads are bounded by one pool buffer on this path).
            retireExchange()
            answered = false
            return respond(status: 431, text: nil, head: head, close: true)
        }
        if shared.drafted {
            // The access log's draft goes with the exchange, which ends the line.
            swap(&x.logDraft, &shared.logDraft)
            x.logStartedAt = shared.logStartedAt
            x.logging = true
            shared.dropDraft()
        }
        // `Expect: 100-continue` is Tether's to answer (it is not forwarded): the body may come.
        // RFC 9110 10.1.1 lets a server send it even when some of the body is here already.
        if head.expectContinue && framing != .none && head.minorVersion == 1 && exchange === x && !x.responseStarted {
            sendBytes("HTTP/1.1 100 Continue\r\n\r\n")
            flush()
        }
    }

    /// The exchange is over: its access log lines are written, with `answered` where the client
    /// got an answer of Tether's instead of the upstream's (a 502 page, a 400), and it becomes one
    /// of its upstream's spares.
    private func retireExchange(answered: LocalAnswer.Written? = nil, status: Int? = nil) {
        guard let x = exchange.take() else { return }
        if x.logging, let log = shared.accessLog {
            x.logging = false
            let facts = x.answerFacts(status: answered?.status ?? status, headBytes: answered?.headBytes ?? 0, bodyBytes: answered?.bodyBytes ?? 0)
            log.finish(x.logDraft, route: x.route, startedAt: x.logStartedAt, facts: facts, dates: shared.dateCache)
        }
        x.upstream.retire(x)
    }

    /// The access log's draft of the current request (`route` logs it): what its head says,
    /// while the head's bytes are there. The line is finished when the answer ends.
    func draftAccessLog<V: VariableSource>(_ route: CompiledLocation, _ variables: V) {
        guard let log = shared.accessLog else { return }
        log.draft(route, variables, into: &shared.logDraft)
        shared.logRoute = route
        shared.drafted = true
        shared.logStartedAt = shared.loop.now
    }

    /// Ends the current request's access log lines for an answer of Tether's own.
    private func logLocalAnswer(_ written: LocalAnswer.Written) {
        guard shared.drafted, let route = shared.logRoute, let log = shared.accessLog else { return }
        shared.dropDraft()
        log.finish(shared.logDraft, route: route, startedAt: shared.logStartedAt,
                   facts: AnswerFacts(status: written.status, headBytes: written.headBytes, bodyBytes: written.bodyBytes), dates: shared.dateCache)
    }

    /// `$request_id`: 32 random hex digits, the same for every use within the request.
    func writeRequestID<S: HeadSink & ~Copyable>(into out: inout S) {
        if shared.requestID == nil { shared.requestID = RequestID.make() }
        shared.requestID!.write(into: &out)
    }

    /// Writes the answer's head, as the exchange rewrote it, into the client's queue; `server`
    /// is the index of the `server` block that answers (for the counters).
    func writeResponseHead(_ h: HeadLayout, _ p: UnsafeRawBufferPointer, _ r: HeadWriter.ClientResponse, server: Int) {
        shared.countAnswer(status: h.status, server: server)
        HeadWriter.clientHead(h, p, r, into: &outbound)
    }

    /// Bytes queued for the client and not yet written (the access log measures a head by it).
    var queuedBytes: Int { outbound.queuedBytes }

    /// Queues response bytes from the exchange (the buffer itself: no copy); `flushFromUpstream` writes them.
    func sendFromUpstream(_ buffer: consuming IOBuffer) {
        outbound.enqueue(buffer)
    }

    /// Queues a copy of response bytes (framing lines, re-chunked data).
    func sendBytes(_ bytes: UnsafeRawBufferPointer) {
        outbound.append(bytes)
    }

    func sendBytes(_ s: StaticString) {
        s.withUTF8Buffer { outbound.append(UnsafeRawBufferPointer($0)) }
    }

    /// Writes what the exchange queued.
    func flushFromUpstream() { flush() }

    /// The client's socket took what was queued: the exchange may read more from the upstream.
    var clientTakesMore: Bool { !outbound.isFull }

    /// A 101 opened a tunnel: every byte the client sends from now on (and what it sent after
    /// its head) goes to the upstream as it is, until either side closes.
    func tunnelOpened() {
        chunked = nil
        bodyLeft = .max
        state.pendingReason = .clientClose
        if !handlingInput { pump() }
    }

    /// The upstream took what was queued for it: the request body may flow again.
    func upstreamTakesBody() {
        if !handlingInput { pump() }
    }

    /// The exchange's answer is complete.
    func exchangeEnded(keepAlive: Bool) {
        let tunnel = exchange?.isTunnel ?? false
        retireExchange()
        let bodyPending = bodyLeft > 0 || chunked != nil
        closeAfterWrite = !keepAlive || bodyPending
        // A tunnel's end is no error: the connection simply ends with it.
        if bodyPending && !tunnel { state.pendingReason = .error }
        if state.inExchange { finishExchange() }
        if !handlingInput { pump() }
    }

    /// The exchange failed: an answer if none began (502, 504), else the connection ends.
    /// As nginx, the client connection stays when the request was read whole and keep-alive
    /// allows it: a 502 is an answer like another, and the next request may follow.
    func exchangeFailed(status: Int, responseStarted: Bool, retryAfter: Int? = nil) {
        guard let x = exchange else { return }
        if responseStarted {
            retireExchange()
            tlsAbort = true
            return close(.error)
        }
        let keep = keepsAliveAtResponse(x.clientKeepAlive) && bodyLeft == 0 && chunked == nil
        shared.countAnswer(status: status, server: x.serverIndex)
        var answer = LocalAnswer(status: status, text: nil, serverTokens: x.route.settings.serverTokens, keepAlive: keep,
                                 clientMinor: x.clientMinor, keepAliveHeader: keep ? x.route.keepAliveHeader : [])
        answer.retryAfterSeconds = retryAfter
        retireExchange(answered: writeAnswer(answer))
        if !keep { state.pendingReason = .error }
        closeAfterWrite = !keep
        if state.inExchange { finishExchange() }
        if !handlingInput { pump() }
    }

    /// The upstream failed after the answer's head went out: the client must see an incomplete
    /// message. What is queued goes first (as far as the socket takes it now); with `reset` the
    /// connection then ends with a RST (for an answer that ends with the connection, where a FIN
    /// would make the cut look complete). Over TLS no `close_notify` is sent either way.
    func exchangeAborted(reset: Bool) {
        retireExchange()
        tlsAbort = true
        flush()
        if reset, !streamed, let fd = openSocket {
            var l = linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        }
        close(.error)
    }

    /// The loop's regex matching (made when first needed).
    func regexMatches() -> RegexMatches {
        if let m = shared.regexMatches { return m }
        let m = RegexMatches()
        shared.regexMatches = m
        return m
    }

    /// The regex match of the request being handled, if a regex location matched it.
    var lastRegexMatches: RegexMatches? { shared.regexMatches }

    func logError(_ message: String) { shared.log(.error, message) }

    /// `ssl_verify_client` refused a request (no certificate, or one that failed).
    func countRefusedCertificate(missing: Bool) {
        if missing { shared.stats.clientCertificatesMissing += 1 } else { shared.stats.clientCertificatesInvalid += 1 }
        shared.log(.info, missing ? "client sent no required SSL certificate while reading client request headers"
                                  : "client SSL certificate verify error: \(tls.map { "\($0.clientCertificate)" } ?? "")")
    }

    /// The client as `$remote_addr` says (`real_ip_header`'s address, or the peer) and the address
    /// it connected to: what `server … proxy_protocol` tells the backend.
    func clientAddresses() -> (source: ForwardedAddress, destination: ForwardedAddress)? {
        guard let fd = openSocket, let local = Self.socketAddress(fd, peer: false) else { return nil }
        if let real = shared.realAddress { return (real, local) }
        guard let peer = Self.socketAddress(fd, peer: true) else { return nil }
        return (peer, local)
    }

    static func socketAddress(_ fd: Int32, peer: Bool) -> ForwardedAddress? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { peer ? getpeername(fd, $0, &len) : getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return nil }
        let family = Int32(storage.ss_family)
        return withUnsafeBytes(of: &storage) { raw -> ForwardedAddress? in
            switch family {
            case AF_INET:
                let a = raw.load(as: sockaddr_in.self)
                return withUnsafeBytes(of: a.sin_addr) { ForwardedAddress(bytes: $0, port: UInt16(bigEndian: a.sin_port)) }
            case AF_INET6:
                let a = raw.load(as: sockaddr_in6.self)
                return withUnsafeBytes(of: a.sin6_addr) { ForwardedAddress(bytes: $0, port: UInt16(bigEndian: a.sin6_port)) }
            default:
                return nil
            }
        }
    }

    /// `set_real_ip_from` trusts the peer: the client address it gives (`real_ip_header`) is the
    /// request's `$remote_addr` from now on (the caller resets it with each request).
    func applyRealIP(_ route: CompiledLocation, _ head: HeadLayout, _ bytes: UnsafeRawBufferPointer) {
        let s = route.settings
        let peer = peerAddressBytes(own: true)
        guard !peer.isEmpty, s.realIPFrom.contains(where: { $0.matches(peer) }) else { return }
        if route.realIPFromProxyProtocol {
            if let src = proxied?.source { shared.realAddress = src }
            return
        }
        shared.realAddress = RealIP.fromHeader(head, bytes, name: route.realIPHeaderName, forwardedFor: route.realIPForwardedFor,
                                               recursive: s.realIPRecursive) { a in
            let b = a.bytes
            return s.realIPFrom.contains { $0.matches(b) }
        }
    }

    /// The client's address as 4 or 16 bytes (for `allow` / `deny`); empty for a Unix socket.
    /// Asked of the kernel when a location has rules (not cached: an idle connection holds no
    /// copy of it). `real_ip_header`'s address instead, unless `own`.
    func peerAddressBytes(own: Bool = false) -> [UInt8] {
        if !own, let real = shared.realAddress { return real.bytes }
        guard let fd = openSocket, let peer = Self.socketAddress(fd, peer: true) else { return [] }
        return peer.bytes
    }

    /// nginx's `return 444`: the connection closes without an answer.
    func closeWithoutAnswer() {
        precondition(state.inExchange && !answered, "close without answer outside an exchange: \(state.phase)")
        answered = true
        logLocalAnswer(LocalAnswer.Written(status: 444, headBytes: 0, bodyBytes: 0))
        close(.error)
    }

    /// The peer's (`peer`) or our own address of the connection, as text: the address or the
    /// port. A Unix socket's peer is `unix:` (as nginx's `$remote_addr`). The peer is the address
    /// `real_ip_header` gave for the request, unless `own`.
    func writeAddress<S: HeadSink & ~Copyable>(peer: Bool, port: Bool, own: Bool = false, into out: inout S) {
        if peer && !own, let real = shared.realAddress {
            // A header gives no port: the peer's own stands for it.
            if !port { return real.writeText(into: &out) }
            if real.port != 0 { return out.putDecimal(Int(real.port)) }
        }
        guard let fd = openSocket else { return }
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { peer ? getpeername(fd, $0, &len) : getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return }
        let family = Int32(storage.ss_family)
        var text = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &text) { t in
            let chars = t.baseAddress!.assumingMemoryBound(to: CChar.self)
            withUnsafeMutablePointer(to: &storage) { sp in
                sp.withMemoryRebound(to: UInt8.self, capacity: MemoryLayout<sockaddr_storage>.size) { raw in
                    var portValue: UInt16 = 0
                    var ok = false
                    if family == AF_INET {
                        let a = UnsafeMutableRawPointer(raw).assumingMemoryBound(to: sockaddr_in.self)
                        portValue = UInt16(bigEndian: a.pointee.sin_port)
                        ok = port || inet_ntop(AF_INET, &a.pointee.sin_addr, chars, 64) != nil
                    } else if family == AF_INET6 {
                        let a = UnsafeMutableRawPointer(raw).assumingMemoryBound(to: sockaddr_in6.self)
                        portValue = UInt16(bigEndian: a.pointee.sin6_port)
                        ok = port || inet_ntop(AF_INET6, &a.pointee.sin6_addr, chars, 64) != nil
                    } else if family == AF_UNIX && !port {
                        return out.put("unix:")
                    }
                    guard ok else { return }
                    if port { return out.putDecimal(Int(portValue)) }
                    out.put(UnsafeRawBufferPointer(rebasing: t[0..<strlen(chars)]))
                }
            }
        }
    }

    /// nginx's keep-alive rules for the answer to `head` (`keepalive_requests`, `keepalive_time`,
    /// `keepalive_timeout 0`, drain, what the client asked for); sets the close reason when they say close.
    /// As nginx, the answering location's keep-alive settings decide (`route`; the server's
    /// without one), and its `keepalive_timeout` is the idle time that follows.
    private func clientKeepAlive(head: HeadLayout, close: Bool, route: CompiledLocation? = nil) -> Bool {
        // (Fields read one by one: a copy of the whole settings struct per request costs more.)
        let requests = route?.settings.keepaliveRequests ?? shared.settings.keepaliveRequests
        let time = route?.settings.keepaliveTimeMs ?? shared.settings.keepaliveTimeMs
        keepaliveTimeoutMs = Int32(clamping: route?.settings.keepaliveTimeoutMs ?? shared.settings.keepaliveTimeoutMs)
        let policy = KeepAlivePolicy(maxRequests: requests, maxLifetimeMs: time, draining: shared.draining)
        let keep = state.keepsAlive(requestNumber: state.requests, clientWants: head.clientWantsKeepAlive, policy: policy,
                                    keepaliveTimeoutMs: Int64(keepaliveTimeoutMs), now: Int64(shared.loop.now))
        if close { state.pendingReason = .error }
        return keep && !close
    }

    /// The keep-alive decision made when the request arrived, as it stands when its answer's head
    /// is written: a shutdown begun meanwhile makes it close.
    func keepsAliveAtResponse(_ decided: Bool) -> Bool {
        guard decided, shared.draining else { return decided }
        state.pendingReason = .shutdown
        return false
    }

    // MARK: Answering

    /// Answers the current request from Tether itself and writes it: `text` is the body (or a
    /// redirect's `Location`), nil for nginx's error page. The keep-alive decision is nginx's
    /// (`keepalive_requests`, `keepalive_time`, `keepalive_timeout 0`, drain, what the client
    /// asked for); `close` forces a close. `route` gives `server_tokens` and the `Keep-Alive` line.
    /// `allow`: the answer says `Allow: GET, HEAD` (a 405 from an admin page).
    func respond(status: Int, text: UnsafeRawBufferPointer?, contentType: String = "text/plain", head: HeadLayout,
                 isHEAD: Bool = false, route: CompiledLocation? = nil, close: Bool = false, allow: Bool = false, detail: StaticString? = nil) {
        precondition(state.inExchange && !answered, "respond outside an exchange or twice: \(state.phase)")
        answered = true
        // A body still coming is read and dropped before the next request (its framing is known).
        let keepAlive = clientKeepAlive(head: head, close: close, route: route)
        shared.countAnswer(status: status, server: route?.serverIndex)
        var answer = LocalAnswer(status: status, text: text, contentType: contentType, serverTokens: route?.settings.serverTokens ?? true,
                                 allow: allow, keepAlive: keepAlive, clientMinor: head.minorVersion, isHEAD: isHEAD,
                                 keepAliveHeader: keepAlive ? route?.keepAliveHeader ?? [] : [])
        answer.detail = detail
        logLocalAnswer(writeAnswer(answer))
        closeAfterWrite = !keepAlive
        if !keepAlive && (bodyLeft > 0 || chunked != nil) {
            // The connection closes after this answer: the rest of the body is not waited for.
            bodyLeft = 0
            chunked = nil
            finishExchange()
        }
        flush()
    }

    /// What an answer given later needs of its request, whose head is gone by then.
    struct LaterAnswer {
        /// The request's number on its connection: the answer is for that request only.
        let request: Int
        let keepAlive: Bool
        let clientMinor: Int
        let isHEAD: Bool
        let route: CompiledLocation
        /// The access log's draft, when the location logs.
        let logDraft: [UInt8]?
        let logStartedAt: UInt64
    }

    /// The current request is answered later, through `answer(_:status:body:contentType:)` on
    /// the loop's thread (an admin page gathered from every loop): until then its body is read
    /// and dropped, and pipelined requests wait. The keep-alive decision is taken now.
    func answerLater(head: HeadLayout, isHEAD: Bool, route: CompiledLocation) -> LaterAnswer {
        precondition(state.inExchange && !answered, "answerLater outside an exchange or twice: \(state.phase)")
        answered = true
        answerPending = true
        var draft: [UInt8]?
        if shared.drafted {
            draft = []
            swap(&draft!, &shared.logDraft)
            shared.dropDraft()
        }
        return LaterAnswer(request: state.requests, keepAlive: clientKeepAlive(head: head, close: false, route: route),
                           clientMinor: head.minorVersion, isHEAD: isHEAD, route: route, logDraft: draft, logStartedAt: shared.logStartedAt)
    }

    /// The answer `answerLater` promised. Dropped when the connection closed meanwhile.
    func answer(_ later: LaterAnswer, status: Int, body: UnsafeRawBufferPointer, contentType: String) {
        guard isOpen, answerPending, state.inExchange, state.requests == later.request else { return }
        answerPending = false
        let keepAlive = keepsAliveAtResponse(later.keepAlive)
        shared.countAnswer(status: status, server: later.route.serverIndex)
        let written = writeAnswer(LocalAnswer(status: status, text: body, contentType: contentType, serverTokens: later.route.settings.serverTokens,
                                              keepAlive: keepAlive, clientMinor: later.clientMinor, isHEAD: later.isHEAD,
                                              keepAliveHeader: keepAlive ? later.route.keepAliveHeader : []))
        if let draft = later.logDraft, let log = shared.accessLog {
            log.finish(draft, route: later.route, startedAt: later.logStartedAt,
                       facts: AnswerFacts(status: status, headBytes: written.headBytes, bodyBytes: written.bodyBytes), dates: shared.dateCache)
        }
        closeAfterWrite = !keepAlive
        // A body still arriving is dropped to its end first; then the next request may follow.
        if bodyLeft == 0 && chunked == nil { finishExchange() }
        pump()
    }

    /// The loop this connection is on (for work that answers it later).
    var loop: IOLoop { shared.loop }

    func respond(status: Int, body: [UInt8], contentType: String = "text/plain", head: HeadLayout, close: Bool = false) {
        body.withUnsafeBytes { respond(status: status, text: $0, contentType: contentType, head: head, close: close) }
    }

    /// An answer made here, queued with the loop's cached date.
    @discardableResult
    private func writeAnswer(_ a: LocalAnswer) -> LocalAnswer.Written {
        shared.dateCache.refresh()
        let n = a.write(date: shared.dateCache.httpDate, into: &outbound)
        return LocalAnswer.Written(status: a.status, headBytes: n - a.bodyLength, bodyBytes: a.bodyLength)
    }

    /// An error answer that ends the connection (nginx's page, `Connection: close`); `server`
    /// is the `server` block that took the request, if one did.
    @discardableResult
    private func writeError(_ status: Int, server: Int? = nil) -> LocalAnswer.Written {
        shared.countAnswer(status: status, server: server)
        return writeAnswer(LocalAnswer(status: status, text: nil, keepAlive: false))
    }

    /// Answers a malformed or timed-out request with `status` and closes once it is written (as
    /// nginx: no keep-alive after a head that could not be read).
    private func answerError(_ status: Int) {
        writeError(status)
        if let r = state.close(.error) { shared.stats.downstreamClosed[r] += 1 }
    }

    /// The request was answered and its body read: the next one may follow (unless a shutdown
    /// began after its answer's head went out saying keep-alive: then the connection closes).
    private func finishExchange() {
        guard state.inExchange else { return }
        if closeAfterWrite || shared.draining {
            if let r = state.close(closeAfterWrite ? nil : .shutdown) { shared.stats.downstreamClosed[r] += 1 }
            return
        }
        state.exchangeFinished(keepaliveTimeoutMs: Int64(keepaliveTimeoutMs), now: Int64(shared.loop.now))
    }

    // MARK: Writing and closing

    private func flush() {
        guard !outbound.isEmpty, let fd = openSocket else { return }
        let before = outbound.queuedBytes
        if streamed {
            if !flushStream() { return close(.clientClose) }
        } else if let tls {
            if case .error = tls.flush(&outbound) { return close(.tlsError) }
        } else if case .error = outbound.flush(to: fd) {
            return close(.clientClose)
        }
        // send_timeout runs while the client leaves bytes queued, from the last write that
        // took some (nginx's: between two successive writes).
        if !outbound.isEmpty {
            if timerUse != .send || outbound.queuedBytes < before { armSendTimer() }
        } else if timerUse == .send {
            timerUse = .none
            armTimer()
        }
    }

    private func armSendTimer() {
        guard isOpen, !lingering else { return }
        timerUse = .send
        shared.loop.arm(handle, afterNanoseconds: UInt64(shared.settings.sendTimeoutMs) * 1_000_000)
    }

    /// After the input was handled: writes what is queued, then closes, lingers or waits, as
    /// the connection's state says.
    private func settle() {
        flush()
        guard isOpen else { return }
        if peerClosed && !state.isClosed && exchange != nil && inboundBytes == 0 && (bodyLeft == 0 || exchange!.isTunnel) {
            // The client closed while its answer is with the upstream: as nginx (without
            // proxy_ignore_client_abort), the exchange is abandoned with the connection.
            return close(.clientClose)
        }
        if peerClosed && !state.isClosed && exchange == nil && !answerPending {
            // The client is done sending: what it asked for is answered (or cannot be).
            if let r = state.close(.clientClose) { shared.stats.downstreamClosed[r] += 1 }
        }
        if state.isClosed {
            // A final answer: close once it is written (a writable event brings us back; the
            // client that never takes it is send_timeout's, which comes with the exchange glue).
            guard outbound.isEmpty else { return }
            if lingering {
                if peerClosed { close(nil) }
                return
            }
            let moreInput = inboundBytes > 0 || bodyLeft > 0 || chunked != nil || readable
            guard moreInput, !peerClosed, !streamed, let fd = openSocket else { return close(nil) }
            // Client bytes are still coming: our FIN, then read and drop them for a while, so
            // that a close with unread data (a reset) cannot destroy the answer in flight.
            tls?.shutdown()
            shutdown(fd, Int32(SHUT_WR))
            lingering = true
            if var b = inbound.take() { b.consume(b.readableBytes); shared.pool.recycle(b) }
            timerUse = .linger
            shared.loop.arm(handle, afterNanoseconds: UInt64(shared.settings.lingerMs) * 1_000_000)
            if readable { pump() }
            return
        }
        releaseIdleBuffer()
        armTimer()
    }

    /// Shutdown: closes now if between requests with nothing of a head read (as
    /// `ClientConnectionState.closesOnDrain` says); otherwise the answer under way decides.
    func drain() {
        guard isOpen, !state.isClosed else { return }
        if state.closesOnDrain(bufferedBytes: inboundBytes > 0) { close(.shutdown) }
    }

    /// Closes now; `reason` (or the pending one) is counted unless the close was counted already.
    func close(_ reason: DownstreamCloseReason?) {
        guard isOpen else { return }
        if let x = exchange {
            let started = x.responseStarted
            x.clientLeft()
            // As nginx: 499 for a client that left before its answer began.
            retireExchange(status: started ? nil : 499)
        }
        if streamed { return closeStream(reason) }
        if let r = state.close(reason) { shared.stats.downstreamClosed[r] += 1 }
        if hasProxied {
            shared.proxied.removeValue(forKey: handle.token)
            hasProxied = false
        }
        if let b = inbound.take() { shared.pool.recycle(b) }
        outbound = OutboundQueue(pool: shared.pool)
        // close_notify, unless the answer was cut (or the lingering close sent it already).
        if let tls, !tlsAbort, !lingering { tls.shutdown() }
        tls = nil
        shared.loop.close(handle)
        socket = -1
        shared.connectionClosed()
    }

    /// The stream ends; the session's connection goes on. (Apart from `close`, which every
    /// HTTP/1.1 connection runs, so that its path stays as short as it was.)
    @inline(never)
    private func closeStream(_ reason: DownstreamCloseReason?) {
        _ = state.close(reason)
        streamed = false
        let port = shared.streamPorts.removeValue(forKey: handle.token)
        if hasProxied {
            shared.proxied.removeValue(forKey: handle.token)
            hasProxied = false
        }
        tls = nil
        if let b = inbound.take() { shared.pool.recycle(b) }
        outbound = OutboundQueue(pool: shared.pool)
        shared.loop.close(handle)
        socket = -1
        port?.closed(cut: tlsAbort)
    }

    /// The stream's answer to its session (false: the session's connection failed).
    @inline(never)
    private func flushStream() -> Bool {
        guard let stream else { return false }
        if case .error = stream.flush(&outbound) { return false }
        return true
    }

    /// An idle connection holds no buffer: an empty one goes back to the pool.
    private func releaseIdleBuffer() {
        if let b = inbound.take() {
            if b.isEmpty { b.recycle(to: shared.poolRef) } else { inbound = consume b }
        }
    }

    /// Arms the one timer for what the connection waits for now: the header timeout from the
    /// accept or from a head's first byte, the keep-alive timeout from the last answer, the body
    /// timeout from the last body bytes (as `ClientConnectionState.deadline` and nginx count).
    private func armTimer() {
        guard isOpen, !lingering else { return }
        let want: TimerUse
        if let tls, !tls.handshakeDone {
            want = .handshake
        } else if !outbound.isEmpty {
            // The client is not taking what is queued (`flush` arms and re-arms it).
            if timerUse != .send { armSendTimer() }
            return
        } else if state.inExchange {
            // A tunnel's client may be quiet as long as it likes: the upstream's read timeout
            // bounds the tunnel's silence, as nginx's upgraded connections are timed.
            want = (bodyLeft > 0 || chunked != nil) && exchange?.isTunnel != true ? .body : .none
        } else if state.headStarted {
            want = .head
        } else {
            want = state.requests == 0 ? .firstHead : .keepalive
        }
        let progress = bodyProgress
        bodyProgress = false
        guard want != timerUse || (want == .body && progress) else { return }
        timerUse = want
        let ms: Int64
        switch want {
        case .none, .linger, .send: return shared.loopRef { $0.cancelTimer(handle) }
        case .handshake: ms = tls?.handshakeTimeoutMs ?? shared.settings.headerTimeoutMs
        case .firstHead, .head: ms = shared.settings.headerTimeoutMs
        case .keepalive: ms = Int64(keepaliveTimeoutMs)
        case .body: ms = shared.settings.bodyTimeoutMs
        }
        let h = handle
        shared.loopRef { $0.arm(h, afterNanoseconds: UInt64(ms) * 1_000_000) }
    }
}

/// What a PROXY protocol header said of a connection: the client, and the address it connected to.
final class ProxiedAddresses {
    let source: ForwardedAddress?
    let destination: ForwardedAddress?
    init(source: ForwardedAddress?, destination: ForwardedAddress?) {
        self.source = source
        self.destination = destination
    }
}
