#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import TetherIO

/// TLS on a non-blocking socket of Tether's own loop, driven as nginx drives OpenSSL
/// (`ngx_event_openssl.c`): the SSL object reads and writes the socket itself (`SSL_set_fd`), and
/// the connection calls `handshake`, `read` and `write` when the loop says the socket is ready,
/// waiting for the next edge on `wantRead` / `wantWrite`. No buffer of its own: plaintext goes
/// straight into and out of the connection's pool buffers. OpenSSL frees its record buffers
/// while a connection idles (`SSL_MODE_RELEASE_BUFFERS`, set on the context).
///
/// Confined to its connection's loop. Used by `ClientConnection` for `listen ... ssl` and by
/// upstream links for `proxy_pass https://`.
public final class TLSSocket {
    let ssl: OpaquePointer
    /// SNI: the listener's names; the context a name switched to is kept alive here.
    let serverNames: TLSServerNames?
    var selectedContext: TLSContext?
    /// Client side: where the server's sessions are kept for the next connection's resumption.
    let sessionSlot: TLSSessionSlot?
    /// Client side: the context, kept alive with the connection.
    private let clientContext: TLSContext?
    public private(set) var handshakeDone = false
    /// `ssl_handshake_timeout` of the listener's default server.
    public var handshakeTimeoutMs: Int64 { serverNames?.defaultContext.handshakeTimeoutMs ?? 60_000 }

    /// A server side session on `fd` (accepted, non-blocking), starting with the listener's
    /// default context; `names` switches certificates by SNI during the handshake.
    public init?(server names: TLSServerNames, fd: Int32) {
        guard let ssl = SSL_new(names.defaultContext.ctx) else {
            ERR_clear_error()
            return nil
        }
        self.ssl = ssl
        serverNames = names
        sessionSlot = nil
        clientContext = nil
        SSL_set_accept_state(ssl)
        // A partial write returns what one record took, and a write retried after WANT_WRITE may
        // come from another address (the queue's next gathering): as nginx's ngx_ssl_send_chain.
        _ = tether_SSL_set_mode(ssl, Int(SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER))
        guard SSL_set_fd(ssl, fd) == 1 else {
            ERR_clear_error()
            SSL_free(ssl)
            return nil
        }
        _ = tether_SSL_set_app_data(ssl, Unmanaged.passUnretained(self).toOpaque())
    }

    /// A client side session (upstream TLS) on `fd`, connected or still connecting: the name the
    /// server's certificate must carry, SNI and the session to resume, as `context` says; new
    /// sessions from the server go to `session`.
    public init?(client context: TLSContext, fd: Int32, session: TLSSessionSlot?) {
        guard let ssl = SSL_new(context.ctx) else {
            ERR_clear_error()
            return nil
        }
        self.ssl = ssl
        serverNames = nil
        clientContext = context
        sessionSlot = context.sessionReuse ? session : nil
        SSL_set_connect_state(ssl)
        context.prepareClient(ssl, session: sessionSlot)
        _ = tether_SSL_set_mode(ssl, Int(SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER))
        guard SSL_set_fd(ssl, fd) == 1 else {
            ERR_clear_error()
            SSL_free(ssl)
            return nil
        }
        _ = tether_SSL_set_app_data(ssl, Unmanaged.passUnretained(self).toOpaque())
    }

    deinit { SSL_free(ssl) }

    /// The error `read` reports for a TCP close without `close_notify` where that is an error
    /// (ENODATA: a value no TCP `recv` returns, so that the log can say what happened).
    public static let raggedEnd = ENODATA

    /// Decrypts what the socket has into `buf`'s free space, until it is full or OpenSSL wants
    /// the socket again (no short-read rule: a record read may leave more in OpenSSL's hands).
    /// `close_notify` reads as an end of file; a TCP close without it too, unless
    /// `raggedEndIsError` (an upstream whose response the close may delimit: there it is a
    /// truncation, `raggedEnd`); a TLS error as EPROTO.
    public func read(into buf: inout IOBuffer, raggedEndIsError: Bool = false) -> TetherIO.ReadResult {
        var total = 0
        var outcome = ReadResult.wantRead
        while buf.writableBytes > 0 {
            buf.fill { p in
                outcome = read(into: p)
                if case .bytes(let n) = outcome { return n }
                return 0
            }
            guard case .bytes(let n) = outcome else { break }
            total += n
        }
        switch outcome {
        case .bytes, .wantRead, .wantWrite: return total > 0 ? .bytes(total, eof: false) : .wouldBlock
        case .closeNotify: return total > 0 ? .bytes(total, eof: true) : .eof
        case .eof where raggedEndIsError: return .error(Self.raggedEnd)
        case .eof: return total > 0 ? .bytes(total, eof: true) : .eof
        case .error: return .error(EPROTO)
        }
    }

    /// Writes what `queue` holds through OpenSSL (small buffers gathered into one record) until
    /// it is empty or the socket takes no more.
    public func flush(_ queue: inout OutboundQueue) -> OutboundQueue.FlushResult {
        guard handshakeDone else { return .wouldBlock }
        return queue.flush { p in
            switch write(p) {
            case .wrote(let n): .wrote(n)
            case .wantRead, .wantWrite: .wouldBlock
            case .error: .failed
            }
        }
    }

    public enum Progress: Equatable {
        case done
        case wantRead
        case wantWrite
        case failed(TLSHandshakeFailure, detail: String)
    }

