/// The blocks a directive may stand in.
public struct Context: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let main = Context(rawValue: 1 << 0)
    public static let events = Context(rawValue: 1 << 1)
    public static let http = Context(rawValue: 1 << 2)
    public static let server = Context(rawValue: 1 << 3)
    public static let location = Context(rawValue: 1 << 4)
    public static let upstream = Context(rawValue: 1 << 5)

    /// The http-level settings that server and location inherit.
    public static let httpAll: Context = [.http, .server, .location]
}

/// One row of the directive table: everything the builder needs to check and apply a directive.
struct DirectiveSpec: Sendable {
    typealias Apply = @Sendable (inout Builder, Directive) throws(ConfigErrorReason) -> Void

    let name: String
    let contexts: Context
    /// How many arguments it takes (after the name).
    let arity: ClosedRange<Int>
    /// Whether it opens a `{ }` block.
    let block: Bool
    /// Whether it may appear more than once in the same block.
    let repeats: Bool
    let apply: Apply

    init(_ name: String, _ contexts: Context, args arity: ClosedRange<Int>, block: Bool = false, repeats: Bool = false, apply: @escaping Apply) {
        self.name = name
        self.contexts = contexts
        self.arity = arity
        self.block = block
        self.repeats = repeats
        self.apply = apply
    }
}

let many = Int.max

/// Settings as written at one level; nil where that level says nothing, so the parent's value applies.
struct PartialSettings {
    var keepaliveTimeoutMs: Int64?
    var keepaliveHeaderTimeoutMs: Int64??
    var keepaliveHeader: Bool?
    var keepaliveRequests: Int?
    var keepaliveTimeMs: Int64?
    var clientHeaderTimeoutMs: Int64?
    var clientBodyTimeoutMs: Int64?
    var sendTimeoutMs: Int64?
    var clientMaxBodySize: Int64?
    var largeClientHeaderBuffers: (count: Int, size: Int)?
    var accessLog: [AccessLog]?
    var serverTokens: Bool?
    var mergeSlashes: Bool?
    var proxyAllowUpgrade: [String]?
    var proxyConnectTimeoutMs: Int64?
    var proxyReadTimeoutMs: Int64?
    var proxySendTimeoutMs: Int64?
    var proxySetHeaders: [HeaderSetting]?
    var proxyHTTPVersion: String?
    var proxyNextUpstream: Set<NextUpstreamCondition>?
    var proxyNextUpstreamTries: Int?
    var proxySocketKeepalive: Bool?
    var proxyRequestBuffering: Bool?
    var proxyBuffering: Bool?
    var clientBodyBufferSize: Int?
    var proxyBuffers: (count: Int, size: Int)?
    var proxyBufferSize: Int?
    var proxyMaxTempFileSize: Int64?
    var proxyTempPath: String?
    var clientBodyTempPath: String?
    var accessRules: [AccessRule]?
    var realIPFrom: [AccessRule]?
    var realIPHeader: String?
    var realIPRecursive: Bool?
    /// `ssl_certificate` / `ssl_certificate_key` as written at this level, paired in order.
    var sslCertificates: [(String, SourceLocation)]?
    var sslCertificateKeys: [(String, SourceLocation)]?
    /// The other `ssl_*` and `proxy_ssl_*` values written at this level, applied in order of
    /// the levels (http, server, location) onto the defaults.
    var ssl: [@Sendable (inout SSLSettings) -> Void]?
    var proxySSL: [@Sendable (inout ProxySSLSettings) -> Void]?

    /// This level's values, with the parent's where this level is silent (nginx's merge rule:
    /// a list directive such as `proxy_set_header` replaces the inherited list as a whole).
    func over(_ p: PartialSettings) -> PartialSettings {
        var r = PartialSettings()
        r.keepaliveTimeoutMs = keepaliveTimeoutMs ?? p.keepaliveTimeoutMs
        r.keepaliveHeaderTimeoutMs = keepaliveHeaderTimeoutMs ?? p.keepaliveHeaderTimeoutMs
        r.keepaliveHeader = keepaliveHeader ?? p.keepaliveHeader
        r.keepaliveRequests = keepaliveRequests ?? p.keepaliveRequests
        r.keepaliveTimeMs = keepaliveTimeMs ?? p.keepaliveTimeMs
        r.clientHeaderTimeoutMs = clientHeaderTimeoutMs ?? p.clientHeaderTimeoutMs
        r.clientBodyTimeoutMs = clientBodyTimeoutMs ?? p.clientBodyTimeoutMs
        r.sendTimeoutMs = sendTimeoutMs ?? p.sendTimeoutMs
        r.clientMaxBodySize = clientMaxBodySize ?? p.clientMaxBodySize
        r.largeClientHeaderBuffers = largeClientHeaderBuffers ?? p.largeClientHeaderBuffers
        r.accessLog = accessLog ?? p.accessLog
        r.serverTokens = serverTokens ?? p.serverTokens
        r.mergeSlashes = mergeSlashes ?? p.mergeSlashes
        r.proxyAllowUpgrade = proxyAllowUpgrade ?? p.proxyAllowUpgrade
        r.proxyConnectTimeoutMs = proxyConnectTimeoutMs ?? p.proxyConnectTimeoutMs
        r.proxyReadTimeoutMs = proxyReadTimeoutMs ?? p.proxyReadTimeoutMs
        r.proxySendTimeoutMs = proxySendTimeoutMs ?? p.proxySendTimeoutMs
        r.proxySetHeaders = proxySetHeaders ?? p.proxySetHeaders
        r.proxyHTTPVersion = proxyHTTPVersion ?? p.proxyHTTPVersion
        r.proxyNextUpstream = proxyNextUpstream ?? p.proxyNextUpstream
        r.proxyNextUpstreamTries = proxyNextUpstreamTries ?? p.proxyNextUpstreamTries
        r.proxySocketKeepalive = proxySocketKeepalive ?? p.proxySocketKeepalive
        r.proxyRequestBuffering = proxyRequestBuffering ?? p.proxyRequestBuffering
        r.proxyBuffering = proxyBuffering ?? p.proxyBuffering
        r.clientBodyBufferSize = clientBodyBufferSize ?? p.clientBodyBufferSize
        r.proxyBuffers = proxyBuffers ?? p.proxyBuffers
        r.proxyBufferSize = proxyBufferSize ?? p.proxyBufferSize
        r.proxyMaxTempFileSize = proxyMaxTempFileSize ?? p.proxyMaxTempFileSize
        r.proxyTempPath = proxyTempPath ?? p.proxyTempPath
        r.clientBodyTempPath = clientBodyTempPath ?? p.clientBodyTempPath
        r.accessRules = accessRules ?? p.accessRules
        r.realIPFrom = realIPFrom ?? p.realIPFrom
        r.realIPHeader = realIPHeader ?? p.realIPHeader
        r.realIPRecursive = realIPRecursive ?? p.realIPRecursive
        r.sslCertificates = sslCertificates ?? p.sslCertificates
        r.sslCertificateKeys = sslCertificateKeys ?? p.sslCertificateKeys
        r.ssl = (p.ssl ?? []) + (ssl ?? [])
        r.proxySSL = (p.proxySSL ?? []) + (proxySSL ?? [])
        return r
    }

