/// The whole validated configuration: one immutable value, with inheritance
/// (http → server → location) resolved and every string already parsed.
public struct Configuration: Sendable {
    public enum WorkerProcesses: Hashable, Sendable {
        case auto
        case count(Int)
    }

    public enum LogLevel: String, CaseIterable, Sendable, Comparable {
        case debug, info, notice, warn, error, crit, alert, emerg

        public static func < (a: LogLevel, b: LogLevel) -> Bool {
            allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
        }
    }

    public struct ErrorLog: Hashable, Sendable {
        public var path: String
        public var level: LogLevel
    }

    /// The file the configuration was read from.
    public var file: String
    public var workerProcesses: WorkerProcesses = .auto
    public var errorLog = ErrorLog(path: "stderr", level: .error)
    public var pidFile: String?
    public var workerRlimitNofile: Int?
    public var workerConnections = 512
    public var upstreams: [Upstream] = []
    public var servers: [Server] = []
    public var logFormats: [String: LogFormat] = [:]
    /// Remarks to print at `-t` and start-up; never fatal.
    public var warnings: [ConfigWarning] = []

    public init(file: String) { self.file = file }

    public func upstream(named name: String) -> Upstream? { upstreams.first { $0.name == name } }
}

public struct LogFormat: Hashable, Sendable {
    public var name: String
    public var template: Template

    public static let combined = LogFormat(
        name: "combined",
        template: try! Template.parse(
            "$remote_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent \"$http_referer\" \"$http_user_agent\""
        ).get()
    )
}

/// An `upstream` block, or the implicit one-server upstream that `proxy_pass http://HOST:PORT` makes.
public struct Upstream: Sendable {
    public enum Balancing: String, Sendable {
        case roundRobin = "round_robin"
        case leastConn = "least_conn"
    }

    public var name: String
    public var location: SourceLocation
    public var servers: [UpstreamServer] = []
    public var balancing: Balancing = .roundRobin
    /// `keepalive N`: idle connections kept per event loop without trimming.
    public var keepalive = 32
    public var keepaliveTimeoutMs: Int64 = 60_000
    public var keepaliveRequests = 1000
    public var keepaliveTimeMs: Int64 = 3_600_000
    /// True for the upstream made from a `proxy_pass` host, not an `upstream` block.
    public var implicit = false
    /// `tcp_keepalive` for every connection to this upstream's servers.
    public var tcpKeepalive: TCPKeepalive?
    public var tcpUserTimeout = UserTimeout.auto
    /// `queue N [timeout=T]`: requests that find every server at its `max_conns` wait, first in
    /// first out, up to N at a time process-wide and T each (nginx's default: 60 s).
    public var queue: Queue?
    /// `health_check ...`: each server is asked `uri` every `interval` on a connection of its
    /// own; `fails` failed checks in a row take it out, `passes` in a row bring it back.
    public var healthCheck: HealthCheck?

    public struct HealthCheck: Hashable, Sendable {
        public var intervalMs: Int64 = 5_000
        public var fails = 1
        public var passes = 1
        public var uri = "/"
        /// Statuses that pass (nginx Plus: 2xx and 3xx).
        public var match: ClosedRange<Int> = 200...399
        public var timeoutMs: Int64?
        public init() {}
        /// A check not answered in this long fails: `timeout`, or the interval.
        public var effectiveTimeoutMs: Int64 { timeoutMs ?? intervalMs }
    }

    /// `resolver ADDRESS... [valid=T] [ipv6=on|off]` and `resolver_timeout T` (the upstream
    /// block's, else http's): the DNS servers that `server NAME resolve` lines are resolved with.
    public struct Resolver: Hashable, Sendable {
        /// Numeric `address:port` pairs, asked in turn.
        public var servers: [HostPort]
        /// Overrides the answers' TTL.
        public var validMs: Int64?
        public var ipv6 = false
        public var timeoutMs: Int64 = 30_000
        public var location: SourceLocation
    }

    public struct HostPort: Hashable, Sendable {
        public var host: String
        public var port: Int
    }

    /// The DNS servers for the `resolve` servers; nil when no server resolves.
    public var resolver: Resolver?
    /// Some `server` line has `resolve`.
    public var resolves: Bool { servers.contains(where: \.resolve) }

