import TetherConfig
import TetherHTTP
import TetherIO
import TetherPool
import TetherTLS

extension LoopUpstream {
    /// One `upstream` block (explicit or made from a `proxy_pass` host) on one loop: a pool per
    /// server with the block's keep-alive policy, and its balancing with each server's weight,
    /// `max_fails`, `fail_timeout`, `backup` and `down`.
    /// `socketKeepalive`: some location proxying here has `proxy_socket_keepalive on` (used
    /// where neither the server nor the block sets `tcp_keepalive`).
    /// `tls`: the client context of `proxy_pass https://` (each pool then speaks TLS).
    /// `limits`: the upstream's process-wide `max_conns` and `queue` (shared with the other loops).
    /// `reusing`: pools of a group this one replaces, by `address:port`: a server found there
    /// keeps its pool and its warm connections.
    static func make(_ u: Upstream, loop: IOLoop, buffers: BufferPool, log: LoopErrorLog = .all, socketKeepalive: Bool = false,
                     host: HostKeepalive = HostKeepalive(), tls: TLSContext? = nil, limits: UpstreamLimits? = nil,
                     reusing: [String: UpstreamPool] = [:]) throws(SetupError) -> LoopUpstream {
        let policy = PoolPolicy(keepalive: u.keepalive, idleTimeoutMs: u.keepaliveTimeoutMs, maxRequests: u.keepaliveRequests,
                                maxLifetimeMs: u.keepaliveTimeMs)
        var pools: [UpstreamPool] = []
        for s in u.servers {
            if let kept = reusing[s.addressText] {
                pools.append(kept)
                continue
            }
            guard let port = UInt16(exactly: s.port),
                  let pool = UpstreamPool(loop: loop, buffers: buffers, host: s.address, port: port, policy: policy, log: log,
                                          tuning: SocketTuning(keepalive: s.tcpKeepalive ?? u.tcpKeepalive ?? (socketKeepalive ? TCPKeepalive(enabled: true) : nil),
                                                               userTimeout: s.tcpUserTimeout ?? u.tcpUserTimeout, host: host), tls: tls) else {
                throw SetupError("\(u.location): server \(s.host):\(s.port) of upstream \"\(u.name)\": not a numeric address")
            }
            pool.upstreamName = u.name
            pool.sendsProxyProtocol = s.proxyProtocol
            pools.append(pool)
        }
        guard !pools.isEmpty else { throw SetupError("\(u.location): upstream \"\(u.name)\" has no server") }
        let peers = u.servers.map { PeerSpec(weight: $0.weight, maxFails: $0.maxFails, failTimeoutMs: $0.failTimeoutMs, backup: $0.backup, down: $0.down) }
        return LoopUpstream(name: u.name, pools: pools, peers: peers, method: u.balancing == .leastConn ? .leastConn : .roundRobin, log: log,
                            config: u, limits: limits)
    }
}

/// Why a configuration could not be set up on Tether's own loop: what failed, where.
struct SetupError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The configuration's routing for the requests of one listening address: the server by `Host` (nginx's virtual host rules), the
/// location by the normalised path, then `client_max_body_size` (413), `CONNECT` (405),
/// `allow`/`deny` (403), and the location's action: `proxy_pass` through the loop's pools,
/// `return` (444 closes without an answer; a text is expanded with the request's variables),
/// or 404 where nothing handles the request; admin pages (GET and HEAD, others 405) are answered
/// once `AdminPages` has gathered every loop's figures.
final class Router: ClientRequestHandler {
    let hosts: VirtualHosts
    let servers: [CompiledServer]
    /// Each server's first name: `$server_name`, and `$host` for a request without Host.
    let serverNames: [[UInt8]]
    private var upstreams: [String: LoopUpstream]
    /// The last location's upstream: requests to the same location do not hash its name.
    private var lastRoute: CompiledLocation?
    /// Not counted (`upstreams` holds it; `replace` clears it): the request is handed to it
    /// without a retain and a release.
    private var lastUpstream: Unretained<LoopUpstream>?

    /// The upstream group of `key` was remade (its `resolve` names have new addresses): the next
    /// requests go to `group`.
    func replace(_ key: String, with group: LoopUpstream) {
        upstreams[key] = group
        lastRoute = nil
        lastUpstream = nil
    }
    /// The admin pages' gathering (nil: they answer 501).
    private let admin: AdminPages?
    /// Some server has `location ~` (checked per request: a flag, not the array).
    private let hasRegex: Bool

    init(hosts: VirtualHosts, servers: [CompiledServer], upstreams: [String: LoopUpstream], admin: AdminPages? = nil) {
        self.hosts = hosts
        self.servers = servers
        serverNames = servers.map { Array(($0.server.names.first?.description ?? "").utf8) }
        self.upstreams = upstreams
        self.admin = admin
        hasRegex = servers.contains { !$0.regexLocations.isEmpty }
    }

    /// nginx's pages for a missing (496) and a failed (495) client certificate, answered as 400.
    static let noCertificate: StaticString = "No required SSL certificate was sent"
    static let badCertificate: StaticString = "The SSL certificate error"

