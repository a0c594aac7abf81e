#if canImport(Glibc)
import Glibc
#endif
import COpenSSL

/// A TLS protocol version as nginx names it in `ssl_protocols`.
public enum TLSVersion: String, CaseIterable, Sendable, Comparable {
    case tls1 = "TLSv1", tls1_1 = "TLSv1.1", tls1_2 = "TLSv1.2", tls1_3 = "TLSv1.3"

    var wire: Int32 {
        switch self {
        case .tls1: return TLS1_VERSION
        case .tls1_1: return TLS1_1_VERSION
        case .tls1_2: return TLS1_2_VERSION
        case .tls1_3: return TLS1_3_VERSION
        }
    }

    init?(wire: Int32) {
        guard let v = TLSVersion.allCases.first(where: { $0.wire == wire }) else { return nil }
        self = v
    }

    public static func < (a: TLSVersion, b: TLSVersion) -> Bool { a.wire < b.wire }
}

/// The Mozilla "intermediate" profile (v5.7): what `ssl_ciphers` is when not set.
public let mozillaIntermediateCiphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"

/// How a server's TLS is set up (nginx's `ssl_*` directives).
public struct TLSServerSettings: Sendable {
    /// PEM files: each certificate file may carry its chain after the leaf.
    public var certificates: [(certificate: String, key: String)]
    public var protocols: Set<TLSVersion> = [.tls1_2, .tls1_3]
    public var ciphers = mozillaIntermediateCiphers
    public var preferServerCiphers = false
    /// `auto`, or a colon-separated list of groups (`X25519:prime256v1`).
    public var ecdhCurve = "X25519:prime256v1:secp384r1"
    /// Server-side session cache size in sessions; 0 = none.
    public var sessionCacheSize = 0
    public var sessionTimeoutSeconds = 300
    public var sessionTickets = true
    /// `ssl_verify_client` (not `off`): the client is asked for a certificate, checked against
    /// `clientCertificate` (also sent as the acceptable CAs) and `trustedCertificate`, `verifyDepth`
    /// deep, and against the CRLs in `crl`.
    public var verifyClient = false
    public var clientCertificate: String?
    public var trustedCertificate: String?
    public var verifyDepth = 1
    public var crl: String?
    /// `ssl_stapling`: an OCSP response stapled to handshakes whose client asks, when it says
    /// the certificate is good and is current (and, with `staplingVerify`, is signed by a trusted
    /// CA). From `staplingFile` (DER) when set, else fetched (`TLSContext.ocspQuery`) from
    /// `staplingResponder` or the responder the certificate names.
    public var stapling = false
    public var staplingFile: String?
    public var staplingVerify = false
    public var staplingResponder: String?
    /// `http2 on` (or `listen … http2`): ALPN selects `h2` when the client offers it.
    public var http2 = false

    public init(certificates: [(certificate: String, key: String)]) {
        self.certificates = certificates
    }
}

/// How Tether connects to an upstream over TLS (nginx's `proxy_ssl_*` directives).
public struct TLSClientSettings: Hashable, Sendable {
    public var verify = false
    /// CA certificates (PEM) to verify against; nil = the system's store.
    public var trustedCertificate: String?
    /// The name checked in the certificate and sent as SNI.
    public var name: String
    public var sendServerName = false
    public var sessionReuse = true
    public var protocols: Set<TLSVersion> = [.tls1_2, .tls1_3]
    public var ciphers = "DEFAULT"
    /// A certificate and key of Tether's own, for upstreams that ask for one (PEM).
    public var certificate: String?
    public var certificateKey: String?

    public init(name: String) { self.name = name }

    /// Everything that makes a connection with these settings different from another: part of
    /// the upstream pool's key, so connections are reused only under the same settings.
    public var poolKey: String {
        "tls|\(verify)|\(trustedCertificate ?? "")|\(name)|\(sendServerName)|\(sessionReuse)|\(protocols.map(\.rawValue).sorted())|\(ciphers)|\(certificate ?? "")|\(certificateKey ?? "")"
    }
}

