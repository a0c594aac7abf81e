#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TetherConfig
import TetherHTTP
import TetherIO

/// A configuration served on Tether's own loop (issue 15), beside the SwiftNIO path until the
/// switch: `tether --event-loop own`. One loop per worker, each on its own thread with its own
/// `SO_REUSEPORT` socket per listening address, its own buffer pool and its own upstream pools;
/// nothing is shared between loops, so the request path takes no lock. What the own loop cannot
/// serve yet (`CoreRouter.unsupported`) is refused before anything listens. Not yet here: access
/// logs, metrics and admin pages, reload, TLS, upgrades.
public final class CoreServer: @unchecked Sendable {
    public let configuration: Configuration
    private let setup: ProxySetup
    private var loops: [IOLoop] = []
    private var workers: [LoopThread] = []
    private var threads: [pthread_t] = []
    /// The address and port each listening address was bound to (port 0 in the configuration:
    /// the one the kernel chose), in `ProxySetup.virtualHosts` order.
    public private(set) var boundPorts: [(address: String, port: UInt16)] = []

    public init(_ configuration: Configuration) throws(CoreServerError) {
        let refused = CoreRouter.unsupported(configuration)
        guard refused.isEmpty else { throw CoreServerError(lines: refused) }
        self.configuration = configuration
        do {
            setup = try ProxySetup(configuration)
        } catch {
            throw CoreServerError(lines: ["\(error)"])
        }
    }

    public var workerCount: Int {
        switch configuration.workerProcesses {
        case .auto: max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        case .count(let n): max(1, n)
        }
    }

    /// Binds every listening address on every loop, then runs each loop on a thread of its own.
    public func start() throws(CoreServerError) {
        let hosts = setup.virtualHosts()
        // Upstreams some location reaches with proxy_socket_keepalive on.
        var socketKeepalive = Set<String>()
        for server in setup.servers {
            for l in server.locations {
                if case .proxy(let p) = l.action, l.settings.proxySocketKeepalive { socketKeepalive.insert(p.upstream) }
            }
        }
        var ports = hosts.map { UInt16(clamping: $0.0.port) }
        var workers: [LoopThread] = []
        // Loops made so far: on a failure their listening sockets are closed again.
        var made: [IOLoop] = []
        do {
            for _ in 0..<workerCount {
                let loop = try IOLoop()
                made.append(loop)
                let buffers = BufferPool()
                var upstreams: [String: LoopUpstream] = [:]
                for (name, u) in setup.upstreams {
                    upstreams[name] = try LoopUpstream.make(u.config, loop: loop, buffers: buffers,
                                                            socketKeepalive: socketKeepalive.contains(name), host: setup.hostKeepalive)
                }
                var listeners: [Listener] = []
                var clientLoops: [ClientLoop] = []
                let admission = Admission(limit: configuration.workerConnections)
                for (i, (listen, vhosts, servers)) in hosts.enumerated() {
                    let router = CoreRouter(hosts: vhosts, servers: servers, upstreams: upstreams)
                    let clients = ClientLoop(loop: loop, pool: buffers, settings: Self.clientSettings(servers[vhosts.defaultIndex].server.settings), handler: router)
                    clientLoops.append(clients)
                    admission.clients.append(clients)
                    let fd: Int32, port: UInt16
                    do {
                        (fd, port) = try Sockets.listenTCP(address: listen.address, port: ports[i], backlog: Int32(listen.backlog))
                    } catch {
                        // As nginx: bind() to [::1]:8080 failed (98: Address already in use).
                        throw CoreSetupError("\(listen.location): \(error.call)() to \(listen.addressText) failed (\(error.errno): \(String(cString: strerror(error.errno))))")
                    }
                    // Set once on the listening socket: accepted sockets inherit TCP_NODELAY and
                    // the keepalive options (Linux copies them), so no setsockopt per connection.
                    Sockets.setNoDelay(fd)
                    let tuning = SocketTuning(keepalive: listen.soKeepalive, userTimeout: listen.tcpUserTimeout, host: setup.hostKeepalive)
                    for failure in tuning.apply(toSocket: fd) { Self.log("tether: [warn] \(failure) on listen \(listen.addressText)") }
                    // Port 0: the first loop's port is every other loop's too.
                    ports[i] = port
                    let where_ = listen.addressText
                    let listener = Listener(fd: fd, accepted: { c, loop in
                        guard admission.admits(now: loop.now) else { Glibc.close(c); return }
                        _ = try? clients.adopt(c)
                    }, failed: { e, _ in
                        // Once per back-off (at most ten a second per loop), as nginx logs accept4() failures.
                        CoreServer.log("tether: [crit] \(e) on \(where_), accepting again in 100 ms")
                    })
                    try listener.start(on: loop)
                    listeners.append(listener)
                }
                workers.append(LoopThread(loop: loop, listeners: listeners, clients: clientLoops))
            }
        } catch let e as CoreSetupError {
            for l in made { l.closeAll() }
            throw CoreServerError(lines: [e.description])
        } catch {
            for l in made { l.closeAll() }
            throw CoreServerError(lines: ["\(error)"])
        }
        boundPorts = zip(hosts, ports).map { ($0.0.address, $1) }
        loops = workers.map(\.loop)
        self.workers = workers
        for work in workers {
            let box = Unmanaged.passRetained(work)
            var t = pthread_t()
            let rc = pthread_create(&t, nil, { arg in
                let work = Unmanaged<LoopThread>.fromOpaque(arg!).takeRetainedValue()
                work.run()
                return nil
            }, box.toOpaque())
            guard rc == 0 else {
                box.release()
                throw CoreServerError(lines: ["pthread_create failed (\(rc))"])
            }
            threads.append(t)
        }
    }

