import Foundation
import NIOCore
import TetherAdmin
import TetherConfig
@testable import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A Tether under test: what a test that only talks HTTP to it needs.
protocol ProxyUnderTest: Sendable {
    var port: Int { get }
    /// Every loop's counters, summed (what the admin pages show).
    func stats() -> StatsSnapshot
    /// Swaps in a new configuration without a restart.
    func reload(_ configuration: Configuration) throws
    /// The ports it listens on.
    var listeningPorts: [Int] { get }
    /// The configuration it runs.
    var configuration: Configuration { get }
    /// Runs `body` on each event loop's thread (a test holds the loops busy this way).
    func executeOnEachLoop(_ body: @escaping @Sendable () -> Void)
    func stop()
}

/// Tether with `config`, in-process.
func startProxy(config: String) throws -> any ProxyUnderTest {
    try RunningProxy(config: config)
}

extension ProxyUnderTest {
    func client() throws -> TestClient { try TestClient(port: port) }
}

/// Tether running in-process on 127.0.0.1 with a port the kernel chose.
final class RunningProxy: ProxyUnderTest {
    let server: TetherServer
    let port: Int

    /// `errorLog`: where its error log goes (standard error without one).
    init(config text: String, errorLog: LoopErrorLog? = nil) throws {
        let config = try Configuration.parse(text, file: "test.conf", resolver: { Builder.isNumeric($0) ? $0 : ($0 == "localhost" ? "127.0.0.1" : nil) }).get()
        server = try TetherServer(config, admin: Renderer(), log: errorLog)
        try server.start()
        port = Int(server.boundPorts[0].port)
    }

    func stats() -> StatsSnapshot { server.stats() }
    func reload(_ configuration: Configuration) throws { try server.reload(configuration) }
    var listeningPorts: [Int] { server.boundPorts.map { Int($0.port) } }
    var configuration: Configuration { server.configuration }
    func executeOnEachLoop(_ body: @escaping @Sendable () -> Void) { server.executeOnEachLoop(body) }
    func stop() { server.shutdown(timeoutMs: 2_000) }
}

/// The configuration `withProxy` makes: a backend's upstream and one server on port 0.
func proxyConfig(backendPort: Int, workers: Int, http: String, upstream: String, server: String, location: String) -> String {
    """
    worker_processes \(workers);
    http {
        \(http)
        upstream backend {
            server 127.0.0.1:\(backendPort);
            \(upstream)
        }
        server {
            listen 127.0.0.1:0;
            \(server)
            location / {
                proxy_pass http://backend;
                \(location)
            }
        }
    }
    """
}

/// Starts a backend and Tether in front of it with the given snippets, runs `body`, stops both.
func withProxy(
    backend options: TestBackend.Options = .init(),
    workers: Int = 2,
    http: String = "",
    upstream: String = "",
    server: String = "",
    location: String = "",
    _ body: (any ProxyUnderTest, TestBackend) throws -> Void
) throws {
    let backend = try TestBackend(options: options)
    defer { backend.stop() }
    let proxy = try startProxy(config: proxyConfig(backendPort: backend.port, workers: workers, http: http, upstream: upstream,
                                                   server: server, location: location))
    defer { proxy.stop() }
    try body(proxy, backend)
}

/// Polls `condition` every 10 ms until it holds or `timeoutMs` passes; returns whether it held.
func eventually(timeoutMs: Int = 5_000, _ condition: () -> Bool) -> Bool {
    let deadline = NIODeadline.now() + .milliseconds(Int64(timeoutMs))
    while NIODeadline.now() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

func seconds(since t: NIODeadline) -> Double {
    Double((NIODeadline.now() - t).nanoseconds) / 1e9
}

/// TCP sockets of this machine in a state (`/proc/net/tcp` codes: 06 TIME_WAIT, 08 CLOSE_WAIT)
/// whose remote port is `port`.
func socketsInState(_ state: String, remotePort port: Int) -> Int {
    socketsInState(state, port: port, field: 2)
}

/// TCP sockets of this machine in a state (`0A` LISTEN, ...) whose local port is `port`.
func socketsInState(_ state: String, localPort port: Int) -> Int {
    socketsInState(state, port: port, field: 1)
}

private func socketsInState(_ state: String, port: Int, field: Int) -> Int {
    let fd = open("/proc/net/tcp", O_RDONLY)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, 65536) }
        if n <= 0 { break }
        data.append(contentsOf: chunk[0..<n])
    }
    let hexPort = String(port, radix: 16, uppercase: true).leftPadded(4)
    return String(decoding: data, as: UTF8.self).split(separator: "\n").dropFirst().filter { line in
        let f = line.split(separator: " ")
        return f.count > 3 && f[field].hasSuffix(":" + hexPort) && f[3] == state
    }.count
}

extension String {
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// Tether's error log in a file of its own, for tests that check what Tether tells its operator.
final class ErrorLogFile: @unchecked Sendable {
    let path = NSTemporaryDirectory() + "tether-error-\(UUID().uuidString).log"
    let fd: Int32
    /// What `RunningProxy` writes to (at `level` and above).
    let log: LoopErrorLog

    init(level: Configuration.LogLevel = .info) {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        log = LoopErrorLog(level: level, fd: fd)
    }

    deinit {
        // The descriptor stays open: a proxy may outlive this object (Swift may release it after
        // its last use, before the proxy stops), and its lines must never go to a descriptor
        // number that another test reused.
        unlink(path)
    }

    /// The lines written so far.
    var lines: [Substring] {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n")
    }
}
