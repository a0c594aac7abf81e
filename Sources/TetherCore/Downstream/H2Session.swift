#if canImport(Glibc)
import Glibc
#endif
import CTether
import TetherH2
import TetherHTTP
import TetherIO
import TetherTLS

/// An HTTP/2 client connection (ALPN `h2`): the frames are `H2Connection`'s to read, and each
/// stream's request is answered by a `ClientConnection` of its own, which reads the request as
/// HTTP/1.1 from an `H2StreamPort` and writes its answer back through it, so that routing, the
/// upstream pools, the limits and every check of the HTTP/1.1 path serve both protocols. The
/// port turns the answer's head into a HEADERS frame and its body into DATA frames, within the
/// client's windows; what a stream's client has not yet been sent stays in that stream's queue,
/// and the upstream is read no further than it takes (backpressure per stream).
///
/// The session itself times only its idleness (`keepalive_timeout` with no stream open, then a
/// GOAWAY and the close); each stream's connection has the client timeouts and `send_timeout`.
final class H2Session: IOHandler, PostedWork {
    private unowned(unsafe) let shared: ClientLoop
    private var handle: Handle
    private var socket: Int32
    private var tls: TLSSocket?
    private var machine: H2Connection
    /// Bytes read and not yet taken by the machine (a frame may span reads).
    private var input: [UInt8] = []
    private var outbound: OutboundQueue
    private var streams: [UInt32: H2StreamPort] = [:]
    private var readable = true
    private var peerClosed = false
    private var closed = false
    /// Streams taken (`keepalive_requests` counts them).
    private var requests = 0
    private let chunkSize: Int
    /// What the connection's PROXY protocol header said (its streams see it too).
    private let proxied: ProxiedAddresses?

    /// `tls` nil: h2c (prior knowledge on a plain listener).
    init(shared: ClientLoop, handle: Handle, socket: Int32, tls: TLSSocket?) {
        self.shared = shared
        self.handle = handle
        self.socket = socket
        self.tls = tls
        machine = H2Connection(settings: shared.settings.http2)
        proxied = shared.proxied[handle.token]
        outbound = OutboundQueue(pool: shared.pool, limit: 256 * 1024)
        chunkSize = shared.settings.http2ChunkSize
    }

    var streamCount: Int { streams.count }

    /// Bytes read before the session took the connection (h2c: the preface and what followed).
    func take(_ bytes: UnsafeRawBufferPointer) { input.append(contentsOf: bytes) }

    private func read(into buf: inout IOBuffer) -> ReadResult {
        if let tls { return tls.read(into: &buf) }
        return socket >= 0 ? buf.read(from: socket) : .error(EBADF)
    }

    private func write() -> OutboundQueue.FlushResult {
        if let tls { return tls.flush(&outbound) }
        return socket >= 0 ? outbound.flush(to: socket) : .error(EBADF)
    }

    /// The server's preface (SETTINGS), then whatever came with the handshake's last flight.
    func start() {
        shared.stats.http2Connections += 1
        process()
        pump()
    }

    // MARK: Events

    func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {
        if lingering {
            if events.contains(.error) || events.contains(.hangup) { return release() }
            return discard()
        }
        if events.contains(.error) || events.contains(.hangup) && !events.contains(.readable) { return close(.clientClose) }
        if events.contains(.readable) || events.contains(.readHangup) { readable = true }
        pump()
    }

    func timerFired(handle: Handle, loop: IOLoop) {
        if lingering { return release() }
        // keepalive_timeout with no stream open: GOAWAY, then the close.
        guard streams.isEmpty else { return armTimer() }
        machine.goAway(.noError)
        writeOutput()
        close(.keepaliveTimeout)
    }

