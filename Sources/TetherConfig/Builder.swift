#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Walks the syntax tree against the directive table and builds the typed `Configuration`.
/// Directive-level errors are collected, so that one run reports every mistake it can find.
public struct Builder {
    struct ServerDraft {
        var location: SourceLocation
        var listens: [Listen] = []
        var names: [ServerName] = []
        var settings = PartialSettings()
        var locations: [LocationDraft] = []
        var returnAction: ReturnAction?
    }

    struct LocationDraft {
        var match: Location.Match
        var path: String
        var settings = PartialSettings()
        var proxy: (raw: String, scheme: String, host: String, port: Int?, uri: String?, at: SourceLocation)?
        var returnAction: ReturnAction?
        var admin: Location.Action?
        /// `health_check` here: for the upstream of this location's `proxy_pass`.
        var healthCheck: (Upstream.HealthCheck, SourceLocation)?
        var location: SourceLocation
        var regex: Regex?
    }

    enum Cursor {
        case main, events, http
        case server(Int)
        case location(Int, Int)
        case upstream(Int)
    }

    var config: Configuration
    var http = PartialSettings()
    var servers: [ServerDraft] = []
    var upstreams: [Upstream] = []
    var cursor = Cursor.main
    var errors: [ConfigError] = []
    var formatUses: [(String, SourceLocation)] = []
    /// Upstreams that had `server` lines, valid or not (an invalid one is reported itself).
    var upstreamsWithServerLines = Set<Int>()
    /// `resolver` and `resolver_timeout` at http level (an upstream block's own win).
    var httpResolver: Upstream.Resolver?
    var httpResolverTimeoutMs: Int64?
    var upstreamResolverTimeoutMs: [Int: Int64] = [:]
    /// Whether `access_log` / `proxy_set_header` already appeared in the current block (they
    /// accumulate within a block and replace what is inherited).
    var accessLogSeenHere = false
    var proxyHeadersSeenHere = false
    var accessRulesSeenHere = false
    var realIPFromSeenHere = false
    /// The named groups of the regex locations read so far (`$name` refers to them, as in nginx).
    var captureNames = Set<String>()

    /// Turns a host name into a numeric address; the system's getaddrinfo unless a test gives another.
    var resolver: @Sendable (String) -> String?

    init(file: String, resolver: @escaping @Sendable (String) -> String?) {
        config = Configuration(file: file)
        self.resolver = resolver
    }

    static let byName: [String: [DirectiveSpec]] = Dictionary(grouping: directiveTable, by: \.name)

    /// The http-level settings of the innermost http, server or location block.
    var settings: PartialSettings {
        get {
            switch cursor {
            case .http: return http
            case .server(let s): return servers[s].settings
            case .location(let s, let l): return servers[s].locations[l].settings
            default: preconditionFailure("http settings used in \(cursor)")
            }
        }
        set {
            switch cursor {
            case .http: http = newValue
            case .server(let s): servers[s].settings = newValue
            case .location(let s, let l): servers[s].locations[l].settings = newValue
            default: preconditionFailure("http settings used in \(cursor)")
            }
        }
    }

    var context: Context {
        switch cursor {
        case .main: return .main
        case .events: return .events
        case .http: return .http
        case .server: return .server
        case .location: return .location
        case .upstream: return .upstream
        }
    }

    mutating func warn(_ message: String, at location: SourceLocation) {
        config.warnings.append(ConfigWarning(location: location, message: message))
    }

    // MARK: Walking

