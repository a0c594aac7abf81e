import Testing
@testable import TetherConfig

/// Every class of configuration error, with the exact place and wording a user sees.
@Suite struct ErrorTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var text: String
        var expected: [String]
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "unknown directive with hint", text: """
            http {
                keepalive_timout 65;
            }
            """, expected: ["t.conf:2: unknown directive \"keepalive_timout\", did you mean \"keepalive_timeout\"?"]),
        Case(name: "unknown directive without hint", text: "frobnicate on;\n", expected: ["t.conf:1: unknown directive \"frobnicate\""]),
        Case(name: "not allowed here", text: """
            http {
                server {
                    proxy_pass http://127.0.0.1:9;
                }
            }
            """, expected: ["t.conf:3: \"proxy_pass\" directive is not allowed here"]),
        Case(name: "arity", text: "http {\n  keepalive_timeout;\n}\n", expected: ["t.conf:2: invalid number of arguments in \"keepalive_timeout\" directive"]),
        Case(name: "duplicate", text: "worker_processes 1;\nworker_processes 2;\n", expected: ["t.conf:2: \"worker_processes\" directive is duplicate"]),
        Case(name: "invalid time", text: "http {\n\n  keepalive_timeout 10x;\n}\n",
             expected: ["t.conf:3: invalid value \"10x\" in \"keepalive_timeout\" directive, it must be a time (for example 500ms, 30s, 1h30m)"]),
        Case(name: "time overflow", text: "http { send_timeout 99999999999999999999; }\n",
             expected: ["t.conf:1: invalid value \"99999999999999999999\" in \"send_timeout\" directive, the time is too large"]),
        Case(name: "negative count", text: "http { keepalive_requests -1; }\n",
             expected: ["t.conf:1: invalid value \"-1\" in \"keepalive_requests\" directive, it must be a number"]),
        Case(name: "invalid flag", text: "http { server_tokens yes; }\n",
             expected: ["t.conf:1: invalid value \"yes\" in \"server_tokens\" directive, it must be \"on\" or \"off\""]),
        Case(name: "invalid size", text: "http { client_max_body_size 1t; }\n",
             expected: ["t.conf:1: invalid value \"1t\" in \"client_max_body_size\" directive, it must be a size (for example 512, 8k, 1m)"]),
        Case(name: "unexpected end of file in block", text: "http {\n  server {\n", expected: ["t.conf:3: unexpected end of file, expecting \"}\""]),
        Case(name: "unexpected end of file in directive", text: "worker_processes 1", expected: ["t.conf:1: unexpected end of file, expecting \";\" or \"}\""]),
        Case(name: "unbalanced close", text: "http {\n}\n}\n", expected: ["t.conf:3: unexpected \"}\""]),
        Case(name: "stray semicolon", text: "http {\n ;\n}\n", expected: ["t.conf:2: unexpected \";\""]),
        Case(name: "block for simple directive", text: "worker_processes 1 {\n}\n", expected: ["t.conf:1: directive \"worker_processes\" is not terminated by \";\""]),
        Case(name: "simple for block directive", text: "http;\n", expected: ["t.conf:1: directive \"http\" has no opening \"{\""]),
        Case(name: "unknown upstream in proxy_pass", text: """
            http {
                server {
                    listen 127.0.0.1:8080;
                    location / {
                        proxy_pass http://backend;
                    }
                }
            }
            """, expected: ["t.conf:5: unknown upstream \"backend\" in \"proxy_pass\" directive (no \"upstream backend\" block)"]),
        Case(name: "two default servers", text: """
            http {
                server { listen 127.0.0.1:8080 default_server; }
                server { listen 127.0.0.1:8080 default_server; }
            }
            """, expected: ["t.conf:3: a duplicate default server for 127.0.0.1:8080"]),
        Case(name: "include not found", text: "http {\n    include missing.conf;\n}\n",
             expected: ["t.conf:2: open() \"./missing.conf\" failed (2: No such file or directory)"]),
        Case(name: "empty upstream", text: "http {\n upstream u {\n }\n}\n", expected: ["t.conf:2: no servers are inside upstream"]),
        Case(name: "bad listen parameter", text: "http { server { listen 8080 fast; } }\n", expected: ["t.conf:1: invalid parameter \"fast\""]),
        Case(name: "bad listen port", text: "http { server { listen 70000; } }\n", expected: ["t.conf:1: invalid port in \"70000\" of the \"listen\" directive"]),
        Case(name: "unknown variable", text: "http { proxy_set_header X-Who $whom; }\n", expected: ["t.conf:1: unknown \"whom\" variable"]),
        Case(name: "unknown log format", text: "http {\n access_log /tmp/a.log main;\n}\n", expected: ["t.conf:2: unknown log format \"main\""]),
        Case(name: "upstream with port", text: """
            http {
                upstream app { server 127.0.0.1:9000; }
                server { location / { proxy_pass http://app:80; } }
            }
            """, expected: ["t.conf:3: upstream \"app\" may not have port 80"]),
        Case(name: "every semantic error is reported", text: """
            http {
                keepalive_requests lots;
                server_tokens maybe;
                server {
                    listen 127.0.0.1:8080;
                    location / { proxy_pass http://nowhere; }
                }
            }
            """, expected: [
                "t.conf:2: invalid value \"lots\" in \"keepalive_requests\" directive, it must be a number",
                "t.conf:3: invalid value \"maybe\" in \"server_tokens\" directive, it must be \"on\" or \"off\"",
                "t.conf:6: unknown upstream \"nowhere\" in \"proxy_pass\" directive (no \"upstream nowhere\" block)",
            ]),
        Case(name: "quote must be followed by a separator", text: "pid \"a\"b;\n", expected: ["t.conf:1: unexpected \"b\""]),
        Case(name: "unterminated quote", text: "pid \"abc;\n", expected: ["t.conf:2: unexpected end of file, expecting '\"'"]),
        Case(name: "bad regex location", text: "http { server {\n location ~ ^/(a|b { return 404; } } }\n",
             expected: ["t.conf:2: pcre2_compile() failed: missing closing parenthesis in \"^/(a|b\" at \"\""]),
        Case(name: "regex location with a URI part", text: "http { server {\n location ~ ^/a { proxy_pass http://127.0.0.1:1/b; } } }\n",
             expected: ["t.conf:2: \"proxy_pass\" cannot have URI part in location given by regular expression (use captures: proxy_pass http://backend/$1;)"]),
        Case(name: "unknown capture name", text: "http { server {\n location ~ ^/(?<id>\\d+) { return 200 \"$id $name\"; } } }\n",
             expected: ["t.conf:2: unknown \"name\" variable"]),
        Case(name: "keepalive in wrong block", text: "http { keepalive 16; }\n", expected: ["t.conf:1: \"keepalive\" directive is not allowed here"]),
        Case(name: "invalid return code", text: "http { server { return 99; } }\n", expected: ["t.conf:1: invalid return code \"99\""]),
        Case(name: "proxy_next_upstream value", text: "http { proxy_next_upstream error never; }\n",
             expected: ["t.conf:1: invalid value \"never\" in \"proxy_next_upstream\" directive, it must be one of: off, error, timeout, invalid_header, http_500, http_502, http_503, http_504, http_403, http_404, http_429, non_idempotent"]),
        Case(name: "listen ssl without a certificate", text: "http {\n  server {\n    listen 8443 ssl;\n  }\n}\n",
             expected: ["t.conf:3: no \"ssl_certificate\" is defined for the \"listen ... ssl\" directive"]),
        Case(name: "ssl belongs to the address", text: "http {\n  server { listen 8443 ssl; ssl_certificate a.pem; ssl_certificate_key a.key; }\n  server {\n    listen 8443;\n  }\n}\n",
             expected: ["t.conf:4: no \"ssl_certificate\" is defined for the \"listen ... ssl\" directive"]),
        Case(name: "certificate without key", text: "http {\n  ssl_certificate a.pem;\n  server { listen 8443 ssl; }\n}\n",
             expected: ["t.conf:2: no \"ssl_certificate_key\" is defined for certificate \"a.pem\""]),
        Case(name: "unknown TLS protocol", text: "http {\n  ssl_protocols TLSv1.2 SSLv3;\n}\n",
             expected: ["t.conf:2: invalid value \"SSLv3\" in \"ssl_protocols\" directive, it must be TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3"]),
        Case(name: "session cache syntax", text: "http { ssl_session_cache shared:1m; }\n",
             expected: ["t.conf:1: invalid session cache \"shared:1m\" in \"ssl_session_cache\" directive, it must be \"off\", \"none\", \"builtin[:size]\" or \"shared:name:size\""]),
        Case(name: "ssl directive in a location", text: "http { server { location / { ssl_protocols TLSv1.3; } } }\n",
             expected: ["t.conf:1: \"ssl_protocols\" directive is not allowed here"]),
        Case(name: "h2c upgrades", text: "http {\n  server { location / {\n    proxy_allow_upgrade websocket H2C;\n  } }\n}\n",
             expected: ["t.conf:3: \"h2c\" cannot be allowed in \"proxy_allow_upgrade\" directive: an HTTP/2 upgrade would tunnel requests past the locations' rules"]),
        Case(name: "merge_slashes in a location", text: "http { server { location / { merge_slashes off; } } }\n",
             expected: ["t.conf:1: \"merge_slashes\" directive is not allowed here"]),
        Case(name: "max_conns not a number", text: "http {\n  upstream a { server 127.0.0.1:1 max_conns=x; }\n}\n",
             expected: ["t.conf:2: invalid value \"x\" in \"server\" directive, it must be a number"]),
        Case(name: "empty queue", text: "http {\n  upstream a { server 127.0.0.1:1; queue 0; }\n}\n",
             expected: ["t.conf:2: invalid value \"0\" in \"queue\" directive, it must be a number from 1 to 1048576"]),
        Case(name: "queue timeout", text: "http {\n  upstream a { server 127.0.0.1:1; queue 10 timeout=abc; }\n}\n",
             expected: ["t.conf:2: invalid value \"abc\" in \"queue\" directive, it must be a time (for example 500ms, 30s, 1h30m)"]),
        Case(name: "queue parameter", text: "http {\n  upstream a { server 127.0.0.1:1; queue 10 foo=1; }\n}\n",
             expected: ["t.conf:2: invalid parameter \"foo=1\""]),
        Case(name: "health_check uri", text: "http {\n  upstream a { server 127.0.0.1:1; health_check uri=healthz; }\n}\n",
             expected: ["t.conf:2: invalid uri \"healthz\" in \"health_check\" directive, it must start with \"/\" and have no spaces"]),
        Case(name: "health_check match", text: "http {\n  upstream a { server 127.0.0.1:1; health_check match=99; }\n}\n",
             expected: ["t.conf:2: invalid match \"99\" in \"health_check\" directive, it must be a status or a range such as 200-399"]),
        Case(name: "health_check parameter", text: "http {\n  upstream a { server 127.0.0.1:1; health_check fails; }\n}\n",
             expected: ["t.conf:2: invalid parameter \"fails\""]),
        Case(name: "health_check without proxy_pass", text: "http {\n  server { location / {\n    return 200;\n    health_check;\n  } }\n}\n",
             expected: ["t.conf:4: \"health_check\" needs \"proxy_pass\" in its location"]),
        Case(name: "two health checks", text: "http {\n  upstream a { server 127.0.0.1:1; health_check interval=2s; }\n  server { location / { proxy_pass http://a; health_check interval=1s; } }\n}\n",
             expected: ["t.conf:3: upstream \"a\" has another \"health_check\" already"]),
        Case(name: "queue outside upstream", text: "http {\n  server { queue 1; }\n}\n",
             expected: ["t.conf:2: \"queue\" directive is not allowed here"]),
        Case(name: "buffering 1", text: "http { proxy_temp_path /nonexistent/t; }\n", expected: ["t.conf:1: \"proxy_temp_path\" directory \"/nonexistent/t\" is not a directory Tether can write to"]),
        Case(name: "buffering 2", text: "http { proxy_buffer_size 32k; }\n", expected: ["t.conf:1: invalid value \"32k\" in \"proxy_buffer_size\" directive, it must be from 1k to 16k (the size of Tether's buffers)"]),
        Case(name: "buffering 3", text: "http { proxy_buffers 8 100; }\n", expected: ["t.conf:1: invalid value \"100\" in \"proxy_buffers\" directive, it must be at least 1k"]),
        Case(name: "buffering 4", text: "http { proxy_buffering maybe; }\n", expected: ["t.conf:1: invalid value \"maybe\" in \"proxy_buffering\" directive, it must be \"on\" or \"off\""]),
        Case(name: "buffering 5", text: "http { client_body_temp_path /tmp 3; }\n", expected: ["t.conf:1: invalid value \"3\" in \"client_body_temp_path\" directive, a level must be 1 or 2"]),
        Case(name: "resolve 1", text: "http { upstream u { server api.internal:80 resolve; } }\n", expected: ["t.conf:1: no resolver defined to resolve api.internal"]),
        Case(name: "resolve 2", text: "http { resolver 127.0.0.1; upstream u { server api.internal:80 resolve max_conns=4; } }\n", expected: ["t.conf:1: \"max_conns\" cannot be used with \"resolve\" (each address would need a cap of its own)"]),
        Case(name: "resolve 3", text: "http { resolver 127.0.0.1; upstream u { server api.internal:80 resolve; health_check; } }\n", expected: ["t.conf:1: \"health_check\" cannot be used in upstream \"u\", whose servers are resolved at run time (\"resolve\")"]),
        Case(name: "resolve 4", text: "http { resolver dns.example; }\n", expected: ["t.conf:1: invalid address \"dns.example\" in \"resolver\" directive, it must be a numeric IPv4 or IPv6 address with an optional port"]),
        Case(name: "resolve 5", text: "http { resolver valid=5s; }\n", expected: ["t.conf:1: no address in \"resolver\" directive"]),
        Case(name: "edge 1", text: "http { set_real_ip_from 10.0.0.0/33; }\n", expected: ["t.conf:1: invalid parameter \"10.0.0.0/33\" in \"set_real_ip_from\" directive"]),
        Case(name: "edge 2", text: "http { set_real_ip_from example.com; }\n", expected: ["t.conf:1: invalid parameter \"example.com\" in \"set_real_ip_from\" directive"]),
        Case(name: "edge 3", text: "http { real_ip_header \"X Real\"; }\n", expected: ["t.conf:1: invalid header name \"X Real\" in \"real_ip_header\" directive"]),
        Case(name: "edge 5", text: "http {\n  ssl_stapling_responder https://ocsp.example/;\n}\n", expected: ["t.conf:2: invalid URL prefix in \"https://ocsp.example/\" of \"ssl_stapling_responder\", only \"http://\" is supported"]),
        Case(name: "edge 6", text: "http { server { ssl_stapling_responder http://; } }\n", expected: ["t.conf:1: no host in \"http://\" of \"ssl_stapling_responder\""]),
        Case(name: "http2 1", text: "http { http2_recv_buffer_size 1k; }\n", expected: ["t.conf:1: invalid value \"1k\" in \"http2_recv_buffer_size\" directive, it must be at least 16k (one pool buffer)"]),
        Case(name: "http2 2", text: "http { http2_chunk_size 32k; }\n", expected: ["t.conf:1: invalid value \"32k\" in \"http2_chunk_size\" directive, it must be from 1 to 16k (the largest frame a client must take)"]),
        Case(name: "http2 3", text: "http { http2 maybe; }\n", expected: ["t.conf:1: invalid value \"maybe\" in \"http2\" directive, it must be \"on\" or \"off\""]),
        Case(name: "edge 4", text: "http { real_ip_recursive maybe; }\n", expected: ["t.conf:1: invalid value \"maybe\" in \"real_ip_recursive\" directive, it must be \"on\" or \"off\""]),
    ]

    @Test(arguments: cases)
    func reportsError(_ c: Case) {
        switch Configuration.parse(c.text, file: "t.conf", resolver: offlineResolver) {
        case .success:
            Issue.record("expected errors \(c.expected)")
        case .failure(let errors):
            #expect(errors.errors.map(\.description) == c.expected)
        }
    }
}