    /// Reads what the client sent while the answers are being taken, hands it to the machine,
    /// and writes what it answers.
    private func pump() {
        guard !closed else { return }
        flush()
        var taken = 0
        while !closed && readable && !peerClosed && !outbound.isFull {
            // http2_recv_buffer_size: at most that much is read and acted on in one pass; the
            // rest waits for the end of the pass, after the loop's other connections.
            if taken >= recvLimit {
                readPosted = true
                if !flushPosted {
                    flushPosted = true
                    shared.loop.post(self)
                }
                break
            }
            var buf = shared.pool.take()
            let result = read(into: &buf)
            switch result {
            case .bytes(let n, let eof):
                taken += n
                buf.withReadableBytes { input.append(contentsOf: $0) }
                if eof { peerClosed = true }
                if n == 0 { readable = false }
            case .wouldBlock:
                readable = false
            case .eof:
                peerClosed = true
            case .error:
                shared.pool.recycle(buf)
                return close(.clientClose)
            }
            shared.pool.recycle(buf)
            process()
        }
        if closed { return }
        if peerClosed {
            // The client is gone: its streams end with it.
            return close(.clientClose)
        }
        if machine.goingAway && streams.isEmpty { return close(goawayReason) }
        armTimer()
    }

    /// What the machine read, gathered while it reads and acted on after (the streams' answers
    /// go through the machine too, which must not be re-entered).
    private struct Collector: H2Receiver {
        enum Event {
            case headers(UInt32, [H2Field], end: Bool, trailers: Bool, tooLarge: Bool)
            case data(UInt32, [UInt8], end: Bool)
            case reset(UInt32, H2ErrorCode, byPeer: Bool)
            case window(UInt32)
            case goaway
        }
        var events: [Event] = []
        mutating func headers(stream: UInt32, fields: [H2Field], endStream: Bool, trailers: Bool, tooLarge: Bool) {
            events.append(.headers(stream, fields, end: endStream, trailers: trailers, tooLarge: tooLarge))
        }
        mutating func data(stream: UInt32, bytes: UnsafeRawBufferPointer, endStream: Bool) { events.append(.data(stream, Array(bytes), end: endStream)) }
        mutating func streamReset(stream: UInt32, code: H2ErrorCode, byPeer: Bool) { events.append(.reset(stream, code, byPeer: byPeer)) }
        mutating func windowOpened(stream: UInt32) { events.append(.window(stream)) }
        mutating func goaway(lastStream: UInt32, code: H2ErrorCode) { events.append(.goaway) }
    }

    /// Hands the bytes read to the machine, acts on what it read, writes its answers.
    private func process() {
        guard !input.isEmpty else { return }
        var collector = Collector()
        let used = input.withUnsafeBytes { machine.receive($0, &collector) }
        input.removeFirst(used)
        if let f = machine.failure, case .connection(let code, let why) = f {
            // The GOAWAY is queued; what the client sent is not acted on any further.
            shared.log(.info, "client HTTP/2 connection error \(code.name): \(why)")
            shared.stats.http2Errors[code.name, default: 0] += 1
            writeOutput()
            return close(.error)
        }
        // The answers made while these frames are acted on go out together, in as few TLS
        // records and writes as the queue allows, not one write per stream.
        batching = true
        defer {
            batching = false
            writeOutput()
        }
        for e in collector.events {
            if closed { return }
            switch e {
            case .headers(let id, let fields, let end, let trailers, let tooLarge): headers(id, fields, end, trailers, tooLarge)
            case .data(let id, let bytes, let end): data(id, bytes, end)
            case .reset(let id, let code, let byPeer): streamReset(id, code, byPeer)
            case .window(let id): windowOpened(id)
            case .goaway: shared.stats.http2GoawaysReceived += 1
            }
            writeOutput()
        }
    }

    /// The session is acting on what it read: writes wait for the end of it.
    private var batching = false

    /// Queues the machine's frames and writes (unless batching).
    private func writeOutput() {
        if machine.goingAway && !goawayCounted {
            goawayCounted = true
            shared.stats.http2GoawaysSent += 1
        }
        if !machine.output.isEmpty {
            machine.output.withUnsafeBytes { outbound.append($0) }
            machine.output.removeAll(keepingCapacity: true)
        }
        if !batching || outbound.isFull { flush() }
    }