    mutating func walk(_ directives: [Directive], in context: Context) {
        let saved = (cursor, accessLogSeenHere, proxyHeadersSeenHere, accessRulesSeenHere, realIPFromSeenHere)
        switch context {
        case .events: cursor = .events
        case .http: cursor = .http
        default: break  // server, location and upstream set their own cursor
        }
        accessLogSeenHere = false
        proxyHeadersSeenHere = false
        accessRulesSeenHere = false
        realIPFromSeenHere = false
        defer { (cursor, accessLogSeenHere, proxyHeadersSeenHere, accessRulesSeenHere, realIPFromSeenHere) = saved }

        var seen = Set<String>()
        for d in directives {
            guard let specs = Builder.byName[d.name] else {
                var message = "unknown directive \"\(d.name)\""
                if let hint = suggestion(for: d.name) { message += ", did you mean \"\(hint)\"?" }
                errors.append(ConfigError(message, at: d.location))
                continue
            }
            guard let spec = specs.first(where: { $0.contexts.contains(self.context) }) else {
                errors.append(ConfigError("\"\(d.name)\" directive is not allowed here", at: d.location))
                continue
            }
            if spec.block && d.block == nil {
                errors.append(ConfigError("directive \"\(d.name)\" has no opening \"{\"", at: d.location))
                continue
            }
            if !spec.block && d.block != nil {
                errors.append(ConfigError("directive \"\(d.name)\" is not terminated by \";\"", at: d.location))
                continue
            }
            guard spec.arity.contains(d.args.count) else {
                errors.append(ConfigError("invalid number of arguments in \"\(d.name)\" directive", at: d.location))
                continue
            }
            if !spec.repeats {
                if seen.contains(d.name) {
                    errors.append(ConfigError("\"\(d.name)\" directive is duplicate", at: d.location))
                    continue
                }
                seen.insert(d.name)
            }
            do {
                try spec.apply(&self, d)
            } catch {
                errors.append(ConfigError(error.message, at: d.location))
            }
        }
    }

    /// The closest known directive name, for "did you mean".
    func suggestion(for name: String) -> String? {
        var best: (String, Int)?
        for candidate in Builder.byName.keys {
            let dist = Builder.editDistance(name, candidate)
            if dist <= max(1, min(3, candidate.count / 4)), best == nil || dist < best!.1 || (dist == best!.1 && candidate < best!.0) {
                best = (candidate, dist)
            }
        }
        return best?.0
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a.utf8), b = Array(b.utf8)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var prev = Array(0...b.count)
        var cur = [Int](repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            cur[0] = i
            for j in 1...b.count {
                cur[j] = Swift.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            swap(&prev, &cur)
        }
        return prev[b.count]
    }

    // MARK: Blocks

    mutating func serverBlock(_ d: Directive) {
        servers.append(ServerDraft(location: d.location))
        let saved = cursor
        cursor = .server(servers.count - 1)
        walk(d.block!, in: .server)
        cursor = saved
    }

    mutating func locationBlock(_ d: Directive) throws(ConfigErrorReason) {
        guard case .server(let s) = cursor else { preconditionFailure("location outside server: \(cursor)") }
        var match = Location.Match.prefix
        var path = d.args[0].text
        var regex: Regex?
        if d.args.count == 2 {
            switch d.args[0].text {
            case "=": match = .exact
            case "^~": match = .prefixStop
            case "~", "~*":
                match = .regex
                regex = try Regex(d.args[1].text, caseInsensitive: d.args[0].text == "~*")
                captureNames.formUnion(regex!.names.keys)
            default: throw ConfigErrorReason("invalid location modifier \"\(d.args[0].text)\"")
            }
            path = d.args[1].text
        } else if path.hasPrefix("="), path.count > 1 {
            match = .exact
            path.removeFirst()
        } else if path == "~" || path == "~*" || path == "=" {
            throw ConfigErrorReason("invalid number of arguments in \"location\" directive")
        }
        if path.hasPrefix("@") {
            throw ConfigErrorReason("named locations (\"\(path)\") are not supported")
        }
        // `^~ /a` and `/a` are the same prefix, as in nginx.
        let kind = { (m: Location.Match) in m == .prefixStop ? .prefix : m }
        if servers[s].locations.contains(where: { $0.path == path && kind($0.match) == kind(match) && $0.regex == regex }) {
            throw ConfigErrorReason("duplicate location \"\(path)\"")
        }
        servers[s].locations.append(LocationDraft(match: match, path: path, location: d.location, regex: regex))
        let saved = cursor
        cursor = .location(s, servers[s].locations.count - 1)
        walk(d.block!, in: .location)
        cursor = saved
    }

    mutating func upstreamBlock(_ d: Directive) throws(ConfigErrorReason) {
        let name = d.args[0].text
        if upstreams.contains(where: { $0.name == name }) {
            throw ConfigErrorReason("duplicate upstream \"\(name)\"")
        }
        upstreams.append(Upstream(name: name, location: d.location))
        let saved = cursor
        cursor = .upstream(upstreams.count - 1)
        walk(d.block!, in: .upstream)
        cursor = saved
    }

    // MARK: Directives with structure

