#if canImport(Glibc)
import Glibc
#endif
import TetherConfig
import TetherHTTP

/// What `$variables` expand to for a request on Tether's own loop, while its head is parsed
/// (the head's bytes are valid during the handler's call only, and so is this value). Written
/// straight into the sink, without a `String` per request.
///
/// Variables that describe the answer (`$status`, `$bytes_sent`, `$upstream_*`, `$request_time`,
/// `$sent_http_*`) are empty here: nothing of the answer exists when the request head is written
/// (the access log takes them from the answer: `LoopAccessLog`).
///
/// The head's layout is lent through a pointer (`with`), not copied: a copy of a layout retains
/// its arrays, and releases them again, for every request.
struct ClientVariables: VariableSource {
    let layout: UnsafePointer<HeadLayout>
    let bytes: UnsafeRawBufferPointer
    unowned(unsafe) let connection: ClientConnection
    let route: CompiledLocation
    /// The server block's first name: `$server_name`, and `$host` without a Host.
    let serverName: [UInt8]

    static let xForwardedFor = Array("x-forwarded-for".utf8)

    /// Runs `body` with the variables of the request whose layout is `head` and head bytes `bytes`.
    @inline(__always)
    static func with<R>(head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection, route: CompiledLocation,
                        serverName: [UInt8], _ body: (ClientVariables) -> R) -> R {
        withUnsafePointer(to: head) { body(ClientVariables(layout: $0, bytes: bytes, connection: connection, route: route, serverName: serverName)) }
    }

    func writeVariable<S: HeadSink & ~Copyable>(_ v: Variable, into out: inout S) {
        let h = layout
        switch v {
        case .host:
            if h.pointee.hostStart >= 0 {
                Self.putLowercased(UnsafeRawBufferPointer(rebasing: bytes[h.pointee.hostStart..<h.pointee.hostEnd]), into: &out)
            } else {
                out.put(serverName)
            }
        case .remoteAddr: connection.writeAddress(peer: true, port: false, into: &out)
        case .remotePort: connection.writeAddress(peer: true, port: true, into: &out)
        case .serverPort: connection.writeAddress(peer: false, port: true, into: &out)
        case .scheme: if connection.tls != nil { out.put("https") } else { out.put("http") }
        case .https: if connection.tls != nil { out.put("on") }
        case .http2: if connection.isStream { out.put(connection.tls != nil ? "h2" : "h2c") }
        case .sslProtocol: if let t = connection.tls { out.put(string: t.version) }
        case .sslCipher: if let t = connection.tls { out.put(string: t.cipher) }
        case .sslServerName: if let n = connection.tls?.serverName { out.put(string: n) }
        case .sslSessionReused: if let t = connection.tls { out.put(t.resumed ? "r" : ".") }
        case .requestURI: out.put(UnsafeRawBufferPointer(rebasing: bytes[h.pointee.targetStart..<h.pointee.targetEnd]))
        case .uri:
            if let uri = h.pointee.path.uri { out.put(uri) } else { out.put(UnsafeRawBufferPointer(rebasing: bytes[h.pointee.pathStart..<h.pointee.pathEnd])) }
        case .args:
            if h.pointee.pathEnd < h.pointee.targetEnd { out.put(UnsafeRawBufferPointer(rebasing: bytes[(h.pointee.pathEnd + 1)..<h.pointee.targetEnd])) }
        case .requestMethod: out.put(UnsafeRawBufferPointer(rebasing: bytes[0..<h.pointee.methodEnd]))
        case .request:
            out.put(UnsafeRawBufferPointer(rebasing: bytes[0..<h.pointee.targetEnd]))
            if connection.isStream { return out.put(" HTTP/2.0") }
            out.put(" HTTP/1.")
            out.putDecimal(h.pointee.minorVersion)
        case .proxyAddXForwardedFor:
            if let i = h.pointee.index(named: Self.xForwardedFor, in: bytes) {
                let f = h.pointee.headers[i]
                out.put(UnsafeRawBufferPointer(rebasing: bytes[Int(f.valueStart)..<Int(f.valueEnd)]))
                out.put(", ")
            }
            connection.writeAddress(peer: true, port: false, into: &out)
        case .proxyHost:
            if case .proxy(let p) = route.action { out.put(string: p.proxyHost) }
        case .requestID:
            connection.writeRequestID(into: &out)
        case .serverName: out.put(serverName)
        case .serverProtocol:
            if connection.isStream { return out.put("HTTP/2.0") }
            out.put("HTTP/1.")
            out.putDecimal(h.pointee.minorVersion)
        case .timeLocal: out.put(connection.dateCache.localTime)
        case .timeISO8601: out.put(connection.dateCache.iso8601)
        case .msec:
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            out.putSeconds(milliseconds: Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec / 1_000_000))
        case .remoteUser: out.put("-")
        case .connection: out.putDecimal(UInt(bitPattern: ObjectIdentifier(connection).hashValue) % 1_000_000_000)
        case .connectionRequests: out.putDecimal(connection.state.requests)
        case .sslClientVerify:
            guard let t = connection.tls else { break }
            switch t.clientCertificate {
            case .none: out.put("NONE")
            case .verified: out.put("SUCCESS")
            case .failed(let reason, _): out.put("FAILED:"); out.put(Array(reason.utf8))
            }
        case .sslClientSDN: if let b = connection.tls?.peerFact(.subject) { out.put(b) }
        case .sslClientIDN: if let b = connection.tls?.peerFact(.issuer) { out.put(b) }
        case .sslClientSerial: if let b = connection.tls?.peerFact(.serial) { out.put(b) }
        case .sslClientFingerprint: if let b = connection.tls?.peerFact(.fingerprint) { out.put(b) }
        case .sslClientEscapedCert:
            if let pem = connection.tls?.peerFact(.pem) {
                let hex = Array("0123456789ABCDEF".utf8)
                var escaped: [UInt8] = []
                for c in pem {
                    if (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2D || c == 0x2E || c == 0x5F || c == 0x7E {
                        escaped.append(c)
                    } else {
                        escaped += [UInt8(ascii: "%"), hex[Int(c >> 4)], hex[Int(c & 15)]]
                    }
                }
                out.put(escaped)
            }
        case .capture(let n): writeCapture(n, into: &out)
        case .namedCapture(let name): if let n = route.location?.regex?.names[name] { writeCapture(n, into: &out) }
        case .proxyProtocolAddr: connection.proxied?.source?.writeText(into: &out)
        case .proxyProtocolPort: if let a = connection.proxied?.source { out.putDecimal(Int(a.port)) }
        case .proxyProtocolServerAddr: connection.proxied?.destination?.writeText(into: &out)
        case .proxyProtocolServerPort: if let a = connection.proxied?.destination { out.putDecimal(Int(a.port)) }
        case .realipRemoteAddr: connection.writeAddress(peer: true, port: false, own: true, into: &out)
        case .realipRemotePort: connection.writeAddress(peer: true, port: true, own: true, into: &out)
        case .httpHeader(let name):
            if let f = Self.field(named: name, in: h.pointee, bytes) {
                out.put(UnsafeRawBufferPointer(rebasing: bytes[Int(f.valueStart)..<Int(f.valueEnd)]))
            }
        case .status, .bodyBytesSent, .bytesSent, .requestTime, .upstreamAddr, .upstreamStatus, .upstreamConnectTime,
             .upstreamResponseTime, .upstreamHeaderTime, .upstreamReused, .sentHTTPHeader:
            break
        }
    }

