#if canImport(Glibc)
import Glibc
#endif
import CTether
import Synchronization
import TetherConfig
import TetherIO
import TetherTLS

/// `ssl_stapling` without `ssl_stapling_file`: OCSP responses fetched from each certificate's
/// responder on a thread of its own (never on a loop: the fetch is a blocking DNS lookup through
/// `resolver`, a connect and an HTTP/1.0 exchange, bounded by `resolver_timeout`), checked, and
/// swapped into the context's staple, which handshakes read under its lock.
///
/// The first fetch starts with the server (a start does not wait for it: until it lands,
/// handshakes go on without a staple, as with an unreachable responder). A good response is
/// fetched again five minutes before its nextUpdate, and at least hourly; a failed fetch keeps
/// what was stapled (until its own nextUpdate) and is tried again after five minutes; a revoked
/// status takes the staple down at once. A reload's contexts that ask the same question get the
/// last answer at once, and its schedule.
final class Stapler: @unchecked Sendable {
    /// One question to one responder, and every context (server) it staples.
    private struct Entry {
        var query: OCSPQuery
        var resolver: Upstream.Resolver?
        var contexts: [Weak]
        /// Seconds since the epoch.
        var dueAt: Int
        var last: (response: [UInt8], outcome: StapleOutcome)?
    }

    struct Weak {
        weak var context: TLSContext?
    }

    private let entries = Mutex<[OCSPQuery: Entry]>([:])
    /// Fetches by result (`good`, `revoked`, `failed`), for the metrics.
    private let counts = Mutex<[String: Int]>([:])
    private let thread = ServiceThread()
    private let log: LoopErrorLog
    /// How long one fetch may take when no `resolver_timeout` says (nginx's default for it).
    static let defaultTimeoutMs = 30_000
    /// The largest answer read from a responder.
    static let maximumResponse = 256 * 1024

    init(log: LoopErrorLog) { self.log = log }

    var fetches: [String: Int] { counts.withLock { $0 } }

    /// The contexts of a start or a reload that fetch their staple (`TLSContext.ocspQuery`).
    func configure(_ contexts: [(TLSContext, Upstream.Resolver?)]) {
        let now = Int(time(nil))
        var next: [OCSPQuery: Entry] = [:]
        let old = entries.withLock { $0 }
        for (ctx, resolver) in contexts {
            guard let q = ctx.ocspQuery else { continue }
            if next[q] != nil {
                if !next[q]!.contexts.contains(where: { $0.context === ctx }) { next[q]!.contexts.append(Weak(context: ctx)) }
                continue
            }
            var e = Entry(query: q, resolver: resolver, contexts: [Weak(context: ctx)], dueAt: now)
            if let o = old[q], o.resolver == resolver, let last = o.last {
                // The same question was answered: the new context staples that answer now.
                e.last = last
                e.dueAt = o.dueAt
                if case .stapled = last.outcome { _ = ctx.staple(response: last.response) }
            }
            next[q] = e
        }
        entries.withLock { $0 = next }
        if !next.isEmpty && !thread.isRunning && !thread.start(name: "tether-ocsp", { self.run() }) {
            log(.alert, "pthread_create failed for OCSP stapling: no response is fetched")
        }
        thread.poke()
    }

    /// Tells the thread to end without waiting for it (a fetch under way may take up to
    /// `resolver_timeout`); it holds this object until it ends.
    func stop() { thread.stop() }

    private func run() {
        while !thread.isStopping {
            let now = Int(time(nil))
            let due = entries.withLock { e in e.values.filter { $0.dueAt <= now } }
            for e in due {
                if thread.isStopping { return }
                let (last, next) = refresh(e)
                // A reload may have replaced the entry meanwhile: the new one keeps its own contexts.
                entries.withLock { all in
                    guard all[e.query] != nil else { return }
                    all[e.query]!.dueAt = next
                    if let last { all[e.query]!.last = last }
                }
            }
            let next = entries.withLock { $0.values.map(\.dueAt).min() }
            // At most a day at a time (an answer with no nextUpdate is asked again hourly anyway).
            thread.sleep(ms: next.map { n in Int32(max(0, min(n - Int(time(nil)), 86_400)) * 1000) })
        }
    }

