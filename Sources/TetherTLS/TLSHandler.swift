#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import NIOCore

/// Told of each handshake's outcome, on the connection's event loop (for the counters).
public protocol TLSObserver: AnyObject {
    func tlsHandshakeCompleted(version: String, resumed: Bool)
    func tlsHandshakeFailed(_ failure: TLSHandshakeFailure, detail: String)
}

/// Fired inbound once the handshake is done, before any application data.
public struct TLSHandshakeCompleted: Sendable {
    public var version: String
    /// OpenSSL's name for the cipher suite (`TLS_AES_256_GCM_SHA384`).
    public var cipher: String
    public var alpn: String?
    public var resumed: Bool
    public var serverName: String?
}

/// Sent down the pipeline (`triggerUserOutboundEvent`) before a close that must not look orderly:
/// the next close sends no `close_notify`, so a peer reading to the end of the stream sees a TCP
/// close or reset, not a clean end (a response cut short that the close would otherwise complete).
public struct TLSAbort: Sendable {
    public init() {}
}

/// Terminates (server) or originates (client) TLS on one connection through OpenSSL 3, over a
/// `ByteBufferBIO`: OpenSSL reads ciphertext from the buffers the socket delivered and writes its
/// records into the buffer that goes to the socket. Plaintext passes through as `ByteBuffer`s.
///
/// - Writes made during the handshake are held and sent once it is done.
/// - `close` (and `close(mode: .output)`) sends `close_notify` first. A `close_notify` from the
///   peer is answered with ours, and the connection is closed.
/// - A TCP close without `close_notify` fires `TLSError.uncleanShutdown` before `channelInactive`:
///   OpenSSL 3 never sees that EOF (it would report it as an error unless
///   `SSL_OP_IGNORE_UNEXPECTED_EOF` is set), so it is the HTTP layer that decides whether it
///   truncated something (a close-delimited upstream response) or is a client simply leaving.
public final class TLSHandler: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    enum State { case idle, handshaking, active, closing, closed }

    private var state = State.idle
    private let ssl: OpaquePointer
    /// Set in `handlerAdded` (it needs the channel's allocator); the SSL object owns its BIO.
    private var io: ByteBufferBIO!
    private let context: TLSContext
    /// SNI: the listener's names (server side).
    let serverNames: TLSServerNames?
    /// The context SNI switched to; kept alive while the connection uses it.
    var selectedContext: TLSContext?
    /// Where a client connection's sessions go and come from.
    let sessionSlot: TLSSessionSlot?
    private weak var observer: TLSObserver?
    private var pending: CircularBuffer<(ByteBuffer, EventLoopPromise<Void>?)> = CircularBuffer(initialCapacity: 4)
    /// How many of `pending` were flushed by the handler after us (sent once the handshake is done).
    private var flushedCount = 0
    private var handshakeTimer: Scheduled<Void>?
    private var receivedCloseNotify = false
    private var ctx: ChannelHandlerContext?

    /// A server side handler; `names` switches certificates by SNI.
    public convenience init(server names: TLSServerNames, observer: TLSObserver?) {
        self.init(context: names.defaultContext, names: names, slot: nil, observer: observer)
    }

    /// A client side handler: sends SNI and checks the certificate as its context says; resumes
    /// and stores sessions in `session` when given.
    public convenience init(client context: TLSContext, session: TLSSessionSlot?, observer: TLSObserver?) {
        self.init(context: context, names: nil, slot: context.sessionReuse ? session : nil, observer: observer)
    }

    private init(context: TLSContext, names: TLSServerNames?, slot: TLSSessionSlot?, observer: TLSObserver?) {
        self.context = context
        self.serverNames = names
        self.sessionSlot = slot
        self.observer = observer
        ssl = SSL_new(context.ctx)!
        if context.isServer {
            SSL_set_accept_state(ssl)
        } else {
            SSL_set_connect_state(ssl)
        }
    }

    deinit {
        SSL_free(ssl)  // frees the BIO too
    }

    /// Called once the handler is in place, to set what needs `self`'s address.
    private func bindSelf() {
        _ = tether_SSL_set_app_data(ssl, Unmanaged.passUnretained(self).toOpaque())
    }

    // MARK: Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        ctx = context
        if io == nil {
            io = ByteBufferBIO(allocator: context.channel.allocator)
            SSL_set_bio(ssl, io.bio, io.bio)  // one reference, taken by the SSL object
        }
        bindSelf()
        if context.channel.isActive { start(context) }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        failPending(ChannelError.ioOnClosedChannel)
        ctx = nil
    }

    public func channelActive(context: ChannelHandlerContext) {
        start(context)
        context.fireChannelActive()
    }

    private func start(_ context: ChannelHandlerContext) {
        guard state == .idle else { return }
        state = .handshaking
        // The certificate's name, SNI and the session to resume, for upstream TLS.
        if !self.context.isServer { self.context.prepareClient(ssl, session: sessionSlot) }
        let ms = self.context.handshakeTimeoutMs
        if ms > 0 {
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) {
                bound.value.handshakeTimedOut()
            }
        }
        if !self.context.isServer { doHandshake(context) }
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard state != .closed else { return }
        io.receive(unwrapInboundIn(data))
        switch state {
        case .handshaking: doHandshake(context)
        case .active, .closing: readPlaintext(context)
        case .idle, .closed: break
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        let was = state
        state = .closed
        switch was {
        case .handshaking:
            observer?.tlsHandshakeFailed(.eof, detail: "the peer closed the connection during the handshake")
            context.fireErrorCaught(TLSError.handshakeFailed(.eof, detail: "the peer closed the connection during the handshake"))
        case .active where !receivedCloseNotify:
            context.fireErrorCaught(TLSError.uncleanShutdown)
        default:
            break
        }
        failPending(ChannelError.ioOnClosedChannel)
        context.fireChannelInactive()
    }

    // MARK: Outbound

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard state != .closed && state != .closing else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        pending.append((unwrapOutboundIn(data), promise))
    }

    public func flush(context: ChannelHandlerContext) {
        flushedCount = pending.count
        if state == .active { encryptPending(context) }
    }

    public func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard event is TLSAbort else { return context.triggerUserOutboundEvent(event, promise: promise) }
        // Nothing more goes out encrypted, close_notify included: what is pending is dropped.
        state = .closed
        failPending(ChannelError.ioOnClosedChannel)
        promise?.succeed()
    }

    public func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        switch (state, mode) {
        case (_, .input):
            context.close(mode: mode, promise: promise)
        case (.active, _):
            // Whatever was written but not flushed goes out first, then close_notify.
            encryptPending(context, flushEvenIfUnflushed: true)
            state = .closing
            _ = SSL_shutdown(ssl)
            ERR_clear_error()
            sendCiphertext(context, promise: nil)
            context.close(mode: mode, promise: promise)
        default:
            if mode == .all { state = .closed }
            failPending(ChannelError.ioOnClosedChannel)
            context.close(mode: mode, promise: promise)
        }
    }

    // MARK: Driving OpenSSL

    private func doHandshake(_ context: ChannelHandlerContext) {
        ERR_clear_error()
        let rc = SSL_do_handshake(ssl)
        if rc == 1 {
            state = .active
            handshakeTimer?.cancel()
            handshakeTimer = nil
            let version = String(cString: SSL_get_version(ssl))
            let resumed = SSL_session_reused(ssl) == 1
            observer?.tlsHandshakeCompleted(version: version, resumed: resumed)
            var alpnData: UnsafePointer<UInt8>?
            var alpnLen: UInt32 = 0
            SSL_get0_alpn_selected(ssl, &alpnData, &alpnLen)
            let alpn = alpnData.map { String(decoding: UnsafeBufferPointer(start: $0, count: Int(alpnLen)), as: UTF8.self) }
            let sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name).map { String(cString: $0) }
            let cipher = SSL_get_current_cipher(ssl).flatMap { SSL_CIPHER_get_name($0) }.map { String(cString: $0) } ?? ""
            sendCiphertext(context, promise: nil)
            context.fireUserInboundEventTriggered(TLSHandshakeCompleted(version: version, cipher: cipher, alpn: alpn, resumed: resumed, serverName: sni))
            // Writes that waited for the handshake, then data that came with its last flight.
            if flushedCount > 0 { encryptPending(context) }
            readPlaintext(context)
            return
        }
        switch SSL_get_error(ssl, rc) {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
            sendCiphertext(context, promise: nil)
        default:
            let (failure, detail) = TLSHandshakeFailure.of(ssl)
            fail(context, .handshakeFailed(failure, detail: detail))
        }
    }

    private func handshakeTimedOut() {
        guard state == .handshaking, let context = ctx else { return }
        handshakeTimer = nil
        fail(context, .handshakeFailed(.timeout, detail: "ssl_handshake_timeout passed"))
    }

    /// Sends whatever alert OpenSSL produced, reports the error and closes.
    private func fail(_ context: ChannelHandlerContext, _ error: TLSError) {
        sendCiphertext(context, promise: nil)
        if case .handshakeFailed(let failure, let detail) = error { observer?.tlsHandshakeFailed(failure, detail: detail) }
        state = .closed
        handshakeTimer?.cancel()
        handshakeTimer = nil
        failPending(error)
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }

    /// Decrypts the ciphertext received so far and passes the plaintext on, a record at a time.
    private func readPlaintext(_ context: ChannelHandlerContext) {
        while state == .active || state == .closing {
            let available = io.inboundBytes + Int(SSL_pending(ssl))
            if available == 0 { break }
            var out = io.allocator.buffer(capacity: min(max(available, 1024), 16384 + 256))
            // The error queue is empty here: every failure below drains it.
            var rc: Int32 = 0
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { p in
                rc = SSL_read(ssl, p.baseAddress, Int32(p.count))
                return Int(max(0, rc))
            }
            if rc > 0 {
                context.fireChannelRead(wrapInboundOut(out))
                continue
            }
            switch SSL_get_error(ssl, rc) {
            case SSL_ERROR_WANT_READ:
                // An incomplete record, or only post-handshake messages (TLS 1.3 tickets).
                sendCiphertext(context, promise: nil)
                return
            case SSL_ERROR_WANT_WRITE:
                sendCiphertext(context, promise: nil)
                continue
            case SSL_ERROR_ZERO_RETURN:
                // close_notify from the peer: answer it and close.
                receivedCloseNotify = true
                if state == .active {
                    state = .closing
                    _ = SSL_shutdown(ssl)
                    ERR_clear_error()
                    sendCiphertext(context, promise: nil)
                }
                context.close(promise: nil)
                return
            default:
                let errors = OpenSSLErrors.drain()
                fail(context, .protocolError(detail: errors.description))
                return
            }
        }
        sendCiphertext(context, promise: nil)
    }

    /// Encrypts the flushed writes (all of them when closing) and sends the records.
    private func encryptPending(_ context: ChannelHandlerContext, flushEvenIfUnflushed: Bool = false) {
        var count = flushEvenIfUnflushed ? pending.count : min(flushedCount, pending.count)
        guard count > 0 else { return }
        var promises: [EventLoopPromise<Void>] = []
        // Small writes (a response head and a short body) are joined into one record.
        var total = 0
        for (b, _) in pending.prefix(count) { total += b.readableBytes }
        if count > 1 && total <= 16384 {
            var joined = io.allocator.buffer(capacity: total)
            while count > 0 {
                var (b, p) = pending.removeFirst()
                joined.writeBuffer(&b)
                if let p { promises.append(p) }
                count -= 1
                flushedCount -= 1
            }
            guard writePlaintext(joined) else { return failAfterWrite(context, promises) }
        } else {
            while count > 0 {
                let (b, p) = pending.removeFirst()
                count -= 1
                flushedCount -= 1
                if let p { promises.append(p) }
                guard writePlaintext(b) else { return failAfterWrite(context, promises) }
            }
        }
        flushedCount = max(0, flushedCount)
        let promise: EventLoopPromise<Void>?
        switch promises.count {
        case 0: promise = nil
        case 1: promise = promises[0]
        default:
            let p = context.eventLoop.makePromise(of: Void.self)
            for q in promises { p.futureResult.cascade(to: q) }
            promise = p
        }
        sendCiphertext(context, promise: promise)
    }

    private func failAfterWrite(_ context: ChannelHandlerContext, _ promises: [EventLoopPromise<Void>]) {
        let error = TLSError.protocolError(detail: OpenSSLErrors.drain().description)
        for p in promises { p.fail(error) }
        fail(context, error)
    }

    /// SSL_write into the memory BIO: it never blocks, so all of `buffer` is taken.
    private func writePlaintext(_ buffer: ByteBuffer) -> Bool {
        guard buffer.readableBytes > 0 else { return true }
        return buffer.withUnsafeReadableBytes { p in
            SSL_write(ssl, p.baseAddress, Int32(p.count)) > 0
        }
    }

    /// Sends the records OpenSSL wrote, flushed.
    private func sendCiphertext(_ context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        guard let out = io.takeOutbound() else {
            promise?.succeed(())
            return
        }
        context.writeAndFlush(wrapOutboundOut(out), promise: promise)
    }

    private func failPending(_ error: Error) {
        while let (_, p) = pending.popFirst() { p?.fail(error) }
        flushedCount = 0
    }
}

/// Whether `s` is an IPv4 or IPv6 literal (SNI is never sent for those, RFC 6066).
func isIPAddress(_ s: String) -> Bool {
    var a4 = in_addr()
    var a6 = in6_addr()
    return inet_pton(AF_INET, s, &a4) == 1 || inet_pton(AF_INET6, s, &a6) == 1
}