    public struct Queue: Hashable, Sendable {
        public var size: Int
        public var timeoutMs: Int64
        public init(size: Int, timeoutMs: Int64 = 60_000) {
            self.size = size
            self.timeoutMs = timeoutMs
        }
    }

    public init(name: String, location: SourceLocation) {
        self.name = name
        self.location = location
    }
}

public struct UpstreamServer: Hashable, Sendable {
    /// The host as written, and the numeric address it resolved to at load time.
    public var host: String
    public var address: String
    public var port: Int
    public var weight = 1
    public var maxFails = 1
    public var failTimeoutMs: Int64 = 10_000
    public var backup = false
    public var down = false
    /// `max_conns=N`: connections to this server, idle and busy, process-wide; 0: no limit.
    public var maxConns = 0
    /// `proxy_protocol` (HAProxy's `send-proxy-v2`): each connection to this server starts with
    /// a PROXY protocol v2 header naming the client. Such connections serve one request each and
    /// are never pooled: a pooled one would carry the header of the client that opened it.
    public var proxyProtocol = false
    /// `resolve`: `host` is a name resolved again as its TTL (or the resolver's `valid`) runs out;
    /// each address it has is a server of its own with this line's parameters. In the
    /// configuration as read, `address` is empty: `ResolvedSets` fills in the addresses.
    public var resolve = false
    /// `tcp_keepalive=` on the server line, over the upstream block's.
    public var tcpKeepalive: TCPKeepalive?
    public var tcpUserTimeout: UserTimeout?
    public var location: SourceLocation

    /// `host:port` as nginx's `$upstream_addr` shows it.
    public var addressText: String { address.contains(":") ? "[\(address)]:\(port)" : "\(address):\(port)" }
}

/// TCP keepalive for a socket: nginx's `so_keepalive=on|off|[IDLE]:[INTVL]:[CNT]`. A nil field
/// keeps the host's value (`net.ipv4.tcp_keepalive_time`, `_intvl`, `_probes`).
public struct TCPKeepalive: Hashable, Sendable, CustomStringConvertible {
    public var enabled: Bool
    /// Seconds of idleness before the first probe (TCP_KEEPIDLE).
    public var idle: Int?
    /// Seconds between probes (TCP_KEEPINTVL).
    public var interval: Int?
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    public var count: Int?

    public init(enabled: Bool, idle: Int? = nil, interval: Int? = nil, count: Int? = nil) {
        self.enabled = enabled
        self.idle = idle
        self.interval = interval
        self.count = count
    }

    public static let off = TCPKeepalive(enabled: false)

    public var description: String {
        guard enabled else { return "off" }
        if idle == nil && interval == nil && count == nil { return "on" }
        return "\(idle.map { Units.formatTime(Int64($0) * 1000) } ?? ""):\(interval.map { Units.formatTime(Int64($0) * 1000) } ?? ""):\(count.map(String.init) ?? "")"
    }
}

/// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel drops the
/// connection. `auto` derives it from keepalive (IDLE + INTVL x CNT) so that a connection with
/// stuck writes dies on the same schedule as an idle one.
public enum UserTimeout: Hashable, Sendable, CustomStringConvertible {
    case off
    case auto
    case milliseconds(Int64)

    public var description: String {
        switch self {
        case .off: return "off"
        case .auto: return "auto"
        case .milliseconds(let ms): return Units.formatTime(ms)
        }
    }
}

public struct Listen: Hashable, Sendable {
    public var host: String
    public var address: String
    public var port: Int
    public var defaultServer = false
    public var backlog = 511
    /// nil: the socket is left as the host makes it.
    public var soKeepalive: TCPKeepalive?
    public var tcpUserTimeout = UserTimeout.auto
    /// `ssl`: connections on this address speak TLS.
    public var ssl = false
    /// `proxy_protocol`: each connection starts with a PROXY protocol header (v1 or v2), read
    /// before TLS and HTTP.
    public var proxyProtocol = false
    /// `http2`: TLS clients on this address may choose HTTP/2 (nginx's older spelling of `http2 on`).
    public var http2 = false
    public var location: SourceLocation

    /// The address as nginx prints it in errors: `0.0.0.0:8080`, `[::1]:8080`.
    public var addressText: String { address.contains(":") ? "[\(address)]:\(port)" : "\(address):\(port)" }
}