    /// Concrete settings, with defaults where nothing was said at any level.
    func resolved() -> HTTPSettings {
        var s = HTTPSettings()
        s.keepaliveTimeoutMs = keepaliveTimeoutMs ?? s.keepaliveTimeoutMs
        // `Keep-Alive: timeout=` follows keepalive_timeout unless its second argument says otherwise.
        let header = keepaliveHeaderTimeoutMs ?? s.keepaliveTimeoutMs / 1000 * 1000
        // The header counts whole seconds: below one there is nothing useful to advertise.
        s.keepaliveHeaderTimeoutMs = (keepaliveHeader ?? true) && s.keepaliveTimeoutMs > 0 && (header ?? 0) >= 1000 ? header : nil
        s.keepaliveRequests = keepaliveRequests ?? s.keepaliveRequests
        s.keepaliveTimeMs = keepaliveTimeMs ?? s.keepaliveTimeMs
        s.clientHeaderTimeoutMs = clientHeaderTimeoutMs ?? s.clientHeaderTimeoutMs
        s.clientBodyTimeoutMs = clientBodyTimeoutMs ?? s.clientBodyTimeoutMs
        s.sendTimeoutMs = sendTimeoutMs ?? s.sendTimeoutMs
        s.clientMaxBodySize = clientMaxBodySize ?? s.clientMaxBodySize
        s.largeClientHeaderBuffers = largeClientHeaderBuffers ?? s.largeClientHeaderBuffers
        s.accessLog = accessLog ?? s.accessLog
        s.serverTokens = serverTokens ?? s.serverTokens
        s.mergeSlashes = mergeSlashes ?? s.mergeSlashes
        s.proxyAllowUpgrade = proxyAllowUpgrade ?? s.proxyAllowUpgrade
        s.proxyConnectTimeoutMs = proxyConnectTimeoutMs ?? s.proxyConnectTimeoutMs
        s.proxyReadTimeoutMs = proxyReadTimeoutMs ?? s.proxyReadTimeoutMs
        s.proxySendTimeoutMs = proxySendTimeoutMs ?? s.proxySendTimeoutMs
        s.proxySetHeaders = proxySetHeaders ?? s.proxySetHeaders
        s.proxyHTTPVersion = proxyHTTPVersion ?? s.proxyHTTPVersion
        s.proxyNextUpstream = proxyNextUpstream ?? s.proxyNextUpstream
        s.proxyNextUpstreamTries = proxyNextUpstreamTries ?? s.proxyNextUpstreamTries
        s.proxySocketKeepalive = proxySocketKeepalive ?? s.proxySocketKeepalive
        s.proxyRequestBuffering = proxyRequestBuffering ?? s.proxyRequestBuffering
        s.proxyBuffering = proxyBuffering ?? s.proxyBuffering
        s.clientBodyBufferSize = clientBodyBufferSize ?? s.clientBodyBufferSize
        s.proxyBuffers = proxyBuffers ?? s.proxyBuffers
        s.proxyBufferSize = proxyBufferSize ?? s.proxyBufferSize
        s.proxyMaxTempFileSize = proxyMaxTempFileSize ?? s.proxyMaxTempFileSize
        s.proxyTempPath = proxyTempPath ?? s.proxyTempPath
        s.clientBodyTempPath = clientBodyTempPath ?? s.clientBodyTempPath
        s.accessRules = accessRules ?? s.accessRules
        s.realIPFrom = realIPFrom ?? s.realIPFrom
        s.realIPHeader = realIPHeader ?? s.realIPHeader
        s.realIPRecursive = realIPRecursive ?? s.realIPRecursive
        for apply in ssl ?? [] { apply(&s.ssl) }
        for apply in proxySSL ?? [] { apply(&s.proxySSL) }
        let keys = sslCertificateKeys ?? []
        s.ssl.certificates = (sslCertificates ?? []).enumerated().map { i, c in
            SSLSettings.Certificate(certificate: c.0, key: i < keys.count ? keys[i].0 : "", location: c.1, keyLocation: i < keys.count ? keys[i].1 : nil)
        }
        return s
    }
}