    private func flush() {
        guard !closed else { return }
        if !outbound.isEmpty {
            let wasFull = outbound.isFull
            if case .error = write() {
                let reason: DownstreamCloseReason = tls != nil ? .tlsError : .clientClose
                // From inside a stream's own write, whose queue is in use: the close comes right after.
                guard !inStreamWrite else {
                    let me = UncheckedBox(self)
                    shared.loop.execute { _ in me.value.close(reason) }
                    return
                }
                return close(reason)
            }
            if wasFull && !outbound.isFull { resumePending = true }
        }
        // Room again: the streams that wait for it go on; from inside a stream's write (its
        // queue in use), at the end of the pass.
        guard resumePending && !outbound.isFull else { return }
        if inStreamWrite {
            if !flushPosted {
                flushPosted = true
                shared.loop.post(self)
            }
            return
        }
        resumePending = false
        for port in streams.values.sorted(by: { $0.id < $1.id }) { port.resume() }
    }

    /// Streams wait to be resumed (room came while a stream was writing).
    private var resumePending = false

    private func armTimer() {
        guard !closed else { return }
        if streams.isEmpty {
            shared.loop.arm(handle, afterNanoseconds: UInt64(shared.settings.keepaliveTimeoutMs) * 1_000_000)
        } else {
            shared.loop.cancelTimer(handle)
        }
    }

    /// Shutdown: GOAWAY; the streams open finish, and the connection closes after them.
    func drain() {
        guard !closed else { return }
        machine.goAway(.noError)
        writeOutput()
        if streams.isEmpty { close(.shutdown) }
    }

    /// Ends the connection: its streams close, the last frames (a GOAWAY) go out, and, while
    /// the client may still be sending, the session lingers (as nginx's lingering close): our
    /// side is shut, and what comes is read and dropped until the client closes or `lingerMs`,
    /// so that a reset cannot destroy the GOAWAY before the client reads it.
    private func close(_ reason: DownstreamCloseReason) {
        guard !closed else { return }
        closed = true
        for port in streams.values { port.connection?.close(.clientClose) }
        streams = [:]
        shared.stats.downstreamClosed[reason] += 1
        if !outbound.isEmpty { _ = write() }
        guard !peerClosed, outbound.isEmpty, socket >= 0 else { return release() }
        tls?.shutdown()
        shutdown(socket, Int32(SHUT_WR))
        lingering = true
        shared.loop.arm(handle, afterNanoseconds: UInt64(shared.settings.lingerMs) * 1_000_000)
        discard()
    }

    private var lingering = false

    /// Lingering: reads and drops until the client's EOF.
    private func discard() {
        while socket >= 0 {
            var buf = shared.pool.take()
            let r = read(into: &buf)
            shared.pool.recycle(buf)
            switch r {
            case .bytes(_, let eof): if eof { return release() }
            case .wouldBlock: return
            case .eof, .error: return release()
            }
        }
    }

    private func release() {
        lingering = false
        if proxied != nil { shared.proxied.removeValue(forKey: handle.token) }
        outbound = OutboundQueue(pool: shared.pool)
        tls = nil
        shared.loop.close(handle)
        socket = -1
        shared.connectionClosed()
    }

    // MARK: What the machine reads

    private func headers(_ id: UInt32, _ fields: [H2Field], _ endStream: Bool, _ trailers: Bool, _ tooLarge: Bool) {
        if trailers {
            streams[id]?.requestTrailers(fields)
            return
        }
        requests += 1
        shared.stats.http2Streams += 1
        if requests >= shared.settings.keepaliveRequests && !machine.goingAway {
            goawayReason = .keepaliveRequests
            machine.goAway(.noError)
        }
        if tooLarge {
            shared.log(.info, "client sent too large a header list on HTTP/2 stream \(id) (large_client_header_buffers)")
            return answerLocally(id, status: 431, fields: fields)
        }
        let request: H2Request
        switch H2Request.parse(fields) {
        case .success(let r): request = r
        case .failure(let why):
            shared.log(.info, "client sent a malformed HTTP/2 request on stream \(id): \(why)")
            shared.stats.http2Errors["malformed_request", default: 0] += 1
            machine.reset(id, .protocolError)
            return
        }
        let port = H2StreamPort(session: self, id: id, request: request, bodyFollows: !endStream)
        streams[id] = port
        let connection = ClientConnection(shared: shared)
        port.connection = connection
        connection.startStream(port, socket: socket, tls: tls, proxied: proxied)
        port.deliver()
    }