    /// Stops every loop after its pass under way, waits for their threads, and closes every
    /// listener and connection at once (a fast stop: answers under way are cut).
    public func stop() {
        for l in loops { l.stop() }
        for t in threads { pthread_join(t, nil) }
        for l in loops { l.closeAll() }
        threads = []
        loops = []
        workers = []
    }

    /// Stops gracefully, as nginx does on SIGQUIT: every loop closes its listening sockets and
    /// its idle client connections at once; a connection with a request under way gets its
    /// answer (`Connection: close` unless its head went out already) and closes after it; a loop
    /// stops when its last client connection has closed. Whatever is still open after
    /// `timeoutMs` is closed (`stop`). Returns once every loop has stopped.
    public func shutdown(timeoutMs: Int64 = 10_000) {
        for w in workers { w.loop.execute { _ in w.drain() } }
        let deadline = IOLoop.monotonicNanoseconds() + UInt64(max(0, timeoutMs)) * 1_000_000
        // The main thread waits; the loops do not. (Polled: a shutdown is not a hot path, and a
        // loop ends on its own thread without anyone to signal but its own exit.)
        while workers.contains(where: { !$0.finished.load(ordering: .acquiring) }) && IOLoop.monotonicNanoseconds() < deadline {
            usleep(5_000)
        }
        stop()
    }

    /// A line on standard error, written whole (loops log from their own threads).
    static func log(_ line: String) {
        let text = line + "\n"
        _ = text.withCString { Glibc.write(2, $0, strlen($0)) }
    }

    /// What a client connection needs of the server's settings.
    static func clientSettings(_ s: HTTPSettings) -> ClientSettings {
        var c = ClientSettings()
        let (count, size) = s.largeClientHeaderBuffers
        c.headLimits = HeadParser.Limits(lineLimit: size, headLimit: count * size, mergeSlashes: s.mergeSlashes)
        c.headerTimeoutMs = s.clientHeaderTimeoutMs
        c.bodyTimeoutMs = s.clientBodyTimeoutMs
        c.keepaliveTimeoutMs = s.keepaliveTimeoutMs
        c.keepaliveRequests = s.keepaliveRequests
        c.keepaliveTimeMs = s.keepaliveTimeMs
        return c
    }
}

/// `worker_connections` on one loop: the client connections its listening addresses hold
/// together. One accepted beyond them is closed at once, and that is logged as nginx words it,
/// at most once a second (with the count since the last line).
private final class Admission {
    let limit: Int
    var clients: [ClientLoop] = []
    private var refused = 0
    private var lastLog: UInt64 = 0

    init(limit: Int) { self.limit = limit }

    func admits(now: UInt64) -> Bool {
        var open = 0
        for c in clients { open += c.open }
        guard open >= limit else { return true }
        refused += 1
        if lastLog == 0 || now &- lastLog >= 1_000_000_000 {
            let extra = refused > 1 ? " (\(refused) connections closed since the last line)" : ""
            CoreServer.log("tether: [alert] \(limit) worker_connections are not enough\(extra)")
            lastLog = now
            refused = 0
        }
        return false
    }
}

/// A loop, its listeners and its client connections, run on one thread until the loop is stopped.
private final class LoopThread: @unchecked Sendable {
    let loop: IOLoop
    let listeners: [Listener]
    let clients: [ClientLoop]
    /// `run` has returned (read by the thread that shuts the server down).
    let finished = Atomic<Bool>(false)

    init(loop: IOLoop, listeners: [Listener], clients: [ClientLoop]) {
        self.loop = loop
        self.listeners = listeners
        self.clients = clients
        for c in clients { c.emptied = { [unowned self] in self.stopIfEmpty() } }
    }

    func run() {
        do {
            try loop.run()
        } catch {
            CoreServer.log("tether: [emerg] event loop stopped: \(error)")
        }
        finished.store(true, ordering: .releasing)
    }

    /// On the loop: the graceful shutdown's start (`CoreServer.shutdown`).
    func drain() {
        for l in listeners { l.stop(on: loop) }
        for c in clients { c.beginDrain() }
        for h in loop.handlers { (h as? ClientConnection)?.drain() }
        stopIfEmpty()
    }

    private func stopIfEmpty() {
        if clients.allSatisfy({ $0.open == 0 }) { loop.stop() }
    }
}

/// A configuration the own loop refuses, or a start that failed: one `file:line: message` per line.
public struct CoreServerError: Error, CustomStringConvertible {
    public let lines: [String]
    public var description: String { lines.joined(separator: "\n") }
}
