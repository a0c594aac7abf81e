import NIOCore

/// Writes to one channel, gathered while they are small and sent at the flush as one buffer with
/// one `writeAndFlush`: a response head and a small body, or a request head, take one trip
/// through the pipeline and one write(2) instead of several writes, a flush and a writev.
/// Copying up to `limit` bytes costs less than another write. Larger writes go through at once
/// (behind what was gathered).
struct WriteCoalescer {
    static let limit = 4096
    private var gathered: ByteBuffer?
    /// Something was written (gathered or passed on) since the last flush.
    private(set) var pending = false

    mutating func write(_ buffer: ByteBuffer, on context: ChannelHandlerContext) {
        pending = true
        if gathered == nil {
            if buffer.readableBytes <= Self.limit {
                gathered = buffer
                return
            }
        } else if gathered!.readableBytes + buffer.readableBytes <= Self.limit {
            var b = buffer
            gathered!.writeBuffer(&b)
            return
        }
        if let g = gathered {
            gathered = nil
            context.write(NIOAny(g), promise: nil)
        }
        context.write(NIOAny(buffer), promise: nil)
    }

    /// Sends what was written; `promise` completes once all of it reached the socket.
    mutating func flush(on context: ChannelHandlerContext, promise: EventLoopPromise<Void>? = nil) {
        pending = false
        if let g = gathered {
            gathered = nil
            context.writeAndFlush(NIOAny(g), promise: promise)
        } else if let promise {
            context.writeAndFlush(NIOAny(ByteBuffer()), promise: promise)
        } else {
            context.flush()
        }
    }

    /// The channel is closing: what was gathered is dropped.
    mutating func discard() {
        gathered = nil
        pending = false
    }
}
