import Testing
@testable import TetherConfig

@Suite struct KeepaliveConfigTests {
    @Test func listenAndUpstreamKeepaliveForms() throws {
        let c = try load("""
            http {
                upstream a {
                    server 127.0.0.1:1 tcp_keepalive=10s:2:3 tcp_user_timeout=5s;
                    server 127.0.0.1:2;
                    tcp_keepalive 30m::10;
                    tcp_user_timeout off;
                }
                server {
                    listen 127.0.0.1:8080 so_keepalive=on;
                    listen 127.0.0.1:8081 so_keepalive=off tcp_user_timeout=90s;
                    listen 127.0.0.1:8082 so_keepalive=::5;
                    proxy_socket_keepalive on;
                    location / { proxy_pass http://a; }
                }
            }
            """)
        let u = try #require(c.upstream(named: "a"))
        #expect(u.servers[0].tcpKeepalive == TCPKeepalive(enabled: true, idle: 10, interval: 2, count: 3))
        #expect(u.servers[0].tcpUserTimeout == .milliseconds(5_000))
        #expect(u.servers[1].tcpKeepalive == nil)
        #expect(u.tcpKeepalive == TCPKeepalive(enabled: true, idle: 1800, interval: nil, count: 10))
        #expect(u.tcpUserTimeout == .off)
        let l = c.servers[0].listens
        #expect(l[0].soKeepalive == TCPKeepalive(enabled: true) && l[0].tcpUserTimeout == .auto)
        #expect(l[1].soKeepalive == .off && l[1].tcpUserTimeout == .milliseconds(90_000))
        #expect(l[2].soKeepalive == TCPKeepalive(enabled: true, count: 5))
        #expect(c.servers[0].locations[0].settings.proxySocketKeepalive)
        // -T prints what reloads to the same values.
        let text = c.effectiveText()
        #expect(text.contains("tcp_keepalive 30m::10;"))
        #expect(text.contains("so_keepalive=::5"))
        #expect(try load(text).upstream(named: "a")?.tcpKeepalive == u.tcpKeepalive)
    }

    @Test(arguments: [
        ("http { server { listen 8080 so_keepalive=0:1:1; } }", "t.conf:1: invalid idle time \"0\" in so_keepalive value \"0:1:1\", it must be from 1s to 32767s in whole seconds"),
        ("http { server { listen 8080 so_keepalive=1:32768:1; } }", "t.conf:1: invalid probe interval \"32768\" in so_keepalive value \"1:32768:1\", it must be from 1s to 32767s in whole seconds"),
        ("http { server { listen 8080 so_keepalive=1:1:128; } }", "t.conf:1: invalid probe count \"128\" in so_keepalive value \"1:1:128\", it must be from 1 to 127"),
        ("http { server { listen 8080 so_keepalive=1:1; } }", "t.conf:1: invalid so_keepalive value \"1:1\", it must be \"on\", \"off\" or \"[IDLE]:[INTVL]:[CNT]\""),
        ("http { server { listen 8080 so_keepalive=500ms::; } }", "t.conf:1: invalid idle time \"500ms\" in so_keepalive value \"500ms::\", it must be from 1s to 32767s in whole seconds"),
        ("http {\n upstream u {\n  server 127.0.0.1:1;\n  tcp_keepalive yes;\n }\n}", "t.conf:4: invalid \"tcp_keepalive\" value \"yes\", it must be \"on\", \"off\" or \"[IDLE]:[INTVL]:[CNT]\""),
        ("http { upstream u { server 127.0.0.1:1; tcp_user_timeout soon; } }", "t.conf:1: invalid \"tcp_user_timeout\" value \"soon\", it must be a time, \"auto\" or \"off\""),
        ("http { upstream u { server 127.0.0.1:1 tcp_keepalive=1:1:0; } }", "t.conf:1: invalid probe count \"0\" in \"tcp_keepalive=\" value \"1:1:0\", it must be from 1 to 127"),
    ] as [(String, String)])
    func rangeErrors(text: String, expected: String) {
        guard case .failure(let e) = Configuration.parse(text, file: "t.conf", resolver: offlineResolver) else { Issue.record("loaded"); return }
        #expect(e.errors.map(\.description) == [expected])
    }
}
