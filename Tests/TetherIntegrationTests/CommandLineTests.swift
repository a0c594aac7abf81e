import Foundation
import Testing
import TetherTestSupport

/// Runs the built `tether` binary (next to the test bundle in the build folder).
/// The built `tether` binary, found next to the test bundle in the build folder.
func tetherExecutable() throws -> URL {
    let exe = URL(fileURLWithPath: try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
    var dir = exe.deletingLastPathComponent()
    while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("tether").path) && dir.path != "/" {
        dir = dir.deletingLastPathComponent()
    }
    return dir.appendingPathComponent("tether")
}

func runTether(_ args: [String], cwd: String? = nil) throws -> (status: Int32, out: String, err: String) {
    try run(try tetherExecutable().path, args, cwd: cwd)
}

func packageRoot() -> String {
    var url = URL(fileURLWithPath: #filePath)
    while !FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) {
        url = url.deletingLastPathComponent()
    }
    return url.path
}

@Suite struct CommandLineTests {
    @Test func shippedConfigurationTestsSuccessfully() throws {
        let r = try runTether(["-t", "-c", "conf/tether.conf"], cwd: packageRoot())
        #expect(r.status == 0)
        #expect(r.err.contains("tether: configuration file conf/tether.conf test is successful"))
    }

    @Test func effectiveConfigurationIsPrinted() throws {
        let r = try runTether(["-T", "-c", "conf/tether.conf"], cwd: packageRoot())
        #expect(r.status == 0)
        #expect(r.out.contains("keepalive_timeout 1m5s;"))
        #expect(r.out.contains("client_max_body_size 1m;"))
        #expect(r.out.contains("listen 127.0.0.1:8081 backlog=511 tcp_user_timeout=auto;"), "the include of conf.d/ is expanded")
    }

    @Test func badConfigurationExitsOneWithEveryErrorAndItsPlace() throws {
        let dir = NSTemporaryDirectory() + "tether-cli-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/bad.conf"
        try """
            http {
                keepalive_timout 65;
                server {
                    listen 127.0.0.1:8080;
                    location / { proxy_pass http://missing; }
                }
            }
            """.write(toFile: file, atomically: true, encoding: .utf8)
        let r = try runTether(["-t", "-c", file])
        #expect(r.status == 1)
        #expect(r.err.contains("tether: [emerg] \(file):2: unknown directive \"keepalive_timout\", did you mean \"keepalive_timeout\"?"))
        #expect(r.err.contains("tether: [emerg] \(file):5: unknown upstream \"missing\" in \"proxy_pass\" directive"))
        #expect(r.err.contains("tether: configuration file \(file) test failed"))
        // Running (not only testing) a bad file fails the same way.
        #expect(try runTether(["-c", file]).status == 1)
    }

    @Test func missingFileExitsOne() throws {
        let r = try runTether(["-t", "-c", "/nonexistent/tether.conf"])
        #expect(r.status == 1)
        #expect(r.err.contains("open() \"/nonexistent/tether.conf\" failed (2: No such file or directory)"))
    }

    @Test func versionAndHelp() throws {
        #expect(try runTether(["-v"]).out.hasPrefix("tether version: tether/"))
        let help = try runTether(["--help"])
        for flag in ["-c <file>", "-t", "-T", "-v", "-V"] { #expect(help.out.contains(flag), "\(flag) in --help") }
    }

    /// What OpenSSL refuses is found by `tether -t`, at the directive's line.
    @Test func tlsMistakesAreFileLineErrorsAtTest() throws {
        let dir = NSTemporaryDirectory() + "tether-cli-tls-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/tls.conf"
        try """
            http {
                server {
                    listen 127.0.0.1:8443 ssl;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("a.test.key"));
                }
                server {
                    listen 127.0.0.1:8444 ssl;
                    ssl_certificate \(TestPKI.path("localhost.pem"));
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    ssl_ciphers NO-SUCH-CIPHER;
                }
                server {
                    listen 127.0.0.1:8445 ssl;
                    ssl_certificate missing.pem;
                    ssl_certificate_key \(TestPKI.path("localhost.key"));
                    location / {
                        proxy_pass https://127.0.0.1:9443;
                        proxy_ssl_trusted_certificate /nonexistent/ca.pem;
                    }
                }
            }
            """.write(toFile: file, atomically: true, encoding: .utf8)
        let r = try runTether(["-t", "-c", file])
        #expect(r.status == 1)
        #expect(r.err.contains("tether: [emerg] \(file):5: certificate key \"\(TestPKI.path("a.test.key"))\" does not match certificate \"\(TestPKI.path("localhost.pem"))\""), "\(r.err)")
        #expect(r.err.contains("tether: [emerg] \(file):11: no cipher in \"ssl_ciphers NO-SUCH-CIPHER\" is known to OpenSSL"))
        #expect(r.err.contains("tether: [emerg] \(file):15: cannot load certificate \"\(dir)/missing.pem\": No such file or directory"), "relative to the configuration's folder")
        #expect(r.err.contains("tether: [emerg] \(file):19: cannot load trusted certificate \"/nonexistent/ca.pem\": No such file or directory"))
        #expect(r.err.contains("test failed"))
        // Starting with it fails the same way, before listening.
        let start = try runTether(["-c", file], cwd: dir)
        #expect(start.status == 1)
        #expect(start.err.contains("tether: [emerg] \(file):5: certificate key \"\(TestPKI.path("a.test.key"))\" does not match certificate \"\(TestPKI.path("localhost.pem"))\""), "\(start.err)")
    }
}
