import TetherConfig
import TetherHTTP
import TetherIO

extension OutboundQueue: HeadSink {
    @inline(__always)
    public mutating func put(_ bytes: UnsafeRawBufferPointer) { append(bytes) }
    public var mark: Int { queuedBytes }
}

/// A head written into one pool buffer: what does not fit is not written and `overflowed` says
/// so (a head is refused whole rather than sent cut).
struct BufferSink: HeadSink, ~Copyable {
    var buffer: IOBuffer
    private(set) var overflowed = false

    init(_ buffer: consuming IOBuffer) { self.buffer = buffer }

    /// The buffer, as written.
    consuming func take() -> IOBuffer { buffer }

    @inline(__always)
    mutating func put(_ bytes: UnsafeRawBufferPointer) {
        if buffer.append(contentsOf: bytes) < bytes.count { overflowed = true }
    }

    var mark: Int { buffer.writerIndex }

    mutating func rollback(to mark: Int) {
        buffer.truncate(toReadable: mark - buffer.readerIndex)
    }
}

/// What `$variables` expand to for one request (the connection and the exchange know).
protocol VariableSource {
    func writeVariable<S: HeadSink & ~Copyable>(_ v: Variable, into out: inout S)
}

/// The head writers, blind to the buffers under them: the request head as it goes
/// upstream and the response head as it goes to the client, from a parsed head's bytes and its
/// `HeadLayout`.
enum HeadWriter {
    /// A template with its variables expanded.
    static func template<S: HeadSink & ~Copyable, V: VariableSource>(_ t: Template, _ variables: V, into out: inout S) {
        for part in t.parts {
            switch part {
            case .literal(let s): out.put(string: s)
            case .variable(let v): variables.writeVariable(v, into: &out)
            }
        }
    }

    /// What the upstream request needs besides the client's head.
    struct UpstreamRequest {
        /// How the body goes upstream (`Content-Length` or re-framed chunks; the client's own
        /// framing lines are never copied).
        var framing: BodyFraming
        /// The protocols of `Upgrade` the location allows, as they go upstream.
        var upgradeOffer: [UInt8]?
    }

    /// The request head for the upstream: the client's header lines copied as they are, less
    /// hop-by-hop ones and those `proxy_set_header` replaces, plus the configured ones and framing.
    static func upstreamHead<S: HeadSink & ~Copyable, V: VariableSource>(
        _ h: HeadLayout, _ p: UnsafeRawBufferPointer, route: CompiledLocation, request: UpstreamRequest, variables: V, into out: inout S
    ) {
        let names = route.setHeaderNames
        var run = LineRun(start: 0, end: 0)
        if p[h.targetStart] == UInt8(ascii: "/") && !route.rewritesURI && h.minorVersion == 1 && !route.proxyHTTP10 {
            // The usual request line goes as it came: it starts the first run of lines.
            run.end = h.targetEnd + 11  // " HTTP/1.1\r\n"
        } else {
            upstreamRequestLine(h, p, route: route, variables: variables, into: &out)
        }
        for f in h.headers {
            var keep = !(f.kind.isHopByHop || f.droppedByConnection || f.kind == .contentLength || f.kind == .expect)
            let ls = Int(f.lineStart), ne = Int(f.nameEnd)
            if keep {
                for n in names where n.count == ne - ls {
                    var same = true
                    for k in 0..<n.count where ASCII.lower(p[ls + k]) != n[k] { same = false; break }
                    if same { keep = false; break }
                }
            }
            run.add(f, keep: keep, from: p, into: &out)
        }
        run.write(from: p, into: &out)
        for line in route.setHeaderLines {
            switch line {
            case .constant(let bytes):
                out.put(bytes)
            case .template(let prefix, let value):
                let mark = out.mark
                out.put(prefix)
                let valueStart = out.mark
                template(value, variables, into: &out)
                if out.mark == valueStart {
                    out.rollback(to: mark)  // an empty value means the header is not sent
                } else {
                    out.put("\r\n")
                }
            }
        }
        switch request.framing {
        case .length(let n):
            out.put("Content-Length: ")
            out.putDecimal(n)
            out.put("\r\n")
        case .chunked: out.put("Transfer-Encoding: chunked\r\n")
        default: break
        }
        if let offer = request.upgradeOffer {
            out.put("Connection: upgrade\r\nUpgrade: ")
            out.put(offer)
            out.put("\r\n")
        }
        out.put("\r\n")
    }

