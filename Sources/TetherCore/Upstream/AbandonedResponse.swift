import NIOCore
import TetherHTTP
import TetherPool

/// The rest of a response whose client has gone, read and dropped so that the upstream
/// connection goes back to the pool instead of being closed. nginx closes it (with its default
/// `proxy_ignore_client_abort off`) and opens another for the next request: a load balancer's
/// health checks, browsers leaving pages and clients that time out each cost it a connect and a
/// TIME_WAIT. Only a response that ends soon and cleanly is waited for: the whole request was
/// sent, the framing is a length or chunks, at most `byteBudget` more bytes, and within the
/// location's `proxy_read_timeout`. Anything else closes the connection (`client_abort`).
final class AbandonedResponse: UpstreamDelegate {
    /// At most this many more bytes are read for a response nobody will receive.
    static let byteBudget = 64 * 1024

    private enum Phase {
        /// Waiting for the head; the bytes of it received so far.
        case head(ByteBuffer?)
        case length(Int64)
        case chunked(ChunkedDecoder)
    }

    private var phase: Phase
    private let conn: UpstreamConnection
    private let server: ServerPool
    private let isHEAD: Bool
    private var backend: ConnectionPool<ObjectIdentifier>.BackendKeepAlive?
    private var budget = AbandonedResponse.byteBudget
    private var timer: Scheduled<Void>?
    private var over = false

    /// nil when the response cannot be waited for (the connection is closed instead).
    init?(exchange e: Exchange, connection: UpstreamConnection, server: ServerPool) {
        guard e.requestBodyDone, connection.isOpen, !e.route.proxyHTTP10 else { return nil }
        switch e.phase {
        case .head:
            phase = .head(e.responseHeadBuffer)
        case .body:
            guard e.upstreamReusable else { return nil }
            switch e.responseFraming {
            case .length:
                guard e.responseRemaining <= Int64(Self.byteBudget) else { return nil }
                phase = .length(e.responseRemaining)
            case .chunked:
                phase = .chunked(e.responseChunks)
            default:
                return nil
            }
        case .tunnel, .done:
            return nil
        }
        conn = connection
        self.server = server
        isHEAD = e.head.isHEAD
        backend = e.backendKeepAlive
    }

    /// Takes the connection over; `timeoutMs` is the longest the rest may take.
    func start(timeoutMs: Int64) {
        conn.delegate = self
        conn.flush()
        conn.resumeReading()
        let me = NIOLoopBound(self, eventLoop: server.loop.eventLoop)
        timer = server.loop.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(timeoutMs)) { me.value.giveUp() }
        if case .head(let buffered?) = phase {
            phase = .head(nil)
            upstreamRead(buffered)
        }
    }

    func upstreamRead(_ buffer: ByteBuffer) {
        guard !over else { return }
        var buf = buffer
        budget -= buf.readableBytes
        guard budget >= 0 else { return giveUp() }
        while true {
            switch phase {
            case .head(var got):
                if got == nil { got = buf } else { got!.writeBuffer(&buf) }
                switch HeadParser.parse(got!, kind: .response, limits: .response, headers: &server.loop.responseHeaderScratch) {
                case .incomplete:
                    phase = .head(got)
                    return
                case .error:
                    return giveUp()
                case .complete(var head, let consumed):
                    // The loop's scratch storage went into the head; it goes back when this is done.
                    defer { swap(&server.loop.responseHeaderScratch, &head.headers) }
                    buf = got!
                    buf.moveReaderIndex(forwardBy: consumed)
                    if head.status < 200 && head.status != 101 {
                        phase = .head(nil)  // an interim response: the final one follows
                        if buf.readableBytes == 0 { return }
                        continue
                    }
                    guard head.status != 101, head.keepsConnection else { return giveUp() }
                    if let ka = head.backendKeepAlive { backend = ka }
                    switch head.responseFraming(requestIsHEAD: isHEAD) {
                    case .none: phase = .length(0)
                    case .chunked: phase = .chunked(ChunkedDecoder())
                    case .length(let n) where n <= Int64(budget): phase = .length(n)
                    default: return giveUp()  // too long, or delimited by the close
                    }
                }
            case .length(let n):
                let take = min(n, Int64(buf.readableBytes))
                buf.moveReaderIndex(forwardBy: Int(take))
                guard n - take == 0 else {
                    phase = .length(n - take)
                    return
                }
                // Bytes past the response: the backend is out of step.
                return buf.readableBytes == 0 ? finish() : giveUp()
            case .chunked(var decoder):
                let used: Int
                do {
                    used = try buf.withUnsafeReadableBytes { p in try decoder.consume(p) { _, _ in } }
                } catch {
                    return giveUp()
                }
                buf.moveReaderIndex(forwardBy: used)
                guard decoder.isDone else {
                    phase = .chunked(decoder)
                    return
                }
                return buf.readableBytes == 0 ? finish() : giveUp()
            }
        }
    }

    func upstreamReadComplete() {}

    func upstreamClosed(_ connection: UpstreamConnection, error: Error?) {
        guard !over else { return }
        over = true
        timer?.cancel()
        server.discard(connection, reason: error == nil ? .peerClosed : .error)
    }

    func upstreamWritabilityChanged(_ connection: UpstreamConnection) {}

    /// The response ended cleanly: the connection is as good as any other.
    private func finish() {
        over = true
        timer?.cancel()
        server.counters.drained += 1
        server.release(conn, reusable: true, backend: backend)
    }

    private func giveUp() {
        guard !over else { return }
        over = true
        timer?.cancel()
        server.discard(conn, reason: .clientAbort)
    }
}
