import TetherPool

/// A client connection's lifecycle between requests, as a value: waiting for a head (idle
/// keep-alive, or part of one read), in an exchange, or closed. The glue tells it what happened
/// and carries out what it answers; it holds no socket, buffer or clock (times are monotonic
/// nanoseconds passed in).
struct ClientConnectionState: Equatable {
    enum Phase: Equatable {
        /// Waiting for the next request head; `headStartedAt` is set once a byte of it arrived.
        case awaitingHead(headStartedAt: Int64?)
        case exchange
        /// Closed, and why (the first reason is the one counted).
        case closed(DownstreamCloseReason)
    }

    private(set) var phase: Phase = .awaitingHead(headStartedAt: nil)
    /// Requests started on this connection.
    private(set) var requests = 0
    let acceptedAt: Int64
    /// When the last response ended (the keep-alive timer's start).
    private(set) var idleSince: Int64
    /// `client_header_timeout` of the default server, and the `keepalive_timeout` of the location
    /// that answered the last request (as nginx).
    var headerTimeoutMs: Int64
    private(set) var keepaliveTimeoutMs: Int64 = 75_000
    /// The reason the connection will give when it closes, as far as known now (a keep-alive
    /// decision that said close, an error): `close()` without a reason uses it.
    var pendingReason = DownstreamCloseReason.clientClose

    init(acceptedAt: Int64, headerTimeoutMs: Int64) {
        self.acceptedAt = acceptedAt
        self.idleSince = acceptedAt
        self.headerTimeoutMs = headerTimeoutMs
    }

    var isClosed: Bool { if case .closed = phase { true } else { false } }
    var inExchange: Bool { phase == .exchange }
    var awaitingHead: Bool { if case .awaitingHead = phase { true } else { false } }
    var headStarted: Bool { if case .awaitingHead(let s) = phase { s != nil } else { false } }

    /// What nginx's stub_status calls the connection: reading a request head, writing a
    /// response (anything between head and last byte), or waiting idle for the next request.
    enum Activity: Equatable { case reading, writing, waiting }

    var activity: Activity {
        switch phase {
        case .exchange: .writing
        case .awaitingHead(let started): started != nil ? .reading : .waiting
        case .closed: .waiting
        }
    }

    /// Bytes of a head are waiting to be parsed: the header timer runs from the first of them.
    mutating func headBytesArrived(now: Int64) {
        if case .awaitingHead(nil) = phase { phase = .awaitingHead(headStartedAt: now) }
    }

    /// A complete head was parsed: an exchange starts. Returns its number (1 for the first).
    mutating func headParsed() -> Int {
        precondition(awaitingHead, "head parsed in \(phase)")
        requests += 1
        phase = .exchange
        return requests
    }

    /// The exchange ended and the connection stays open for the next request.
    mutating func exchangeFinished(keepaliveTimeoutMs: Int64, now: Int64) {
        precondition(phase == .exchange, "exchange finished in \(phase)")
        phase = .awaitingHead(headStartedAt: nil)
        idleSince = now
        self.keepaliveTimeoutMs = keepaliveTimeoutMs
    }

    /// nginx's keep-alive rules for the answer to request `number` (`keepalive_requests`,
    /// `keepalive_time`, drain in `policy`; `keepalive_timeout 0`; what the client asked for).
    /// When they say close, that becomes the reason the close will be counted under.
    mutating func keepsAlive(requestNumber: Int, clientWants: Bool, policy: KeepAlivePolicy, keepaliveTimeoutMs: Int64, now: Int64) -> Bool {
        let decision = policy.decide(requestNumber: requestNumber, clientWantsKeepAlive: clientWants,
                                     connectionAgeMs: (now - acceptedAt) / 1_000_000)
        if case .close(let r) = decision { pendingReason = DownstreamCloseReason(r) }
        return decision == .keepAlive && keepaliveTimeoutMs > 0
    }

    /// Marks the connection closed. Returns the reason to count, or nil when it was closed already.
    @discardableResult
    mutating func close(_ reason: DownstreamCloseReason? = nil) -> DownstreamCloseReason? {
        if isClosed { return nil }
        let r = reason ?? pendingReason
        phase = .closed(r)
        return r
    }

    /// When the connection's own timer (header or keep-alive) expires; nil in an exchange, whose
    /// timers are the exchange's (`ExchangeTimer`).
    var deadline: Int64? {
        switch phase {
        case .awaitingHead(let started?): started + headerTimeoutMs * 1_000_000
        case .awaitingHead(nil) where requests == 0: acceptedAt + headerTimeoutMs * 1_000_000
        case .awaitingHead(nil): idleSince + keepaliveTimeoutMs * 1_000_000
        case .exchange, .closed: nil
        }
    }

    enum Expiry: Equatable {
        /// Part of a head arrived and no more in time: answer 408 and close (as nginx).
        case requestTimeout
        /// Nothing arrived: close quietly with this reason.
        case close(DownstreamCloseReason)
    }

    /// What to do when `deadline` has passed. `bufferedBytes`: bytes read and not yet parsed.
    func expired(bufferedBytes: Bool) -> Expiry? {
        guard case .awaitingHead(let started) = phase else { return nil }
        if started != nil || (requests == 0 && bufferedBytes) { return .requestTimeout }
        return .close(requests == 0 ? .clientHeaderTimeout : .keepaliveTimeout)
    }

    /// Drain: a connection between requests, with nothing of a head read, closes now.
    func closesOnDrain(bufferedBytes: Bool) -> Bool {
        phase == .awaitingHead(headStartedAt: nil) && !bufferedBytes
    }
}
