import Foundation
import NIOCore
import Testing
import TetherTestSupport

/// This process's TCP sockets whose local or remote port is `port`, by file descriptor.
func socketsOfThisProcess(localPort: Int? = nil, remotePort: Int? = nil) -> [Int32] {
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return fds.compactMap(Int32.init).filter { fd in
        var a = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        func port(_ f: (Int32, UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> Int32) -> Int? {
            len = socklen_t(MemoryLayout<sockaddr_in>.size)
            let rc = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { f(fd, $0, &len) } }
            return rc == 0 && a.sin_family == sa_family_t(AF_INET) ? Int(UInt16(bigEndian: a.sin_port)) : nil
        }
        guard let l = port(getsockname), let r = port(getpeername) else { return false }
        return (localPort == nil || l == localPort) && (remotePort == nil || r == remotePort)
    }
}

struct SocketOptions: Equatable, CustomStringConvertible {
    var keepalive, idle, interval, count, userTimeout: Int32

    init(keepalive: Int32, idle: Int32, interval: Int32, count: Int32, userTimeout: Int32) {
        (self.keepalive, self.idle, self.interval, self.count, self.userTimeout) = (keepalive, idle, interval, count, userTimeout)
    }

    init(fd: Int32) {
        func get(_ level: Int32, _ name: Int32) -> Int32 {
            var v: Int32 = -1
            var len = socklen_t(4)
            getsockopt(fd, level, name, &v, &len)
            return v
        }
        keepalive = get(SOL_SOCKET, SO_KEEPALIVE)
        idle = get(Int32(IPPROTO_TCP), TCP_KEEPIDLE)
        interval = get(Int32(IPPROTO_TCP), TCP_KEEPINTVL)
        count = get(Int32(IPPROTO_TCP), TCP_KEEPCNT)
        userTimeout = get(Int32(IPPROTO_TCP), TCP_USER_TIMEOUT)
    }

    var description: String { "keepalive=\(keepalive) idle=\(idle) intvl=\(interval) cnt=\(count) user_timeout=\(userTimeout)" }
}

/// TCP_NODELAY on a socket: small responses must not wait behind Nagle's algorithm.
func tcpNoDelay(fd: Int32) -> Int32 {
    var v: Int32 = -1
    var len = socklen_t(4)
    getsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &v, &len)
    return v
}