public enum ServerName: Hashable, Sendable, CustomStringConvertible {
    /// `example.com`
    case exact(String)
    /// `*.example.com`: any name ending in `.example.com`.
    case wildcardPrefix(String)
    /// `.example.com`: `example.com` itself and any name under it.
    case domainAndSubdomains(String)

    public init(_ text: String) {
        let t = text.lowercased()
        if t.hasPrefix("*.") { self = .wildcardPrefix(String(t.dropFirst(1))) }
        else if t.hasPrefix("."), t.count > 1 { self = .domainAndSubdomains(String(t.dropFirst(1))) }
        else { self = .exact(t) }
    }

    public var description: String {
        switch self {
        case .exact(let s): return s
        case .wildcardPrefix(let s): return "*" + s
        case .domainAndSubdomains(let s): return "." + s
        }
    }
}

public struct Server: Sendable {
    public var location: SourceLocation
    public var listens: [Listen] = []
    public var names: [ServerName] = []
    public var locations: [Location] = []
    /// Settings for the connection and for requests that no location matches.
    public var settings = HTTPSettings()
    /// A server-level `return`, answered before locations are looked at.
    public var returnAction: ReturnAction?
}

public struct Location: Sendable {
    public enum Match: Hashable, Sendable {
        case exact
        case prefix
        /// `^~`: a prefix that, when it is the longest match, stops the regex search.
        case prefixStop
        /// `~` (or `~*`, case-insensitive): `regex` is searched in the normalised path.
        case regex
    }

    public enum Action: Sendable {
        case proxy(ProxyPass)
        case respond(ReturnAction)
        /// nginx's `stub_status` page.
        case stubStatus
        /// `stats prometheus` or `stats json`.
        case stats(StatsFormat)
        /// Nothing handles the request here: 404.
        case none
    }

    public var match: Match
    public var path: String
    public var settings: HTTPSettings
    public var action: Action
    public var location: SourceLocation
    /// `location ~ REGEX` / `~* REGEX`: the compiled pattern.
    public var regex: Regex?
}

public enum StatsFormat: String, Hashable, Sendable {
    case prometheus, json
}

/// One `allow` or `deny` rule: an address range, or all addresses.
public struct AccessRule: Hashable, Sendable, CustomStringConvertible {
    public var allow: Bool
    /// The network's address bytes (4 or 16) and prefix length; nil for `all`.
    public var network: (bytes: [UInt8], prefix: Int)?
    public var source: String

    public static func == (a: AccessRule, b: AccessRule) -> Bool { a.allow == b.allow && a.source == b.source }
    public func hash(into h: inout Hasher) { h.combine(allow); h.combine(source) }

    /// Whether the rule applies to an address (4 or 16 bytes).
    public func matches(_ address: [UInt8]) -> Bool {
        guard let n = network else { return true }
        guard n.bytes.count == address.count else { return false }
        var bits = n.prefix
        for i in 0..<address.count where bits > 0 {
            let mask: UInt8 = bits >= 8 ? 0xFF : UInt8(0xFF) << UInt8(8 - bits)
            if address[i] & mask != n.bytes[i] & mask { return false }
            bits -= 8
        }
        return true
    }

    public var description: String { (allow ? "allow " : "deny ") + source }
}

public struct ProxyPass: Hashable, Sendable {
    /// `http` or `https`.
    public var scheme: String
    public var isTLS: Bool { scheme == "https" }
    /// The host written in `proxy_pass` (without port): the default `proxy_ssl_name`.
    public var host: String = ""
    /// The upstream's name (explicit or implicit).
    public var upstream: String
    /// The URI part of `proxy_pass`, or nil when none was given (the request URI passes unchanged).
    public var uri: String?
    /// A URI part with variables (a regex location's captures): the upstream request's whole
    /// URI, expanded per request, as nginx does.
    public var uriTemplate: Template? = nil
    /// What `$proxy_host` expands to: the upstream's name, or `host:port` for an explicit address.
    public var proxyHost: String
    /// The text as written, for `-T`.
    public var source: String
}

public struct ReturnAction: Hashable, Sendable {
    public var code: Int
    /// The body text, or the redirect target for 301, 302, 303, 307 and 308.
    public var text: Template?
}

public struct HeaderSetting: Hashable, Sendable {
    public var name: String
    public var value: Template
}

public enum NextUpstreamCondition: String, CaseIterable, Hashable, Sendable {
    case error, timeout
    case invalidHeader = "invalid_header"
    case http500 = "http_500", http502 = "http_502", http503 = "http_503", http504 = "http_504"
    case http403 = "http_403", http404 = "http_404", http429 = "http_429"
    case nonIdempotent = "non_idempotent"
}

