import COpenSSL

/// What went wrong in OpenSSL, from its error queue (which is emptied).
struct OpenSSLErrors: CustomStringConvertible {
    var codes: [UInt]
    var messages: [String]

    /// Drains the calling thread's error queue.
    static func drain() -> OpenSSLErrors {
        var codes: [UInt] = []
        var messages: [String] = []
        while true {
            let e = ERR_get_error()
            if e == 0 { break }
            codes.append(e)
            if let r = ERR_reason_error_string(e) {
                messages.append(String(cString: r))
            } else {
                var buf = [UInt8](repeating: 0, count: 256)
                buf.withUnsafeMutableBufferPointer { p in
                    p.withMemoryRebound(to: CChar.self) { ERR_error_string_n(e, $0.baseAddress, $0.count) }
                }
                messages.append(String(decoding: buf.prefix { $0 != 0 }, as: UTF8.self))
            }
        }
        return OpenSSLErrors(codes: codes, messages: messages)
    }

    var reasons: [Int32] { codes.map { tether_ERR_GET_REASON($0) } }

    /// The oldest error in the calling thread's queue, left there; 0 when there is none.
    static func peek() -> UInt { ERR_peek_error() }
    var description: String { messages.isEmpty ? "unknown error" : messages.joined(separator: ", ") }
}

/// Why a handshake failed, as counted in `tether_tls_handshake_failures_total{reason}`.
public enum TLSHandshakeFailure: String, Sendable, CaseIterable {
    /// No protocol version both sides allow (for example a TLS 1.1 client).
    case protocolVersion = "protocol"
    /// No cipher suite, group or signature algorithm in common.
    case cipher
    /// Not TLS at all: plain HTTP or other bytes sent to a TLS port.
    case notTLS = "not_tls"
    /// The peer's certificate did not verify (upstream TLS with `proxy_ssl_verify on`).
    case certificate
    /// The peer sent an alert and gave up.
    case peerAlert = "peer_alert"
    /// The peer closed the connection before the handshake was done.
    case eof
    /// `ssl_handshake_timeout` passed.
    case timeout
    /// Anything else OpenSSL rejected.
    case other

    /// Why the handshake on `ssl` failed, and OpenSSL's words for it (drains the thread's error
    /// queue; for a certificate that did not verify, the verification's own reason too).
    static func of(_ ssl: OpaquePointer) -> (TLSHandshakeFailure, detail: String) {
        let errors = OpenSSLErrors.drain()
        let failure = classify(errors)
        var detail = errors.description
        if failure == .certificate {
            let v = SSL_get_verify_result(ssl)
            if v != X509_V_OK, let s = X509_verify_cert_error_string(v) { detail += " (\(String(cString: s)))" }
        }
        return (failure, detail)
    }

    static func classify(_ errors: OpenSSLErrors) -> TLSHandshakeFailure {
        for r in errors.reasons {
            switch r {
            case SSL_R_UNSUPPORTED_PROTOCOL, SSL_R_VERSION_TOO_LOW, SSL_R_NO_PROTOCOLS_AVAILABLE,
                 SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
                return .protocolVersion
            case SSL_R_NO_SHARED_CIPHER, SSL_R_NO_CIPHERS_AVAILABLE, SSL_R_NO_SUITABLE_KEY_SHARE,
                 SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM, SSL_R_NO_SHARED_GROUPS:
                return .cipher
            case SSL_R_HTTP_REQUEST, SSL_R_HTTPS_PROXY_REQUEST, SSL_R_WRONG_VERSION_NUMBER,
                 SSL_R_PACKET_LENGTH_TOO_LONG, SSL_R_UNKNOWN_PROTOCOL, SSL_R_RECORD_LENGTH_MISMATCH,
                 SSL_R_LENGTH_MISMATCH, SSL_R_UNEXPECTED_MESSAGE, SSL_R_UNEXPECTED_RECORD:
                return .notTLS
            case SSL_R_CERTIFICATE_VERIFY_FAILED:
                return .certificate
            case SSL_R_UNEXPECTED_EOF_WHILE_READING:
                return .eof
            case 1000..<1200:
                // SSL_R_SSLV3_ALERT_* and SSL_R_TLSV1_ALERT_*: the alert the peer sent, plus 1000.
                return .peerAlert
            default:
                continue
            }
        }
        return .other
    }
}

/// A configuration OpenSSL refused: a file that is missing or unreadable, a key that does not
/// match its certificate, an unknown protocol, cipher or curve.
public struct TLSConfigurationError: Error, CustomStringConvertible, Sendable {
    public var message: String
    /// The index of the certificate pair it is about, when it is about one.
    public var certificate: Int?
    /// Whether it is about that pair's key rather than its certificate.
    public var aboutKey: Bool
    /// The directive whose value was refused, when it is about one.
    public var directive: String?
    public init(_ message: String, certificate: Int? = nil, aboutKey: Bool = false, directive: String? = nil) {
        self.message = message
        self.certificate = certificate
        self.aboutKey = aboutKey
        self.directive = directive
    }
    public var description: String { message }
}