    /// Fetches `e`'s response and staples it on every context still alive; returns what to
    /// remember and when to fetch again.
    private func refresh(_ e: Entry) -> (last: (response: [UInt8], outcome: StapleOutcome)?, next: Int) {
        let contexts = e.contexts.compactMap(\.context)
        // Every context went with a reload meanwhile (the new ones have an entry of their own).
        guard let first = contexts.first else { return (nil, Int(time(nil)) + 300) }
        let timeout = Int(e.resolver?.timeoutMs ?? Int64(Self.defaultTimeoutMs))
        let fetched = Self.fetch(e.query, resolver: e.resolver, timeoutMs: timeout)
        let now = Int(time(nil))
        let what = "the OCSP response for certificate \"\(first.certificateFile)\" from \(e.query.url)"
        switch fetched {
        case .failure(let f):
            counts.withLock { $0["failed", default: 0] += 1 }
            let kept = first.isStapling ? "the last good response stays stapled until its nextUpdate" : "nothing is stapled"
            log(.error, "\(what) could not be fetched: \(f); \(kept), trying again in 300 s")
            return (nil, now + 300)
        case .success(let der):
            var outcome = StapleOutcome.refused("no context")
            for ctx in contexts { outcome = ctx.staple(response: der) }
            switch outcome {
            case .stapled(let valid):
                counts.withLock { $0["good", default: 0] += 1 }
                log(.info, "\(what): good, stapled\(valid == .max ? "" : " until \(Self.httpDate(valid))")")
            case .revoked(let why):
                counts.withLock { $0["revoked", default: 0] += 1 }
                log(.error, "\(what) is not stapled: \(why)")
            case .refused(let why):
                counts.withLock { $0["failed", default: 0] += 1 }
                let kept = first.isStapling ? "the last good response stays stapled until its nextUpdate" : "nothing is stapled"
                log(.error, "\(what) is not stapled: \(why); \(kept)")
            }
            return ((der, outcome), outcome.nextFetch(now: now))
        }
    }

    private static func httpDate(_ t: Int) -> String {
        var tt = time_t(t)
        var tm = tm()
        gmtime_r(&tt, &tm)
        var buf = [CChar](repeating: 0, count: 64)
        strftime(&buf, 64, "%Y-%m-%d %H:%M:%S UTC", &tm)
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// One fetch: the responder's address (numeric, or looked up through `resolver`), a
    /// connect, the request, and the answer read to its end; everything within `timeoutMs`.
    static func fetch(_ q: OCSPQuery, resolver: Upstream.Resolver?, timeoutMs: Int) -> Result<[UInt8], OCSPFailure> {
        let deadline = IOLoop.monotonicNanoseconds() + UInt64(timeoutMs) * 1_000_000
        let address: InetAddress
        if let a = InetAddress(host: q.host, port: q.port) {
            address = a
        } else {
            guard let resolver else { return .failure(.io("no resolver defined to resolve \(q.host)")) }
            let servers = resolver.servers.compactMap { InetAddress(host: $0.host, port: UInt16(clamping: $0.port)) }
            var found: InetAddress?
            var failure = DNS.Failure.timeout
            for type in resolver.ipv6 ? [DNS.RecordType.a, .aaaa] : [.a] where found == nil {
                switch DNS.lookup(q.host, type: type, servers: servers, timeoutMs: timeoutMs) {
                case .success(let answer): found = answer.addresses.first.flatMap { InetAddress(host: $0, port: q.port) }
                case .failure(let f): failure = f
                }
            }
            guard let found else { return .failure(.io("\(q.host) could not be resolved (\(failure))")) }
            address = found
        }
        let fd = address.tcpSocket()
        guard fd >= 0 else { return .failure(.io("socket() failed: \(String(cString: strerror(errno)))")) }
        defer { Glibc.close(fd) }
        func wait(_ events: Int32) -> Bool {
            while true {
                let now = IOLoop.monotonicNanoseconds()
                guard now < deadline else { return false }
                var p = pollfd(fd: fd, events: Int16(events), revents: 0)
                let r = poll(&p, 1, Int32(max(1, (deadline - now) / 1_000_000)))
                if r > 0 { return true }
                if r < 0 && errno != EINTR { return false }
            }
        }
        let rc = address.withSockaddr { connect(fd, $0, $1) }
        if rc != 0 {
            guard errno == EINPROGRESS else { return .failure(.io("connect() failed: \(String(cString: strerror(errno)))")) }
            guard wait(POLLOUT) else { return .failure(.io("connect() timed out")) }
            var err: Int32 = 0
            var len = socklen_t(4)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            guard err == 0 else { return .failure(.io("connect() failed: \(String(cString: strerror(err)))")) }
        }
        let request = q.httpRequest
        var sent = 0
        while sent < request.count {
            let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 { sent += n; continue }
            guard n < 0, errno == EAGAIN || errno == EINTR else { return .failure(.io("send() failed: \(String(cString: strerror(errno)))")) }
            guard wait(POLLOUT) else { return .failure(.io("the responder timed out")) }
        }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 {
                answer += chunk[0..<n]
                guard answer.count <= maximumResponse else { return .failure(.http("the responder's answer is over \(maximumResponse / 1024) KiB")) }
                if OCSPQuery.isComplete(answer) { break }
                continue
            }
            if n == 0 { break }
            guard errno == EAGAIN || errno == EINTR else { return .failure(.io("recv() failed: \(String(cString: strerror(errno)))")) }
            guard wait(POLLIN) else { return .failure(.io("the responder timed out")) }
        }
        return OCSPQuery.responseBody(answer)
    }
}
