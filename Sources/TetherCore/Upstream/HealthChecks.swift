#if canImport(Glibc)
import Glibc
#endif
import TetherConfig
import TetherIO
import TetherTLS

/// Active health checks (`health_check` in an `upstream`): every `interval`, each server is asked
/// `GET uri` on a connection of its own (never a pooled one), with `Connection: close`. A status
/// in `match` within `timeout` passes; anything else (a refused connect, a reset, a timeout, a
/// status outside the range, bytes that are not HTTP) fails. `fails` failures in a row take the
/// server out of every loop's balancer, `passes` passes in a row bring it back; passive
/// `max_fails` works beside it. The checks run once per process, on the helper loop, and the
/// verdict is an atomic flag in the server's `UpstreamLimits.Server` that the loops read.
/// An upstream reached with `proxy_pass https://` is checked over TLS, with the TLS settings
/// (verification, SNI) of a location that proxies to it.
final class HealthChecks {
    private unowned(unsafe) let loop: IOLoop
    private let log: LoopErrorLog
    private var probes: [HealthProbe] = []

    init(loop: IOLoop, log: LoopErrorLog) {
        self.loop = loop
        self.log = log
    }

    /// Replaces the running checks with `setup`'s (on the helper loop's thread). `tls`: the
    /// client context of the upstreams reached over TLS.
    func configure(_ upstreams: [(Upstream, UpstreamLimits)], tls: [String: TLSContext]) {
        for p in probes { p.stop() }
        probes = []
        for (u, limits) in upstreams {
            guard let check = u.healthCheck else { continue }
            for (i, s) in u.servers.enumerated() where !s.down {
                guard let port = UInt16(exactly: s.port), let address = InetAddress(host: s.address, port: port) else { continue }
                if let p = try? HealthProbe(loop: loop, log: log, upstream: u.name, server: s, address: address, check: check,
                                            state: limits.servers[i], tls: tls[u.name]) {
                    probes.append(p)
                }
            }
        }
    }

    func stop() {
        for p in probes { p.stop() }
        probes = []
    }
}

/// One server's checks: a timer for the next check, and while a check runs, its socket.
final class HealthProbe: IOHandler {
    private unowned(unsafe) let loop: IOLoop
    private let log: LoopErrorLog
    private let upstream: String
    private let hostHeader: String
    private let addressText: String
    private let address: InetAddress
    private let check: Upstream.HealthCheck
    private let state: UpstreamLimits.Server
    private var timer: LoopTimer!
    private var handle: Handle?
    private var request: [UInt8]
    private var written = 0
    private var response: [UInt8] = []
    private var startedAt: UInt64 = 0
    private var passesInARow = 0
    private var failsInARow = 0
    private var stopped = false
    /// `proxy_pass https://`: the context, and the session of the check under way.
    private let tlsContext: TLSContext?
    private var tls: TLSSocket?

    init(loop: IOLoop, log: LoopErrorLog, upstream: String, server: UpstreamServer, address: InetAddress,
         check: Upstream.HealthCheck, state: UpstreamLimits.Server, tls: TLSContext? = nil) throws(IOError) {
        tlsContext = tls
        self.loop = loop
        self.log = log
        self.upstream = upstream
        hostHeader = server.host.contains(":") ? "[\(server.host)]" : server.host
        addressText = server.addressText
        self.address = address
        self.check = check
        self.state = state
        request = Array("GET \(check.uri) HTTP/1.1\r\nHost: \(hostHeader)\r\nUser-Agent: tether-health-check\r\nConnection: close\r\n\r\n".utf8)
        timer = try LoopTimer(loop: loop) { [unowned(unsafe) self] _ in self.begin() }
        // The first check at once: a server that is down at the start is found within one timeout.
        timer.arm(afterNanoseconds: 0)
    }

    func stop() {
        stopped = true
        if let h = handle { loop.close(h) }
        handle = nil
        timer.close()
    }

    private func begin() {
        guard !stopped, handle == nil else { return }
        written = 0
        response.removeAll(keepingCapacity: true)
        startedAt = IOLoop.monotonicNanoseconds()
        let fd = address.tcpSocket()
        guard fd >= 0 else { return finish(pass: false, why: "socket() failed (\(errno))") }
        let rc = address.withSockaddr { Glibc.connect(fd, $0, $1) }
        if rc < 0 && errno != EINPROGRESS {
            let e = errno
            Glibc.close(fd)
            return finish(pass: false, why: "connect() failed (\(e): \(String(cString: strerror(e))))")
        }
        if let ctx = tlsContext {
            guard let session = TLSSocket(client: ctx, fd: fd, session: nil) else {
                Glibc.close(fd)
                return finish(pass: false, why: "no TLS session")
            }
            tls = session
        }
        do {
            let h = try loop.register(fd, handler: self)
            handle = h
            loop.arm(h, afterNanoseconds: UInt64(check.effectiveTimeoutMs) * 1_000_000)
        } catch {
            Glibc.close(fd)
            finish(pass: false, why: "\(error)")
        }
    }