    /// Group `n` of the regex location that matched this request (nothing if none did).
    func writeCapture<S: HeadSink & ~Copyable>(_ n: Int, into out: inout S) {
        guard let r = connection.lastRegexMatches?.group(n, of: route) else { return }
        CompiledServer.withMatchedPath(layout.pointee, bytes) { p in
            if r.upperBound <= p.count { out.put(UnsafeRawBufferPointer(rebasing: p[r])) }
        }
    }

    /// The first header whose name is `name` of `$http_name` (`_` for `-`, any case).
    static func field(named name: String, in h: HeadLayout, _ p: UnsafeRawBufferPointer) -> HeaderField? {
        let n = name.utf8
        for f in h.headers where Int(f.nameEnd - f.lineStart) == n.count {
            var i = Int(f.lineStart)
            var same = true
            for c in n {
                let want = c == UInt8(ascii: "_") ? UInt8(ascii: "-") : ASCII.lower(c)
                if ASCII.lower(p[i]) != want { same = false; break }
                i += 1
            }
            if same { return f }
        }
        return nil
    }

    /// Host names compare and go on in lowercase (as nginx's `$host`).
    static func putLowercased<S: HeadSink & ~Copyable>(_ b: UnsafeRawBufferPointer, into out: inout S) {
        guard b.contains(where: { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) else { return out.put(b) }
        withUnsafeTemporaryAllocation(byteCount: 64, alignment: 1) { scratch in
            var i = 0
            while i < b.count {
                let n = min(64, b.count - i)
                for k in 0..<n { scratch[k] = ASCII.lower(b[i + k]) }
                out.put(UnsafeRawBufferPointer(rebasing: scratch[0..<n]))
                i += n
            }
        }
    }
}
