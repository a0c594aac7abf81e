#if canImport(Glibc)
import Glibc
#endif
import CTether
import Synchronization
import TetherConfig
import TetherIO

/// `server NAME resolve`: the addresses each such line has now, process-wide, kept fresh by a
/// thread of its own. Lookups are plain blocking DNS over UDP (`DNS.lookup`) on that thread, so no
/// event loop ever waits for one, and no C library is needed for the handful of names a
/// configuration has (c-ares would bring its own event handling to fit into ours). A name is
/// asked again when its answer's TTL runs out, or the resolver's `valid`; a failed lookup keeps
/// the last good addresses (logged), and is tried again after 5 s or `valid` if shorter.
final class ResolverThread: @unchecked Sendable {
    struct Key: Hashable, Sendable {
        var upstream: String
        var server: Int
    }

    private struct Entry {
        var name: String
        var resolver: Upstream.Resolver
        /// Sorted numeric addresses; nil before the first good answer.
        var addresses: [String]?
        var dueAt: UInt64
        var lastError: String?
    }

    private let entries = Mutex<[Key: Entry]>([:])
    private let thread = ServiceThread()
    private let log: LoopErrorLog
    /// Called on the resolver's thread when an upstream's addresses changed.
    private let changed: @Sendable (String) -> Void
    static let retryMs: Int64 = 5_000
    /// Answers with a TTL of 0 are asked again no sooner than this.
    static let minimumMs: Int64 = 1_000

    init(log: LoopErrorLog, changed: @escaping @Sendable (String) -> Void) {
        self.log = log
        self.changed = changed
    }

    /// The `resolve` lines of `upstreams` (start and reload). Lines whose name and resolver are
    /// unchanged keep their addresses; new ones are looked up now, on the calling thread (a start
    /// or a reload waits for its names, at most `resolver_timeout` per server asked).
    func configure(_ upstreams: [Upstream], keepFresh: Bool = true) {
        var next: [Key: Entry] = [:]
        let old = entries.withLock { $0 }
        for u in upstreams {
            guard let r = u.resolver else { continue }
            for (i, s) in u.servers.enumerated() where s.resolve && !Builder.isNumeric(s.host) {
                let key = Key(upstream: u.name, server: i)
                if let e = old[key], e.name == s.host, e.resolver == r {
                    next[key] = e
                } else if let same = next.values.first(where: { $0.name == s.host && $0.resolver == r && $0.addresses != nil }) {
                    next[key] = same
                } else {
                    var e = Entry(name: s.host, resolver: r, addresses: nil, dueAt: 0)
                    refresh(&e, upstream: u.name)
                    next[key] = e
                }
            }
        }
        entries.withLock { $0 = next }
        if keepFresh && !next.isEmpty && !thread.isRunning && !thread.start(name: "tether-resolve", { self.run() }) {
            log(.alert, "pthread_create failed for the resolver: names are not resolved again")
        }
        thread.poke()
    }

    /// What line `server` of `upstream` resolves to now (nil: no good answer yet).
    func addresses(upstream: String, server: Int) -> [String]? {
        entries.withLock { $0[Key(upstream: upstream, server: server)]?.addresses }
    }

    /// `-T`'s comment for the line.
    func describe(upstream: String, server: Int) -> String? {
        entries.withLock { e -> String? in
            guard let entry = e[Key(upstream: upstream, server: server)] else { return nil }
            let now = entry.addresses.map { $0.isEmpty ? "resolves to no address" : "resolves to " + $0.joined(separator: " ") } ?? "not resolved"
            return entry.lastError.map { "\(now); the last lookup failed: \($0)" } ?? now
        }
    }

    /// Tells the thread to end, without waiting for it: a lookup under way may take up to
    /// `resolver_timeout` per DNS server, and a shutdown does not wait for DNS. The thread holds
    /// this object until it ends, and reaches the server only through a weak reference.
    func stop() { thread.stop() }

