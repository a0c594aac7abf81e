/// The client side's keep-alive decision for one response, from nginx's rules: the connection
/// stays open unless either side asked to close, the request count reached `keepalive_requests`,
/// or the connection has lived `keepalive_time`.
public struct KeepAlivePolicy: Sendable, Equatable {
    public var maxRequests: Int
    public var maxLifetimeMs: Int64
    public var draining: Bool

    public init(maxRequests: Int, maxLifetimeMs: Int64, draining: Bool = false) {
        self.maxRequests = maxRequests
        self.maxLifetimeMs = maxLifetimeMs
        self.draining = draining
    }

    public enum Decision: Equatable, Sendable {
        case keepAlive
        case close(Reason)
    }

    public enum Reason: String, Sendable {
        case clientClose = "client_close"
        case keepaliveRequests = "keepalive_requests"
        case keepaliveTime = "keepalive_time"
        case shutdown = "shutdown"
        case error = "error"
    }

    /// - Parameters:
    ///   - requestNumber: 1 for the first request on the connection.
    ///   - clientWantsKeepAlive: HTTP/1.1 without `Connection: close`, or 1.0 with `Connection: keep-alive`.
    ///   - connectionAgeMs: time since the connection was accepted.
    public func decide(requestNumber: Int, clientWantsKeepAlive: Bool, connectionAgeMs: Int64) -> Decision {
        if !clientWantsKeepAlive { return .close(.clientClose) }
        if draining { return .close(.shutdown) }
        if requestNumber >= maxRequests { return .close(.keepaliveRequests) }
        if connectionAgeMs >= maxLifetimeMs { return .close(.keepaliveTime) }
        return .keepAlive
    }
}