func hostDefault(_ name: String) -> Int32 {
    Int32((try? String(contentsOfFile: "/proc/sys/net/ipv4/\(name)", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? -1
}

@Suite struct TCPKeepaliveTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var listen: String
        var upstream: String
        var client: SocketOptions
        var pooled: SocketOptions
        var testDescription: String { name }
    }

    static let idle = hostDefault("tcp_keepalive_time"), intvl = hostDefault("tcp_keepalive_intvl"), probes = hostDefault("tcp_keepalive_probes")

    static let cases: [Case] = [
        Case(name: "full triples, auto user timeout", listen: "so_keepalive=30:5:4", upstream: "tcp_keepalive 10:2:3;",
             client: .init(keepalive: 1, idle: 30, interval: 5, count: 4, userTimeout: 50_000),
             pooled: .init(keepalive: 1, idle: 10, interval: 2, count: 3, userTimeout: 16_000)),
        Case(name: "on keeps the host's timers", listen: "so_keepalive=on", upstream: "tcp_keepalive on; tcp_user_timeout off;",
             client: .init(keepalive: 1, idle: idle, interval: intvl, count: probes, userTimeout: (idle + intvl * probes) * 1000),
             pooled: .init(keepalive: 1, idle: idle, interval: intvl, count: probes, userTimeout: 0)),
        Case(name: "partial triple", listen: "so_keepalive=1m::7", upstream: "tcp_keepalive :3:; tcp_user_timeout 4s;",
             client: .init(keepalive: 1, idle: 60, interval: intvl, count: 7, userTimeout: (60 + intvl * 7) * 1000),
             pooled: .init(keepalive: 1, idle: idle, interval: 3, count: probes, userTimeout: 4_000)),
        Case(name: "off", listen: "so_keepalive=off", upstream: "tcp_keepalive off;",
             client: .init(keepalive: 0, idle: idle, interval: intvl, count: probes, userTimeout: 0),
             pooled: .init(keepalive: 0, idle: idle, interval: intvl, count: probes, userTimeout: 0)),
    ]

    /// The options read back from the live sockets on both sides match the configuration.
    @Test(arguments: cases)
    func optionsReachTheKernel(_ c: Case) throws {
        let backend = try TestBackend()
        defer { backend.stop() }
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream b { server 127.0.0.1:\(backend.port); \(c.upstream) }
                server { listen 127.0.0.1:0 \(c.listen); location / { proxy_pass http://b; } }
            }
            """)
        defer { proxy.stop() }
        let client = try proxy.client()
        #expect(try client.get().status == 200)
        let accepted = socketsOfThisProcess(localPort: proxy.port)
        let pooled = socketsOfThisProcess(remotePort: backend.port)
        try #require(accepted.count == 1 && pooled.count == 1)
        #expect(SocketOptions(fd: accepted[0]) == c.client)
        #expect(SocketOptions(fd: pooled[0]) == c.pooled)
        // Accepted sockets get it from the listening socket (Linux copies it), not from a
        // setsockopt per connection.
        #expect(tcpNoDelay(fd: accepted[0]) == 1)
        #expect(tcpNoDelay(fd: pooled[0]) == 1)
    }

    @Test
    func proxySocketKeepaliveTurnsOnSOKeepaliveUpstream() throws {
        try withProxy(workers: 1, location: "proxy_socket_keepalive on;") { proxy, backend in
            let client = try proxy.client()
            try client.sendGET()
            _ = try client.readResponse()
            let pooled = socketsOfThisProcess(remotePort: backend.port)
            try #require(pooled.count == 1)
            #expect(SocketOptions(fd: pooled[0]).keepalive == 1)
        }
    }

    static let canMakeNamespaces: Bool = {
        getuid() == 0 && (FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") || FileManager.default.isExecutableFile(atPath: "/sbin/ip"))
    }()

    /// A pooled connection to a backend host that stops answering (its link goes down, nothing is
    /// closed) is found dead by `tcp_keepalive 1:1:2` within about 3 s, and the next request gets a
    /// fresh connection. Needs root to make a network namespace; skipped (and said so) otherwise.
    @Test(.enabled(if: canMakeNamespaces, "needs root and iproute2 to create a network namespace"))
    func deadPeerIsDetectedByKeepalive() throws {
        let net = try TestNamespace()
        defer { net.remove() }
        try net.startBackend(port: 8080)
        let proxy = try startProxy(config: """
            worker_processes 1;
            http {
                upstream b { server \(net.peerAddress):8080; tcp_keepalive 1:1:2; }
                server { listen 127.0.0.1:0; location / { proxy_pass http://b; proxy_connect_timeout 2s; } }
            }
            """)
        defer { proxy.stop() }
        let client = try proxy.client()
        #expect(try client.get().status == 200)
        #expect(proxy.stats().idleUpstreamConnections == 1)

        try net.linkDown()
        let t = NIODeadline.now()
        #expect(eventually(timeoutMs: 6_000) { proxy.stats().upstreamClosed["tcp_keepalive"] == 1 })
        let took = seconds(since: t)
        #expect(took < 4.5, "dead peer found after \(took) s")
        #expect(proxy.stats().idleUpstreamConnections == 0)

        try net.linkUp()
        #expect(net.waitUntilReachable(port: 8080))
        #expect(try client.get().status == 200)
        #expect(proxy.stats().upstreamConnects == 2)
    }
}

/// A network namespace with a veth pair: the test's own backend host. Made and removed by the test.
final class TestNamespace {
    let name = "tether-\(getpid())-\(UInt32.random(in: 0..<1_000_000))"
    let hostIf: String
    let peerIf: String
    let hostAddress = "10.213.77.1"
    let peerAddress = "10.213.77.2"

    init() throws {
        let tag = String(UInt32.random(in: 0..<0xFFFFFF), radix: 16)
        hostIf = "tth\(tag)"
        peerIf = "ttn\(tag)"
        try ip(["netns", "add", name])
        try ip(["link", "add", hostIf, "type", "veth", "peer", "name", peerIf])
        try ip(["link", "set", peerIf, "netns", name])
        try ip(["addr", "add", "\(hostAddress)/30", "dev", hostIf])
        try ip(["link", "set", hostIf, "up"])
        try ip(["netns", "exec", name, "ip", "addr", "add", "\(peerAddress)/30", "dev", peerIf])
        try ip(["netns", "exec", name, "ip", "link", "set", peerIf, "up"])
        try ip(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
    }

    var ipPath: String { FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip" }

    func ip(_ args: [String]) throws {
        let r = try Spawn.run(ipPath, args)
        guard r.status == 0 else {
            throw TestError("ip \(args.joined(separator: " ")) failed: \(r.err)")
        }
    }

    /// Processes started inside the namespace; `remove` ends them.
    private var processes: [Spawn.Child] = []

    /// A keep-alive HTTP/1.1 backend (Python's http.server) listening inside the namespace.
    func startBackend(port: Int) throws {
        let script = """
            import http.server
            class H(http.server.BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"
                def do_GET(self):
                    self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
                def log_message(self, *a): pass
            http.server.ThreadingHTTPServer(("\(peerAddress)", \(port)), H).serve_forever()
            """
        // Not the test runner's own output: a child holding it open would keep `swift test` waiting.
        processes.append(try Spawn.start(ipPath, ["netns", "exec", name, "python3", "-c", script], stdout: .null, stderr: .null))
        guard waitUntilReachable(port: port) else {
            throw TestError("the namespace backend did not start")
        }
    }

    /// Waits (up to 5 s) until a TCP connect to the namespace's backend succeeds.
    func waitUntilReachable(port: Int) -> Bool {
        for _ in 0..<100 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var tv = timeval(tv_sec: 0, tv_usec: 200_000)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            addr.sin_addr.s_addr = inet_addr(peerAddress)
            let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            close(fd)
            if rc == 0 { return true }
            usleep(50_000)
        }
        return false
    }

    /// The backend host stops answering: its side of the link goes down, nothing is closed.
    func linkDown() throws { try ip(["netns", "exec", name, "ip", "link", "set", peerIf, "down"]) }
    func linkUp() throws { try ip(["netns", "exec", name, "ip", "link", "set", peerIf, "up"]) }

    func remove() {
        // Whatever still runs inside the namespace goes with it. (`ip netns exec` forks and waits
        // for its child, so ending the `ip` process would leave the child running.)
        if let pids = try? Spawn.run(ipPath, ["netns", "pids", name]) {
            for pid in pids.out.split(separator: "\n").compactMap({ Int32($0) }) {
                kill(pid, SIGKILL)
            }
        }
        for p in processes { p.wait() }
        try? ip(["link", "del", hostIf])
        try? ip(["netns", "del", name])
    }
}