/// One `SSL_CTX`. Immutable once built; shared by every loop (OpenSSL locks what it must).
public final class TLSContext: @unchecked Sendable {
    let ctx: OpaquePointer
    public let isServer: Bool
    /// Upstream contexts: the name checked in the peer's certificate and sent as SNI.
    let peerName: String?
    /// Whether `peerName` is an IP literal (checked against the certificate's IP entries, and
    /// never sent as SNI, RFC 6066), decided once here rather than per connection.
    let peerNameIsAddress: Bool
    let verifyPeer: Bool
    let sendServerName: Bool
    let sessionReuse: Bool
    public let handshakeTimeoutMs: Int64
    /// The OCSP response stapled (owned here; OpenSSL gets a copy per handshake, under the
    /// staple's lock, since the thread that fetches responses may replace it at any time).
    private var staple: UnsafeMutablePointer<tether_staple>?
    /// Why `ssl_stapling` staples nothing, for the error log (nil when it staples, or is off).
    public private(set) var staplingProblem: String?
    /// `ssl_stapling` without a file: what to ask the responder (nil when nothing is fetched).
    public private(set) var ocspQuery: OCSPQuery?
    private var staplingVerify = false
    /// The certificate's file, for log lines about its staple.
    public private(set) var certificateFile = ""

    deinit {
        SSL_CTX_free(ctx)
        tether_staple_free(staple)
    }

    private init(ctx: OpaquePointer, isServer: Bool, peerName: String?, verifyPeer: Bool, sendServerName: Bool, sessionReuse: Bool, handshakeTimeoutMs: Int64) {
        self.ctx = ctx
        self.isServer = isServer
        self.peerName = peerName
        self.peerNameIsAddress = peerName.map(isIPAddress) ?? false
        self.verifyPeer = verifyPeer
        self.sendServerName = sendServerName
        self.sessionReuse = sessionReuse
        self.handshakeTimeoutMs = handshakeTimeoutMs
    }

