import COpenSSL
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// HTTPS for a `TestBackend`: a listener of its own that completes each TLS handshake (OpenSSL,
/// blocking sockets, a thread per connection) and relays the plaintext to the plain backend over
/// a connection of its own, one for one, so that the backend's counts are the TLS connections'.
/// A close on either side closes the other: the backend's close is sent on as `close_notify`.
/// Written on OpenSSL's blocking calls, it shares no code with Tether's TLS layer.
final class TLSFront: @unchecked Sendable {
    let port: Int
    private let listenFD: Int32
    private let ctx: OpaquePointer
    private let target: Int
    private var acceptThread: Thread?
    private let done = DispatchSemaphore(value: 0)

    init(certificate: String, key: String, target: Int) throws {
        self.target = target
        guard let ctx = SSL_CTX_new(TLS_server_method()) else { throw TestBackendError("SSL_CTX_new failed") }
        self.ctx = ctx
        guard SSL_CTX_use_certificate_chain_file(ctx, certificate) == 1, SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1 else {
            SSL_CTX_free(ctx)
            throw TestBackendError("cannot load \(certificate) and \(key)")
        }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard bound, listen(fd, 4096) == 0 else {
            close(fd)
            SSL_CTX_free(ctx)
            throw TestBackendError("cannot listen: errno \(errno)")
        }
        listenFD = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        let thread = Thread { [self] in acceptLoop() }
        acceptThread = thread
        thread.start()
    }

    private func acceptLoop() {
        while true {
            let c = accept(listenFD, nil, nil)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                break  // `stop` shut the listener down
            }
            Thread { [self] in relay(c) }.start()
        }
        done.signal()
    }

    /// One connection: the handshake, then bytes both ways until either side ends.
    private func relay(_ c: Int32) {
        guard let ssl = SSL_new(ctx) else { close(c); return }
        defer { SSL_free(ssl); close(c) }
        SSL_set_fd(ssl, c)
        guard SSL_accept(ssl) == 1 else { return }
        let p = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(p) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(target).bigEndian
        let connected = withUnsafePointer(to: &addr) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(p, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard connected else { return }
        var buf = [UInt8](repeating: 0, count: 16 * 1024)
        var fds = [pollfd(fd: c, events: Int16(POLLIN), revents: 0), pollfd(fd: p, events: Int16(POLLIN), revents: 0)]
        while true {
            // Bytes OpenSSL has decrypted already are not on the socket: no waiting for them.
            if SSL_pending(ssl) == 0 {
                fds[0].revents = 0
                fds[1].revents = 0
                guard poll(&fds, 2, -1) > 0 else { if errno == EINTR { continue }; return }
            }
            if SSL_pending(ssl) > 0 || fds[0].revents != 0 {
                let n = SSL_read(ssl, &buf, Int32(buf.count))
                // close_notify, a TCP close or an error: the backend's connection ends too.
                guard n > 0 else { return }
                guard writeAll(p, buf, Int(n)) else { return }
                fds[0].revents = 0
            }
            if fds[1].revents != 0 {
                let n = read(p, &buf, buf.count)
                guard n > 0 else {
                    // The backend closed: close_notify, then the close.
                    _ = SSL_shutdown(ssl)
                    return
                }
                var at = 0
                while at < n {
                    let w = buf[at..<n].withUnsafeBytes { SSL_write(ssl, $0.baseAddress, Int32($0.count)) }
                    guard w > 0 else { return }
                    at += Int(w)
                }
                fds[1].revents = 0
            }
        }
    }

    private func writeAll(_ fd: Int32, _ buf: [UInt8], _ count: Int) -> Bool {
        var at = 0
        while at < count {
            let w = buf[at..<count].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard w > 0 else { return false }
            at += w
        }
        return true
    }

    /// Stops accepting (connections under way end with the backend's).
    func stop() {
        shutdown(listenFD, Int32(SHUT_RDWR))
        done.wait()
        close(listenFD)
        SSL_CTX_free(ctx)
    }
}

struct TestBackendError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
