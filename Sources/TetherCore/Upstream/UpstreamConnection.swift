import NIOCore
import TetherPool
import TetherTLS

/// What an upstream connection reports to the exchange that leased it.
protocol UpstreamDelegate: AnyObject {
    func upstreamRead(_ buffer: ByteBuffer)
    func upstreamReadComplete()
    func upstreamClosed(_ connection: UpstreamConnection, error: Error?)
    func upstreamWritabilityChanged(_ connection: UpstreamConnection)
}

/// The one handler of an upstream channel. While leased it hands bytes to its delegate; while
/// idle in the pool it watches: any byte or EOF closes it at once (no CLOSE_WAIT is left).
final class UpstreamConnection: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    unowned let pool: ServerPool
    weak var delegate: UpstreamDelegate?
    private(set) var context: ChannelHandlerContext?
    private var readPaused = false
    private var pendingRead = false
    private(set) var isOpen = true

    init(pool: ServerPool) { self.pool = pool }

    var id: ObjectIdentifier { ObjectIdentifier(self) }
    var isWritable: Bool { context?.channel.isWritable ?? false }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// Breaks the handler-context cycle, which would otherwise keep every closed connection.
    func handlerRemoved(context: ChannelHandlerContext) {
        isOpen = false
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if let delegate {
            delegate.upstreamRead(buffer)
        } else {
            // Bytes on an idle connection: the backend is out of step; never reuse it.
            pool.idleConnectionClosed(self, reason: .error)
            close()
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        delegate?.upstreamReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isOpen = false
        if let delegate {
            self.delegate = nil
            delegate.upstreamClosed(self, error: nil)
        } else {
            pool.idleConnectionClosed(self, reason: .peerClosed)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let delegate {
            self.delegate = nil
            delegate.upstreamClosed(self, error: error)
        } else {
            // A TLS backend that closes an idle connection without close_notify has simply closed it.
            let reason: CloseReason = if case TLSError.uncleanShutdown = error { .peerClosed } else if isKernelTimeout(error) { .tcpKeepalive } else { .error }
            pool.idleConnectionClosed(self, reason: reason)
        }
        close()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        delegate?.upstreamWritabilityChanged(self)
    }

    func read(context: ChannelHandlerContext) {
        if readPaused { pendingRead = true } else { context.read() }
    }

    /// Stops reading (the client is not keeping up) until `resumeReading`.
    func pauseReading() { readPaused = true }

    func resumeReading() {
        guard readPaused else { return }
        readPaused = false
        if pendingRead, let context {
            pendingRead = false
            context.read()
        }
    }

    /// A request head with nothing behind it goes out with one `writeAndFlush`; a flush with
    /// nothing written does nothing.
    private var out = WriteCoalescer()

    func write(_ buffer: ByteBuffer) {
        guard let context else { return }
        out.write(buffer, on: context)
    }

    func flush() {
        guard let context, out.pending else { return }
        out.flush(on: context)
    }

    func close() {
        guard isOpen, let context else { return }
        isOpen = false
        delegate = nil
        out.discard()
        context.close(promise: nil)
    }
}
