import Foundation
import Logging
import NIOCore
import TetherAdmin
import TetherConfig
@testable import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A Tether under test, on either event loop: what a test that only talks HTTP to it needs.
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

/// Tether with `config` on the event loop `loop`.
func startProxy(on loop: EventLoopUnderTest, config: String) throws -> any ProxyUnderTest {
    switch loop {
    case .nio: try RunningProxy(config: config)
    case .own: try RunningCore(config: config)
    }
}

extension ProxyUnderTest {
    func client() throws -> TestClient { try TestClient(port: port) }
}

/// Tether running in-process on 127.0.0.1 with a port the kernel chose.
final class RunningProxy: ProxyUnderTest {
    let server: TetherServer
    let port: Int

    init(config text: String, logs: LogCapture? = nil) throws {
        let config = try Configuration.parse(text, file: "test.conf", resolver: { Builder.isNumeric($0) ? $0 : ($0 == "localhost" ? "127.0.0.1" : nil) }).get()
        var logger = logs.map { capture in Logger(label: "tether-test") { _ in capture } } ?? Logger(label: "tether-test")
        logger.logLevel = logs == nil ? .critical : .info
        server = try TetherServer(configuration: config, logger: logger, admin: Renderer())
        try server.start()
        port = server.boundAddresses[0].port
    }

    func stats() -> StatsSnapshot { server.stats() }
    func reload(_ configuration: Configuration) throws { try server.reload(configuration) }
    var listeningPorts: [Int] { server.boundAddresses.map(\.port) }
    var configuration: Configuration { server.configuration }
    func executeOnEachLoop(_ body: @escaping @Sendable () -> Void) { server.executeOnEachLoop(body) }
    func stop() { server.shutdown(timeout: .seconds(2)) }
}

/// Tether's own event loop (`--event-loop own`, issue 15) running in-process the same way.
final class RunningCore: ProxyUnderTest {
    let server: CoreServer
    let port: Int

    /// `errorLog`: where its error log goes (standard error without one).
    init(config text: String, errorLog: LoopErrorLog? = nil) throws {
        let config = try Configuration.parse(text, file: "test.conf", resolver: { Builder.isNumeric($0) ? $0 : ($0 == "localhost" ? "127.0.0.1" : nil) }).get()
        server = try CoreServer(config, admin: Renderer(), log: errorLog)
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

enum EventLoopUnderTest: String, CaseIterable, Sendable {
    case nio, own

    /// The binary's command line that picks this loop.
    var arguments: [String] { ["--event-loop", rawValue] }

    /// The loops `withProxy` without a loop runs its body on: both, or the one
    /// `TETHER_TEST_LOOP` names (to look at one when a test fails).
    static var selected: [EventLoopUnderTest] {
        ProcessInfo.processInfo.environment["TETHER_TEST_LOOP"].flatMap(EventLoopUnderTest.init(rawValue:)).map { [$0] } ?? allCases
    }
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

/// `withProxy` on the event loop `loop`, for tests that hold on either (the switch of issue 15
/// waits for the rest).
func withProxy(
    on loop: EventLoopUnderTest,
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
    let proxy = try startProxy(on: loop, config: proxyConfig(backendPort: backend.port, workers: workers, http: http, upstream: upstream,
                                                             server: server, location: location))
    defer { proxy.stop() }
    try body(proxy, backend)
}

/// Starts a backend and Tether in front of it with the given snippets, runs `body`, stops both;
/// once on each event loop (each run with a backend of its own), until the switch of issue 15
/// leaves one.
func withProxy(
    backend options: TestBackend.Options = .init(),
    workers: Int = 2,
    http: String = "",
    upstream: String = "",
    server: String = "",
    location: String = "",
    _ body: (any ProxyUnderTest, TestBackend) throws -> Void
) throws {
    for loop in EventLoopUnderTest.selected {
        try withProxy(on: loop, backend: options, workers: workers, http: http, upstream: upstream, server: server, location: location, body)
    }
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

/// Keeps every log message, for tests that check what Tether tells its operator.
final class LogCapture: LogHandler, @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        lock.lock(); lines.append("[\(event.level)] \(event.message)"); lock.unlock()
    }

    var messages: [String] {
        lock.lock(); defer { lock.unlock() }
        return lines
    }
}