    /// Drives the handshake as far as the socket allows.
    public func handshake() -> Progress {
        ERR_clear_error()
        let rc = SSL_do_handshake(ssl)
        if rc == 1 {
            handshakeDone = true
            return .done
        }
        switch SSL_get_error(ssl, rc) {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        case SSL_ERROR_SYSCALL where OpenSSLErrors.peek() == 0:
            // The peer closed (or reset) the connection in the middle of the handshake.
            ERR_clear_error()
            return .failed(.eof, detail: "the peer closed the connection during the handshake")
        default:
            let (failure, detail) = TLSHandshakeFailure.of(ssl)
            return .failed(failure, detail: detail)
        }
    }

    public enum ReadResult: Equatable {
        /// Plaintext bytes were put into the buffer.
        case bytes(Int)
        /// Nothing now: wait for the socket to be readable (or, rarely, writable).
        case wantRead
        case wantWrite
        /// The peer sent `close_notify`: an orderly end of its data.
        case closeNotify
        /// The peer closed the TCP connection without `close_notify`.
        case eof
        case error(String)
    }

    /// Reads plaintext into `into` (one record at most per call).
    public func read(into p: UnsafeMutableRawBufferPointer) -> ReadResult {
        guard p.count > 0 else { return .bytes(0) }
        ERR_clear_error()
        let rc = SSL_read(ssl, p.baseAddress, Int32(clamping: p.count))
        if rc > 0 { return .bytes(Int(rc)) }
        switch SSL_get_error(ssl, rc) {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        case SSL_ERROR_ZERO_RETURN: return .closeNotify
        case SSL_ERROR_SYSCALL:
            ERR_clear_error()
            return .eof
        default:
            let errors = OpenSSLErrors.drain()
            // OpenSSL 3 reports a TCP close without close_notify as an error unless
            // SSL_OP_IGNORE_UNEXPECTED_EOF is set; it is not set, so that it is seen here.
            if errors.reasons.contains(SSL_R_UNEXPECTED_EOF_WHILE_READING) { return .eof }
            return .error(errors.description)
        }
    }

    public enum WriteResult: Equatable {
        case wrote(Int)
        case wantRead
        case wantWrite
        case error(String)
    }

    /// Encrypts and sends plaintext: returns how much of it went (a record at least).
    public func write(_ p: UnsafeRawBufferPointer) -> WriteResult {
        guard p.count > 0 else { return .wrote(0) }
        ERR_clear_error()
        let rc = SSL_write(ssl, p.baseAddress, Int32(clamping: p.count))
        if rc > 0 { return .wrote(Int(rc)) }
        switch SSL_get_error(ssl, rc) {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        default:
            let errors = OpenSSLErrors.drain()
            return .error(errors.description)
        }
    }

    /// Sends `close_notify`, as far as the socket takes it now (a close follows either way; the
    /// peer's own `close_notify` is not waited for, as nginx does not).
    public func shutdown() {
        guard handshakeDone else { return }
        ERR_clear_error()
        _ = SSL_shutdown(ssl)
        ERR_clear_error()
    }

    /// `$ssl_protocol` (`TLSv1.3`).
    public var version: String { String(cString: SSL_get_version(ssl)) }
    /// `$ssl_cipher`, as OpenSSL names the suite.
    public var cipher: String { SSL_get_current_cipher(ssl).flatMap { SSL_CIPHER_get_name($0) }.map { String(cString: $0) } ?? "" }
    /// `$ssl_server_name`: the name the client sent (SNI), if any.
    public var serverName: String? { SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name).map { String(cString: $0) } }
    /// `$ssl_session_reused`: the handshake resumed a session (ticket or cache).
    public var resumed: Bool { SSL_session_reused(ssl) == 1 }

    /// ALPN selected `h2`: the connection speaks HTTP/2.
    public var selectedH2: Bool { tether_SSL_selected_h2(ssl) == 1 }

    /// The client's certificate (`ssl_verify_client`): none, or the verdict on its chain.
    public enum ClientCertificate: Equatable, Sendable {
        case none
        case verified
        /// OpenSSL's reason (`certificate has expired`) and whether it is only about finding the
        /// issuer (what `optional_no_ca` lets through, as nginx's `ngx_ssl_verify_error_optional`).
        case failed(reason: String, caOnly: Bool)
    }

    public var clientCertificate: ClientCertificate {
        guard let cert = SSL_get1_peer_certificate(ssl) else { return .none }
        X509_free(cert)
        let r = Int32(SSL_get_verify_result(ssl))
        if r == X509_V_OK { return .verified }
        let caOnly = [X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
                      X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE].contains(r)
        return .failed(reason: String(cString: X509_verify_cert_error_string(Int(r))), caOnly: caOnly)
    }

    public enum PeerFact: Int32 { case subject = 0, issuer, serial, fingerprint, pem }

    /// A fact of the client's certificate as nginx's `$ssl_client_*` show it (nil without one).
    public func peerFact(_ what: PeerFact) -> [UInt8]? {
        var buf = [CChar](repeating: 0, count: what == .pem ? 16384 : 1024)
        let n = tether_SSL_peer_fact(ssl, what.rawValue, &buf, Int32(buf.count))
        guard n >= 0 else { return nil }
        return buf[0..<Int(n)].map { UInt8(bitPattern: $0) }
    }
}