    private func data(_ id: UInt32, _ bytes: [UInt8], _ endStream: Bool) {
        guard let port = streams[id], port.connection != nil else {
            // The stream's answer is done: what still comes is read and dropped.
            machine.consumed(id, bytes.count)
            return
        }
        bytes.withUnsafeBytes { port.requestData($0, end: endStream) }
    }

    private func streamReset(_ id: UInt32, _ code: H2ErrorCode, _ byPeer: Bool) {
        guard let port = streams.removeValue(forKey: id) else { return }
        if byPeer { shared.stats.http2Resets[code.name, default: 0] += 1 }
        port.ended = true
        port.connection?.close(.clientClose)
    }

    private func windowOpened(_ id: UInt32) {
        if id == 0 {
            for port in streams.values.sorted(by: { $0.id < $1.id }) { port.resume() }
        } else {
            streams[id]?.resume()
        }
    }

    // MARK: What the streams send

    /// How many body bytes `id` may send now: within the client's windows, one frame
    /// (`http2_chunk_size`), and while the connection's queue has room.
    func window(_ id: UInt32) -> Int {
        guard !closed, !outbound.isFull else { return 0 }
        return min(machine.sendWindow(id), chunkSize)
    }

    /// `status` nil: trailers.
    func sendHeaders(_ id: UInt32, status: Int?, fields: [(name: String, value: String)], end: Bool) {
        var block: [UInt8] = []
        H2ResponseBlock.encode(status: status, fields: fields, into: &block)
        sendBlock(id, block, end: end)
    }

    /// Frame headers are written here before they are queued (its storage is kept: no
    /// allocation per frame).
    private var frameScratch: [UInt8] = []

    /// A header block already encoded (`H2ResponseBlock`), as HEADERS and CONTINUATION frames.
    func sendBlock(_ id: UInt32, _ block: [UInt8], end: Bool) {
        frameScratch.removeAll(keepingCapacity: true)
        H2Write.headers(id, block: block, endStream: end, maxFrame: machine.peerMaxFrameSize, to: &frameScratch)
        frameScratch.withUnsafeBytes { outbound.append($0) }
        if end { machine.sent(id, 0, end: true) }
    }

    func sendData(_ id: UInt32, _ bytes: UnsafeRawBufferPointer, end: Bool) {
        frameScratch.removeAll(keepingCapacity: true)
        H2Write.dataHeader(id, length: bytes.count, endStream: end, to: &frameScratch)
        frameScratch.withUnsafeBytes { outbound.append($0) }
        if !bytes.isEmpty { outbound.append(bytes) }
        machine.sent(id, bytes.count, end: end)
    }

    /// What the streams queued goes out at the end of the loop's pass, with what other streams
    /// queue in the same pass (their upstreams' answers arrive as events of their own).
    func streamWrote() {
        guard !batching, !closed else { return }
        if outbound.isFull {
            inStreamWrite = true
            writeOutput()
            inStreamWrite = false
            return
        }
        if !flushPosted {
            flushPosted = true
            shared.loop.post(self)
        }
    }

    private var flushPosted = false

    func runPosted() {
        flushPosted = false
        writeOutput()
        if readPosted {
            readPosted = false
            pump()
        }
    }

    /// Reading stopped at `http2_recv_buffer_size` with more to read.
    private var readPosted = false
    private var recvLimit: Int { shared.settings.http2RecvBufferSize }