// MARK: - Value parsers shared by the rows

enum Value {
    static func time(_ a: Argument, _ d: Directive) throws(ConfigErrorReason) -> Int64 {
        switch Units.time(a.text) {
        case .success(let v): return v
        case .failure(.overflow): throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, the time is too large")
        case .failure(.invalid): throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be a time (for example 500ms, 30s, 1h30m)")
        }
    }

    static func size(_ a: Argument, _ d: Directive) throws(ConfigErrorReason) -> Int64 {
        switch Units.size(a.text) {
        case .success(let v): return v
        case .failure(.overflow): throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, the size is too large")
        case .failure(.invalid): throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be a size (for example 512, 8k, 1m)")
        }
    }

    static func size(_ a: Argument, _ d: Directive, max: Int64) throws(ConfigErrorReason) -> Int64 {
        let v = try size(a, d)
        guard v <= max else { throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be at most \(Units.formatSize(max))") }
        return v
    }

    static func count(_ a: Argument, _ d: Directive, min: Int = 0, max: Int = Int(Int32.max)) throws(ConfigErrorReason) -> Int {
        switch Units.integer(a.text) {
        case .success(let v) where v >= min && v <= max: return Int(v)
        case .success, .failure(.overflow):
            throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be a number from \(min) to \(max)")
        case .failure(.invalid):
            throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be a number")
        }
    }

    static func flag(_ a: Argument, _ d: Directive) throws(ConfigErrorReason) -> Bool {
        switch a.text.lowercased() {
        case "on": return true
        case "off": return false
        default: throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be \"on\" or \"off\"")
        }
    }

    /// `on`, `off`, or `[IDLE]:[INTVL]:[CNT]` with nginx's meaning: an empty field keeps the
    /// host's value; IDLE and INTVL are times (seconds when bare), within what the kernel accepts.
    static func tcpKeepalive(_ text: String, what: String) throws(ConfigErrorReason) -> TCPKeepalive {
        switch text {
        case "on": return TCPKeepalive(enabled: true)
        case "off": return .off
        default: break
        }
        let fields = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard fields.count == 3 else {
            throw ConfigErrorReason("invalid \(what) \"\(text)\", it must be \"on\", \"off\" or \"[IDLE]:[INTVL]:[CNT]\"")
        }
        func seconds(_ f: String, _ name: String) throws(ConfigErrorReason) -> Int? {
            if f.isEmpty { return nil }
            guard case .success(let ms) = Units.time(f), ms % 1000 == 0, (1...32767).contains(ms / 1000) else {
                throw ConfigErrorReason("invalid \(name) \"\(f)\" in \(what) \"\(text)\", it must be from 1s to 32767s in whole seconds")
            }
            return Int(ms / 1000)
        }
        let idle = try seconds(fields[0], "idle time")
        let interval = try seconds(fields[1], "probe interval")
        var count: Int?
        if !fields[2].isEmpty {
            guard let n = Int(fields[2]), (1...127).contains(n) else {
                throw ConfigErrorReason("invalid probe count \"\(fields[2])\" in \(what) \"\(text)\", it must be from 1 to 127")
            }
            count = n
        }
        return TCPKeepalive(enabled: true, idle: idle, interval: interval, count: count)
    }

    static func userTimeout(_ text: String, what: String) throws(ConfigErrorReason) -> UserTimeout {
        switch text {
        case "auto": return .auto
        case "off": return .off
        default:
            guard case .success(let ms) = Units.time(text), ms > 0, ms <= Int64(Int32.max) else {
                throw ConfigErrorReason("invalid \(what) \"\(text)\", it must be a time, \"auto\" or \"off\"")
            }
            return .milliseconds(ms)
        }
    }

    /// `all`, an address, or an address with a prefix length (`10.0.0.0/8`, `::1`, `fd00::/8`).
    static func accessRule(_ d: Directive) throws(ConfigErrorReason) -> AccessRule {
        let text = d.args[0].text
        let allow = d.name == "allow"
        if text == "all" { return AccessRule(allow: allow, network: nil, source: text) }
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let bytes = Builder.addressBytes(parts[0]) else {
            throw ConfigErrorReason("invalid parameter \"\(text)\" in \"\(d.name)\" directive")
        }
        var prefix = bytes.count * 8
        if parts.count == 2 {
            guard let p = Int(parts[1]), (0...bytes.count * 8).contains(p) else {
                throw ConfigErrorReason("invalid parameter \"\(text)\" in \"\(d.name)\" directive")
            }
            prefix = p
        }
        return AccessRule(allow: allow, network: (bytes, prefix), source: text)
    }

