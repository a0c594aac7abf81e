import Testing
@testable import TetherCore
import TetherHTTP

@Suite struct HeadParserTests {
    func parse(_ text: String, kind: HeadParser.Kind = .request, line: Int = 8192, head: Int = 32768) -> ParsedHeadOutcome {
        var storage: [HeaderField] = []
        return HeadParser.parse(Array(text.utf8), kind: kind, limits: .init(lineLimit: line, headLimit: head), headers: &storage)
    }

    func complete(_ text: String, kind: HeadParser.Kind = .request) throws -> (ParsedHead, Int) {
        guard case .complete(let h, let n) = parse(text, kind: kind) else { throw HeadError(status: 0, reason: "not complete: \(parse(text, kind: kind))") }
        return (h, n)
    }

    @Test func requestLineHeadersAndFraming() throws {
        let text = "POST /a/b?c=d HTTP/1.1\r\nHost: Example.com\r\nContent-Length: 12\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nExpect: 100-continue\r\n\r\nbody"
        let (h, consumed) = try complete(text)
        #expect(consumed == text.utf8.count - 4)
        #expect(h.method == "POST" && h.target == "/a/b?c=d" && h.minorVersion == 1)
        #expect(h.contentLength == 12 && !h.chunked)
        #expect(h.connectionKeepAlive && !h.connectionClose)
        #expect(h.expectContinue)
        #expect(h.headers.count == 5)
        #expect(h.headers[0].kind == .host && h.value(h.headers[0]) == "Example.com")
        #expect(h.headers[3].droppedByConnection, "X-Hop is named by Connection")
        #expect(!h.isIdempotent)
    }

    @Test func leadingEmptyLinesAreSkipped() throws {
        let (h, n) = try complete("\r\n\r\nGET / HTTP/1.0\r\n\r\n")
        #expect(h.method == "GET" && h.minorVersion == 0)
        #expect(n == 22)
    }

    @Test func incompleteUntilTheBlankLine() {
        for cut in ["GET", "GET / HTTP/1.1\r", "GET / HTTP/1.1\r\nHost: a\r\n", "GET / HTTP/1.1\r\nHost: a\r\n\r"] {
            guard case .incomplete = parse(cut) else { Issue.record("\(cut.debugDescription) should be incomplete"); continue }
        }
    }