    /// Why the connection closes once its streams are done after a GOAWAY of this side's.
    private var goawayReason = DownstreamCloseReason.shutdown

    /// A stream's connection is writing (its queue is in use): nothing may close it now.
    private var inStreamWrite = false
    /// The GOAWAY this side sent is counted.
    private var goawayCounted = false

    /// The stream's client took `n` body bytes: its window opens again.
    func consumed(_ id: UInt32, _ n: Int) {
        machine.consumed(id, n)
    }

    /// The stream's connection closed: its answer was complete (`complete`), or it was cut, or
    /// its request was still coming.
    func streamEnded(_ port: H2StreamPort, complete: Bool, requestDone: Bool) {
        if !complete {
            machine.reset(port.id, .internalError)
        } else if !requestDone {
            // The answer went out whole before the request's body ended: the rest is not wanted.
            machine.reset(port.id, .noError)
        }
        streams.removeValue(forKey: port.id)
        writeOutput()
        if machine.goingAway && streams.isEmpty && !closed { close(goawayReason) } else { armTimer() }
    }

    /// An answer of the session's own (nginx's 431 page for a header list over the limit), made
    /// as every local answer is and sent through a port.
    private func answerLocally(_ id: UInt32, status: Int, fields: [H2Field]) {
        shared.countAnswer(status: status, server: nil)
        let head = fields.first { $0.name.elementsEqual(":method".utf8) }?.value.elementsEqual("HEAD".utf8) == true
        let port = H2StreamPort(session: self, id: id, isHEAD: head)
        streams[id] = port
        var queue = OutboundQueue(pool: shared.pool)
        shared.dateCache.refresh()
        _ = LocalAnswer(status: status, text: nil, keepAlive: false).write(date: shared.dateCache.httpDate, into: &queue)
        _ = port.flush(&queue)
        port.closed(cut: !queue.isEmpty)
    }
}

/// One stream's request and answer as the stream's `ClientConnection` sees them: the request
/// as HTTP/1.1 bytes to read (the head `H2Request` wrote, then the body, chunked when its length
/// is unknown), and its HTTP/1.1 answer taken apart into a HEADERS frame and DATA frames.
final class H2StreamPort {
    unowned(unsafe) let session: H2Session
    let id: UInt32
    let isHEAD: Bool
    var connection: ClientConnection?
    /// The stream was reset by the client: nothing more is sent on it.
    var ended = false
    /// The answer could not be framed (a broken head or chunk): the stream is reset.
    private var failed = false
    /// The request's HTTP/1.1 bytes not yet read by the connection.
    private var input: [UInt8] = []
    private var inputStart = 0
    private let chunkedRequest: Bool
    private(set) var requestDone: Bool
    /// Body bytes of DATA frames not yet read by the connection (given back to the client's window as they are).
    private var uncredited = 0

    private enum Phase: Equatable { case head, length(Int64), chunked, close, done }
    private var phase = Phase.head
    private var head: [UInt8] = []
    private var decoder = ChunkedDecoder()
    /// The answer's bytes wait for the client's window.
    private var blocked = false

    init(session: H2Session, id: UInt32, request: H2Request, bodyFollows: Bool) {
        self.session = session
        self.id = id
        isHEAD = request.method.elementsEqual("HEAD".utf8)
        chunkedRequest = bodyFollows && !request.hasContentLength
        requestDone = !bodyFollows
        request.http1Head(bodyFollows: bodyFollows, into: &input)
    }

    /// A port for an answer of the session's own (no request, no connection).
    init(session: H2Session, id: UInt32, isHEAD: Bool) {
        self.session = session
        self.id = id
        self.isHEAD = isHEAD
        chunkedRequest = false
        requestDone = true
    }

    // MARK: The request

