/// The timers of an exchange, each blaming the side it names. Times are monotonic nanoseconds.
enum ExchangeTimer: Equatable {
    /// `send_timeout`: the client does not take the response.
    case send
    /// `proxy_send_timeout`: the upstream does not take the request.
    case proxySend
    /// `client_body_timeout`: the client sends no body while Tether is ready for it (408).
    case clientBody
    /// `proxy_read_timeout`: the request was sent, Tether waits for the upstream with nothing to
    /// send and the client is taking what comes (504).
    case proxyRead

    /// What the exchange knows about who is holding things up.
    struct Facts: Equatable {
        var requestBodyDone: Bool
        /// Tether stopped reading from the client (read-ahead bound, backpressure).
        var readPaused: Bool
        var lastClientRead: Int64
        /// Since when the client has not been taking the response, if it is not.
        var clientUnwritableSince: Int64?
        /// Since when the upstream has not been taking the request, if it is not.
        var upstreamUnwritableSince: Int64?
        /// An upstream connection is attached and its response is not complete.
        var waitingForUpstream: Bool
        var lastUpstreamActivity: Int64
        /// When the upstream read timer last restarted for a reason other than a read from it
        /// (the request finished, the client or the upstream took data again).
        var readTimerRestart: Int64
    }

    struct Timeouts: Equatable {
        var clientBodyMs: Int64
        var sendMs: Int64
        var proxySendMs: Int64
        var proxyReadMs: Int64
    }

    /// The earliest deadline and which timer it is. Each timer runs only while its side is the
    /// one holding things up: none runs against the upstream while the request body is still
    /// arriving or while the client is slow to read, and none against the client while Tether
    /// itself has stopped reading from it.
    static func next(_ f: Facts, _ t: Timeouts) -> (timer: ExchangeTimer, deadline: Int64)? {
        var best: (timer: ExchangeTimer, deadline: Int64)?
        func consider(_ timer: ExchangeTimer, _ d: Int64) {
            if best == nil || d < best!.deadline { best = (timer, d) }
        }
        if !f.requestBodyDone && !f.readPaused { consider(.clientBody, f.lastClientRead + t.clientBodyMs * 1_000_000) }
        if let since = f.clientUnwritableSince { consider(.send, since + t.sendMs * 1_000_000) }
        if let since = f.upstreamUnwritableSince, f.waitingForUpstream { consider(.proxySend, since + t.proxySendMs * 1_000_000) }
        if f.waitingForUpstream && f.requestBodyDone && f.clientUnwritableSince == nil && f.upstreamUnwritableSince == nil {
            consider(.proxyRead, max(f.lastUpstreamActivity, f.readTimerRestart) + t.proxyReadMs * 1_000_000)
        }
        return best
    }
}
