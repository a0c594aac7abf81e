#if canImport(Glibc)
import Glibc
#endif
import TetherHTTP
import TetherIO

/// One request on its way through an upstream connection and its answer on the way back, on
/// Tether's own loop: leases a connection from the server's pool, writes the request, parses the
/// response head, writes it to the client without its hop-by-hop lines, and moves the body's
/// buffers from the upstream to the client (no copy). The connection goes back to the pool when
/// the response ended cleanly.
///
/// This first version relays Content-Length (and bodiless) responses; a chunked or close-delimited
/// response is answered 502, as are connect failures. Canonical re-framing, retries on a stale
/// reused connection, `proxy_next_upstream`, the exchange timers and upgrades come with the
/// switch from the SwiftNIO path, through the same `Lifecycle` values that path uses.
final class ProxyExchange: UpstreamLinkOwner {
    private unowned(unsafe) let connection: ClientConnection
    private let pool: UpstreamPool
    private var request: IOBuffer?
    private var link: UpstreamLink?
    private let requestIsHEAD: Bool
    private let clientKeepAlive: Bool
    private let clientMinor: Int
    private var headSent = false
    private var remaining: Int64 = 0
    private var upstreamReusable = true
    private var finished = false

    init(connection: ClientConnection, pool: UpstreamPool, request: consuming IOBuffer, requestIsHEAD: Bool,
         clientKeepAlive: Bool, clientMinor: Int) {
        self.connection = connection
        self.pool = pool
        self.request = consume request
        self.requestIsHEAD = requestIsHEAD
        self.clientKeepAlive = clientKeepAlive
        self.clientMinor = clientMinor
    }

    /// A head as it goes on: its first line and header lines as they came, less the hop-by-hop
    /// ones (and those `Connection` names), without the blank line that ends it. False when it
    /// does not fit `out` (one pool buffer), which is never written on cut.
    static func writeLines(_ head: HeadLayout, _ p: UnsafeRawBufferPointer, into out: inout IOBuffer) -> Bool {
        let firstLineEnd = head.headers.first.map { Int($0.lineStart) } ?? p.count - 2
        var fits = out.append(contentsOf: UnsafeRawBufferPointer(rebasing: p[0..<firstLineEnd])) == firstLineEnd
        for h in head.headers where !h.kind.isHopByHop && !h.droppedByConnection {
            let line = UnsafeRawBufferPointer(rebasing: p[Int(h.lineStart)..<Int(h.lineEnd)])
            fits = fits && out.append(contentsOf: line) == line.count
        }
        return fits
    }

    /// The request head as it goes upstream (HTTP/1.1 keeps the connection by default); false
    /// when it does not fit one buffer.
    static func writeForwarded(_ head: HeadLayout, _ p: UnsafeRawBufferPointer, into out: inout IOBuffer) -> Bool {
        writeLines(head, p, into: &out) && out.append(contentsOf: "\r\n".utf8) == 2
    }

    func start() {
        let (l, _) = pool.lease(for: self)
        guard let l else { return fail(502) }
        link = l
        // Written now even to a connection still connecting: it goes out once connected, and a
        // body that follows queues behind it.
        sendRequest()
    }

    func sendBody(_ chunk: consuming IOBuffer) {
        guard let l = link, !finished else { return pool.buffers.recycle(chunk) }
        l.write(chunk)
    }

    /// The client's socket took what was queued: read on from the upstream.
    func clientDrained() {
        if let l = link { upstreamReadable(l) }
    }

    /// The client went away: the upstream connection cannot be trusted with a half-read answer.
    func clientLeft() {
        finished = true
        if let l = link { pool.discard(l, reason: .clientAbort) }
        link = nil
    }

    private func sendRequest() {
        guard let l = link, let r = request.take() else { return }
        l.write(r)
    }

    // MARK: UpstreamLinkOwner

    func upstreamConnected(_ link: UpstreamLink) {}

    func upstreamConnectFailed(_ link: UpstreamLink, errno: Int32) {
        self.link = nil
        fail(errno == ETIMEDOUT ? 504 : 502)
    }

    func upstreamClosed(_ link: UpstreamLink, errno: Int32?) {
        self.link = nil
        fail(502)
    }

    func upstreamReadable(_ link: UpstreamLink) {
        while !finished {
            // Backpressure: while the client is not taking the answer, the upstream's bytes wait
            // in its socket (`clientDrained` resumes).
            guard connection.clientTakesMore else { return }
            let more = link.read()
            guard link.isOpen else { return }
            if !headSent { guard parseHead(link) else { break } }
            if headSent && !finished { relayBody(link) }
            if finished { return }
            if link.peerClosed { return fail(502) }
            if !more { break }
        }
    }

    // MARK: Response

    /// Parses the response head in the link's buffer and writes the client's; false while incomplete.
    private func parseHead(_ link: UpstreamLink) -> Bool {
        guard var buf = link.takeInbound() else { return false }
        var layout = HeadLayout()
        var headers: [HeaderField] = []
        let outcome = buf.withReadableBytes { p in HeadParser.parse(p, kind: .response, limits: .response, headers: &headers, into: &layout) }
        guard case .complete(let start, let consumed) = outcome else {
            link.putBack(buf)
            if case .error = outcome { fail(502) }
            return false
        }
        if layout.status < 200 {
            // 100 Continue and other interim answers are not relayed.
            buf.consume(consumed)
            link.putBack(buf)
            return parseHead(link)
        }
        let framing = layout.responseFraming(requestIsHEAD: requestIsHEAD)
        switch framing {
        case .none: remaining = 0
        case .length(let n): remaining = n
        case .chunked, .untilClose:
            link.putBack(buf)
            fail(502)
            return false
        }
        upstreamReusable = layout.keepsConnection
        var out = pool.buffers.take()
        var fits = buf.withReadableBytes { p in Self.writeLines(layout, UnsafeRawBufferPointer(rebasing: p[start..<consumed]), into: &out) }
        let ending: StaticString = !clientKeepAlive ? "Connection: close\r\n\r\n" : clientMinor == 0 ? "Connection: keep-alive\r\n\r\n" : "\r\n"
        ending.withUTF8Buffer { fits = fits && out.append(contentsOf: $0) == $0.count }
        guard fits else {
            // A response head larger than a buffer: refused whole rather than sent cut.
            pool.buffers.recycle(out)
            link.putBack(buf)
            fail(502)
            return false
        }
        buf.consume(consumed)
        link.putBack(buf)
        headSent = true
        connection.sendFromUpstream(out)
        if remaining == 0 { finish(link) }
        return true
    }

    /// Moves body bytes to the client: the upstream's buffer itself when it holds only body.
    private func relayBody(_ link: UpstreamLink) {
        guard var buf = link.takeInbound() else { return }
        if buf.isEmpty { link.putBack(buf); return }
        let n = Int(min(remaining, Int64(buf.readableBytes)))
        if n < buf.readableBytes {
            // Bytes past the response: the connection is out of step.
            upstreamReusable = false
            buf.truncate(toReadable: n)
        }
        remaining -= Int64(n)
        connection.sendFromUpstream(buf)
        if remaining == 0 { finish(link) }
    }

    private func finish(_ link: UpstreamLink) {
        finished = true
        self.link = nil
        pool.release(link, reusable: upstreamReusable)
        connection.exchangeEnded(keepAlive: clientKeepAlive)
    }

    private func fail(_ status: Int) {
        guard !finished else { return }
        finished = true
        if let l = link { pool.discard(l, reason: .error) }
        link = nil
        connection.exchangeFailed(status: status, responseStarted: headSent)
    }
}
