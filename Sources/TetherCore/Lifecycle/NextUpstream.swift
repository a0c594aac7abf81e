import TetherConfig

/// What happens to an exchange when its upstream fails or answers with a status
/// `proxy_next_upstream` names: the one place that decides whether a request may be sent again,
/// and where (nginx's `ngx_http_upstream_next`).
enum NextUpstream {
    /// What the exchange knows when its upstream fails.
    struct Facts: Equatable {
        /// Part of the response went to the client.
        var responseStarted: Bool
        /// The client's response ends with the connection (an HTTP/1.0 client without a length).
        var closeDelimitedToClient: Bool
        /// The failed connection came from the pool.
        var reused: Bool
        /// A fresh connection was already tried after a reused one failed.
        var retriedFresh: Bool
        /// Nothing of a body was sent and the method may be repeated (RFC 9110 9.2.2, or
        /// `proxy_next_upstream non_idempotent`).
        var replayable: Bool
        /// Servers tried so far, this one included.
        var tries: Int
        /// `proxy_next_upstream` and `proxy_next_upstream_tries` (0: no limit).
        var conditions: Set<NextUpstreamCondition>
        var maxTries: Int
        /// Whether the request body was read to its end (an answer keeps the connection only then).
        var requestBodyDone: Bool
    }

    enum Action: Equatable {
        /// The response is cut: end the client connection, with a reset where a FIN would make
        /// the cut response look complete. Counted as `truncated` (or `timeout`).
        case abort(reset: Bool, counted: UpstreamFailedReason)
        /// Send the request again to the same server on a new connection; not a failure of the server.
        case retryFresh
        /// Mark the server failed and send the request to another one.
        case nextServer
        /// Mark the server failed and answer the client (502, 504) with this status.
        case respond(status: Int, closeAfter: Bool, counted: UpstreamFailedReason)
    }

    /// After a failure of `kind`. `hasCandidate` says whether the balancer has a server not yet
    /// tried; it is asked only when everything else allows another server.
    static func afterFailure(_ kind: UpstreamFailureKind, _ f: Facts, hasCandidate: () -> Bool) -> Action {
        if f.responseStarted {
            return .abort(reset: f.closeDelimitedToClient, counted: kind == .timeout ? .timeout : .truncated)
        }
        // A reused connection that failed before any response byte most likely met the backend
        // closing it as it idled: not the server's fault, and safe to repeat once.
        if kind == .error && f.reused && f.replayable && !f.retriedFresh { return .retryFresh }
        if mayGoToNextServer(kind.condition, f, hasCandidate: hasCandidate) { return .nextServer }
        return .respond(status: kind == .timeout ? 504 : 502, closeAfter: !f.requestBodyDone, counted: UpstreamFailedReason(kind))
    }

    /// For a complete response head with `status`: the condition to try another server for, or
    /// nil to relay the response.
    static func afterStatus(_ status: Int, _ f: Facts, hasCandidate: () -> Bool) -> NextUpstreamCondition? {
        guard let c = condition(forStatus: status), mayGoToNextServer(c, f, hasCandidate: hasCandidate) else { return nil }
        return c
    }

    /// Whether a request that met `condition` may go to another server: the condition is
    /// configured, the request can be repeated, tries are left, and a server is.
    static func mayGoToNextServer(_ condition: NextUpstreamCondition, _ f: Facts, hasCandidate: () -> Bool) -> Bool {
        f.conditions.contains(condition) && f.replayable && (f.maxTries == 0 || f.tries < f.maxTries) && hasCandidate()
    }

    static func condition(forStatus status: Int) -> NextUpstreamCondition? {
        switch status {
        case 500: .http500
        case 502: .http502
        case 503: .http503
        case 504: .http504
        case 403: .http403
        case 404: .http404
        case 429: .http429
        default: nil
        }
    }

    /// 403 and 404 send the request elsewhere without holding it against the server (as nginx).
    static func countsAsServerFailure(_ c: NextUpstreamCondition) -> Bool { c != .http403 && c != .http404 }

    static func retryReason(_ c: NextUpstreamCondition) -> UpstreamRetryReason {
        switch c {
        case .http500: .http500
        case .http502: .http502
        case .http503: .http503
        case .http504: .http504
        case .http403: .http403
        case .http404: .http404
        case .http429: .http429
        case .error, .timeout, .invalidHeader, .nonIdempotent: .nextUpstream
        }
    }
}