    /// The detail of the 400 a request on `tls` gets under `mode`, or nil when it may go on.
    static func refusedCertificate(_ tls: TLSSocket, _ mode: SSLSettings.VerifyClient) -> StaticString? {
        switch tls.clientCertificate {
        case .verified: return nil
        case .none: return mode == .on ? noCertificate : nil
        case .failed(_, let caOnly): return mode == .optionalNoCA && caOnly ? nil : badCertificate
        }
    }

    func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
        let index = servers.count == 1 ? 0 : hosts.server(forHost: hostName(head, bytes))
        var regex: RegexMatches?
        if hasRegex && !servers[index].regexLocations.isEmpty {
            let m = connection.regexMatches()
            m.route = nil
            regex = m
        }
        let route = servers[index].route(head, bytes, regex: regex)
        if hasRegex, let m = regex, let why = m.failure {
            m.failure = nil
            connection.logError(why)
            return connection.respond(status: 500, text: nil, head: head, isHEAD: head.methodIs("HEAD", in: bytes), route: route)
        }
        let isHEAD = head.methodIs("HEAD", in: bytes)
        // set_real_ip_from: a trusted peer's word on who the client is, before anything uses it.
        if route.realIP { connection.applyRealIP(route, head, bytes) }
        if route.logsAccess {
            ClientVariables.with(head: head, bytes: bytes, connection: connection, route: route, serverName: serverNames[index]) {
                connection.draftAccessLog(route, $0)
            }
        }
        // The settings are read where needed (a copy of the struct would retain every list in it).
        // ssl_verify_client: nginx's 400 pages, and the connection closes.
        if route.verifyClient != .off, let tls = connection.tls, let detail = Self.refusedCertificate(tls, route.verifyClient) {
            connection.countRefusedCertificate(missing: tls.clientCertificate == .none)
            return connection.respond(status: 400, text: nil, head: head, isHEAD: isHEAD, route: route, close: true, detail: detail)
        }
        if let n = head.contentLength, route.settings.clientMaxBodySize > 0, n > route.settings.clientMaxBodySize {
            return connection.respond(status: 413, text: nil, head: head, isHEAD: isHEAD, route: route, close: true)
        }
        if head.methodIs("CONNECT", in: bytes) {
            return connection.respond(status: 405, text: nil, head: head, isHEAD: isHEAD, route: route, close: true)
        }
        if !route.settings.accessRules.isEmpty {
            let address = connection.peerAddressBytes()
            if let rule = route.settings.accessRules.first(where: { $0.matches(address) }), !rule.allow {
                return connection.respond(status: 403, text: nil, head: head, isHEAD: isHEAD, route: route)
            }
        }
        switch route.action {
        case .proxy:
            if route !== lastRoute {
                // The location's pool key: the upstream's name, with its TLS settings for https.
                lastRoute = route
                lastUpstream = upstreams[route.poolKey].map { Unretained($0) }
            }
            guard let upstream = lastUpstream else {
                // Every proxy_pass names an upstream the setup made; a miss is a bug, answered.
                return connection.respond(status: 502, text: nil, head: head, isHEAD: isHEAD, route: route)
            }
            upstream { connection.proxy(to: $0, route: route, head: head, bytes: bytes, serverName: serverNames[index]) }
        case .respond(let r):
            if r.code == 444 { return connection.closeWithoutAnswer() }
            guard let t = r.text else {
                return connection.respond(status: r.code, text: nil, head: head, isHEAD: isHEAD, route: route)
            }
            var text: [UInt8] = []
            ClientVariables.with(head: head, bytes: bytes, connection: connection, route: route, serverName: serverNames[index]) {
                HeadWriter.template(t, $0, into: &text)
            }
            text.withUnsafeBytes { connection.respond(status: r.code, text: $0, head: head, isHEAD: isHEAD, route: route) }
        case .stubStatus, .stats(_):
            guard isHEAD || head.methodIs("GET", in: bytes) else {
                return connection.respond(status: 405, text: nil, head: head, isHEAD: isHEAD, route: route, allow: true)
            }
            guard let admin, admin.renderer != nil else {
                return connection.respond(status: 501, text: nil, head: head, isHEAD: isHEAD, route: route)
            }
            let page: AdminPage
            switch route.action {
            case .stats(.prometheus): page = .prometheus
            case .stats: page = .json
            default: page = .stubStatus
            }
            let later = connection.answerLater(head: head, isHEAD: isHEAD, route: route)
            let receiver = AdminPages.Receiver(loop: connection.loop) { [connection] p in
                Array(p.body.utf8).withUnsafeBytes { connection.answer(later, status: 200, body: $0, contentType: p.contentType) }
            }
            admin.page(page, to: receiver)
        case .none:
            connection.respond(status: 404, text: nil, head: head, isHEAD: isHEAD, route: route)
        }
    }

    /// The Host (or absolute-form authority) in lowercase, without its port.
    private func hostName(_ head: HeadLayout, _ bytes: UnsafeRawBufferPointer) -> String? {
        guard head.hostStart >= 0 else { return nil }
        return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[head.hostStart..<head.hostEnd]), as: UTF8.self).lowercased()
    }
}