    func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {
        guard let fd = loop.fd(handle) else { return }
        if events.contains(.error) && !events.contains(.readable) {
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            return finish(pass: false, why: "connect() failed (\(err): \(String(cString: strerror(err))))")
        }
        if let tls, !tls.handshakeDone {
            switch tls.handshake() {
            case .done: break
            case .wantRead, .wantWrite: return
            case .failed(let f, let detail): return finish(pass: false, why: "TLS handshake failed (\(f.rawValue)): \(detail)")
            }
        }
        while written < request.count {
            let n: Int
            if let tls {
                switch request[written...].withUnsafeBytes({ tls.write($0) }) {
                case .wrote(let w): n = w
                case .wantRead, .wantWrite: n = 0
                case .error(let e): return finish(pass: false, why: "TLS error: \(e)")
                }
            } else {
                n = request[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno != EAGAIN { return finish(pass: false, why: "send() failed (\(errno): \(String(cString: strerror(errno))))") }
            }
            guard n > 0 else { break }
            written += n
        }
        var buf = [UInt8](repeating: 0, count: 512)
        var ended = events.contains(.readHangup) || events.contains(.hangup)
        reading: while response.count < 4096 {
            if let tls {
                switch buf.withUnsafeMutableBytes({ tls.read(into: $0) }) {
                case .bytes(let n): response += buf[0..<n]
                case .wantRead, .wantWrite: break reading
                case .closeNotify, .eof: ended = true; break reading
                case .error(let e): return finish(pass: false, why: "TLS error: \(e)")
                }
            } else {
                let n = Glibc.read(fd, &buf, buf.count)
                if n > 0 { response += buf[0..<n]; continue }
                if n == 0 { ended = true; break }
                if errno == EAGAIN { break }
                return finish(pass: false, why: "recv() failed (\(errno): \(String(cString: strerror(errno))))")
            }
        }
        // The status line is all a check needs.
        guard let end = response.firstIndex(of: UInt8(ascii: "\n")) else {
            if response.count >= 4096 || ended { finish(pass: false, why: "no status line") }
            return
        }
        let line = String(decoding: response[..<end], as: UTF8.self)
        let parts = line.split(separator: " ")
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]) else {
            return finish(pass: false, why: "not an HTTP response")
        }
        finish(pass: check.match.contains(status), why: "status \(status)")
    }

    func timerFired(handle: Handle, loop: IOLoop) {
        finish(pass: false, why: "timed out after \(Units.formatTime(check.effectiveTimeoutMs))")
    }

    /// A check's verdict: counted, the server's state changed after `fails` or `passes` in a row,
    /// and the next check in `interval`.
    private func finish(pass: Bool, why: String) {
        tls = nil
        if let h = handle { loop.close(h) }
        handle = nil
        state.lastCheckNs.store(Int(IOLoop.monotonicNanoseconds() &- startedAt), ordering: .relaxed)
        if pass {
            state.checksPassed.add(1, ordering: .relaxed)
            failsInARow = 0
            passesInARow += 1
            if !state.healthy.load(ordering: .relaxed) && passesInARow >= check.passes {
                state.healthy.store(true, ordering: .relaxed)
                state.transitions.add(1, ordering: .relaxed)
                log(.notice, "upstream \"\(upstream)\" server \(addressText) passed its health check \(passesInARow) times in a row (\(why)): back in service")
            }
        } else {
            state.checksFailed.add(1, ordering: .relaxed)
            passesInARow = 0
            failsInARow += 1
            if state.healthy.load(ordering: .relaxed) && failsInARow >= check.fails {
                state.healthy.store(false, ordering: .relaxed)
                state.transitions.add(1, ordering: .relaxed)
                log(.warn, "upstream \"\(upstream)\" server \(addressText) failed its health check \(failsInARow) times in a row (\(why) for GET \(check.uri)): out of service")
            }
        }
        if !stopped { timer.arm(afterNanoseconds: UInt64(check.intervalMs) * 1_000_000) }
    }
}