    func requestData(_ bytes: UnsafeRawBufferPointer, end: Bool) {
        if chunkedRequest && !bytes.isEmpty {
            ChunkedDecoder.writeSize(Int64(bytes.count), into: &input)
            input.append(contentsOf: bytes)
            input += [13, 10]
        } else {
            input.append(contentsOf: bytes)
        }
        uncredited += bytes.count
        if end {
            if chunkedRequest { input.append(contentsOf: "0\r\n\r\n".utf8) }
            requestDone = true
        }
        deliver()
    }

    /// Trailers end the request; a chunked body carries them on, a sized one cannot (dropped).
    func requestTrailers(_ fields: [H2Field]) {
        if chunkedRequest {
            input.append(contentsOf: "0\r\n".utf8)
            for f in fields where H2Request.validName(f.name) && H2Request.validValue(f.value) {
                input += f.name + [UInt8(ascii: ":"), 0x20] + f.value + [13, 10]
            }
            input += [13, 10]
        }
        requestDone = true
        deliver()
    }

    /// Tells the connection there is something to read.
    func deliver() {
        connection?.ioEvent(.readable, handle: Handle(token: 0), loop: connection!.loop)
    }

    /// What the connection reads: the request's bytes, as far as `buf` has room. Never an EOF:
    /// the end of a stream's request is its framing's (the client's half-close would abandon the answer).
    func read(into buf: inout IOBuffer) -> ReadResult {
        guard inputStart < input.count else { return .wouldBlock }
        let n = buf.append(contentsOf: input[inputStart...])
        inputStart += n
        if inputStart == input.count {
            input.removeAll(keepingCapacity: true)
            inputStart = 0
        }
        let credit = min(n, uncredited)
        if credit > 0 {
            uncredited -= credit
            session.consumed(id, credit)
        }
        return n > 0 ? .bytes(n, eof: false) : .wouldBlock
    }

    // MARK: The answer

    /// The connection's queue, as frames: as much as the client's windows let through.
    func flush(_ queue: inout OutboundQueue) -> OutboundQueue.FlushResult {
        let result = queue.flush(gather: 0) { take($0) }
        session.streamWrote()
        return result
    }

    /// The window opened, or the session's queue has room: the connection writes again.
    func resume() {
        guard blocked, let c = connection else { return }
        blocked = false
        c.ioEvent(.writable, handle: Handle(token: 0), loop: c.loop)
    }

    private func take(_ p: UnsafeRawBufferPointer) -> OutboundQueue.WriteOutcome {
        if ended || failed || phase == .done { return .wrote(p.count) }
        var used = 0
        while used < p.count && !failed {
            switch phase {
            case .head:
                let before = head.count
                head.append(contentsOf: UnsafeRawBufferPointer(rebasing: p[used...]))
                guard let consumed = parseHead() else {
                    if failed { return .failed }
                    guard head.count <= 64 * 1024 else { return fail() }
                    return .wrote(p.count)
                }
                used += consumed - before
                head.removeAll(keepingCapacity: false)
            case .length(let left):
                let window = session.window(id)
                guard window > 0 else { return wait(used) }
                let n = min(window, Int(min(left, Int64(p.count - used))))
                session.sendData(id, UnsafeRawBufferPointer(rebasing: p[used..<used + n]), end: left == Int64(n))
                used += n
                phase = left == Int64(n) ? .done : .length(left - Int64(n))
            case .close:
                let window = session.window(id)
                guard window > 0 else { return wait(used) }
                let n = min(window, p.count - used)
                session.sendData(id, UnsafeRawBufferPointer(rebasing: p[used..<used + n]), end: false)
                used += n
            case .chunked:
                let window = session.window(id)
                guard window > 0 else { return wait(used) }
                // Data bytes are never more than the bytes they come in: within the window.
                let slice = UnsafeRawBufferPointer(rebasing: p[used..<used + min(window, p.count - used)])
                var d = decoder
                let n: Int
                do {
                    n = try d.consume(slice, data: { a, b in
                        if b > a { session.sendData(id, UnsafeRawBufferPointer(rebasing: slice[a..<b]), end: false) }
                    })
                } catch {
                    return fail()
                }
                decoder = d
                used += n
                if d.isDone {
                    phase = .done
                    let trailers = Self.trailerFields(d.trailers)
                    if trailers.isEmpty {
                        session.sendData(id, UnsafeRawBufferPointer(start: nil, count: 0), end: true)
                    } else {
                        session.sendHeaders(id, status: nil, fields: trailers, end: true)
                    }
                } else if n == 0 {
                    return used > 0 ? .wrote(used) : .wouldBlock
                }
            case .done:
                used = p.count
            }
        }
        return failed ? .failed : .wrote(used)
    }