    @Test(arguments: [
        ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
        ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\u{0}\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\u{7f}\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n: a\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
        ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
        ("GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
        ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        ("GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
        ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ] as [(String, Int)])
    func refusedRequests(text: String, status: Int) {
        guard case .error(let e) = parse(text) else { Issue.record("accepted: \(text.debugDescription)"); return }
        #expect(e.status == status, "\(e.reason)")
    }

    @Test func limits() {
        let long = "GET /" + String(repeating: "a", count: 100) + " HTTP/1.1\r\nHost: a\r\n\r\n"
        guard case .error(let e1) = parse(long, line: 64, head: 1024) else { Issue.record("long line accepted"); return }
        #expect(e1.status == 414)
        let big = "GET / HTTP/1.1\r\nHost: a\r\nX: " + String(repeating: "b", count: 100) + "\r\n\r\n"
        guard case .error(let e2) = parse(big, line: 64, head: 1024) else { Issue.record("long header accepted"); return }
        #expect(e2.status == 431)
        let many = "GET / HTTP/1.1\r\nHost: a\r\n" + String(repeating: "X: 1234567890\r\n", count: 20) + "\r\n"
        guard case .error(let e3) = parse(many, line: 64, head: 200) else { Issue.record("big head accepted"); return }
        #expect(e3.status == 431)
        // An incomplete head already past the limit is refused without waiting for more.
        guard case .error(let e4) = parse("GET / HTTP/1.1\r\nHost: a\r\nX: " + String(repeating: "c", count: 300), line: 64, head: 1024) else {
            Issue.record("incomplete long line not refused"); return
        }
        #expect(e4.status == 431)
    }

    @Test func responses() throws {
        let (r, _) = try complete("HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=99\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", kind: .response)
        #expect(r.status == 200 && r.chunked && r.connectionClose)
        #expect(r.keepAliveTimeout == 5 && r.keepAliveMax == 99)
        let (e, _) = try complete("HTTP/1.0 204\r\n\r\n", kind: .response)
        #expect(e.status == 204 && e.minorVersion == 0)
        for bad in ["HTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 2000 OK\r\n\r\n", "HTTP/1.1 20 OK\r\n\r\n", "HTTP/2 200\r\n\r\n",
                    "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"] {
            guard case .error(let err) = parse(bad, kind: .response) else { Issue.record("accepted \(bad.debugDescription)"); continue }
            #expect(err.status == 502)
        }
    }

    @Test func tokenBytesAreRFC9110TChars() {
        let tchar = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~".utf8)
        for c in 0...255 { #expect(ASCII.isToken(UInt8(c)) == tchar.contains(UInt8(c)), "byte \(c)") }
    }

    @Test func headerValuesAreTrimmedAndMayCarryObsText() throws {
        var b: [UInt8] = []
        b.put("GET / HTTP/1.1\r\nHost: a\r\nX-A:\t a b \t\r\nX-B:\r\nX-C: caf")
        b.put([0xC3, 0xA9])
        b.put("\r\nX-D: abc def          \r\nX-E:         \r\nX-F: Wed, 25 Nov 2026 16:30:00 GMT  \r\n\r\n")
        var storage: [HeaderField] = []
        guard case .complete(let h, let n) = HeadParser.parse(b, kind: .request, limits: .init(lineLimit: 8192, headLimit: 32768), headers: &storage) else {
            Issue.record("refused"); return
        }
        #expect(n == b.count)
        #expect(h.headers.count == 7)
        #expect(h.value(named: "x-d") == "abc def")
        #expect(h.value(named: "x-e") == "")
        #expect(h.value(named: "x-f") == "Wed, 25 Nov 2026 16:30:00 GMT")
        #expect(h.value(named: "x-a") == "a b")
        #expect(h.value(named: "x-b") == "")
        #expect(h.value(named: "x-c") == "café")
    }

    /// Every byte value at every place of a long header value: accepted exactly when RFC 9110
    /// allows it in a field value (visible, obs-text, space, tab), and the value is trimmed.
    @Test func everyByteAtEveryPlaceOfAValue() {
        var storage: [HeaderField] = []
        for byte in 0...255 {
            let c = UInt8(byte)
            let allowed = c == 0x09 || (c >= 0x20 && c != 0x7F)
            for place in 0..<20 {
                var value = Array(repeating: UInt8(ascii: "v"), count: 20)
                value[place] = c
                var b: [UInt8] = []
                b.put("GET / HTTP/1.1\r\nHost: a\r\nX: ")
                b.put(value)
                b.put("\r\n\r\n")
                let outcome = HeadParser.parse(b, kind: .request, limits: .init(lineLimit: 8192, headLimit: 32768), headers: &storage)
                switch outcome {
                case .complete(let h, _):
                    #expect(allowed, "byte \(byte) at \(place) accepted")
                    var trimmed = value[...]
                    while let f = trimmed.first, f == 0x20 || f == 0x09 { trimmed.removeFirst() }
                    while let l = trimmed.last, l == 0x20 || l == 0x09 { trimmed.removeLast() }
                    let x = h.headers[1]
                    let got = Array(h.bytes[Int(x.valueStart)..<Int(x.valueEnd)])
                    #expect(got == Array(trimmed), "byte \(byte) at \(place)")
                case .error:
                    // A CR followed by "v" is a bare CR; a LF a bare LF: refused as well.
                    #expect(!allowed, "byte \(byte) at \(place) refused")
                case .incomplete:
                    Issue.record("byte \(byte) at \(place): incomplete")
                }
            }
        }
    }

    @Test func idempotentMethods() throws {
        for (m, idem) in [("GET", true), ("HEAD", true), ("PUT", true), ("DELETE", true), ("OPTIONS", true), ("TRACE", true), ("POST", false), ("PATCH", false)] {
            let (h, _) = try complete("\(m) / HTTP/1.1\r\nHost: a\r\n\r\n")
            #expect(h.isIdempotent == idem, "\(m)")
        }
    }

    /// Random bytes and random cuts of valid heads give an outcome, never a crash.
    @Test func randomInputNeverCrashes() {
        var seed: UInt64 = 7
        func next() -> UInt64 { seed = seed &* 6364136223846793005 &+ 1442695040888963407; return seed >> 33 }
        let sample = Array("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close, X\r\nX: y\r\n\r\n".utf8)
        let alphabet = Array("\r\n :,\tHTP/1.0GETchunked-ContentLength\u{0}\u{7f}".utf8)
        var outcomes = 0
        for _ in 0..<5000 {
            var b = sample
            for _ in 0..<Int(next() % 5 + 1) {
                let i = Int(next() % UInt64(b.count))
                b[i] = alphabet[Int(next() % UInt64(alphabet.count))]
            }
            b = Array(b[0..<Int(next() % UInt64(b.count + 1))])
            var storage: [HeaderField] = []
            for kind in [HeadParser.Kind.request, .response] {
                var buf: [UInt8] = []
                buf.put(b)
                switch HeadParser.parse(buf, kind: kind, limits: .init(lineLimit: 64, headLimit: 256), headers: &storage) {
                case .incomplete, .error: outcomes += 1
                case .complete(let h, let n):
                    #expect(n <= b.count && h.bytes.count <= n)
                    outcomes += 1
                }
            }
        }
        #expect(outcomes == 10_000)
    }

    /// The parser reads header lines and the first line a word at a time. Random lines (tokens,
    /// spaces, tabs, CR, LF, DEL, NUL, obs-text, colons) at every alignment get the outcome and
    /// the value a byte-by-byte reading of RFC 9112 gives: a complete head with the value's
    /// bytes, trailing spaces and tabs trimmed, or an error, or incomplete when cut.
    @Test func wordAtATimeScanningAgreesWithAByteByByteReading() {
        var seed: UInt64 = 11
        func next() -> UInt64 { seed = seed &* 6364136223846793005 &+ 1442695040888963407; return seed >> 33 }
        let pieces: [[UInt8]] = ["a", "Z", "-", "9", " ", " ", "\t", ":", "\r", "\n", "\r\n", "\u{7f}", "\u{0}", "\u{1f}", "x-long-value/1.2;q=0.5"].map { Array($0.utf8) } + [[0x80], [0xFF], [0xA0]]
        // The reference: what one header line `name: value` says, or nil where it is invalid.
        func reference(_ line: [UInt8]) -> [UInt8]? {
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > 0,
                  line[..<colon].allSatisfy(ASCII.isToken) else { return nil }
            var value = Array(line[(colon + 1)...])
            guard value.allSatisfy(ASCII.isFieldByte) else { return nil }
            while let f = value.first, f == 0x20 || f == 0x09 { value.removeFirst() }
            while let l = value.last, l == 0x20 || l == 0x09 { value.removeLast() }
            return value
        }
        var checked = 0
        for round in 0..<20_000 {
            var line = Array("X-\(round % 7):".utf8)
            for _ in 0..<Int(next() % 12) { line += pieces[Int(next() % UInt64(pieces.count))] }
            if next() % 4 == 0 { line.remove(at: Int(next() % UInt64(line.count))) }
            let padding = Array(repeating: UInt8(ascii: "a"), count: Int(next() % 9))
            let text = Array("GET /\(String(decoding: padding, as: UTF8.self)) HTTP/1.1\r\n".utf8) + line + Array("\r\nHost: h\r\n\r\n".utf8)
            var storage: [HeaderField] = []
            let outcome = HeadParser.parse(text, kind: .request, limits: .init(lineLimit: 8192, headLimit: 32768), headers: &storage)
            // A line with a CR or LF in it is two lines, or a bare CR or LF: not compared here.
            if line.contains(0x0D) || line.contains(0x0A) { continue }
            let expected = reference(line)
            switch outcome {
            case .complete(let h, _):
                guard let expected else { Issue.record("accepted \(line)"); continue }
                #expect(h.headers.count == 2 && Array(h.bytes[Int(h.headers[0].valueStart)..<Int(h.headers[0].valueEnd)]) == expected, "\(line)")
                checked += 1
            case .error:
                if let expected { Issue.record("refused \(line), a valid line with value \(expected)") }
            case .incomplete:
                Issue.record("incomplete: \(line)")
            }
        }
        #expect(checked > 4_000)
    }

    /// Header names are classified a word at a time: every name Tether acts on, in any case, and
    /// names one byte off (a letter, "-" against "_", a longer or shorter name) that are other.
    @Test func headerNamesAreClassifiedInAnyCaseAndOnlyExactly() {
        let kinds: [(String, HeaderKind)] = [
            ("te", .te), ("host", .host), ("expect", .expect), ("upgrade", .upgrade), ("trailer", .trailer),
            ("connection", .connection), ("keep-alive", .keepAlive), ("content-length", .contentLength),
            ("http2-settings", .http2Settings), ("x-forwarded-for", .xForwardedFor),
            ("proxy-connection", .proxyConnection), ("transfer-encoding", .transferEncoding),
        ]
        func kind(of name: String) -> HeaderKind? {
            var storage: [HeaderField] = []
            // (Transfer-Encoding must name chunked in a request that is parsed to its end.)
            let value = name.lowercased() == "transfer-encoding" ? "chunked" : "1"
            let text = Array("GET / HTTP/1.1\r\nHost: h\r\n\(name): \(value)\r\n\r\n".utf8)
            guard case .complete(let h, _) = HeadParser.parse(text, kind: .request, limits: .init(lineLimit: 8192, headLimit: 32768), headers: &storage),
                  h.headers.count == 2 else { return nil }
            return h.headers[1].kind
        }
        for (name, k) in kinds where k != .host {
            #expect(kind(of: name) == k, "\(name)")
            #expect(kind(of: name.uppercased()) == k, "\(name.uppercased())")
            let mixed = String(name.enumerated().map { $0.offset % 2 == 0 ? Character($0.element.uppercased()) : $0.element })
            #expect(kind(of: mixed) == k, "\(mixed)")
            // One byte changed at each position, and one more or one fewer.
            for i in 0..<name.utf8.count {
                var bytes = Array(name.utf8)
                bytes[i] = bytes[i] == UInt8(ascii: "-") ? UInt8(ascii: "_") : bytes[i] == UInt8(ascii: "z") ? UInt8(ascii: "y") : bytes[i] + 1
                let near = String(decoding: bytes, as: UTF8.self)
                #expect(kind(of: near) == .other, "\(near)")
            }
            #expect(kind(of: name + "s") == .other && kind(of: String(name.dropLast())) == .other)
        }
        #expect(kind(of: "CONTENT-LENGTH") == .contentLength && kind(of: "Content_Length") == .other)
    }
}

/// The canonical chunk-size lines Tether writes (the decoder's own tests are in TetherHTTPTests).
@Suite struct ChunkedWritingTests {
    @Test func canonicalSizeLines() {
        for (n, text) in [(Int64(1), "1"), (0xe3, "e3"), (0x10, "10"), (0xABCDEF, "abcdef"), (1 << 59, "800000000000000")] {
            var b: [UInt8] = []
            ChunkedDecoder.writeSize(n, into: &b)
            #expect(String(decoding: b, as: UTF8.self) == text + "\r\n")
        }
    }
}
