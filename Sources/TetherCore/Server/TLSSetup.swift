import TetherConfig
import TetherTLS

/// The OpenSSL contexts a configuration needs, made (and its files read) at start-up, at every
/// reload and by `tether -t`, so that a bad certificate, key, cipher list or curve is a
/// `FILE:LINE` error before anything listens.
struct TLSSetup: Sendable {
    /// The TLS context of each `server` block that listens with `ssl`, by server index. Servers
    /// with the same `ssl_*` settings (inherited from `http`, say) share one context.
    var servers: [Int: TLSContext] = [:]
    /// Upstream TLS contexts by pool key (upstream name and everything that sets a TLS connection
    /// apart), and each location's key, by server and location index.
    var upstreams: [String: TLSContext] = [:]
    var locationKeys: [Int: [Int: String]] = [:]

    init(_ configuration: Configuration) throws(ConfigErrors) {
        var errors: [ConfigError] = []
        var byServerSettings: [SSLSettings: TLSContext] = [:]
        for (i, server) in configuration.servers.enumerated() where server.listens.contains(where: \.ssl) {
            let ssl = server.settings.ssl
            if let shared = byServerSettings[ssl] {
                servers[i] = shared
                continue
            }
            do {
                let ctx = try TLSContext.server(TLSSetup.serverSettings(ssl), handshakeTimeoutMs: ssl.handshakeTimeoutMs)
                byServerSettings[ssl] = ctx
                servers[i] = ctx
            } catch {
                errors.append(TLSSetup.locate(error, certificates: ssl.certificates, sources: ssl.sources, fallback: server.location))
            }
        }
        for (i, server) in configuration.servers.enumerated() {
            for (j, location) in server.locations.enumerated() {
                guard case .proxy(let pass) = location.action, pass.isTLS else { continue }
                let p = location.settings.proxySSL
                let settings = TLSSetup.clientSettings(p, host: pass.host)
                let key = pass.upstream + "|" + settings.poolKey
                locationKeys[i, default: [:]][j] = key
                if upstreams[key] != nil { continue }
                do {
                    upstreams[key] = try TLSContext.client(settings)
                } catch {
                    errors.append(TLSSetup.locate(error, certificates: [], sources: p.sources, fallback: location.location))
                }
            }
        }
        if !errors.isEmpty { throw ConfigErrors(errors) }
    }

    /// The listener's SNI table: the default server's context, and each named server's.
    func names(hosts: VirtualHosts, servers compiled: [CompiledServer]) -> TLSServerNames? {
        guard let def = servers[compiled[hosts.defaultIndex].index] else { return nil }
        let byPosition = compiled.map { servers[$0.index] }
        return TLSServerNames(defaultContext: def) { name in byPosition[hosts.server(forHost: name)] }
    }

    static func serverSettings(_ s: SSLSettings) -> TLSServerSettings {
        var t = TLSServerSettings(certificates: s.certificates.map { ($0.certificate, $0.key) })
        t.protocols = Set(s.protocols.compactMap(TLSVersion.init(rawValue:)))
        if let c = s.ciphers { t.ciphers = c }
        t.preferServerCiphers = s.preferServerCiphers
        t.ecdhCurve = s.ecdhCurve
        switch s.sessionCache {
        case .off, .none: t.sessionCacheSize = 0
        case .sessions(let n): t.sessionCacheSize = n
        }
        t.sessionTimeoutSeconds = Int(max(1, s.sessionTimeoutMs / 1000))
        t.sessionTickets = s.sessionTickets
        t.verifyClient = s.verifyClient != .off
        t.clientCertificate = s.clientCertificate
        t.trustedCertificate = s.trustedCertificate
        t.verifyDepth = s.verifyDepth
        t.crl = s.crl
        t.stapling = s.stapling
        t.staplingFile = s.staplingFile
        t.staplingVerify = s.staplingVerify
        t.staplingResponder = s.staplingResponder
        t.http2 = s.http2
        return t
    }

    static func clientSettings(_ p: ProxySSLSettings, host: String) -> TLSClientSettings {
        var c = TLSClientSettings(name: p.name ?? host)
        c.verify = p.verify
        c.trustedCertificate = p.trustedCertificate
        c.sendServerName = p.serverName
        c.sessionReuse = p.sessionReuse
        c.protocols = Set(p.protocols.compactMap(TLSVersion.init(rawValue:)))
        c.ciphers = p.ciphers
        c.certificate = p.certificate
        c.certificateKey = p.certificateKey
        return c
    }

    /// Puts an OpenSSL refusal at the directive it is about.
    static func locate(_ error: Error, certificates: [SSLSettings.Certificate], sources: [String: SourceLocation], fallback: SourceLocation) -> ConfigError {
        guard let e = error as? TLSConfigurationError else { return ConfigError("\(error)", at: fallback) }
        if let i = e.certificate, i < certificates.count {
            let c = certificates[i]
            return ConfigError(e.message, at: e.aboutKey ? c.keyLocation ?? c.location : c.location)
        }
        if let d = e.directive, let at = sources[d] { return ConfigError(e.message, at: at) }
        return ConfigError(e.message, at: fallback)
    }
}
