import TetherConfig
import TetherPool

/// Why a client connection closed: `tether_downstream_cx_closed_total{reason}`.
public enum DownstreamCloseReason: Int, CountedReason {
    /// The client closed, or asked to (`Connection: close`, HTTP/1.0 without keep-alive).
    case clientClose
    /// Idle for `keepalive_timeout` after a response.
    case keepaliveTimeout
    /// Opened (or started a head) and sent no complete head within `client_header_timeout`.
    case clientHeaderTimeout
    case keepaliveRequests
    case keepaliveTime
    /// A malformed request, a failed exchange, a timeout that ends the exchange.
    case error
    case tlsError
    /// The kernel gave up on the peer (TCP keepalive probes, TCP_USER_TIMEOUT).
    case tcpKeepalive
    /// Drain or shutdown.
    case shutdown
    /// The client took nothing of its answer for `send_timeout`.
    case sendTimeout
    /// `listen … proxy_protocol`: the header was missing, malformed or late.
    case proxyProtocol

    public var label: String {
        switch self {
        case .clientClose: "client_close"
        case .keepaliveTimeout: "keepalive_timeout"
        case .clientHeaderTimeout: "client_header_timeout"
        case .keepaliveRequests: "keepalive_requests"
        case .keepaliveTime: "keepalive_time"
        case .error: "error"
        case .tlsError: "tls_error"
        case .tcpKeepalive: "tcp_keepalive"
        case .shutdown: "shutdown"
        case .sendTimeout: "send_timeout"
        case .proxyProtocol: "proxy_protocol"
        }
    }

    init(_ r: KeepAlivePolicy.Reason) {
        switch r {
        case .clientClose: self = .clientClose
        case .keepaliveRequests: self = .keepaliveRequests
        case .keepaliveTime: self = .keepaliveTime
        case .shutdown: self = .shutdown
        case .error: self = .error
        }
    }
}

/// What went wrong with an upstream before its response was complete.
enum UpstreamFailureKind: Sendable, Equatable {
    /// Connect refused or failed, a reset, a close before the response ended, a read error.
    case error
    /// `proxy_connect_timeout`, `proxy_send_timeout`, `proxy_read_timeout`.
    case timeout
    /// A response head (or a 101) Tether will not relay.
    case invalidHeader

    /// The `proxy_next_upstream` condition it counts as.
    var condition: NextUpstreamCondition {
        switch self {
        case .error: .error
        case .timeout: .timeout
        case .invalidHeader: .invalidHeader
        }
    }
}

/// Why a request failed upstream: `tether_upstream_rq_failed_total{reason}`.
public enum UpstreamFailedReason: Int, CountedReason {
    case error, timeout, invalidHeader
    /// Part of the response had reached the client when the upstream failed.
    case truncated
    /// No server of the upstream group could be tried (counted for the group, not a server).
    case noLiveUpstreams
    /// Every server was at its `max_conns` and the `queue` was full (503; the group's).
    case queueFull
    /// The request waited in the `queue` for its whole timeout (503; the group's).
    case queueTimeout

    public var label: String {
        switch self {
        case .error: "error"
        case .timeout: "timeout"
        case .invalidHeader: "invalid_header"
        case .truncated: "truncated"
        case .noLiveUpstreams: "no_live_upstreams"
        case .queueFull: "queue_full"
        case .queueTimeout: "queue_timeout"
        }
    }

    init(_ kind: UpstreamFailureKind) {
        switch kind {
        case .error: self = .error
        case .timeout: self = .timeout
        case .invalidHeader: self = .invalidHeader
        }
    }
}

/// Why a request was sent again: `tether_upstream_rq_retry_total{reason}`.
public enum UpstreamRetryReason: Int, CountedReason {
    /// A reused connection failed before any response byte: sent again on a fresh one.
    case reusedConnectionClosed
    /// `proxy_next_upstream error|timeout|invalid_header`: another server.
    case nextUpstream
    /// `proxy_next_upstream http_NNN`: another server, for that status.
    case http500, http502, http503, http504, http403, http404, http429

    public var label: String {
        switch self {
        case .reusedConnectionClosed: "reused_connection_closed"
        case .nextUpstream: "next_upstream"
        case .http500: "http_500"
        case .http502: "http_502"
        case .http503: "http_503"
        case .http504: "http_504"
        case .http403: "http_403"
        case .http404: "http_404"
        case .http429: "http_429"
        }
    }
}

/// A reason a counter is kept for: a case of a small enum, with the label metrics show.
public protocol CountedReason: CaseIterable, Sendable, RawRepresentable where RawValue == Int {
    var label: String { get }
}

/// A counter per case of a reason enum, in a fixed array: counting is an index, not a hash of a
/// string, and a close costs no allocation.
public struct ReasonCounts<Reason: CountedReason>: Sendable, Equatable {
    private(set) var counts = [Int](repeating: 0, count: Reason.allCases.count)

    public init() {}

    public subscript(_ r: Reason) -> Int {
        get { counts[r.rawValue] }
        set { counts[r.rawValue] = newValue }
    }

    /// The count for a label, nil when it is zero (as a dictionary of the counted reasons reads).
    public subscript(_ label: String) -> Int? {
        guard let r = Reason.allCases.first(where: { $0.label == label }), counts[r.rawValue] > 0 else { return nil }
        return counts[r.rawValue]
    }

    public mutating func add(_ o: ReasonCounts) {
        for i in counts.indices { counts[i] += o.counts[i] }
    }

    /// The non-zero counts by label.
    public var byLabel: [String: Int] {
        var d: [String: Int] = [:]
        for r in Reason.allCases where counts[r.rawValue] > 0 { d[r.label] = counts[r.rawValue] }
        return d
    }

    /// Every label, in declaration order (the series metrics always show).
    public static var labels: [String] { Reason.allCases.map(\.label) }
}
