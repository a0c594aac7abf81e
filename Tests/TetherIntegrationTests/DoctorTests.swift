import Foundation
import Testing

@Suite struct DoctorTests {
    /// A fake /proc with the given sysctls and TCP table lines.
    func fakeProc(_ sysctls: [String: String], tcp: [String] = []) throws -> String {
        let root = NSTemporaryDirectory() + "tether-proc-\(UUID().uuidString)"
        for (name, value) in sysctls {
            let path = root + "/sys/" + name.split(separator: ".").joined(separator: "/")
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try (value + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        }
        try FileManager.default.createDirectory(atPath: root + "/net", withIntermediateDirectories: true)
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        try (header + tcp.joined(separator: "\n") + "\n").write(toFile: root + "/net/tcp", atomically: true, encoding: .utf8)
        return root
    }

    func config() throws -> String {
        let file = NSTemporaryDirectory() + "tether-doctor-\(UUID().uuidString).conf"
        try """
            worker_processes 2;
            events { worker_connections 1000; }
            http {
                upstream app { server 127.0.0.1:9000; }
                server { listen 127.0.0.1:8080 backlog=1024; location / { proxy_pass http://app; } }
            }
            """.write(toFile: file, atomically: true, encoding: .utf8)
        return file
    }

    @Test func goodHostPasses() throws {
        let proc = try fakeProc([
            "net.ipv4.tcp_keepalive_time": "300", "net.ipv4.tcp_keepalive_intvl": "10", "net.ipv4.tcp_keepalive_probes": "3",
            "net.core.somaxconn": "4096", "net.ipv4.ip_local_port_range": "10240\t65535",
            "net.ipv4.tcp_tw_reuse": "1", "net.ipv4.tcp_fin_timeout": "30",
        ])
        defer { try? FileManager.default.removeItem(atPath: proc) }
        let conf = try config()
        defer { try? FileManager.default.removeItem(atPath: conf) }
        let r = try runTether(["doctor", "-c", conf, "--proc", proc, "--open-files", "65536"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        let lines = r.out.split(separator: "\n")
        #expect(lines.count == 7)
        #expect(lines.allSatisfy { $0.hasPrefix("[ok]") }, "\(r.out)")
        #expect(r.out.contains("net.core.somaxconn = 4096 (largest listen backlog 1024)"))
    }

    @Test func badHostIsTold() throws {
        let proc = try fakeProc([
            "net.ipv4.tcp_keepalive_time": "7200", "net.ipv4.tcp_keepalive_intvl": "75", "net.ipv4.tcp_keepalive_probes": "9",
            "net.core.somaxconn": "128", "net.ipv4.ip_local_port_range": "60000 60999",
            "net.ipv4.tcp_tw_reuse": "0", "net.ipv4.tcp_fin_timeout": "120", "net.ipv4.tcp_tw_recycle": "0",
        ], tcp: [
            // 127.0.0.1:8080 <- 127.0.0.1:40000 in CLOSE_WAIT (08); 127.0.0.1:50000 -> 127.0.0.1:9000 in TIME_WAIT (06)
            "   0: 0100007F:1F90 0100007F:9C40 08 00000000:00000000 00:00000000 00000000     0        0 1",
            "   1: 0100007F:C350 0100007F:2328 06 00000000:00000000 00:00000000 00000000     0        0 0",
        ])
        defer { try? FileManager.default.removeItem(atPath: proc) }
        let conf = try config()
        defer { try? FileManager.default.removeItem(atPath: conf) }
        let r = try runTether(["doctor", "-c", conf, "--proc", proc, "--open-files", "1024"])
        #expect(r.status == 1, "critical: too few open files")
        for expected in [
            "[warn]       net.ipv4.tcp_keepalive_time/intvl/probes = 7200/75/9 (a dead peer is found after 2h11m15s); no upstream sets tcp_keepalive",
            "[warn]       net.core.somaxconn = 128: the kernel caps \"listen ... backlog=1024\" at it",
            "[warn]       net.ipv4.ip_local_port_range = 60000 60999: 1000 ports per upstream server, but 2 loops x worker_connections 1000 can need 2000",
            "[warn]       net.ipv4.tcp_tw_reuse = 0 (off)",
            "[warn]       net.ipv4.tcp_fin_timeout = 120",
            "[warn]       net.ipv4.tcp_tw_recycle exists on this kernel",
            "[critical]   open files limit = 1024: 2 loops x worker_connections 1000 x 2 (client and upstream) needs 4064",
            "[warn]       sockets: 1 in TIME_WAIT, 1 in CLOSE_WAIT",
        ] {
            #expect(r.out.contains(expected), "missing: \(expected)\n\(r.out)")
        }
    }
}
