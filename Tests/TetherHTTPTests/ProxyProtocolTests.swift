#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import TetherHTTP

@Suite struct ProxyProtocolTests {
    static func parse(_ b: [UInt8]) -> ProxyProtocol.Outcome { b.withUnsafeBytes { ProxyProtocol.parse($0) } }
    static func text(_ a: ForwardedAddress?) -> String {
        guard let a else { return "-" }
        var out: [UInt8] = []
        a.writeText(into: &out)
        return String(decoding: out, as: UTF8.self) + ":\(a.port)"
    }
    static func v2(family: UInt8, command: UInt8 = 1, body: [UInt8]) -> [UInt8] {
        ProxyProtocol.v2Signature + [0x20 | command, family, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    /// A valid header is incomplete at every shorter prefix and complete whole; bytes after it are
    /// not its (HTTP or TLS follows).
    static func checkEverySplit(_ header: [UInt8], source: String, destination: String, version: Int) {
        for n in 0..<header.count {
            #expect(parse(Array(header[0..<n])) == .incomplete, "prefix of \(n) bytes")
        }
        let whole = parse(header + Array("GET / HTTP/1.1\r\n".utf8))
        guard case .complete(let h) = whole else { Issue.record("\(whole)"); return }
        #expect(h.length == header.count && h.version == version)
        #expect(text(h.source) == source && text(h.destination) == destination)
    }

    @Test func version1() {
        Self.checkEverySplit(Array("PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n".utf8), source: "192.0.2.1:56324",
                             destination: "198.51.100.7:443", version: 1)
        Self.checkEverySplit(Array("PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n".utf8), source: "2001:db8::1:65535",
                             destination: "2001:db8::2:0", version: 1)
        Self.checkEverySplit(Array("PROXY UNKNOWN\r\n".utf8), source: "-", destination: "-", version: 1)
        Self.checkEverySplit(Array("PROXY UNKNOWN ffff:: 1.2.3.4 1 2\r\n".utf8), source: "-", destination: "-", version: 1)
    }

    @Test func version2() {
        let tcp4: [UInt8] = [192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x01, 0xBB]
        Self.checkEverySplit(Self.v2(family: 0x11, body: tcp4), source: "192.0.2.1:56324", destination: "198.51.100.7:443", version: 2)
        // TLVs after the addresses are skipped (an ALPN and a unique ID).
        let tlvs: [UInt8] = [0x01, 0, 2, 0x68, 0x32, 0x05, 0, 4, 1, 2, 3, 4]
        Self.checkEverySplit(Self.v2(family: 0x11, body: tcp4 + tlvs), source: "192.0.2.1:56324", destination: "198.51.100.7:443", version: 2)
        var tcp6 = [UInt8](repeating: 0, count: 36)
        tcp6[0] = 0x20; tcp6[1] = 0x01; tcp6[2] = 0x0d; tcp6[3] = 0xb8; tcp6[15] = 1
        tcp6[16] = 0x20; tcp6[17] = 0x01; tcp6[18] = 0x0d; tcp6[19] = 0xb8; tcp6[31] = 2
        tcp6[32] = 0x30; tcp6[33] = 0x39; tcp6[34] = 0; tcp6[35] = 80
        Self.checkEverySplit(Self.v2(family: 0x21, body: tcp6), source: "2001:db8::1:12345", destination: "2001:db8::2:80", version: 2)
        // LOCAL (the balancer's own health check) and UNSPEC: the connection's addresses stand.
        Self.checkEverySplit(Self.v2(family: 0x11, command: 0, body: tcp4), source: "-", destination: "-", version: 2)
        Self.checkEverySplit(Self.v2(family: 0x00, body: []), source: "-", destination: "-", version: 2)
    }

    @Test(arguments: [
        "GET / HTTP/1.1\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\n",
        "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\rX",
        "PROXY TCP5 192.0.2.1 198.51.100.7 56324 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.7 56324\r\n",
        "PROXY TCP4 192.0.2.1  198.51.100.7 56324 443\r\n",
        "PROXY TCP4 2001:db8::1 198.51.100.7 56324 443\r\n",
        "PROXY TCP6 192.0.2.1 198.51.100.7 56324 443\r\n",
        "PROXY TCP4 192.0.2.256 198.51.100.7 56324 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.7 65536 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.7 0443 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.7 -1 443\r\n",
        "proxy TCP4 192.0.2.1 198.51.100.7 1 443\r\n",
    ])
    func malformedVersion1IsRefused(_ line: String) {
        guard case .invalid = Self.parse(Array(line.utf8)) else { Issue.record("accepted: \(line.debugDescription)"); return }
    }

    @Test func oversizedAndTruncatedHeadersAreRefused() {
        // A v1 line that does not end within 107 bytes.
        #expect(Self.parse(Array(("PROXY UNKNOWN " + String(repeating: "x", count: 100)).utf8)) != .incomplete)
        if case .invalid = Self.parse(Array(("PROXY UNKNOWN " + String(repeating: "x", count: 100)).utf8)) {} else { Issue.record("long v1") }
        // A v2 header announcing more than 4096 bytes is refused before its bytes arrive.
        let big = ProxyProtocol.v2Signature + [0x21, 0x11, 0x10, 0x00]
        if case .invalid = Self.parse(big) {} else { Issue.record("oversized v2") }
        // Addresses cut short, a TLV that runs past the header, version 1 in a v2 frame, an unknown command.
        let tcp4: [UInt8] = [192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x01, 0xBB]
        for bad in [Self.v2(family: 0x11, body: Array(tcp4[0..<8])), Self.v2(family: 0x11, body: tcp4 + [0x01, 0, 9, 1]),
                    Self.v2(family: 0x11, body: tcp4 + [0x01, 0]),
                    ProxyProtocol.v2Signature + [0x11, 0x11, 0, 12] + tcp4, ProxyProtocol.v2Signature + [0x22, 0x11, 0, 12] + tcp4] {
            if case .invalid = Self.parse(bad) {} else { Issue.record("accepted \(bad)") }
        }
        // Every byte of a good v2 header replaced: refused or parsed, never a crash.
        let good = Self.v2(family: 0x21, body: [UInt8](repeating: 1, count: 36) + [0x01, 0, 2, 0x68, 0x32])
        for i in good.indices {
            for v: UInt8 in [0, 0x0F, 0x20, 0xFF] {
                var m = good
                m[i] = v
                _ = Self.parse(m)
            }
        }
    }

    /// What `proxy_protocol on` sends a backend reads back as it was made.
    @Test func aV2HeaderMadeHereParsesBack() throws {
        let src = try #require(Array("192.0.2.9".utf8).withUnsafeBytes { ForwardedAddress(text: $0, port: 40000) })
        let dst = try #require(Array("2001:db8::7".utf8).withUnsafeBytes { ForwardedAddress(text: $0, port: 8443) })
        for (s, d, expected) in [(src, src, "192.0.2.9:40000"), (src, dst, "::ffff:192.0.2.9:40000"), (dst, dst, "2001:db8::7:8443")] {
            let h = ProxyProtocol.v2Header(source: s, destination: d)
            guard case .complete(let parsed) = Self.parse(h) else { Issue.record("\(h)"); continue }
            #expect(Self.text(parsed.source) == expected && parsed.length == h.count)
        }
    }
}