public enum AccessLog: Hashable, Sendable {
    case off
    case file(path: String, format: String)
}

/// Settings of `http`, inherited by `server` and `location`, resolved to concrete values.
public struct HTTPSettings: Sendable {
    public var keepaliveTimeoutMs: Int64 = 75_000
    /// The `timeout=` advertised in `Keep-Alive:`; nil sends none.
    public var keepaliveHeaderTimeoutMs: Int64? = 75_000
    public var keepaliveRequests = 1000
    public var keepaliveTimeMs: Int64 = 3_600_000
    public var clientHeaderTimeoutMs: Int64 = 60_000
    public var clientBodyTimeoutMs: Int64 = 60_000
    public var sendTimeoutMs: Int64 = 60_000
    public var clientMaxBodySize: Int64 = 1 << 20
    public var largeClientHeaderBuffers = (count: 4, size: 8192)
    public var accessLog: [AccessLog] = [.off]
    public var serverTokens = true
    /// `merge_slashes`: runs of slashes in a path count as one when locations are matched
    /// (server level: it applies before a location is chosen).
    public var mergeSlashes = true
    /// `proxy_allow_upgrade`: the protocols a client may ask to switch to (`Upgrade:`) through
    /// this location; lowercase, `websocket` by default, empty for none. Never `h2c`.
    public var proxyAllowUpgrade: [String] = ["websocket"]
    public var proxyConnectTimeoutMs: Int64 = 60_000
    public var proxyReadTimeoutMs: Int64 = 60_000
    public var proxySendTimeoutMs: Int64 = 60_000
    public var proxySetHeaders: [HeaderSetting] = HTTPSettings.defaultProxyHeaders
    public var proxyHTTPVersion = "1.1"
    public var proxyNextUpstream: Set<NextUpstreamCondition> = [.error, .timeout]
    public var proxyNextUpstreamTries = 0
    /// nginx's `proxy_socket_keepalive`: SO_KEEPALIVE with the host's timers on upstream
    /// connections, when the upstream sets no `tcp_keepalive` of its own.
    public var proxySocketKeepalive = false
    /// `proxy_request_buffering`: a request body is read whole (memory first, then a temp file)
    /// before an upstream connection is taken for it.
    public var proxyRequestBuffering = true
    /// `proxy_buffering`: a response is read from the upstream as fast as it comes (memory up to
    /// `proxy_buffers`, then a temp file up to `proxy_max_temp_file_size`), so that its
    /// connection goes back to the pool while a slow client drains the rest.
    public var proxyBuffering = true
    /// `client_body_buffer_size`: the part of a buffered request body held in memory.
    public var clientBodyBufferSize = 16 * 1024
    /// `proxy_buffers NUMBER SIZE`: the part of a buffered response held in memory is their product.
    public var proxyBuffers = (count: 8, size: 4096)
    /// `proxy_buffer_size`: the largest response head (at most one of Tether's 16 KiB buffers).
    public var proxyBufferSize = 16 * 1024
    /// `proxy_max_temp_file_size`: the most a response's temp file holds at once; 0: no temp file.
    public var proxyMaxTempFileSize: Int64 = 1 << 30
    public var proxyTempPath = "/tmp"
    public var clientBodyTempPath = "/tmp"
    /// nginx's `allow` / `deny`, in order; the first that matches decides, none matching allows.
    public var accessRules: [AccessRule] = []
    /// `set_real_ip_from`: the peers trusted to say who the client is (none: nobody is).
    public var realIPFrom: [AccessRule] = []
    /// `real_ip_header`: where a trusted peer says it, lowercased: a header (`x-real-ip` by
    /// default, `x-forwarded-for`, any other), or `proxy_protocol`.
    public var realIPHeader = "x-real-ip"
    /// `real_ip_recursive`: in `X-Forwarded-For`, trusted addresses from the right are skipped.
    public var realIPRecursive = false
    /// TLS termination (`ssl_*`, server level).
    public var ssl = SSLSettings()
    /// TLS to upstreams (`proxy_ssl_*`).
    public var proxySSL = ProxySSLSettings()

    public init() {}