    mutating func upstreamServer(_ d: Directive) throws(ConfigErrorReason) {
        guard case .upstream(let u) = cursor else { preconditionFailure("server outside upstream: \(cursor)") }
        upstreamsWithServerLines.insert(u)
        let (host, port) = try Builder.hostPort(d.args[0].text, defaultPort: 80, what: "upstream")
        guard port > 0 else { throw ConfigErrorReason("invalid port in upstream \"\(d.args[0].text)\"") }
        var server = UpstreamServer(host: host, address: host, port: port, location: d.location)
        for a in d.args.dropFirst() {
            let (key, value) = Builder.split(a.text)
            let arg = Argument(text: value ?? "", quoted: false, location: a.location)
            switch (key, value) {
            case ("weight", .some): server.weight = try Value.count(arg, d, min: 1, max: 1000)
            case ("max_fails", .some): server.maxFails = try Value.count(arg, d, min: 0, max: 1000)
            case ("fail_timeout", .some): server.failTimeoutMs = try Value.time(arg, d)
            case ("max_conns", .some): server.maxConns = try Value.count(arg, d, min: 0, max: 1 << 20)
            case ("backup", nil): server.backup = true
            case ("down", nil): server.down = true
            case ("resolve", nil): server.resolve = true
            case ("proxy_protocol", nil): server.proxyProtocol = true
            case ("tcp_keepalive", .some(let v)): server.tcpKeepalive = try Value.tcpKeepalive(v, what: "\"tcp_keepalive=\" value")
            case ("tcp_user_timeout", .some(let v)): server.tcpUserTimeout = try Value.userTimeout(v, what: "\"tcp_user_timeout=\" value")
            default: throw ConfigErrorReason("invalid parameter \"\(a.text)\"")
            }
        }
        upstreams[u].servers.append(server)
    }