    /// The request line for the upstream when it cannot go as it came: the origin-form target
    /// (an absolute-form one loses its scheme and authority; `proxy_pass` with a URI replaces the
    /// location's prefix) and the HTTP version `proxy_http_version` says.
    static func upstreamRequestLine<S: HeadSink & ~Copyable, V: VariableSource>(_ h: HeadLayout, _ p: UnsafeRawBufferPointer, route: CompiledLocation,
                                                                             variables: V, into out: inout S) {
        out.put(UnsafeRawBufferPointer(rebasing: p[0..<h.methodEnd]))
        out.put(" ")
        if let t = route.proxyURITemplate {
            // proxy_pass with captures: the whole URI, as nginx; what the variables bring from
            // the decoded path is escaped, so that it cannot break the request line.
            template(t, EscapedVariables(base: variables), into: &out)
            out.put(route.proxyHTTP10 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
            return
        }
        let start = h.pathStart
        let query = UnsafeRawBufferPointer(rebasing: p[h.pathEnd..<h.targetEnd])
        if let uri = route.proxyURI, let loc = route.location {
            // proxy_pass with a URI: the normalised path's location prefix is replaced by it (as
            // nginx), the rest re-escaped, the query as it came.
            out.put(string: uri)
            var rest: [UInt8] = []
            let prefix = loc.path.utf8.count
            func tail(_ path: UnsafeRawBufferPointer) {
                NormalizedPath.escape(UnsafeRawBufferPointer(rebasing: path[min(prefix, path.count)...]), into: &rest)
            }
            if let uri = h.path.uri {
                // Parameters may be why the location matched (`/a;x/b` for `location /a/`): then
                // the path it was matched by is the one the prefix comes off.
                if let m = h.path.match, !uri.starts(with: loc.path.utf8) { m.withUnsafeBytes(tail) } else { uri.withUnsafeBytes(tail) }
            } else {
                tail(UnsafeRawBufferPointer(rebasing: p[start..<h.pathEnd]))
            }
            out.put(rest)
        } else {
            if start == h.pathEnd && h.targetForm == .absolute { out.put("/") }
            out.put(UnsafeRawBufferPointer(rebasing: p[start..<h.pathEnd]))
        }
        out.put(query)
        out.put(route.proxyHTTP10 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
    }

    /// How the response head goes to the client.
    struct ClientResponse {
        /// The answer's `Content-Length` is not this hop's (the body is re-framed).
        var dropContentLength: Bool
        /// `Transfer-Encoding: chunked` of this hop.
        var chunked: Bool
        /// 101 Switching Protocols: `Upgrade` passes, `Connection: upgrade` is added.
        var upgrading: Bool
        var closeAfter: Bool
        /// The request's HTTP minor version (an HTTP/1.0 client kept alive is told so).
        var clientMinor: Int
        /// `Keep-Alive: timeout=N\r\n` of the location, or empty.
        var keepAliveHeader: [UInt8]
    }

    /// The response head for the client: status and header lines copied, hop-by-hop ones
    /// dropped, framing and keep-alive headers of this hop added.
    static func clientHead<S: HeadSink & ~Copyable>(_ head: HeadLayout, _ p: UnsafeRawBufferPointer, _ r: ClientResponse, into out: inout S) {
        // "HTTP/1.x " is replaced by our own version; the status code and reason are kept.
        out.put("HTTP/1.1")
        // Kept lines are copied in runs: the status line and the header lines up to the first
        // dropped one in one write, and so on (lines are contiguous in the head).
        var run = LineRun(start: 8, end: head.headers.first.map { Int($0.lineStart) } ?? p.count - 2)
        for f in head.headers {
            let drop = f.droppedByConnection || (f.kind.isHopByHop && !(r.upgrading && f.kind == .upgrade))
                || (f.kind == .contentLength && r.dropContentLength)
            run.add(f, keep: !drop, from: p, into: &out)
        }
        run.write(from: p, into: &out)
        if r.upgrading {
            out.put("Connection: upgrade\r\n")
        } else {
            if r.chunked { out.put("Transfer-Encoding: chunked\r\n") }
            if r.closeAfter {
                out.put("Connection: close\r\n")
            } else {
                if r.clientMinor == 0 { out.put("Connection: keep-alive\r\n") }
                out.put(r.keepAliveHeader)
            }
        }
        out.put("\r\n")
    }

    /// Consecutive kept lines of a head, written with one copy when a line is dropped or at the end.
    struct LineRun {
        var start: Int
        var end: Int

        @inline(__always)
        mutating func add<S: HeadSink & ~Copyable>(_ f: HeaderField, keep: Bool, from p: UnsafeRawBufferPointer, into out: inout S) {
            if keep {
                if end == Int(f.lineStart) {
                    end = Int(f.lineEnd)
                    return
                }
                write(from: p, into: &out)
                start = Int(f.lineStart)
                end = Int(f.lineEnd)
            } else {
                write(from: p, into: &out)
                start = Int(f.lineEnd)
                end = start
            }
        }

        @inline(__always)
        mutating func write<S: HeadSink & ~Copyable>(from p: UnsafeRawBufferPointer, into out: inout S) {
            if end > start { out.put(UnsafeRawBufferPointer(rebasing: p[start..<end])) }
            start = end
        }
    }
}

extension ChunkedDecoder {
    /// A canonical chunk-size line: lowercase hex without leading zeros, no extension, CRLF.
    static func writeSize<S: HeadSink & ~Copyable>(_ n: Int64, into out: inout S) {
        out.putHex(UInt64(n))
        out.put("\r\n")
    }
}

/// Variables written into a request line: everything but `$args` and `$request_uri` (the raw
/// target's own, already valid there) is percent-escaped as a path is, so that a decoded capture
/// (`%20`, `%0d%0a`, `?`) stays inside the path.
struct EscapedVariables<V: VariableSource>: VariableSource {
    let base: V

    func writeVariable<S: HeadSink & ~Copyable>(_ v: Variable, into out: inout S) {
        switch v {
        case .args, .requestURI:
            base.writeVariable(v, into: &out)
        default:
            var raw: [UInt8] = []
            base.writeVariable(v, into: &raw)
            var escaped: [UInt8] = []
            raw.withUnsafeBytes { NormalizedPath.escape($0, into: &escaped) }
            out.put(escaped)
        }
    }
}