    private func wait(_ used: Int) -> OutboundQueue.WriteOutcome {
        blocked = true
        return used > 0 ? .wrote(used) : .wouldBlock
    }

    private func fail() -> OutboundQueue.WriteOutcome {
        failed = true
        return .failed
    }

    /// Parses the answer's head when it is whole: the HEADERS frame goes out, and the body's
    /// framing is set. Returns how many of `head`'s bytes it took, nil while it is incomplete.
    private func parseHead() -> Int? {
        var offset = 0
        while true {
            var layout = HeadLayout()
            var headers: [HeaderField] = []
            let outcome = head.withUnsafeBytes { p in
                HeadParser.parse(UnsafeRawBufferPointer(rebasing: p[offset...]), kind: .response,
                                 limits: .init(lineLimit: 64 * 1024, headLimit: 64 * 1024), headers: &headers, into: &layout)
            }
            guard case .complete(let start, let consumed) = outcome else {
                if case .error = outcome { failed = true }
                return nil
            }
            // 100 Continue and the like: HTTP/2 clients do without (the final answer follows).
            if layout.status < 200 {
                offset += consumed
                continue
            }
            // The block is written from the head's bytes (no text made of them): hop-by-hop
            // fields, and those its Connection field names, stay behind (RFC 9113 §8.2.2).
            var block: [UInt8] = []
            block.reserveCapacity(consumed)
            H2ResponseBlock.status(layout.status, into: &block)
            head.withUnsafeBytes { all in
                let p = UnsafeRawBufferPointer(rebasing: all[(offset + start)...])
                for h in layout.headers where !h.kind.isHopByHop && !h.droppedByConnection {
                    H2ResponseBlock.field(name: UnsafeRawBufferPointer(rebasing: p[Int(h.lineStart)..<Int(h.nameEnd)]),
                                          value: UnsafeRawBufferPointer(rebasing: p[Int(h.valueStart)..<Int(h.valueEnd)]), into: &block)
                }
            }
            let noBody = isHEAD || layout.status == 204 || layout.status == 304 || layout.contentLength == 0
            session.sendBlock(id, block, end: noBody)
            if noBody {
                phase = .done
            } else if layout.chunked {
                phase = .chunked
            } else if let n = layout.contentLength {
                phase = .length(n)
            } else {
                phase = .close
            }
            return offset + consumed
        }
    }

    /// A chunked answer's trailer lines as fields (the decoder checked them).
    static func trailerFields(_ raw: [UInt8]) -> [(name: String, value: String)] {
        String(decoding: raw, as: UTF8.self).split(separator: "\r\n").compactMap { line in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            let value = line[line.index(after: colon)...].drop { $0 == " " || $0 == "\t" }
            return (String(line[..<colon]), String(value))
        }
    }

    /// The stream's connection closed.
    func closed(cut: Bool) {
        connection = nil
        // Body bytes that came and were never read (a 413, an answer that did not wait for the
        // body) still count against the connection's window: they are given back.
        if uncredited > 0 {
            session.consumed(id, uncredited)
            uncredited = 0
        }
        if ended { return session.streamEnded(self, complete: true, requestDone: true) }
        let cut = cut || failed
        if phase == .close && !cut {
            session.sendData(id, UnsafeRawBufferPointer(start: nil, count: 0), end: true)
            phase = .done
        }
        ended = true
        session.streamEnded(self, complete: phase == .done && !cut, requestDone: requestDone)
    }
}