    /// nginx sends `Host: $proxy_host`; unlike nginx, Tether does not send `Connection: close`,
    /// so upstream connections are kept alive without any extra directive.
    public static let defaultProxyHeaders = [HeaderSetting(name: "Host", value: try! Template.parse("$proxy_host").get())]
}

/// nginx's `ssl_*` directives, as they apply to one server (TLS termination).
public struct SSLSettings: Hashable, Sendable {
    public struct Certificate: Hashable, Sendable {
        public var certificate: String
        public var key: String
        /// Where `ssl_certificate` and its `ssl_certificate_key` stand, for errors about this pair.
        public var location: SourceLocation
        public var keyLocation: SourceLocation?
    }
    public enum SessionCache: Hashable, Sendable {
        /// `off`: clients are told sessions are not reused.
        case off
        /// `none` (nginx's default): no server-side cache; tickets still resume sessions.
        case none
        /// `builtin[:N]` and/or `shared:NAME:SIZE`: a cache of this many sessions for the process.
        case sessions(Int)
    }

    public var certificates: [Certificate] = []
    public var protocols: [String] = ["TLSv1.2", "TLSv1.3"]
    /// nil: the Mozilla "intermediate" list.
    public var ciphers: String?
    public var preferServerCiphers = false
    /// Mozilla's intermediate profile's groups (OpenSSL's own default also offers secp521r1 and
    /// X448, which that profile does not); `auto` leaves OpenSSL's default.
    public var ecdhCurve = "X25519:prime256v1:secp384r1"
    public var sessionCache = SessionCache.none
    public var sessionTimeoutMs: Int64 = 300_000
    public var sessionTickets = true
    public var handshakeTimeoutMs: Int64 = 60_000
    /// `ssl_verify_client`: whether a client certificate is asked for, and what a missing or
    /// failed one gets (nginx's 400 pages).
    public enum VerifyClient: String, Hashable, Sendable {
        case off, on, optional
        case optionalNoCA = "optional_no_ca"
    }
    public var verifyClient = VerifyClient.off
    /// `ssl_client_certificate`: trusted CAs, also sent to the client as the acceptable ones.
    public var clientCertificate: String?
    /// `ssl_trusted_certificate`: trusted CAs not sent.
    public var trustedCertificate: String?
    public var verifyDepth = 1
    /// `ssl_crl`: revocation lists (PEM) the client's chain is checked against.
    public var crl: String?
    /// `ssl_stapling`, `ssl_stapling_file` (a DER OCSP response, read at start and reload),
    /// `ssl_stapling_verify`, `ssl_stapling_responder` (overrides the certificate's responder).
    public var stapling = false
    public var staplingFile: String?
    public var staplingVerify = false
    public var staplingResponder: String?
    /// http's `resolver` (and `resolver_timeout`), for a responder named by a name.
    public var resolver: Upstream.Resolver?
    /// `http2 on` (or `listen … ssl http2`): clients that offer `h2` in ALPN speak HTTP/2.
    public var http2 = false
    /// `http2_max_concurrent_streams`: streams a client may have open at once.
    public var http2MaxConcurrentStreams = 128
    /// `http2_chunk_size`: the largest DATA frame sent.
    public var http2ChunkSize = 8_192
    /// `http2_recv_buffer_size`: what one connection reads and acts on in one pass of its loop.
    public var http2RecvBufferSize = 256 * 1024
    /// Where each `ssl_*` directive that applies was written, by name (for errors found when
    /// OpenSSL reads the settings).
    public var sources: [String: SourceLocation] = [:]

    public init() {}
}

/// nginx's `proxy_ssl_*` directives: TLS towards `proxy_pass https://` upstreams.
public struct ProxySSLSettings: Hashable, Sendable {
    public var verify = false
    /// PEM file of trusted CA certificates; nil: the system's store.
    public var trustedCertificate: String?
    /// `proxy_ssl_server_name`: send SNI.
    public var serverName = false
    /// `proxy_ssl_name`; nil: the host of `proxy_pass`.
    public var name: String?
    public var sessionReuse = true
    public var protocols: [String] = ["TLSv1.2", "TLSv1.3"]
    public var ciphers = "DEFAULT"
    /// `proxy_ssl_certificate` / `proxy_ssl_certificate_key`: Tether's own certificate for
    /// upstreams that ask for one.
    public var certificate: String?
    public var certificateKey: String?
    public var sources: [String: SourceLocation] = [:]

    public init() {}
}