    /// A server context: loads the certificates and keys (checking that each key matches its
    /// certificate) and applies the protocol, cipher and session settings.
    public static func server(_ s: TLSServerSettings, handshakeTimeoutMs: Int64 = 60_000) throws -> TLSContext {
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(TLS_server_method()) else { throw TLSConfigurationError("SSL_CTX_new() failed: \(OpenSSLErrors.drain())") }
        let context = TLSContext(ctx: ctx, isServer: true, peerName: nil, verifyPeer: false, sendServerName: false, sessionReuse: false, handshakeTimeoutMs: handshakeTimeoutMs)
        try applyProtocols(ctx, s.protocols, directive: "ssl_protocols")
        try applyCiphers(ctx, s.ciphers, directive: "ssl_ciphers")
        var options = tether_op_all() | tether_op_no_compression() | tether_op_no_renegotiation()
        if s.preferServerCiphers { options |= tether_op_cipher_server_preference() }
        if !s.sessionTickets { options |= tether_op_no_ticket() }
        SSL_CTX_set_options(ctx, options)
        // Keeps idle keep-alive connections small: OpenSSL frees its record buffers between reads.
        _ = tether_SSL_CTX_set_mode(ctx, Int(SSL_MODE_RELEASE_BUFFERS))
        if s.ecdhCurve != "auto" {
            guard tether_SSL_CTX_set1_groups_list(ctx, s.ecdhCurve) == 1 else {
                ERR_clear_error()
                throw TLSConfigurationError("unknown curve in \"ssl_ecdh_curve \(s.ecdhCurve)\"", directive: "ssl_ecdh_curve")
            }
        }
        for (i, pair) in s.certificates.enumerated() {
            try readable(pair.certificate, "cannot load certificate", certificate: i)
            try readable(pair.key, "cannot load certificate key", certificate: i, aboutKey: true)
            guard SSL_CTX_use_certificate_chain_file(ctx, pair.certificate) == 1 else {
                throw TLSConfigurationError("cannot load certificate \"\(pair.certificate)\": \(OpenSSLErrors.drain())", certificate: i)
            }
            guard SSL_CTX_use_PrivateKey_file(ctx, pair.key, SSL_FILETYPE_PEM) == 1 else {
                let errors = OpenSSLErrors.drain()
                if errors.messages.contains("key values mismatch") {
                    throw TLSConfigurationError("certificate key \"\(pair.key)\" does not match certificate \"\(pair.certificate)\"", certificate: i, aboutKey: true)
                }
                throw TLSConfigurationError("cannot load certificate key \"\(pair.key)\": \(errors)", certificate: i, aboutKey: true)
            }
            guard SSL_CTX_check_private_key(ctx) == 1 else {
                throw TLSConfigurationError("certificate key \"\(pair.key)\" does not match certificate \"\(pair.certificate)\": \(OpenSSLErrors.drain())", certificate: i, aboutKey: true)
            }
        }
        if s.verifyClient {
            tether_SSL_CTX_verify_client(ctx, Int32(s.verifyDepth))
            if let ca = s.clientCertificate {
                try readable(ca, "cannot load client certificate", directive: "ssl_client_certificate")
                guard SSL_CTX_load_verify_locations(ctx, ca, nil) == 1, let names = SSL_load_client_CA_file(ca) else {
                    throw TLSConfigurationError("cannot load client certificate \"\(ca)\": \(OpenSSLErrors.drain())", directive: "ssl_client_certificate")
                }
                SSL_CTX_set_client_CA_list(ctx, names)
            }
            if let ca = s.trustedCertificate {
                try readable(ca, "cannot load trusted certificate", directive: "ssl_trusted_certificate")
                guard SSL_CTX_load_verify_locations(ctx, ca, nil) == 1 else {
                    throw TLSConfigurationError("cannot load trusted certificate \"\(ca)\": \(OpenSSLErrors.drain())", directive: "ssl_trusted_certificate")
                }
            }
            if let crl = s.crl {
                try readable(crl, "cannot load CRL", directive: "ssl_crl")
                guard tether_SSL_CTX_load_crl(ctx, crl) > 0 else {
                    throw TLSConfigurationError("cannot load CRL \"\(crl)\": \(OpenSSLErrors.drain())", directive: "ssl_crl")
                }
            }
        }
        if s.stapling {
            // The issuer named in the OCSP request may be found only here, verification or not.
            if !s.verifyClient, let ca = s.trustedCertificate {
                try readable(ca, "cannot load trusted certificate", directive: "ssl_trusted_certificate")
                guard SSL_CTX_load_verify_locations(ctx, ca, nil) == 1 else {
                    throw TLSConfigurationError("cannot load trusted certificate \"\(ca)\": \(OpenSSLErrors.drain())", directive: "ssl_trusted_certificate")
                }
            }
            try context.loadStaple(s)
        }
        let sidContext: [UInt8] = Array("tether".utf8)
        _ = SSL_CTX_set_session_id_context(ctx, sidContext, UInt32(sidContext.count))
        if s.sessionCacheSize > 0 {
            _ = tether_SSL_CTX_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_SERVER))
            _ = tether_SSL_CTX_sess_set_cache_size(ctx, s.sessionCacheSize)
        } else {
            _ = tether_SSL_CTX_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
        }
        _ = SSL_CTX_set_timeout(ctx, s.sessionTimeoutSeconds)
        tether_SSL_CTX_select_http11(ctx, s.http2 ? 1 : 0)
        tether_SSL_CTX_set_sni_pick(ctx, sniPick)
        return context
    }

    /// Sets up `ssl_stapling`: reads `ssl_stapling_file` and staples it if it is good, or makes
    /// the query a fetcher sends to the responder (`staplingProblem` says why nothing will be
    /// stapled).
    private func loadStaple(_ s: TLSServerSettings) throws {
        staplingVerify = s.staplingVerify
        certificateFile = s.certificates.last?.certificate ?? ""
        guard let st = tether_staple_new(ctx) else { throw TLSConfigurationError("cannot allocate the OCSP staple", directive: "ssl_stapling") }
        staple = st
        guard let file = s.staplingFile else { return makeQuery(s) }
        guard let f = fopen(file, "rb") else {
            throw TLSConfigurationError("cannot load OCSP response \"\(file)\": \(String(cString: strerror(errno)))", directive: "ssl_stapling_file")
        }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n <= 0 { break }
            bytes += chunk[0..<n]
            guard bytes.count <= 1 << 20 else { throw TLSConfigurationError("OCSP response \"\(file)\" is over 1 MiB", directive: "ssl_stapling_file") }
        }
        switch staple(response: bytes) {
        case .stapled: break
        case .revoked(let why), .refused(let why): staplingProblem = "OCSP response \"\(file)\" is not stapled: \(why)"
        }
    }

    private func makeQuery(_ s: TLSServerSettings) {
        var url = [CChar](repeating: 0, count: 1024)
        var why = [CChar](repeating: 0, count: 256)
        var der: UnsafeMutablePointer<UInt8>?
        let n = tether_ocsp_request(ctx, &der, &url, 1024, &why, 256)
        defer { free(der) }
        guard n > 0, let der else {
            staplingProblem = "\"ssl_stapling\" ignored for \"\(certificateFile)\": \(String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))"
            return
        }
        let named = String(decoding: url.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let responder = s.staplingResponder ?? (named.isEmpty ? nil : named) else {
            staplingProblem = "\"ssl_stapling\" ignored, no OCSP responder URL in the certificate \"\(certificateFile)\""
            return
        }
        guard let parts = OCSPQuery.responder(responder) else {
            staplingProblem = "\"ssl_stapling\" ignored for \"\(certificateFile)\": invalid OCSP responder URL \"\(responder)\" (only http:// is supported)"
            return
        }
        ocspQuery = OCSPQuery(url: responder, host: parts.host, port: parts.port, path: parts.path,
                              request: Array(UnsafeBufferPointer(start: der, count: Int(n))))
    }

    /// Checks an OCSP response (DER) about this context's certificate and staples it when it
    /// says good and is current; a revoked (or unknown) status takes down what was stapled, any
    /// other fault leaves it. Any thread: handshakes read the staple under its lock.
    public func staple(response: [UInt8]) -> StapleOutcome {
        guard let staple else { return .refused("\"ssl_stapling\" is off") }
        var why = [CChar](repeating: 0, count: 256)
        var status: Int32 = -1
        var validUntil = time_t(0)
        if tether_check_ocsp(ctx, response, response.count, staplingVerify ? 1 : 0, &why, 256, &status, &validUntil) == 1 {
            let until = validUntil == 0 ? Int.max : Int(validUntil)
            tether_staple_set(staple, response, Int32(response.count), time_t(clamping: until))
            return .stapled(validUntil: until)
        }
        let reason = String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if status == V_OCSP_CERTSTATUS_REVOKED || status == V_OCSP_CERTSTATUS_UNKNOWN {
            tether_staple_set(staple, nil, 0, 0)
            return .revoked(reason)
        }
        return .refused(reason)
    }

    /// Whether a current OCSP response is stapled now.
    public var isStapling: Bool { staple.map { tether_staple_present($0) == 1 } ?? false }

    /// A client context for upstream connections.
    public static func client(_ s: TLSClientSettings, handshakeTimeoutMs: Int64 = 60_000) throws -> TLSContext {
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(TLS_client_method()) else { throw TLSConfigurationError("SSL_CTX_new() failed: \(OpenSSLErrors.drain())") }
        let context = TLSContext(ctx: ctx, isServer: false, peerName: s.name, verifyPeer: s.verify, sendServerName: s.sendServerName,
                                 sessionReuse: s.sessionReuse, handshakeTimeoutMs: handshakeTimeoutMs)
        try applyProtocols(ctx, s.protocols, directive: "proxy_ssl_protocols")
        try applyCiphers(ctx, s.ciphers, directive: "proxy_ssl_ciphers")
        SSL_CTX_set_options(ctx, tether_op_all() | tether_op_no_compression() | tether_op_no_renegotiation())
        _ = tether_SSL_CTX_set_mode(ctx, Int(SSL_MODE_RELEASE_BUFFERS))
        // The trusted certificates are read even with verification off, so that a wrong path is
        // found at `tether -t` rather than on the day verification is turned on.
        if let ca = s.trustedCertificate {
            try readable(ca, "cannot load trusted certificate", directive: "proxy_ssl_trusted_certificate")
            guard SSL_CTX_load_verify_locations(ctx, ca, nil) == 1 else {
                throw TLSConfigurationError("cannot load trusted certificate \"\(ca)\": \(OpenSSLErrors.drain())", directive: "proxy_ssl_trusted_certificate")
            }
        } else if s.verify {
            _ = SSL_CTX_set_default_verify_paths(ctx)
        }
        if s.verify { SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil) }
        if let cert = s.certificate {
            guard let key = s.certificateKey else {
                throw TLSConfigurationError("no \"proxy_ssl_certificate_key\" is defined for certificate \"\(cert)\"", directive: "proxy_ssl_certificate")
            }
            try readable(cert, "cannot load certificate", directive: "proxy_ssl_certificate")
            try readable(key, "cannot load certificate key", directive: "proxy_ssl_certificate_key")
            guard SSL_CTX_use_certificate_chain_file(ctx, cert) == 1, SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1,
                  SSL_CTX_check_private_key(ctx) == 1 else {
                throw TLSConfigurationError("cannot load certificate \"\(cert)\" with key \"\(key)\": \(OpenSSLErrors.drain())", directive: "proxy_ssl_certificate")
            }
        }
        _ = tether_SSL_CTX_offer_http11(ctx)
        if s.sessionReuse { tether_SSL_CTX_set_client_session_store(ctx, storeClientSession) }
        return context
    }

    /// Sets up a client connection as this context says: the name (or address) the server's
    /// certificate must carry when verifying, SNI (`proxy_ssl_server_name`, never for an address),
    /// and the session to resume.
    func prepareClient(_ ssl: OpaquePointer, session: TLSSessionSlot?) {
        if verifyPeer, let name = peerName {
            if peerNameIsAddress {
                _ = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
            } else {
                _ = SSL_set1_host(ssl, name)
            }
        }
        if sendServerName, !peerNameIsAddress, let name = peerName {
            _ = tether_SSL_set_tlsext_host_name(ssl, name)
        }
        session?.apply(to: ssl)
    }

    /// A missing or unreadable file, said plainly (OpenSSL's own wording for it is cryptic).
    private static func readable(_ path: String, _ what: String, certificate: Int? = nil, aboutKey: Bool = false, directive: String? = nil) throws {
        let f = fopen(path, "r")
        guard let f else {
            let reason = String(cString: strerror(errno))
            throw TLSConfigurationError("\(what) \"\(path)\": \(reason)", certificate: certificate, aboutKey: aboutKey, directive: directive)
        }
        fclose(f)
    }

    private static func applyProtocols(_ ctx: OpaquePointer, _ protocols: Set<TLSVersion>, directive: String) throws {
        guard let lo = protocols.min(), let hi = protocols.max() else {
            throw TLSConfigurationError("\"\(directive)\" enables no protocol", directive: directive)
        }
        _ = tether_SSL_CTX_set_min_proto_version(ctx, lo.wire)
        _ = tether_SSL_CTX_set_max_proto_version(ctx, hi.wire)
    }

    private static func applyCiphers(_ ctx: OpaquePointer, _ ciphers: String, directive: String) throws {
        guard SSL_CTX_set_cipher_list(ctx, ciphers) == 1 else {
            ERR_clear_error()
            throw TLSConfigurationError("no cipher in \"\(directive) \(ciphers)\" is known to OpenSSL (see `openssl ciphers`)", directive: directive)
        }
    }
}

