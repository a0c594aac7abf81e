import TetherConfig
import TetherHTTP
import TetherIO
import TetherPool

/// Tether's own loop answering every request itself with a fixed body: what `tether bench-core`
/// runs for `bench/core-local.sh`, which counts its instructions per request against nginx's
/// `return 200` and against `tether -c`'s. A measuring tool for the floor of the client side,
/// not a server to deploy.
public enum LocalAnswerBench {
    final class Answer: ClientRequestHandler {
        let body: [UInt8]
        init(_ body: [UInt8]) { self.body = body }
        func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
            connection.respond(status: 200, body: body, head: head)
        }
    }

    /// Every request through one `proxy_pass` location of a configuration.
    final class Proxy: ClientRequestHandler {
        let upstream: LoopUpstream
        let route: CompiledLocation
        init(_ upstream: LoopUpstream, route: CompiledLocation) {
            self.upstream = upstream
            self.route = route
        }
        func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
            connection.proxy(to: upstream, route: route, head: head, bytes: bytes)
        }
    }

    /// The location of `location / { proxy_pass http://backend; }` in front of 127.0.0.1:`port`,
    /// compiled as the configuration loader compiles it (`proxy_set_header Host $proxy_host` by
    /// default, as nginx's, and nginx's proxy defaults otherwise).
    static func proxyLocation(upstreamPort port: UInt16, extra: String = "") throws -> CompiledLocation {
        let text = """
            events {}
            http {
                upstream backend { server 127.0.0.1:\(port); keepalive 64; }
                server { listen 127.0.0.1:1; location / { proxy_pass http://backend; \(extra) } }
            }
            """
        let c = try Configuration.parse(text, file: "bench-core.conf", resolver: { $0 }).get()
        return try ProxySetup(c, hostKeepalive: HostKeepalive()).servers[0].locations[0]
    }

    /// Listens on 127.0.0.1:`port` with one loop on the calling thread, until the process ends;
    /// answers with `body`, or with `upstream`'s answers (127.0.0.1, a pool of up to 64 idle
    /// keep-alive connections) when one is given.
    public static func serve(port: UInt16, body: String, upstream: UInt16? = nil) throws(IOError) -> Never {
        let loop = try IOLoop()
        var settings = ClientSettings()
        settings.keepaliveRequests = 1_000_000
        settings.keepaliveTimeoutMs = 300_000
        let buffers = BufferPool()
        let handler: ClientRequestHandler
        if let upstream {
            let policy = PoolPolicy(keepalive: 64, idleTimeoutMs: 60_000, maxRequests: 1_000_000, maxLifetimeMs: 3_600_000)
            let pool = UpstreamPool(loop: loop, buffers: buffers, host: "127.0.0.1", port: upstream, policy: policy)!
            let route: CompiledLocation
            do {
                route = try proxyLocation(upstreamPort: upstream)
            } catch {
                fatalError("bench-core: \(error)")
            }
            handler = Proxy(LoopUpstream(name: "backend", pools: [pool]), route: route)
        } else {
            handler = Answer(Array(body.utf8))
        }
        let clients = ClientLoop(loop: loop, pool: buffers, settings: settings, handler: handler)
        let (fd, _) = try Sockets.listenTCP(port: port, backlog: 4096)
        Sockets.setNoDelay(fd)  // inherited by accepted sockets
        let listener = Listener(fd: fd, accepted: { c, _ in _ = try? clients.adopt(c) }, failed: { _, _ in })
        try listener.start(on: loop)
        while true { try loop.run() }
    }
}
