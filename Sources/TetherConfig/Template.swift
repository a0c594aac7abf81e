/// A variable that a header value or a log format may use.
public enum Variable: Hashable, Sendable {
    case host
    case remoteAddr
    case remotePort
    case scheme
    case requestURI
    case uri
    case args
    case requestMethod
    case request
    case proxyAddXForwardedFor
    case proxyHost
    case requestID
    case serverPort
    case serverName
    case serverProtocol
    case status
    case bodyBytesSent
    case bytesSent
    case requestTime
    case timeLocal
    case timeISO8601
    case msec
    case remoteUser
    case upstreamAddr
    case upstreamStatus
    case upstreamConnectTime
    case upstreamResponseTime
    case upstreamHeaderTime
    case upstreamReused
    case connection
    case connectionRequests
    /// `$https`: `on` on a TLS connection, empty otherwise.
    case https
    /// `$http2`: `h2` for a request on an HTTP/2 connection over TLS, `h2c` on a plain one, empty otherwise.
    case http2
    /// `$ssl_protocol`, `$ssl_cipher`, `$ssl_server_name` (SNI), `$ssl_session_reused` (`r` or `.`):
    /// empty on plain connections.
    case sslProtocol
    case sslCipher
    case sslServerName
    case sslSessionReused
    /// `$proxy_protocol_addr`, `$proxy_protocol_port`: the client as the PROXY protocol header
    /// named it; `$proxy_protocol_server_addr`, `$proxy_protocol_server_port`: the address it
    /// connected to. Empty without a header (or with one that names no client).
    case proxyProtocolAddr
    case proxyProtocolPort
    case proxyProtocolServerAddr
    case proxyProtocolServerPort
    /// `$realip_remote_addr`, `$realip_remote_port`: the peer's own address, whatever
    /// `real_ip_header` made `$remote_addr`.
    case realipRemoteAddr
    case realipRemotePort
    /// `ssl_verify_client`: `$ssl_client_verify` (`SUCCESS`, `FAILED:reason`, `NONE`), the
    /// certificate's subject and issuer (RFC 2253), serial (hex), SHA-1 fingerprint, and the PEM
    /// percent-encoded (`$ssl_client_escaped_cert`), for headers to the backend.
    case sslClientVerify
    case sslClientSDN
    case sslClientIDN
    case sslClientSerial
    case sslClientFingerprint
    case sslClientEscapedCert
    /// `$1` … `$9`: a group of the regex location that matched (empty otherwise).
    case capture(Int)
    /// `$name`: a named group (`(?<name>…)`) of the regex location that matched.
    case namedCapture(String)
    /// `$http_NAME`: a request header, with `_` standing for `-`, matched case-insensitively.
    case httpHeader(String)
    /// `$sent_http_NAME`: a response header.
    case sentHTTPHeader(String)

    static let named: [String: Variable] = [
        "host": .host, "remote_addr": .remoteAddr, "remote_port": .remotePort, "scheme": .scheme,
        "request_uri": .requestURI, "uri": .uri, "document_uri": .uri, "args": .args, "query_string": .args,
        "request_method": .requestMethod, "request": .request,
        "proxy_add_x_forwarded_for": .proxyAddXForwardedFor, "proxy_host": .proxyHost,
        "request_id": .requestID, "server_port": .serverPort, "server_name": .serverName,
        "server_protocol": .serverProtocol, "status": .status, "body_bytes_sent": .bodyBytesSent,
        "bytes_sent": .bytesSent, "request_time": .requestTime, "time_local": .timeLocal,
        "time_iso8601": .timeISO8601, "msec": .msec, "remote_user": .remoteUser,
        "upstream_addr": .upstreamAddr, "upstream_status": .upstreamStatus,
        "upstream_connect_time": .upstreamConnectTime, "upstream_response_time": .upstreamResponseTime,
        "upstream_header_time": .upstreamHeaderTime, "upstream_reused": .upstreamReused,
        "connection": .connection, "connection_requests": .connectionRequests,
        "https": .https, "http2": .http2, "ssl_protocol": .sslProtocol, "ssl_cipher": .sslCipher,
        "ssl_server_name": .sslServerName, "ssl_session_reused": .sslSessionReused,
        "proxy_protocol_addr": .proxyProtocolAddr, "proxy_protocol_port": .proxyProtocolPort,
        "proxy_protocol_server_addr": .proxyProtocolServerAddr, "proxy_protocol_server_port": .proxyProtocolServerPort,
        "realip_remote_addr": .realipRemoteAddr, "realip_remote_port": .realipRemotePort,
        "ssl_client_verify": .sslClientVerify, "ssl_client_s_dn": .sslClientSDN, "ssl_client_i_dn": .sslClientIDN,
        "ssl_client_serial": .sslClientSerial, "ssl_client_fingerprint": .sslClientFingerprint,
        "ssl_client_escaped_cert": .sslClientEscapedCert,
    ]

