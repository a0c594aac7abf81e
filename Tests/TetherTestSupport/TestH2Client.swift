import COpenSSL
import Foundation
import NIOCore
import NIOHPACK
import TetherH2
#if canImport(Glibc)
import Glibc
#endif

/// A raw HTTP/2 client over TLS (ALPN `h2`, OpenSSL's blocking calls) for tests that must send
/// exact frames, broken or hostile ones included, and see exactly what comes back. Header blocks
/// are NIOHPACK's (an encoder independent of Tether's decoder).
public final class TestH2Client {
    public struct Frame: Equatable, CustomStringConvertible {
        public var type: UInt8, flags: UInt8, stream: UInt32, payload: [UInt8]
        public var description: String { "type \(type) flags \(flags) stream \(stream) (\(payload.count) bytes)" }
        /// The error code of a RST_STREAM or a GOAWAY.
        public var code: UInt32? {
            let at = type == 7 ? 4 : type == 3 ? 0 : -1
            guard at >= 0, payload.count >= at + 4 else { return nil }
            return UInt32(payload[at]) << 24 | UInt32(payload[at + 1]) << 16 | UInt32(payload[at + 2]) << 8 | UInt32(payload[at + 3])
        }
    }

    private let fd: Int32
    private let ctx: OpaquePointer
    private let ssl: OpaquePointer
    private var pending: [UInt8] = []
    public private(set) var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
    private var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
    /// The connection ended (EOF or error) while reading.
    public private(set) var closed = false

    /// Connects, handshakes with ALPN `h2` only, and sends the preface and an empty SETTINGS
    /// (or `settings`).
    /// `proxyHeader`: sent on the socket before TLS (a load balancer's PROXY protocol line).
    public init(port: Int, settings: [(H2Setting, UInt32)] = [], proxyHeader: String? = nil) throws {
        guard let ctx = SSL_CTX_new(TLS_client_method()) else { throw TestBackendError("SSL_CTX_new failed") }
        self.ctx = ctx
        let h2: [UInt8] = [2, 0x68, 0x32]
        _ = SSL_CTX_set_alpn_protos(ctx, h2, UInt32(h2.count))
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard rc == 0, let ssl = SSL_new(ctx) else { throw TestBackendError("connect failed") }
        if let proxyHeader { _ = Array(proxyHeader.utf8).withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) } }
        self.ssl = ssl
        SSL_set_fd(ssl, fd)
        guard SSL_connect(ssl) == 1 else { throw TestBackendError("TLS handshake failed") }
        var p: UnsafePointer<UInt8>?
        var n: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &p, &n)
        guard n == 2 else { throw TestBackendError("the server did not select h2") }
        var hello = H2Write.preface
        H2Write.settings(settings, to: &hello)
        send(hello)
    }

    deinit {
        SSL_free(ssl)
        SSL_CTX_free(ctx)
        Glibc.close(fd)
    }

    public func send(_ bytes: [UInt8]) {
        var at = 0
        while at < bytes.count {
            let n = bytes[at...].withUnsafeBytes { SSL_write(ssl, $0.baseAddress, Int32($0.count)) }
            guard n > 0 else { return }
            at += Int(n)
        }
    }

    public func frame(_ type: H2FrameType, _ flags: H2Flags = [], stream: UInt32, _ payload: [UInt8] = []) {
        var out: [UInt8] = []
        H2FrameHeader(length: payload.count, type: type.rawValue, flags: flags, stream: stream).write(to: &out)
        send(out + payload)
    }

    public func block(_ fields: [(String, String)]) -> [UInt8] {
        var buffer = ByteBufferAllocator().buffer(capacity: 256)
        try! encoder.encode(headers: HPACKHeaders(fields), to: &buffer)
        return Array(buffer.readableBytesView)
    }

    public static func get(_ path: String, authority: String = "localhost") -> [(String, String)] {
        [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)]
    }

    public func request(_ stream: UInt32, _ fields: [(String, String)], endStream: Bool = true) {
        frame(.headers, endStream ? [.endHeaders, .endStream] : .endHeaders, stream: stream, block(fields))
    }

    /// The next frame, or nil at EOF or after the read time-out.
    public func next() -> Frame? {
        while true {
            if pending.count >= 9 {
                let h = pending.withUnsafeBytes { H2FrameHeader(UnsafeRawBufferPointer(rebasing: $0[0..<9])) }
                if pending.count >= 9 + h.length {
                    let f = Frame(type: h.type, flags: h.flags.rawValue, stream: h.stream, payload: Array(pending[9..<9 + h.length]))
                    pending.removeFirst(9 + h.length)
                    return f
                }
            }
            var chunk = [UInt8](repeating: 0, count: 65_536)
            let n = chunk.withUnsafeMutableBytes { SSL_read(ssl, $0.baseAddress, Int32($0.count)) }
            guard n > 0 else { closed = true; return nil }
            pending += chunk[0..<Int(n)]
        }
    }

    /// Frames until `done` says so (that frame included), EOF or the time-out.
    public func frames(until done: (Frame) -> Bool) -> [Frame] {
        var out: [Frame] = []
        while let f = next() {
            out.append(f)
            if done(f) { break }
        }
        return out
    }

    /// A HEADERS block decoded (NIOHPACK's decoder, kept across blocks as a client's is).
    public func fields(_ block: [UInt8]) -> [(String, String)] {
        var buffer = ByteBufferAllocator().buffer(bytes: block)
        guard let h = try? decoder.decodeHeaders(from: &buffer) else { return [] }
        return h.map { ($0.name, $0.value) }
    }

    /// A whole answer on `stream`: its status, fields and body (the client's windows opened as
    /// it reads, so that large answers flow); the other frames seen are in `others`.
    public func response(_ stream: UInt32) -> (status: String, fields: [(String, String)], body: [UInt8], reset: UInt32?, others: [Frame]) {
        var status = "", fields: [(String, String)] = [], body: [UInt8] = [], others: [Frame] = []
        while let f = next() {
            guard f.stream == stream else {
                if f.type == 4 && f.flags & 1 == 0 { frame(.settings, .ack, stream: 0) }
                others.append(f)
                // A GOAWAY that still covers this stream lets it finish.
                if f.type == 7, f.code != 0 || (f.payload.count >= 4 && UInt32(f.payload[0] & 0x7f) << 24 | UInt32(f.payload[1]) << 16 | UInt32(f.payload[2]) << 8 | UInt32(f.payload[3]) < stream) { break }
                continue
            }
            switch f.type {
            case 1:
                let decoded = self.fields(f.payload)
                if let s = decoded.first(where: { $0.0 == ":status" }) { status = s.1 }
                fields += decoded.filter { !$0.0.hasPrefix(":") }
            case 0:
                body += f.payload
                if !f.payload.isEmpty {
                    let inc = UInt32(f.payload.count)
                    let b = [UInt8(inc >> 24), UInt8(inc >> 16 & 0xff), UInt8(inc >> 8 & 0xff), UInt8(inc & 0xff)]
                    frame(.windowUpdate, stream: 0, b)
                    frame(.windowUpdate, stream: stream, b)
                }
            case 3:
                return (status, fields, body, f.code, others)
            default:
                others.append(f)
            }
            if f.flags & 1 == 1 && (f.type == 0 || f.type == 1) { break }
        }
        return (status, fields, body, nil, others)
    }
}