    /// Looks the name up (A, and AAAA with `ipv6=on`) and sets when to ask again.
    private func refresh(_ e: inout Entry, upstream: String) {
        let servers = e.resolver.servers.compactMap { InetAddress(host: $0.host, port: UInt16(clamping: $0.port)) }
        let timeout = Int(e.resolver.timeoutMs)
        var found: [String] = []
        var ttl = UInt32.max
        var failure: DNS.Failure?
        for type in e.resolver.ipv6 ? [DNS.RecordType.a, .aaaa] : [.a] {
            switch DNS.lookup(e.name, type: type, servers: servers, timeoutMs: timeout) {
            case .success(let a):
                found += a.addresses
                if !a.addresses.isEmpty { ttl = min(ttl, a.ttl) }
            case .failure(let f):
                failure = failure ?? f
            }
        }
        let now = IOLoop.monotonicNanoseconds()
        if let failure, found.isEmpty {
            // The last good answer stays.
            e.lastError = failure.description
            let wait = min(Self.retryMs, e.resolver.validMs ?? Self.retryMs)
            e.dueAt = now + UInt64(wait) * 1_000_000
            let kept = e.addresses.map { $0.isEmpty ? "no address" : $0.joined(separator: " ") } ?? "no address yet"
            log(.error, "\(e.name) could not be resolved (\(failure)) for upstream \"\(upstream)\", keeping \(kept)")
            return
        }
        e.lastError = nil
        let ms = e.resolver.validMs ?? max(Self.minimumMs, Int64(ttl == .max ? 0 : ttl) * 1000)
        e.dueAt = now + UInt64(ms) * 1_000_000
        let sorted = found.sorted()
        if sorted != e.addresses {
            if e.addresses != nil {
                log(.notice, "\(e.name) of upstream \"\(upstream)\" now resolves to \(sorted.isEmpty ? "no address" : sorted.joined(separator: " ")) (was \(e.addresses!.isEmpty ? "no address" : e.addresses!.joined(separator: " ")))")
            }
            e.addresses = sorted
        }
    }

    private func run() {
        while !thread.isStopping {
            let now = IOLoop.monotonicNanoseconds()
            let due = entries.withLock { e in e.filter { $0.value.dueAt <= now } }
            var changedUpstreams = Set<String>()
            for (key, var e) in due {
                let before = e.addresses
                refresh(&e, upstream: key.upstream)
                let after = e
                // A reload may have replaced the entry meanwhile: only the same line is updated.
                let stored = entries.withLock { all -> Bool in
                    guard let current = all[key], current.name == after.name, current.resolver == after.resolver else { return false }
                    all[key] = after
                    return true
                }
                if stored && before != after.addresses { changedUpstreams.insert(key.upstream) }
            }
            for u in changedUpstreams.sorted() { changed(u) }
            let next = entries.withLock { $0.values.map(\.dueAt).min() }
            thread.sleep(ms: next.map { n in
                let now = IOLoop.monotonicNanoseconds()
                return n <= now ? 0 : Int32(clamping: (n - now) / 1_000_000 + 1)
            })
        }
    }
}

extension Upstream {
    /// The upstream as the loops run it: each `resolve` line becomes one server per address it
    /// has now (same parameters), in address order. A line with no address yet stands as one
    /// `down` server `0.0.0.0:PORT`, never tried, so that requests get 502 (no live upstreams)
    /// until the name resolves.
    func expanded(_ addresses: (Int) -> [String]?) -> Upstream {
        guard resolves else { return self }
        var u = self
        u.servers = []
        for (i, s) in servers.enumerated() {
            guard s.resolve, !Builder.isNumeric(s.host) else { u.servers.append(s); continue }
            let list = addresses(i) ?? []
            if list.isEmpty {
                var placeholder = s
                placeholder.address = "0.0.0.0"
                placeholder.down = true
                u.servers.append(placeholder)
            }
            for a in list {
                var one = s
                one.address = a
                u.servers.append(one)
            }
        }
        return u
    }
}
