import TetherTLS
import TetherPool
import TetherIO

/// Latency buckets (seconds) of the upstream connect and response histograms.
public let histogramBuckets: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

/// A histogram as Prometheus wants it: a count per bucket (not cumulative), the sum and count.
public struct Histogram: Sendable, Equatable {
    public var buckets = [Int](repeating: 0, count: histogramBuckets.count)
    public var sum: Double = 0
    public var count = 0

    mutating func observe(nanoseconds: Int64) {
        sum += Double(nanoseconds) / 1e9
        count += 1
        let i = Self.bucket(nanoseconds)
        if i < buckets.count { buckets[i] += 1 }
    }

    /// The bucket of `ns` among `histogramBuckets` (their count for one above them all), by a
    /// few integer comparisons: it runs for every proxied request, where a walk over the global
    /// array cost a retain and a release of it and a comparison per bucket.
    /// (`HistogramTests` holds it to `histogramBuckets`.)
    static func bucket(_ ns: Int64) -> Int {
        if ns <= 10_000_000 {
            if ns <= 1_000_000 { return ns <= 500_000 ? 0 : 1 }
            return ns <= 2_500_000 ? 2 : ns <= 5_000_000 ? 3 : 4
        }
        if ns <= 250_000_000 { return ns <= 25_000_000 ? 5 : ns <= 50_000_000 ? 6 : ns <= 100_000_000 ? 7 : 8 }
        if ns <= 1_000_000_000 { return ns <= 500_000_000 ? 9 : 10 }
        return ns <= 2_500_000_000 ? 11 : ns <= 5_000_000_000 ? 12 : ns <= 10_000_000_000 ? 13 : 14
    }

    mutating func add(_ o: Histogram) {
        for i in buckets.indices { buckets[i] += o.buckets[i] }
        sum += o.sum
        count += o.count
    }
}

/// Counters of one upstream server on one loop: plain integers, touched only on that loop.
public struct ServerCounters: Sendable, Equatable {
    public var connects = 0
    public var requests = 0
    public var reused = 0
    /// Responses read to their end after the client left, their connections kept.
    public var drained = 0
    public var closed: [String: Int] = [:]
    public var retries = ReasonCounts<UpstreamRetryReason>()
    public var failures = ReasonCounts<UpstreamFailedReason>()
    public var connectTime = Histogram()
    public var responseTime = Histogram()
    /// Upstream TLS (`proxy_pass https://`): handshakes done, of which resumed, and failed.
    public var tlsHandshakes = 0
    public var tlsResumed = 0
    public var tlsFailures = 0

    mutating func add(_ o: ServerCounters) {
        connects += o.connects
        tlsHandshakes += o.tlsHandshakes
        tlsResumed += o.tlsResumed
        tlsFailures += o.tlsFailures
        requests += o.requests
        reused += o.reused
        drained += o.drained
        closed.merge(o.closed, uniquingKeysWith: +)
        retries.add(o.retries)
        failures.add(o.failures)
        connectTime.add(o.connectTime)
        responseTime.add(o.responseTime)
    }
}

/// Counters of one event loop's client side: plain integers, summed when read.
struct LoopStats: Sendable {
    var downstreamAccepted = 0
    var downstreamHandled = 0
    var downstreamActive = 0
    var downstreamRequests = 0
    var downstreamClosed = ReasonCounts<DownstreamCloseReason>()
    /// accept4() failures by reason (`emfile`, `enfile`, `other`).
    var acceptFailures: [String: Int] = [:]
    /// Failures not tied to one server (no live upstreams).
    var upstreamFailures = ReasonCounts<UpstreamFailedReason>()
    /// Answers by status class (index 1 is 1xx ... 5 is 5xx), then for each `server` block
    /// (configuration order) its requests and its answers by class: one array, so that counting
    /// an answer checks one array's uniqueness, not three.
    private(set) var answers: [Int]
    private static let perServer = 7
    /// Client TLS handshakes by protocol version, resumed sessions, and failures by reason.
    var tlsHandshakes: [String: Int] = [:]
    var tlsResumed = 0
    var tlsFailures: [String: Int] = [:]
    /// `listen … proxy_protocol`: headers read whole (the failures are close reasons).
    var proxyProtocolHeaders = 0
    /// `ssl_verify_client`: requests refused for a missing or a failed client certificate.
    var clientCertificatesMissing = 0
    var clientCertificatesInvalid = 0
    /// HTTP/2: connections, streams taken, resets the clients sent (by code), connection errors
    /// and refused requests (by code or `malformed_request`), GOAWAYs received.
    var http2Connections = 0
    var http2Streams = 0
    var http2Resets: [String: Int] = [:]
    var http2Errors: [String: Int] = [:]
    var http2GoawaysReceived = 0
    var http2GoawaysSent = 0

