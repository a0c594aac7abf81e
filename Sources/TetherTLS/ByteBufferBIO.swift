import COpenSSL
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The two ends of a TLS connection's byte stream as OpenSSL sees them, without memory BIOs in
/// between: OpenSSL reads ciphertext straight out of the `ByteBuffer` NIO received, and writes
/// its records straight into the `ByteBuffer` that goes to the socket. (A pair of memory BIOs
/// costs a copy and a buffer each way; this is swift-nio-ssl's ByteBufferBIO idea.)
final class ByteBufferBIO {
    /// Ciphertext received and not yet read by OpenSSL.
    var inbound: ByteBuffer?
    /// Records written by OpenSSL and not yet sent.
    var outbound: ByteBuffer?
    let allocator: ByteBufferAllocator
    /// The BIO; owned by the SSL object once `SSL_set_bio` has it.
    let bio: OpaquePointer

    init(allocator: ByteBufferAllocator) {
        self.allocator = allocator
        bio = BIO_new(byteBufferBIOMethod)!
        BIO_set_data(bio, Unmanaged.passUnretained(self).toOpaque())
        BIO_set_init(bio, 1)
    }

    var inboundBytes: Int { inbound?.readableBytes ?? 0 }

    /// Adds received ciphertext behind what OpenSSL has not read yet.
    func receive(_ buffer: ByteBuffer) {
        if inbound == nil || inbound!.readableBytes == 0 {
            inbound = buffer
        } else {
            var b = buffer
            inbound!.writeBuffer(&b)
        }
    }

    /// What OpenSSL wrote since the last call.
    func takeOutbound() -> ByteBuffer? {
        guard let o = outbound, o.readableBytes > 0 else { return nil }
        outbound = nil
        return o
    }

    fileprivate func read(into out: UnsafeMutablePointer<CChar>, count: Int) -> Int32 {
        guard inbound != nil, inbound!.readableBytes > 0 else { return -1 }
        let n = min(count, inbound!.readableBytes)
        inbound!.withUnsafeReadableBytes { p in _ = memcpy(out, p.baseAddress!, n) }
        inbound!.moveReaderIndex(forwardBy: n)
        if inbound!.readableBytes == 0 { inbound = nil }
        return Int32(n)
    }

    fileprivate func write(_ bytes: UnsafePointer<CChar>, count: Int) -> Int32 {
        if outbound == nil { outbound = allocator.buffer(capacity: max(count, 1024)) }
        outbound!.writeBytes(UnsafeRawBufferPointer(start: bytes, count: count))
        return Int32(count)
    }
}

private func box(_ bio: OpaquePointer?) -> ByteBufferBIO? {
    guard let bio, let p = BIO_get_data(bio) else { return nil }
    return Unmanaged<ByteBufferBIO>.fromOpaque(p).takeUnretainedValue()
}

/// The BIO_METHOD, made once for the process and never changed after (so safe to share).
nonisolated(unsafe) let byteBufferBIOMethod: OpaquePointer = {
    let m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "tether ByteBuffer")!
    _ = BIO_meth_set_read(m) { bio, out, len in
        guard let b = box(bio), let out else { return -1 }
        tether_BIO_clear_retry_flags(bio)
        let n = b.read(into: out, count: Int(len))
        if n < 0 { tether_BIO_set_retry_read(bio) }
        return n
    }
    _ = BIO_meth_set_write(m) { bio, data, len in
        guard let b = box(bio), let data else { return -1 }
        tether_BIO_clear_retry_flags(bio)
        return b.write(data, count: Int(len))
    }
    _ = BIO_meth_set_ctrl(m) { bio, cmd, _, _ in
        switch cmd {
        case BIO_CTRL_FLUSH, BIO_CTRL_GET_CLOSE, BIO_CTRL_SET_CLOSE: return 1
        case BIO_CTRL_PENDING: return box(bio).map { $0.inboundBytes } ?? 0
        case BIO_CTRL_WPENDING: return box(bio).map { $0.outbound?.readableBytes ?? 0 } ?? 0
        default: return 0
        }
    }
    _ = BIO_meth_set_create(m) { _ in 1 }
    _ = BIO_meth_set_destroy(m) { bio in
        BIO_set_data(bio, nil)
        return 1
    }
    return m
}()
