import Foundation
import Testing
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Connection churn against the `tether` binary in a process of its own, so that its resident
/// size is not disturbed by the tests running beside this one: every closed connection must give
/// back what it took (handlers, channels, OpenSSL objects).
/// The resident size of process `pid`, KiB.
func residentKiB(_ pid: Int32) -> Int {
    let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let line = text.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
}

/// Starts the `tether` binary on `config` (in a directory of its own, given to `config` to put
/// files in), waits until `port` accepts, runs `body` with its pid, and stops it.
func withTetherProcess(config: (String) -> String, port: Int, arguments: [String] = [], _ body: (Int32, String) throws -> Void) throws {
    let dir = NSTemporaryDirectory() + "tether-proc-" + UUID().uuidString
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    try config(dir).write(toFile: dir + "/t.conf", atomically: true, encoding: .utf8)
    let p = try Spawn.start(try tetherExecutable().path, arguments + ["-c", dir + "/t.conf"], stderr: .null)
    defer { p.terminate(); p.wait() }
    #expect(eventually(timeoutMs: 10_000) { (try? TestClient(port: port, timeoutMs: 200)) != nil })
    try body(p.pid, dir)
}

@Suite(.serialized) struct LeakTests {
    func withTether(config: String, port: Int, _ body: (Int32) throws -> Void) throws {
        try withTetherProcess(config: { _ in config }, port: port, arguments: []) { pid, _ in try body(pid) }
    }

    @Test func tenThousandTLSHandshakesLeaveTheResidentSizeFlat() throws {
        let port = freePort()
        let config = """
            worker_processes 1;
            http {
                server {
                    listen 127.0.0.1:\(port) ssl;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    location / { return 200 "hi"; }
                }
            }
            """
        try withTether(config: config, port: port) { pid in
            // openssl s_time makes a new connection and handshake after another for the given time.
            func churn(seconds: Int) throws -> Int {
                let r = try run("/usr/bin/openssl", ["s_time", "-connect", "127.0.0.1:\(port)", "-new", "-time", String(seconds)])
                let line = r.out.split(separator: "\n").first { $0.contains("connections in") && $0.contains("real seconds") } ?? ""
                return Int(line.split(separator: " ").first ?? "") ?? 0
            }
            var handshakes = try churn(seconds: 2)
            #expect(handshakes > 200, "s_time made \(handshakes) connections")
            let warm = residentKiB(pid)
            var rounds = 0
            while handshakes < 10_000 && rounds < 20 {
                handshakes += try churn(seconds: 3)
                rounds += 1
            }
            let grown = residentKiB(pid) - warm
            #expect(handshakes >= 10_000)
            #expect(grown < 1024, "resident size grew by \(grown) KiB over \(handshakes) handshakes")
        }
    }

    @Test func tenThousandPlainConnectionsLeaveTheResidentSizeFlat() throws {
        let port = freePort()
        let config = """
            worker_processes 1;
            http { server { listen 127.0.0.1:\(port); location / { return 200 "hi"; } } }
            """
        try withTether(config: config, port: port) { pid in
            func churn(_ n: Int) throws {
                for _ in 0..<n {
                    let c = try TestClient(port: port)
                    try c.send("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    #expect(try c.readResponse().status == 200)
                    _ = c.waitForClose(timeoutMs: 2_000)
                    c.close()
                }
            }
            try churn(2_000)
            let warm = residentKiB(pid)
            try churn(10_000)
            let grown = residentKiB(pid) - warm
            #expect(grown < 1024, "resident size grew by \(grown) KiB over 10,000 connections")
        }
    }
}