/// Maps SNI names to contexts for one listening address: each `server` block with its own
/// certificates has a context; names are matched with the virtual host rules by `pick`.
public final class TLSServerNames: @unchecked Sendable {
    /// The default server's context, which every handshake starts with.
    public let defaultContext: TLSContext
    private let pick: @Sendable (String) -> TLSContext?

    public init(defaultContext: TLSContext, pick: @escaping @Sendable (String) -> TLSContext?) {
        self.defaultContext = defaultContext
        self.pick = pick
    }

    func context(forName name: String) -> TLSContext? { pick(name) }
}

/// The servername callback: switches the connection to the context of the `server` block that
/// the client named; unknown names keep the default server's.
private let sniPick: tether_sni_pick = { ssl, name in
    guard let ssl, let name, let raw = tether_SSL_get_app_data(ssl) else { return }
    guard let connection = Unmanaged<AnyObject>.fromOpaque(raw).takeUnretainedValue() as? TLSSocket,
          let names = connection.serverNames else { return }
    let lowered = String(cString: name).lowercased()
    if let ctx = names.context(forName: lowered), ctx !== names.defaultContext {
        SSL_set_SSL_CTX(ssl, ctx.ctx)
        tether_SSL_adopt_verify(ssl, ctx.ctx)
        connection.selectedContext = ctx
    }
}