    mutating func listen(_ d: Directive) throws(ConfigErrorReason) {
        guard case .server(let s) = cursor else { preconditionFailure("listen outside server: \(cursor)") }
        let text = d.args[0].text
        var host = "0.0.0.0"
        var port: Int
        if let p = Int(text), !text.isEmpty, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
            port = p
        } else {
            (host, port) = try Builder.hostPort(text, defaultPort: 80, what: "listen")
            if host == "*" { host = "0.0.0.0" }
        }
        guard (0...65535).contains(port) else { throw ConfigErrorReason("invalid port in \"\(text)\" of the \"listen\" directive") }
        var l = Listen(host: host, address: host, port: port, location: d.location)
        for a in d.args.dropFirst() {
            let (key, value) = Builder.split(a.text)
            switch (key, value) {
            case ("default_server", nil), ("default", nil): l.defaultServer = true
            // Accepted for nginx configurations: every listener is SO_REUSEPORT, one socket per loop.
            case ("reuseport", nil): break
            case ("backlog", .some(let v)):
                guard let n = Int(v), n >= 1, n <= 65535 else { throw ConfigErrorReason("invalid backlog \"\(v)\"") }
                l.backlog = n
            case ("ssl", nil): l.ssl = true
            case ("proxy_protocol", nil): l.proxyProtocol = true
            case ("http2", nil): l.http2 = true
            case ("so_keepalive", .some(let v)): l.soKeepalive = try Value.tcpKeepalive(v, what: "so_keepalive value")
            case ("tcp_user_timeout", .some(let v)): l.tcpUserTimeout = try Value.userTimeout(v, what: "tcp_user_timeout value")
            default: throw ConfigErrorReason("invalid parameter \"\(a.text)\"")
            }
        }
        servers[s].listens.append(l)
    }

    mutating func returnDirective(_ d: Directive) throws(ConfigErrorReason) {
        var action: ReturnAction
        if let code = Int(d.args[0].text), d.args[0].text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
            guard (100...599).contains(code) || code == 444 else { throw ConfigErrorReason("invalid return code \"\(d.args[0].text)\"") }
            action = ReturnAction(code: code, text: d.args.count == 2 ? try Value.template(d.args[1], d, captures: captureNames) : nil)
        } else if d.args.count == 1, d.args[0].text.hasPrefix("http://") || d.args[0].text.hasPrefix("https://") || d.args[0].text.hasPrefix("$scheme") {
            action = ReturnAction(code: 302, text: try Value.template(d.args[0], d, captures: captureNames))
        } else {
            throw ConfigErrorReason("invalid return code \"\(d.args[0].text)\"")
        }
        switch cursor {
        case .server(let s): servers[s].returnAction = action
        case .location(let s, let l): servers[s].locations[l].returnAction = action
        default: preconditionFailure("return in \(cursor)")
        }
    }

    mutating func setAdmin(_ action: Location.Action) {
        guard case .location(let s, let l) = cursor else { preconditionFailure("admin directive in \(cursor)") }
        servers[s].locations[l].admin = action
    }

    /// `allow` / `deny` accumulate in order within a block and replace what is inherited.
    mutating func addAccessRule(_ d: Directive) throws(ConfigErrorReason) {
        let rule = try Value.accessRule(d)
        if !accessRulesSeenHere {
            settings.accessRules = []
            accessRulesSeenHere = true
        }
        settings.accessRules!.append(rule)
    }

    /// The bytes of a numeric IPv4 (4) or IPv6 (16) address.
    public static func addressBytes(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }

    mutating func proxyPass(_ d: Directive) throws(ConfigErrorReason) {
        guard case .location(let s, let l) = cursor else { preconditionFailure("proxy_pass in \(cursor)") }
        let raw = d.args[0].text
        let scheme: String
        let rest: Substring
        if raw.lowercased().hasPrefix("http://") {
            scheme = "http"; rest = raw.dropFirst(7)
        } else if raw.lowercased().hasPrefix("https://") {
            scheme = "https"; rest = raw.dropFirst(8)
        } else {
            throw ConfigErrorReason("invalid URL prefix in \"\(raw)\"")
        }
        let authority = rest.prefix { $0 != "/" }
        if authority.contains("$") { throw ConfigErrorReason("variables in the host of \"proxy_pass\" are not supported") }
        let uri = authority.count < rest.count ? String(rest.dropFirst(authority.count)) : nil
        guard !authority.isEmpty else { throw ConfigErrorReason("no host in \"\(raw)\" of the \"proxy_pass\" directive") }
        var host = String(authority)
        var port: Int?
        if let colon = authority.lastIndex(of: ":"), !authority.hasSuffix("]") {
            guard let p = Int(authority[authority.index(after: colon)...]), (1...65535).contains(p) else {
                throw ConfigErrorReason("invalid port in \"\(raw)\" of the \"proxy_pass\" directive")
            }
            host = String(authority[..<colon])
            port = p
        }
        servers[s].locations[l].proxy = (raw, scheme, host, port, uri, d.location)
    }

    // MARK: Values with structure

    /// A file named in the configuration: relative paths are taken from the main file's folder
    /// (nginx's configuration prefix), so the server can be started from anywhere.
    func path(_ p: String) -> String {
        if p.hasPrefix("/") { return p }
        guard let slash = config.file.lastIndex(of: "/") else { return p }
        return String(config.file[..<slash]) + "/" + p
    }

    /// `proxy_temp_path` / `client_body_temp_path DIR [LEVELS]`: a directory Tether can create files
    /// in, checked now so that `tether -t` finds a wrong one. nginx's levels name subdirectories
    /// for its named temp files; Tether's have no names (`O_TMPFILE`), so they are accepted and
    /// not used.
    func tempDirectory(_ d: Directive) throws(ConfigErrorReason) -> String {
        let dir = path(d.args[0].text)
        for level in d.args.dropFirst() where !["1", "2"].contains(level.text) {
            throw ConfigErrorReason("invalid value \"\(level.text)\" in \"\(d.name)\" directive, a level must be 1 or 2")
        }
        var st = stat()
        guard stat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, access(dir, W_OK | X_OK) == 0 else {
            throw ConfigErrorReason("\"\(d.name)\" directory \"\(dir)\" is not a directory Tether can write to")
        }
        return dir
    }

    /// `resolver ADDRESS[:PORT]... [valid=T] [ipv6=on|off] [status_zone=NAME]`: numeric addresses
    /// (port 53 by default), as nginx's, which also takes names (Tether asks for numbers: a
    /// resolver found through another resolver would be one more thing to go wrong).
    func resolverDirective(_ d: Directive) throws(ConfigErrorReason) -> Upstream.Resolver {
        var r = Upstream.Resolver(servers: [], location: d.location)
        for a in d.args {
            let (key, value) = Builder.split(a.text)
            switch (key, value) {
            case ("valid", .some(let v)):
                r.validMs = max(1, try Value.time(Argument(text: v, quoted: false, location: a.location), d))
            case ("ipv6", .some(let v)):
                r.ipv6 = try Value.flag(Argument(text: v, quoted: false, location: a.location), d)
            case ("ipv4", .some(let v)):
                guard try Value.flag(Argument(text: v, quoted: false, location: a.location), d) else {
                    throw ConfigErrorReason("\"ipv4=off\" is not supported in \"resolver\" directive")
                }
            case ("status_zone", .some):
                break
            case (_, nil):
                let (host, port) = try Builder.hostPort(a.text, defaultPort: 53, what: "resolver")
                guard Builder.isNumeric(host), (1...65535).contains(port) else {
                    throw ConfigErrorReason("invalid address \"\(a.text)\" in \"resolver\" directive, it must be a numeric IPv4 or IPv6 address with an optional port")
                }
                r.servers.append(.init(host: host, port: port))
            default:
                throw ConfigErrorReason("invalid parameter \"\(a.text)\"")
            }
        }
        guard !r.servers.isEmpty else { throw ConfigErrorReason("no address in \"resolver\" directive") }
        return r
    }

    static func split(_ text: String) -> (String, String?) {
        guard let eq = text.firstIndex(of: "=") else { return (text, nil) }
        return (String(text[..<eq]), String(text[text.index(after: eq)...]))
    }

    static func hostPort(_ text: String, defaultPort: Int, what: String) throws(ConfigErrorReason) -> (String, Int) {
        var host = text
        var portText: Substring?
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw ConfigErrorReason("invalid IPv6 address in \"\(text)\"") }
            host = String(text[text.index(after: text.startIndex)..<close])
            let after = text[text.index(after: close)...]
            if after.hasPrefix(":") { portText = after.dropFirst() } else if !after.isEmpty { throw ConfigErrorReason("invalid address \"\(text)\"") }
        } else if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon])
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty else { throw ConfigErrorReason("no host in \"\(text)\"") }
        var port = defaultPort
        if let portText {
            guard let p = Int(portText), !portText.isEmpty, portText.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), p <= 65535 else {
                throw ConfigErrorReason(what == "listen" ? "invalid port in \"\(text)\" of the \"listen\" directive" : "invalid port in upstream \"\(text)\"")
            }
            port = p
        }
        return (host, port)
    }

    /// The numeric address of `host`: itself when it is one, otherwise the first that getaddrinfo gives.
    /// The system resolver: getaddrinfo, preferring IPv4.
    @Sendable public static func resolve(_ host: String) -> String? {
        if isNumeric(host) { return host }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Glibc)
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #else
        hints.ai_socktype = SOCK_STREAM
        #endif
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &result) == 0, let first = result else { return nil }
        defer { freeaddrinfo(result) }
        // Prefer IPv4 where both exist: "localhost" reaching a backend bound to 127.0.0.1 only.
        var pick = first
        var p: UnsafeMutablePointer<addrinfo>? = first
        while let cur = p {
            if cur.pointee.ai_family == AF_INET { pick = cur; break }
            p = cur.pointee.ai_next
        }
        var buf = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        guard getnameinfo(pick.pointee.ai_addr, pick.pointee.ai_addrlen, &buf, socklen_t(buf.count), nil, 0, NI_NUMERICHOST) == 0 else { return nil }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func isNumeric(_ host: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }

    // MARK: Finishing

    /// Resolves references between blocks and addresses, checks what needs the whole file,
    /// and produces the configuration, or every error found.
    mutating func finish() -> Result<Configuration, ConfigErrors> {
        // Upstream blocks.
        for i in upstreams.indices {
            if upstreams[i].servers.isEmpty && !upstreamsWithServerLines.contains(i) {
                errors.append(ConfigError("no servers are inside upstream", at: upstreams[i].location))
            }
            if upstreams[i].resolver == nil { upstreams[i].resolver = httpResolver }
            if upstreams[i].resolves, upstreams[i].healthCheck != nil {
                errors.append(ConfigError("\"health_check\" cannot be used in upstream \"\(upstreams[i].name)\", whose servers are resolved at run time (\"resolve\")", at: upstreams[i].location))
            }
            if let t = upstreamResolverTimeoutMs[i] ?? httpResolverTimeoutMs { upstreams[i].resolver?.timeoutMs = t }
            for j in upstreams[i].servers.indices {
                let s = upstreams[i].servers[j]
                if s.resolve {
                    // Resolved at run time (`ResolvedSets`), never here.
                    if upstreams[i].resolver == nil {
                        errors.append(ConfigError("no resolver defined to resolve \(s.host)", at: s.location))
                    } else if s.maxConns > 0 {
                        errors.append(ConfigError("\"max_conns\" cannot be used with \"resolve\" (each address would need a cap of its own)", at: s.location))
                    }
                    upstreams[i].servers[j].address = Builder.isNumeric(s.host) ? s.host : ""
                    continue
                }
                if let a = resolver(s.host) {
                    upstreams[i].servers[j].address = a
                } else {
                    errors.append(ConfigError("host not found in upstream \"\(s.host):\(s.port)\"", at: s.location))
                }
            }
        }

        // Log formats used by access_log.
        for (name, at) in formatUses where name != "combined" && config.logFormats[name] == nil {
            errors.append(ConfigError("unknown log format \"\(name)\"", at: at))
        }

        // Servers and locations.
        var defaults: [String: SourceLocation] = [:]
        var out: [Server] = []
        for draft in servers {
            var server = Server(location: draft.location)
            server.names = draft.names
            server.returnAction = draft.returnAction
            let serverPartial = draft.settings.over(http)
            server.settings = serverPartial.resolved()
            var listens = draft.listens.isEmpty ? [Listen(host: "0.0.0.0", address: "0.0.0.0", port: 80, location: draft.location)] : draft.listens
            for k in listens.indices {
                if Builder.isNumeric(listens[k].host) { continue }
                if let a = resolver(listens[k].host) {
                    listens[k].address = a
                } else {
                    errors.append(ConfigError("host not found in \"\(listens[k].host):\(listens[k].port)\" of the \"listen\" directive", at: listens[k].location))
                }
            }
            for l in listens where l.defaultServer {
                let key = l.addressText
                if defaults[key] != nil {
                    errors.append(ConfigError("a duplicate default server for \(key)", at: l.location))
                } else {
                    defaults[key] = l.location
                }
            }
            server.listens = listens
            for loc in draft.locations {
                var action = Location.Action.none
                if let admin = loc.admin {
                    action = admin
                } else if let r = loc.returnAction {
                    action = .respond(r)
                } else if let p = loc.proxy {
                    if var pass = proxyTarget(p) {
                        if let uri = pass.uri, uri.contains("$") {
                            // A URI with captures replaces the request's URI whole, as in nginx.
                            switch Template.parse(uri, captures: captureNames) {
                            case .success(let t): pass.uriTemplate = t; pass.uri = nil
                            case .failure(let r): errors.append(ConfigError(r.message, at: p.at))
                            }
                        } else if loc.match == .regex, pass.uri != nil {
                            errors.append(ConfigError("\"proxy_pass\" cannot have URI part in location given by regular expression (use captures: proxy_pass http://backend/$1;)", at: p.at))
                        }
                        action = .proxy(pass)
                    }
                }
                if let (check, at) = loc.healthCheck {
                    if case .proxy(let pass) = action, let u = upstreams.firstIndex(where: { $0.name == pass.upstream }) {
                        if upstreams[u].resolves {
                            errors.append(ConfigError("\"health_check\" cannot be used in upstream \"\(pass.upstream)\", whose servers are resolved at run time (\"resolve\")", at: at))
                        } else if let other = upstreams[u].healthCheck, other != check {
                            errors.append(ConfigError("upstream \"\(pass.upstream)\" has another \"health_check\" already", at: at))
                        } else {
                            upstreams[u].healthCheck = check
                        }
                    } else if loc.proxy == nil {
                        errors.append(ConfigError("\"health_check\" needs \"proxy_pass\" in its location", at: at))
                    }
                }
                server.locations.append(Location(match: loc.match, path: loc.path, settings: loc.settings.over(serverPartial).resolved(), action: action,
                                                 location: loc.location, regex: loc.regex))
            }
            out.append(server)
        }
        // As in nginx, `ssl` belongs to the address: every server on an address that one of them
        // marks `ssl` speaks TLS there, and needs a certificate.
        let sslAddresses = Set(out.flatMap { $0.listens.filter(\.ssl).map(\.addressText) })
        // So does `proxy_protocol`: a connection cannot say which server it is for before its header.
        let proxyProtocolAddresses = Set(out.flatMap { $0.listens.filter(\.proxyProtocol).map(\.addressText) })
        let http2Addresses = Set(out.flatMap { $0.listens.filter(\.http2).map(\.addressText) })
        for i in out.indices {
            for k in out[i].listens.indices where sslAddresses.contains(out[i].listens[k].addressText) { out[i].listens[k].ssl = true }
            for k in out[i].listens.indices where proxyProtocolAddresses.contains(out[i].listens[k].addressText) { out[i].listens[k].proxyProtocol = true }
            guard let l = out[i].listens.first(where: \.ssl) else { continue }
            if out[i].settings.ssl.certificates.isEmpty {
                errors.append(ConfigError("no \"ssl_certificate\" is defined for the \"listen ... ssl\" directive", at: l.location))
            }
            for c in out[i].settings.ssl.certificates where c.key.isEmpty {
                errors.append(ConfigError("no \"ssl_certificate_key\" is defined for certificate \"\(c.certificate)\"", at: c.location))
            }
            // `listen … http2` applies to the address, as `ssl` does.
            if out[i].listens.contains(where: { http2Addresses.contains($0.addressText) }) { out[i].settings.ssl.http2 = true }
            // OCSP responses are fetched through http's `resolver` (a responder named by a name).
            if out[i].settings.ssl.stapling && out[i].settings.ssl.staplingFile == nil, var r = httpResolver {
                if let t = httpResolverTimeoutMs { r.timeoutMs = t }
                out[i].settings.ssl.resolver = r
            }
        }
        config.servers = out
        config.upstreams = upstreams
        if !errors.isEmpty { return .failure(ConfigErrors(errors)) }
        return .success(config)
    }

    /// What a `proxy_pass` points at: a named upstream, or an implicit one for `host:port`.
    mutating func proxyTarget(_ p: (raw: String, scheme: String, host: String, port: Int?, uri: String?, at: SourceLocation)) -> ProxyPass? {
        if p.port == nil, upstreams.contains(where: { $0.name == p.host && !$0.implicit }) {
            return ProxyPass(scheme: p.scheme, host: p.host, upstream: p.host, uri: p.uri, proxyHost: p.host, source: p.raw)
        }
        if let port = p.port, upstreams.contains(where: { $0.name == p.host && !$0.implicit }) {
            errors.append(ConfigError("upstream \"\(p.host)\" may not have port \(port)", at: p.at))
            return nil
        }
        let port = p.port ?? (p.scheme == "https" ? 443 : 80)
        let isName = !p.host.contains(".") && !p.host.contains(":") && p.host != "localhost"
        if p.port == nil && isName {
            errors.append(ConfigError("unknown upstream \"\(p.host)\" in \"proxy_pass\" directive (no \"upstream \(p.host)\" block)", at: p.at))
            return nil
        }
        let host = p.host.hasPrefix("[") ? String(p.host.dropFirst().dropLast()) : p.host
        guard let address = resolver(host) else {
            errors.append(ConfigError("host not found in upstream \"\(p.host)\"", at: p.at))
            return nil
        }
        let name = p.port == nil ? p.host : "\(p.host):\(port)"
        if !upstreams.contains(where: { $0.name == name }) {
            var u = Upstream(name: name, location: p.at)
            u.implicit = true
            u.servers = [UpstreamServer(host: host, address: address, port: port, location: p.at)]
            upstreams.append(u)
        }
        return ProxyPass(scheme: p.scheme, host: host, upstream: name, uri: p.uri, proxyHost: name, source: p.raw)
    }
}

extension Configuration {
    /// Reads, checks and builds the configuration in `path` (with its includes).
    public static func load(path: String, resolver: @escaping @Sendable (String) -> String? = Builder.resolve) -> Result<Configuration, ConfigErrors> {
        do {
            let tree = try Loader().load(path: path)
            return build(tree, file: path, resolver: resolver)
        } catch {
            return .failure(ConfigErrors([error]))
        }
    }

    /// Builds a configuration from text, as if read from `file` (includes are relative to it).
    public static func parse(_ text: String, file: String = "tether.conf", resolver: @escaping @Sendable (String) -> String? = Builder.resolve) -> Result<Configuration, ConfigErrors> {
        do {
            let tree = try Loader().load(text: text, file: file)
            return build(tree, file: file, resolver: resolver)
        } catch {
            return .failure(ConfigErrors([error]))
        }
    }

    static func build(_ tree: [Directive], file: String, resolver: @escaping @Sendable (String) -> String?) -> Result<Configuration, ConfigErrors> {
        var b = Builder(file: file, resolver: resolver)
        b.walk(tree, in: .main)
        return b.finish()
    }
}