    static let tlsProtocolNames = ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]

    static func tlsProtocols(_ d: Directive) throws(ConfigErrorReason) -> [String] {
        var list: [String] = []
        for a in d.args {
            guard tlsProtocolNames.contains(a.text) else {
                throw ConfigErrorReason("invalid value \"\(a.text)\" in \"\(d.name)\" directive, it must be TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3")
            }
            if !list.contains(a.text) { list.append(a.text) }
        }
        return list
    }

    /// `off`, `none`, `builtin[:N]` and/or `shared:NAME:SIZE` (about 4,000 sessions a megabyte, as nginx).
    static func sessionCache(_ d: Directive) throws(ConfigErrorReason) -> SSLSettings.SessionCache {
        if d.args.count == 1 && d.args[0].text == "off" { return .off }
        if d.args.count == 1 && d.args[0].text == "none" { return .none }
        var sessions = 0
        for a in d.args {
            let parts = a.text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            switch parts[0] {
            case "builtin" where parts.count <= 2:
                var n = 20480
                if parts.count == 2 {
                    guard let v = Int(parts[1]), v > 0 else { throw ConfigErrorReason("invalid session cache size \"\(parts[1])\" in \"\(a.text)\"") }
                    n = v
                }
                sessions = max(sessions, n)
            case "shared" where parts.count == 3 && !parts[1].isEmpty:
                guard case .success(let bytes) = Units.size(parts[2]), bytes >= 8192 else {
                    throw ConfigErrorReason("invalid session cache size \"\(parts[2])\" in \"\(a.text)\", it must be 8k or more")
                }
                sessions = max(sessions, Int(bytes / 256))
            default:
                throw ConfigErrorReason("invalid session cache \"\(a.text)\" in \"ssl_session_cache\" directive, it must be \"off\", \"none\", \"builtin[:size]\" or \"shared:name:size\"")
            }
        }
        return .sessions(sessions)
    }

    static func template(_ a: Argument, _ d: Directive, captures: Set<String> = []) throws(ConfigErrorReason) -> Template {
        switch Template.parse(a.text, captures: captures) {
        case .success(let t): return t
        case .failure(let r): throw r
        }
    }
}

// MARK: - The table