    init(servers: Int) {
        answers = [Int](repeating: 0, count: Self.answerSlots(servers: servers))
    }

    /// How many counts `answers` holds for `servers` server blocks.
    static func answerSlots(servers: Int) -> Int { 6 + servers * perServer }

    /// Where an answer of `status` is counted among `slots`: its status class, and, for a
    /// `server` block within them, that block's request and its class (-1 for none).
    @inline(__always)
    static func answerIndices(status: Int, server: Int, slots: Int) -> (statusClass: Int, request: Int, serverClass: Int) {
        let c = min(5, max(0, status / 100))
        let at = 6 + server * perServer
        guard server >= 0, at + perServer <= slots else { return (c, -1, -1) }
        return (c, at, at + 1 + c)
    }

    /// Adds answers counted elsewhere in the same layout (a loop's `Counters`).
    mutating func addAnswers(_ counts: borrowing Counters) {
        for i in 0..<min(answers.count, counts.count) { answers[i] += counts[i] }
    }

    var servers: Int { (answers.count - 6) / Self.perServer }

    /// Answers of status class `c` (1 ... 5).
    func responses(class c: Int) -> Int { answers[c] }
    /// Requests `server` answered, and its answers of status class `c`.
    func requests(server: Int) -> Int { answers[6 + server * Self.perServer] }
    func responses(server: Int, class c: Int) -> Int { answers[6 + server * Self.perServer + 1 + c] }

    /// A response of `status`; `server` is the index of the `server` block that answered it,
    /// nil for a request no server took (a head that could not be read).
    mutating func countResponse(status: Int, server: Int?) {
        let (c, r, sc) = Self.answerIndices(status: status, server: server ?? -1, slots: answers.count)
        answers[c] += 1
        if r >= 0 {
            answers[r] += 1
            answers[sc] += 1
        }
    }

    /// Adds another part's counts (another listening address's on the same loop).
    mutating func add(_ o: LoopStats) {
        downstreamAccepted += o.downstreamAccepted
        downstreamHandled += o.downstreamHandled
        downstreamActive += o.downstreamActive
        downstreamRequests += o.downstreamRequests
        for i in 0..<min(answers.count, o.answers.count) { answers[i] += o.answers[i] }
        downstreamClosed.add(o.downstreamClosed)
        acceptFailures.merge(o.acceptFailures, uniquingKeysWith: +)
        upstreamFailures.add(o.upstreamFailures)
        tlsHandshakes.merge(o.tlsHandshakes, uniquingKeysWith: +)
        tlsResumed += o.tlsResumed
        tlsFailures.merge(o.tlsFailures, uniquingKeysWith: +)
        proxyProtocolHeaders += o.proxyProtocolHeaders
        clientCertificatesMissing += o.clientCertificatesMissing
        clientCertificatesInvalid += o.clientCertificatesInvalid
        http2Connections += o.http2Connections
        http2Streams += o.http2Streams
        http2Resets.merge(o.http2Resets, uniquingKeysWith: +)
        http2Errors.merge(o.http2Errors, uniquingKeysWith: +)
        http2GoawaysReceived += o.http2GoawaysReceived
        http2GoawaysSent += o.http2GoawaysSent
    }

    /// After a reload the `server` blocks are new: their counters start over.
    mutating func resizeServers(_ n: Int) {
        answers = Array(answers[0..<6]) + [Int](repeating: 0, count: n * Self.perServer)
    }
}

/// Everything the admin endpoint shows, summed over the event loops at one moment.
public struct StatsSnapshot: Sendable {
    public struct Server: Sendable {
        public var address: String
        /// Configured up and not failed recently, on every loop.
        public var up: Bool
        public var active = 0
        public var idle = 0
        public var counters = ServerCounters()
        /// The shortest idle window learned on any loop, milliseconds.
        public var learnedIdleMs: Int64?
        /// What the backend advertised in `Keep-Alive: timeout=`, milliseconds.
        public var advertisedTimeoutMs: Int64?
        /// `max_conns` (0: none); `active + idle` is what it caps.
        public var maxConns = 0
        /// `health_check`: its verdict and figures (process-wide), when the upstream has one.
        public var health: Health?
    }

    public struct Health: Sendable {
        public var healthy: Bool
        public var passed: Int
        public var failed: Int
        public var transitions: Int
        /// How long the last check took; nil before the first.
        public var lastCheckSeconds: Double?
    }

    public struct Upstream: Sendable {
        public var name: String
        public var keepalive: Int
        public var servers: [Server]
        /// `queue N` (0: none), the requests waiting now, how long those that left it waited, and
        /// the requests refused for the whole group (no live upstreams, queue full or timed out).
        public var queueSize = 0
        public var queueLength = 0
        public var queueWait = Histogram()
        public var refused = ReasonCounts<UpstreamFailedReason>()