/// OpenSSL hands each new client session here (also TLS 1.3 tickets that arrive after the
/// handshake); the connection's pool keeps the latest for the next connection.
private let storeClientSession: tether_new_session = { ssl, session in
    guard let ssl, let session, let raw = tether_SSL_get_app_data(ssl) else { return 0 }
    guard let connection = Unmanaged<AnyObject>.fromOpaque(raw).takeUnretainedValue() as? TLSSocket,
          let slot = connection.sessionSlot else { return 0 }
    slot.replace(session)
    return 1
}

/// Whether `s` is an IPv4 or IPv6 address (verified as an IP SAN, not a host name).
func isIPAddress(_ s: String) -> Bool {
    var a4 = in_addr()
    var a6 = in6_addr()
    return inet_pton(AF_INET, s, &a4) == 1 || inet_pton(AF_INET6, s, &a6) == 1
}

/// The session an upstream server's pool resumes its next TLS connection with. Confined to the
/// pool's event loop, as the pool is.
public final class TLSSessionSlot {
    private var session: OpaquePointer?
    public private(set) var stored = 0

    public init() {}
    deinit { if let session { SSL_SESSION_free(session) } }

    /// Takes over the reference the caller holds.
    func replace(_ s: OpaquePointer) {
        if let session { SSL_SESSION_free(session) }
        session = s
        stored += 1
    }

    /// Sets the stored session on `ssl` (which takes its own reference).
    func apply(to ssl: OpaquePointer) {
        if let session { _ = SSL_set_session(ssl, session) }
    }
}
