import Foundation
import Logging
import NIOCore
import TetherAdmin
import TetherConfig
import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Tether running in-process on 127.0.0.1 with a port the kernel chose.
final class RunningProxy: Sendable {
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

    func stop() { server.shutdown(timeout: .seconds(2)) }

    func client() throws -> TestClient { try TestClient(port: port) }
}

/// Starts a backend and Tether in front of it with the given snippets, runs `body`, stops both.
func withProxy(
    backend options: TestBackend.Options = .init(),
    workers: Int = 2,
    http: String = "",
    upstream: String = "",
    server: String = "",
    location: String = "",
    _ body: (RunningProxy, TestBackend) throws -> Void
) throws {
    let backend = try TestBackend(options: options)
    defer { backend.stop() }
    let proxy = try RunningProxy(config: """
        worker_processes \(workers);
        http {
            \(http)
            upstream backend {
                server 127.0.0.1:\(backend.port);
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
        """)
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