    public var name: String {
        switch self {
        case .httpHeader(let h): return "http_" + h
        case .sentHTTPHeader(let h): return "sent_http_" + h
        case .capture(let n): return "\(n)"
        case .namedCapture(let n): return n
        default: return Variable.named.first(where: { $0.value == self })!.key
        }
    }

    static func lookup(_ name: String) -> Variable? {
        if let v = named[name] { return v }
        if name.hasPrefix("http_"), name.count > 5 { return .httpHeader(String(name.dropFirst(5)).replacingUnderscores()) }
        if name.hasPrefix("sent_http_"), name.count > 10 { return .sentHTTPHeader(String(name.dropFirst(10)).replacingUnderscores()) }
        return nil
    }
}

extension String {
    /// `user_agent` → `user-agent`, lowercased, as `$http_user_agent` names the header.
    func replacingUnderscores() -> String {
        String(self.lowercased().map { $0 == "_" ? "-" : $0 })
    }
}

/// Text with `$variables` in it, parsed once at configuration time.
public struct Template: Hashable, Sendable, CustomStringConvertible {
    public enum Part: Hashable, Sendable {
        case literal(String)
        case variable(Variable)
    }

    public var parts: [Part]
    /// The text as written, for `-T`.
    public var source: String

    public init(parts: [Part], source: String) {
        self.parts = parts
        self.source = source
    }

    public var isEmpty: Bool { parts.isEmpty }
    public var description: String { source }

    /// Parses `$name` and `${name}` references; `$` not followed by a name is literal.
    /// `captures`: the names of regex groups defined so far (`$name` refers to them).
    public static func parse(_ text: String, captures: Set<String> = []) -> Result<Template, ConfigErrorReason> {
        var parts: [Part] = []
        var literal = ""
        let chars = Array(text.unicodeScalars)
        var i = 0
        func isNameChar(_ c: Unicode.Scalar) -> Bool {
            (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") || c == "_"
        }
        while i < chars.count {
            let c = chars[i]
            guard c == "$", i + 1 < chars.count else {
                literal.unicodeScalars.append(c); i += 1; continue
            }
            var name = ""
            var j = i + 1
            if chars[j] == "{" {
                j += 1
                while j < chars.count, chars[j] != "}" { name.unicodeScalars.append(chars[j]); j += 1 }
                guard j < chars.count else { return .failure(.init("the closing bracket in \"\(name)\" variable is missing")) }
                j += 1
            } else {
                while j < chars.count, isNameChar(chars[j]) { name.unicodeScalars.append(chars[j]); j += 1 }
            }
            if name.isEmpty {
                literal.unicodeScalars.append(c); i += 1; continue
            }
            if name.unicodeScalars.allSatisfy({ $0 >= "0" && $0 <= "9" }) {
                // `$1`…`$9` (a second digit is text, as nginx reads `$10`).
                if !literal.isEmpty { parts.append(.literal(literal)); literal = "" }
                parts.append(.variable(.capture(Int(String(name.unicodeScalars.first!))!)))
                literal = String(name.unicodeScalars.dropFirst())
                i = j
                continue
            }
            guard let v = Variable.lookup(name) ?? (captures.contains(name) ? .namedCapture(name) : nil) else {
                return .failure(.init("unknown \"\(name)\" variable"))
            }
            if !literal.isEmpty { parts.append(.literal(literal)); literal = "" }
            parts.append(.variable(v))
            i = j
        }
        if !literal.isEmpty { parts.append(.literal(literal)) }
        return .success(Template(parts: parts, source: text))
    }
}

/// Why a value was refused, to be placed at a location by the caller.
public struct ConfigErrorReason: Error, Hashable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
}