/// Every directive Tether knows. Adding a directive means adding a row here.
let directiveTable: [DirectiveSpec] = {
    typealias S = DirectiveSpec
    func setting(_ name: String, args: ClosedRange<Int> = 1...1, repeats: Bool = false,
                 _ body: @escaping @Sendable (inout PartialSettings, Directive) throws(ConfigErrorReason) -> Void) -> S {
        S(name, .httpAll, args: args, repeats: repeats) { (b: inout Builder, d: Directive) throws(ConfigErrorReason) in
            try body(&b.settings, d)
        }
    }
    func time(_ name: String, _ kp: WritableKeyPath<PartialSettings, Int64?> & Sendable) -> S {
        setting(name) { (s: inout PartialSettings, d: Directive) throws(ConfigErrorReason) in s[keyPath: kp] = try Value.time(d.args[0], d) }
    }

    /// An `ssl_*` row (http and server): records the value and where it was written.
    func ssl(_ name: String, args: ClosedRange<Int> = 1...1,
             _ parse: @escaping @Sendable (Directive) throws(ConfigErrorReason) -> @Sendable (inout SSLSettings) -> Void) -> S {
        S(name, [.http, .server], args: args) { (b: inout Builder, d: Directive) throws(ConfigErrorReason) in
            let set = try parse(d)
            let at = d.location
            b.settings.ssl = (b.settings.ssl ?? []) + [{ set(&$0); $0.sources[name] = at }]
        }
    }
    func proxySSL(_ name: String, args: ClosedRange<Int> = 1...1,
                  _ parse: @escaping @Sendable (Builder, Directive) throws(ConfigErrorReason) -> @Sendable (inout ProxySSLSettings) -> Void) -> S {
        S(name, .httpAll, args: args) { (b: inout Builder, d: Directive) throws(ConfigErrorReason) in
            let set = try parse(b, d)
            let at = d.location
            b.settings.proxySSL = (b.settings.proxySSL ?? []) + [{ set(&$0); $0.sources[name] = at }]
        }
    }

    return [
        // main
        S("worker_processes", .main, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.config.workerProcesses = d.args[0].text == "auto" ? .auto : .count(try Value.count(d.args[0], d, min: 1, max: 1024))
        },
        S("error_log", [.main, .http], args: 1...2) { b, d throws(ConfigErrorReason) in
            var level = Configuration.LogLevel.error
            if d.args.count == 2 {
                guard let l = Configuration.LogLevel(rawValue: d.args[1].text) else {
                    throw ConfigErrorReason("invalid log level \"\(d.args[1].text)\"")
                }
                level = l
            }
            b.config.errorLog = .init(path: d.args[0].text, level: level)
        },
        S("pid", .main, args: 1...1) { b, d in b.config.pidFile = d.args[0].text },
        S("worker_rlimit_nofile", .main, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.config.workerRlimitNofile = try Value.count(d.args[0], d, min: 1)
        },
        S("events", .main, args: 0...0, block: true) { b, d in b.walk(d.block!, in: .events) },
        S("worker_connections", .events, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.config.workerConnections = try Value.count(d.args[0], d, min: 1, max: 1 << 20)
        },
        S("http", .main, args: 0...0, block: true) { b, d in b.walk(d.block!, in: .http) },

        // http, server, location
        setting("keepalive_timeout", args: 1...2) { s, d throws(ConfigErrorReason) in
            s.keepaliveTimeoutMs = try Value.time(d.args[0], d)
            if d.args.count == 2 { s.keepaliveHeaderTimeoutMs = .some(try Value.time(d.args[1], d) / 1000 * 1000) }
        },
        setting("keepalive_header") { s, d throws(ConfigErrorReason) in s.keepaliveHeader = try Value.flag(d.args[0], d) },
        setting("keepalive_requests") { s, d throws(ConfigErrorReason) in s.keepaliveRequests = try Value.count(d.args[0], d, min: 0) },
        time("keepalive_time", \.keepaliveTimeMs),
        time("client_header_timeout", \.clientHeaderTimeoutMs),
        time("client_body_timeout", \.clientBodyTimeoutMs),
        time("send_timeout", \.sendTimeoutMs),
        setting("client_max_body_size") { s, d throws(ConfigErrorReason) in s.clientMaxBodySize = try Value.size(d.args[0], d) },
        setting("large_client_header_buffers", args: 2...2) { s, d throws(ConfigErrorReason) in
            let n = try Value.count(d.args[0], d, min: 1, max: 1024)
            let size = try Value.size(d.args[1], d)
            guard size >= 64, size <= 1 << 20 else {
                throw ConfigErrorReason("invalid value \"\(d.args[1].text)\" in \"\(d.name)\" directive, it must be from 64 to 1m")
            }
            s.largeClientHeaderBuffers = (n, Int(size))
        },
        S("access_log", .httpAll, args: 1...2, repeats: true) { b, d throws(ConfigErrorReason) in
            let entry: AccessLog
            if d.args[0].text == "off" {
                guard d.args.count == 1 else { throw ConfigErrorReason("invalid parameter \"\(d.args[1].text)\"") }
                entry = .off
            } else {
                let format = d.args.count == 2 ? d.args[1].text : "combined"
                b.formatUses.append((format, d.location))
                entry = .file(path: d.args[0].text, format: format)
            }
            if entry == .off || b.settings.accessLog == [.off] || b.accessLogSeenHere == false {
                b.settings.accessLog = [entry]
            } else {
                b.settings.accessLog!.append(entry)
            }
            b.accessLogSeenHere = true
        },
        S("log_format", .http, args: 2...many, repeats: true) { b, d throws(ConfigErrorReason) in
            let name = d.args[0].text
            if name == "combined" || b.config.logFormats[name] != nil {
                throw ConfigErrorReason("duplicate \"log_format\" name \"\(name)\"")
            }
            let joined = d.args.dropFirst().filter { !$0.text.hasPrefix("escape=") }.map(\.text).joined()
            b.config.logFormats[name] = LogFormat(name: name, template: try Value.template(Argument(text: joined, quoted: true, location: d.location), d, captures: b.captureNames))
        },
        setting("server_tokens") { s, d throws(ConfigErrorReason) in s.serverTokens = try Value.flag(d.args[0], d) },
        S("merge_slashes", [.http, .server], args: 1...1) { b, d throws(ConfigErrorReason) in b.settings.mergeSlashes = try Value.flag(d.args[0], d) },
        setting("proxy_allow_upgrade", args: 1...many) { s, d throws(ConfigErrorReason) in
            var list: [String] = []
            for a in d.args {
                let v = a.text.lowercased()
                if v == "off" {
                    guard d.args.count == 1 else { throw ConfigErrorReason("invalid value \"off\" in \"proxy_allow_upgrade\" directive, \"off\" cannot be combined with others") }
                    break
                }
                guard !v.isEmpty, v.utf8.allSatisfy(HeaderName.isTokenByte) else {
                    throw ConfigErrorReason("invalid protocol \"\(a.text)\" in \"proxy_allow_upgrade\" directive")
                }
                // HTTP/2 over cleartext through an upgrade would reach the backend past every
                // location rule ("h2c smuggling"): never allowed.
                guard v != "h2c" && !v.hasPrefix("h2c/") else {
                    throw ConfigErrorReason("\"h2c\" cannot be allowed in \"proxy_allow_upgrade\" directive: an HTTP/2 upgrade would tunnel requests past the locations' rules")
                }
                list.append(v)
            }
            s.proxyAllowUpgrade = list
        },
        time("proxy_connect_timeout", \.proxyConnectTimeoutMs),
        time("proxy_read_timeout", \.proxyReadTimeoutMs),
        time("proxy_send_timeout", \.proxySendTimeoutMs),
        S("proxy_set_header", .httpAll, args: 2...2, repeats: true) { b, d throws(ConfigErrorReason) in
            let name = d.args[0].text
            guard !name.isEmpty, name.utf8.allSatisfy(HeaderName.isTokenByte) else {
                throw ConfigErrorReason("invalid header name \"\(name)\" in \"proxy_set_header\" directive")
            }
            // `Connection ""` (nginx's idiom for upstream keep-alive) stays: it sends nothing.
            if ["upgrade", "http2-settings"].contains(name.lowercased()) || (name.lowercased() == "connection" && !d.args[1].text.isEmpty) {
                // nginx needs these two lines to pass WebSocket upgrades; Tether forwards
                // Upgrade itself for the protocols proxy_allow_upgrade names, and a templated
                // Upgrade ($http_upgrade) would let "h2c" through.
                b.warn("\"proxy_set_header \(name)\" is ignored: Tether forwards Upgrade and Connection itself, for the protocols \"proxy_allow_upgrade\" allows (websocket by default)", at: d.location)
                return
            }
            let setting = HeaderSetting(name: name, value: try Value.template(d.args[1], d, captures: b.captureNames))
            if !b.proxyHeadersSeenHere {
                // The first proxy_set_header at a level replaces the inherited list; Host
                // keeps its default unless this level sets it too.
                b.settings.proxySetHeaders = HTTPSettings.defaultProxyHeaders
                b.proxyHeadersSeenHere = true
            }
            if let i = b.settings.proxySetHeaders!.firstIndex(where: { $0.name.lowercased() == name.lowercased() }) {
                b.settings.proxySetHeaders![i] = setting
            } else {
                b.settings.proxySetHeaders!.append(setting)
            }
        },
        setting("proxy_http_version") { s, d throws(ConfigErrorReason) in
            guard ["1.0", "1.1"].contains(d.args[0].text) else {
                throw ConfigErrorReason("invalid value \"\(d.args[0].text)\" in \"proxy_http_version\" directive, it must be \"1.0\" or \"1.1\"")
            }
            s.proxyHTTPVersion = d.args[0].text
        },
        setting("proxy_next_upstream", args: 1...many) { s, d throws(ConfigErrorReason) in
            var set = Set<NextUpstreamCondition>()
            for a in d.args {
                if a.text == "off" {
                    guard d.args.count == 1 else { throw ConfigErrorReason("invalid value \"off\" in \"proxy_next_upstream\" directive, \"off\" cannot be combined with others") }
                    break
                }
                guard let c = NextUpstreamCondition(rawValue: a.text) else {
                    throw ConfigErrorReason("invalid value \"\(a.text)\" in \"proxy_next_upstream\" directive, it must be one of: off, " + NextUpstreamCondition.allCases.map(\.rawValue).joined(separator: ", "))
                }
                set.insert(c)
            }
            s.proxyNextUpstream = set
        },
        setting("proxy_next_upstream_tries") { s, d throws(ConfigErrorReason) in s.proxyNextUpstreamTries = try Value.count(d.args[0], d) },
        setting("proxy_buffering") { s, d throws(ConfigErrorReason) in s.proxyBuffering = try Value.flag(d.args[0], d) },
        setting("proxy_request_buffering") { s, d throws(ConfigErrorReason) in s.proxyRequestBuffering = try Value.flag(d.args[0], d) },
        setting("client_body_buffer_size") { s, d throws(ConfigErrorReason) in
            s.clientBodyBufferSize = Int(try Value.size(d.args[0], d, max: 1 << 30))
        },
        setting("proxy_buffers", args: 2...2) { s, d throws(ConfigErrorReason) in
            let n = try Value.count(d.args[0], d, min: 1, max: 1 << 16)
            let size = Int(try Value.size(d.args[1], d, max: 1 << 24))
            guard size >= 1024 else { throw ConfigErrorReason("invalid value \"\(d.args[1].text)\" in \"proxy_buffers\" directive, it must be at least 1k") }
            s.proxyBuffers = (n, size)
        },
        setting("proxy_buffer_size") { s, d throws(ConfigErrorReason) in
            let size = Int(try Value.size(d.args[0], d))
            // A response head is read into one of the loop's buffers.
            guard size >= 1024, size <= 16 * 1024 else {
                throw ConfigErrorReason("invalid value \"\(d.args[0].text)\" in \"proxy_buffer_size\" directive, it must be from 1k to 16k (the size of Tether's buffers)")
            }
            s.proxyBufferSize = size
        },
        setting("proxy_max_temp_file_size") { s, d throws(ConfigErrorReason) in s.proxyMaxTempFileSize = try Value.size(d.args[0], d) },
        S("proxy_temp_path", .httpAll, args: 1...4) { b, d throws(ConfigErrorReason) in
            b.settings.proxyTempPath = try b.tempDirectory(d)
        },
        S("client_body_temp_path", .httpAll, args: 1...4) { b, d throws(ConfigErrorReason) in
            b.settings.clientBodyTempPath = try b.tempDirectory(d)
        },

        S("resolver", [.http, .upstream], args: 1...many) { b, d throws(ConfigErrorReason) in
            let r = try b.resolverDirective(d)
            if case .upstream(let u) = b.cursor { b.upstreams[u].resolver = r } else { b.httpResolver = r }
        },
        S("resolver_timeout", [.http, .upstream], args: 1...1) { b, d throws(ConfigErrorReason) in
            let t = max(1, try Value.time(d.args[0], d))
            if case .upstream(let u) = b.cursor { b.upstreamResolverTimeoutMs[u] = t } else { b.httpResolverTimeoutMs = t }
        },

        // upstream
        S("upstream", .http, args: 1...1, block: true, repeats: true) { b, d throws(ConfigErrorReason) in try b.upstreamBlock(d) },
        S("server", .upstream, args: 1...many, repeats: true) { b, d throws(ConfigErrorReason) in try b.upstreamServer(d) },
        S("least_conn", .upstream, args: 0...0) { b, _ in b.upstreams[b.upstreams.count - 1].balancing = .leastConn },
        S("health_check", [.upstream, .location], args: 0...6) { b, d throws(ConfigErrorReason) in
            var h = Upstream.HealthCheck()
            for a in d.args {
                let (key, value) = Builder.split(a.text)
                guard let value else { throw ConfigErrorReason("invalid parameter \"\(a.text)\"") }
                let arg = Argument(text: value, quoted: false, location: a.location)
                switch key {
                case "interval": h.intervalMs = max(1, try Value.time(arg, d))
                case "fails": h.fails = try Value.count(arg, d, min: 1, max: 1000)
                case "passes": h.passes = try Value.count(arg, d, min: 1, max: 1000)
                case "timeout": h.timeoutMs = max(1, try Value.time(arg, d))
                case "uri":
                    guard value.hasPrefix("/"), value.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                        throw ConfigErrorReason("invalid uri \"\(value)\" in \"health_check\" directive, it must start with \"/\" and have no spaces")
                    }
                    h.uri = value
                case "match":
                    let parts = value.split(separator: "-", omittingEmptySubsequences: false)
                    guard parts.count <= 2, let lo = Int(parts[0]), let hi = parts.count == 2 ? Int(parts[1]) : lo,
                          (100...599).contains(lo), (lo...599).contains(hi) else {
                        throw ConfigErrorReason("invalid match \"\(value)\" in \"health_check\" directive, it must be a status or a range such as 200-399")
                    }
                    h.match = lo...hi
                default: throw ConfigErrorReason("invalid parameter \"\(a.text)\"")
                }
            }
            // In a location (nginx Plus's place for it), it checks the upstream of its proxy_pass.
            if case .location(let si, let li) = b.cursor {
                b.servers[si].locations[li].healthCheck = (h, d.location)
            } else {
                b.upstreams[b.upstreams.count - 1].healthCheck = h
            }
        },
        S("queue", .upstream, args: 1...2) { b, d throws(ConfigErrorReason) in
            var q = Upstream.Queue(size: try Value.count(d.args[0], d, min: 1, max: 1 << 20))
            if d.args.count == 2 {
                let (key, value) = Builder.split(d.args[1].text)
                guard key == "timeout", let value else { throw ConfigErrorReason("invalid parameter \"\(d.args[1].text)\"") }
                q.timeoutMs = try Value.time(Argument(text: value, quoted: false, location: d.args[1].location), d)
            }
            b.upstreams[b.upstreams.count - 1].queue = q
        },
        S("keepalive", .upstream, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.upstreams[b.upstreams.count - 1].keepalive = try Value.count(d.args[0], d, min: 0, max: 1 << 20)
        },
        S("keepalive_timeout", .upstream, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.upstreams[b.upstreams.count - 1].keepaliveTimeoutMs = try Value.time(d.args[0], d)
        },
        S("keepalive_requests", .upstream, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.upstreams[b.upstreams.count - 1].keepaliveRequests = try Value.count(d.args[0], d, min: 1)
        },
        S("keepalive_time", .upstream, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.upstreams[b.upstreams.count - 1].keepaliveTimeMs = try Value.time(d.args[0], d)
        },
        S("tcp_keepalive", .upstream, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.upstreams[b.upstreams.count - 1].tcpKeepalive = try Value.tcpKeepalive(d.args[0].text, what: "\"tcp_keepalive\" value")
        },
        S("tcp_user_timeout", .upstream, args: 1...1) { b, d throws(ConfigErrorReason) in
            b.upstreams[b.upstreams.count - 1].tcpUserTimeout = try Value.userTimeout(d.args[0].text, what: "\"tcp_user_timeout\" value")
        },
        setting("proxy_socket_keepalive") { s, d throws(ConfigErrorReason) in s.proxySocketKeepalive = try Value.flag(d.args[0], d) },

        // TLS termination (http, server)
        S("ssl_certificate", [.http, .server], args: 1...1, repeats: true) { b, d in
            b.settings.sslCertificates = (b.settings.sslCertificates ?? []) + [(b.path(d.args[0].text), d.location)]
        },
        S("ssl_certificate_key", [.http, .server], args: 1...1, repeats: true) { b, d in
            b.settings.sslCertificateKeys = (b.settings.sslCertificateKeys ?? []) + [(b.path(d.args[0].text), d.location)]
        },
        ssl("ssl_protocols", args: 1...many) { d throws(ConfigErrorReason) in
            let list = try Value.tlsProtocols(d)
            return { $0.protocols = list }
        },
        ssl("ssl_ciphers") { d in let v = d.args[0].text; return { $0.ciphers = v } },
        ssl("ssl_prefer_server_ciphers") { d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.preferServerCiphers = v } },
        ssl("ssl_ecdh_curve") { d in let v = d.args[0].text; return { $0.ecdhCurve = v } },
        ssl("ssl_session_cache", args: 1...2) { d throws(ConfigErrorReason) in
            let v = try Value.sessionCache(d)
            return { $0.sessionCache = v }
        },
        ssl("ssl_session_timeout") { d throws(ConfigErrorReason) in let v = try Value.time(d.args[0], d); return { $0.sessionTimeoutMs = v } },
        ssl("ssl_session_tickets") { d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.sessionTickets = v } },
        ssl("ssl_verify_client") { d throws(ConfigErrorReason) in
            guard let v = SSLSettings.VerifyClient(rawValue: d.args[0].text) else {
                throw ConfigErrorReason("invalid value \"\(d.args[0].text)\" in \"ssl_verify_client\" directive, it must be \"on\", \"off\", \"optional\" or \"optional_no_ca\"")
            }
            return { $0.verifyClient = v }
        },
        S("ssl_client_certificate", [.http, .server], args: 1...1) { b, d in
            let v = b.path(d.args[0].text)
            let at = d.location
            b.settings.ssl = (b.settings.ssl ?? []) + [{ $0.clientCertificate = v; $0.sources["ssl_client_certificate"] = at }]
        },
        S("ssl_trusted_certificate", [.http, .server], args: 1...1) { b, d in
            let v = b.path(d.args[0].text)
            let at = d.location
            b.settings.ssl = (b.settings.ssl ?? []) + [{ $0.trustedCertificate = v; $0.sources["ssl_trusted_certificate"] = at }]
        },
        S("ssl_crl", [.http, .server], args: 1...1) { b, d in
            let v = b.path(d.args[0].text)
            let at = d.location
            b.settings.ssl = (b.settings.ssl ?? []) + [{ $0.crl = v; $0.sources["ssl_crl"] = at }]
        },
        ssl("ssl_stapling") { d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.stapling = v } },
        ssl("ssl_stapling_verify") { d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.staplingVerify = v } },
        S("ssl_stapling_file", [.http, .server], args: 1...1) { b, d in
            let v = b.path(d.args[0].text)
            let at = d.location
            b.settings.ssl = (b.settings.ssl ?? []) + [{ $0.staplingFile = v; $0.sources["ssl_stapling_file"] = at }]
        },
        ssl("ssl_stapling_responder") { d throws(ConfigErrorReason) in
            let url = d.args[0].text
            // Plain HTTP only, as nginx: a response is signed, and fetching it over TLS would need one of its own.
            guard url.lowercased().hasPrefix("http://") else { throw ConfigErrorReason("invalid URL prefix in \"\(url)\" of \"ssl_stapling_responder\", only \"http://\" is supported") }
            guard url.count > 7 else { throw ConfigErrorReason("no host in \"\(url)\" of \"ssl_stapling_responder\"") }
            return { $0.staplingResponder = url }
        },
        ssl("http2") { d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.http2 = v } },
        ssl("http2_max_concurrent_streams") { d throws(ConfigErrorReason) in
            let v = try Value.count(d.args[0], d, min: 1, max: 1 << 16)
            return { $0.http2MaxConcurrentStreams = v }
        },
        ssl("http2_chunk_size") { d throws(ConfigErrorReason) in
            let v = try Value.size(d.args[0], d)
            guard v >= 1, v <= 16_384 else { throw ConfigErrorReason("invalid value \"\(d.args[0].text)\" in \"http2_chunk_size\" directive, it must be from 1 to 16k (the largest frame a client must take)") }
            return { $0.http2ChunkSize = Int(v) }
        },
        ssl("http2_recv_buffer_size") { d throws(ConfigErrorReason) in
            let v = try Value.size(d.args[0], d)
            guard v >= 16_384 else { throw ConfigErrorReason("invalid value \"\(d.args[0].text)\" in \"http2_recv_buffer_size\" directive, it must be at least 16k (one pool buffer)") }
            return { $0.http2RecvBufferSize = Int(min(v, 1 << 30)) }
        },
        ssl("ssl_verify_depth") { d throws(ConfigErrorReason) in let v = try Value.count(d.args[0], d, min: 1, max: 100); return { $0.verifyDepth = v } },
        ssl("ssl_handshake_timeout") { d throws(ConfigErrorReason) in let v = try Value.time(d.args[0], d); return { $0.handshakeTimeoutMs = v } },

        // TLS to upstreams (http, server, location)
        proxySSL("proxy_ssl_verify") { _, d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.verify = v } },
        proxySSL("proxy_ssl_trusted_certificate") { b, d in let v = b.path(d.args[0].text); return { $0.trustedCertificate = v } },
        proxySSL("proxy_ssl_server_name") { _, d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.serverName = v } },
        proxySSL("proxy_ssl_name") { _, d in let v = d.args[0].text; return { $0.name = v } },
        proxySSL("proxy_ssl_session_reuse") { _, d throws(ConfigErrorReason) in let v = try Value.flag(d.args[0], d); return { $0.sessionReuse = v } },
        proxySSL("proxy_ssl_protocols", args: 1...many) { _, d throws(ConfigErrorReason) in
            let list = try Value.tlsProtocols(d)
            return { $0.protocols = list }
        },
        proxySSL("proxy_ssl_ciphers") { _, d in let v = d.args[0].text; return { $0.ciphers = v } },
        proxySSL("proxy_ssl_certificate") { b, d in let v = b.path(d.args[0].text); return { $0.certificate = v } },
        proxySSL("proxy_ssl_certificate_key") { b, d in let v = b.path(d.args[0].text); return { $0.certificateKey = v } },

        // server
        S("server", .http, args: 0...0, block: true, repeats: true) { b, d in b.serverBlock(d) },
        S("listen", .server, args: 1...many, repeats: true) { b, d throws(ConfigErrorReason) in try b.listen(d) },
        S("server_name", .server, args: 1...many, repeats: true) { b, d in
            b.servers[b.servers.count - 1].names.append(contentsOf: d.args.map { ServerName($0.text) })
        },
        S("location", .server, args: 1...2, block: true, repeats: true) { b, d throws(ConfigErrorReason) in try b.locationBlock(d) },
        S("return", [.server, .location], args: 1...2) { b, d throws(ConfigErrorReason) in try b.returnDirective(d) },

        // location
        S("proxy_pass", .location, args: 1...1) { b, d throws(ConfigErrorReason) in try b.proxyPass(d) },
        S("stub_status", .location, args: 0...0) { b, _ in b.setAdmin(.stubStatus) },
        S("stats", .location, args: 1...1) { b, d throws(ConfigErrorReason) in
            guard let f = StatsFormat(rawValue: d.args[0].text) else {
                throw ConfigErrorReason("invalid value \"\(d.args[0].text)\" in \"stats\" directive, it must be \"prometheus\" or \"json\"")
            }
            b.setAdmin(.stats(f))
        },
        S("allow", .httpAll, args: 1...1, repeats: true) { b, d throws(ConfigErrorReason) in try b.addAccessRule(d) },
        S("set_real_ip_from", .httpAll, args: 1...1, repeats: true) { b, d throws(ConfigErrorReason) in
            var rule = try Value.accessRule(d)
            rule.allow = true
            if !b.realIPFromSeenHere {
                b.settings.realIPFrom = []
                b.realIPFromSeenHere = true
            }
            b.settings.realIPFrom!.append(rule)
        },
        setting("real_ip_header") { s, d throws(ConfigErrorReason) in
            let v = d.args[0].text
            guard v == "proxy_protocol" || (!v.isEmpty && v.utf8.allSatisfy(HeaderName.isTokenByte)) else {
                throw ConfigErrorReason("invalid header name \"\(v)\" in \"real_ip_header\" directive")
            }
            s.realIPHeader = v.lowercased()
        },
        setting("real_ip_recursive") { s, d throws(ConfigErrorReason) in s.realIPRecursive = try Value.flag(d.args[0], d) },
        S("deny", .httpAll, args: 1...1, repeats: true) { b, d throws(ConfigErrorReason) in try b.addAccessRule(d) },
    ]
}()

/// Header names are RFC 9110 tokens.
enum HeaderName {
    static func isTokenByte(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "!#$%&'*+-.^_`|~".utf8.contains(c)
        }
    }
}