        public init(name: String, keepalive: Int, servers: [Server]) {
            self.name = name
            self.keepalive = keepalive
            self.servers = servers
        }
    }

    /// A `server` block: its names and addresses, and the requests it answered.
    public struct VirtualServer: Sendable {
        public var names: [String]
        public var listen: [String]
        public var requests = 0
        public var responsesByClass = [0, 0, 0, 0, 0, 0]
    }

    public struct Loop: Sendable {
        public var index: Int
        public var activeConnections: Int
        public var requests: Int
        public var upstreamIdle: Int
        public var upstreamActive: Int
    }

    public var acceptedConnections = 0
    public var handledConnections = 0
    public var activeConnections = 0
    public var reading = 0
    public var writing = 0
    public var waiting = 0
    public var requests = 0
    /// Responses by class: index 1 is 1xx ... 5 is 5xx.
    public var responsesByClass = [0, 0, 0, 0, 0, 0]
    public var downstreamClosed: [String: Int] = [:]
    /// Connections the kernel had but `accept4()` could not take, by reason: `emfile` (the
    /// process's descriptor limit), `enfile` (the system's), `other`.
    public var acceptFailures: [String: Int] = [:]
    public static let acceptFailureReasons = ["emfile", "enfile", "other"]
    public var upstreams: [Upstream] = []
    public var servers: [VirtualServer] = []
    public var loops: [Loop] = []
    public var otherUpstreamFailures: [String: Int] = [:]
    /// Client-side TLS: completed handshakes by protocol, resumed sessions, failures by reason.
    public var tlsHandshakes: [String: Int] = [:]
    public var tlsSessionsReused = 0
    public var tlsHandshakeFailures: [String: Int] = [:]

    /// proxy_request_buffering and proxy_buffering: bytes held now for the slower side, in
    /// memory and in temp files, and the temp files' totals.
    public struct Buffered: Sendable {
        public var memoryBytes = 0
        public var fileBytes: Int64 = 0
        public var filesOpened = 0
        public var bytesWrittenToFiles: Int64 = 0
        public var fileErrors = 0

        mutating func add(_ o: Buffered) {
            memoryBytes += o.memoryBytes
            fileBytes += o.fileBytes
            filesOpened += o.filesOpened
            bytesWrittenToFiles += o.bytesWrittenToFiles
            fileErrors += o.fileErrors
        }
    }
    public var buffered = Buffered()
    /// `listen … proxy_protocol`: headers read whole (the refused ones are in `downstreamClosed`).
    public var proxyProtocolHeaders = 0
    /// `ssl_verify_client`: requests refused with 400, by reason (`none`, `invalid`).
    public var clientCertificatesRefused: [String: Int] = [:]
    /// `ssl_stapling`: OCSP responses fetched from responders, by result (`good`, `revoked`, `failed`).
    public var ocspFetches: [String: Int] = [:]
    /// HTTP/2 (see `LoopStats`).
    public var http2Connections = 0
    public var http2Streams = 0
    public var http2Resets: [String: Int] = [:]
    public var http2Errors: [String: Int] = [:]
    public var http2GoawaysReceived = 0
    public var http2GoawaysSent = 0
    /// HTTP/2 streams open now.
    public var http2StreamsActive = 0

    var allServers: [Server] { upstreams.flatMap(\.servers) }

    public var upstreamConnects: Int { allServers.reduce(0) { $0 + $1.counters.connects } }
    public var upstreamReused: Int { allServers.reduce(0) { $0 + $1.counters.reused } }
    public var idleUpstreamConnections: Int { allServers.reduce(0) { $0 + $1.idle } }
    public var upstreamClosed: [String: Int] { allServers.reduce(into: [:]) { $0.merge($1.counters.closed, uniquingKeysWith: +) } }
    public var upstreamRetries: [String: Int] { allServers.reduce(into: [:]) { $0.merge($1.counters.retries.byLabel, uniquingKeysWith: +) } }
    public var upstreamFailures: [String: Int] {
        allServers.reduce(into: otherUpstreamFailures) { $0.merge($1.counters.failures.byLabel, uniquingKeysWith: +) }
    }
    /// Learned idle windows by "upstream server", milliseconds.
    public var learnedIdleMs: [String: Int64] {
        var out: [String: Int64] = [:]
        for u in upstreams { for s in u.servers { if let v = s.learnedIdleMs { out["\(u.name) \(s.address)"] = v } } }
        return out
    }
}

/// The reasons `tether_tls_handshake_failures_total` counts, shown at 0 before they happen.
public enum TLSHandshakeFailureReasons {
    public static let all = TLSHandshakeFailure.allCases.map(\.rawValue)
}
