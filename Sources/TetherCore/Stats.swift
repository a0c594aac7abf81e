import TetherPool

/// Counters of one event loop: plain integers, touched only on that loop, summed when read.
struct LoopStats: Sendable {
    var downstreamAccepted = 0
    var downstreamActive = 0
    var downstreamRequests = 0
    var responsesByClass = [0, 0, 0, 0, 0, 0]
    var downstreamClosed: [String: Int] = [:]
    var upstreamConnects = 0
    var upstreamConnectNanos: Int64 = 0
    var upstreamRequests = 0
    var upstreamReused = 0
    var upstreamRetries: [String: Int] = [:]
    var upstreamFailures: [String: Int] = [:]
    var upstreamClosedByReason: [String: Int] = [:]

    mutating func upstreamClosed(_ reason: CloseReason) {
        upstreamClosedByReason[reason.rawValue, default: 0] += 1
    }

    mutating func add(_ o: LoopStats) {
        downstreamAccepted += o.downstreamAccepted
        downstreamActive += o.downstreamActive
        downstreamRequests += o.downstreamRequests
        for i in responsesByClass.indices { responsesByClass[i] += o.responsesByClass[i] }
        downstreamClosed.merge(o.downstreamClosed, uniquingKeysWith: +)
        upstreamConnects += o.upstreamConnects
        upstreamConnectNanos += o.upstreamConnectNanos
        upstreamRequests += o.upstreamRequests
        upstreamReused += o.upstreamReused
        upstreamRetries.merge(o.upstreamRetries, uniquingKeysWith: +)
        upstreamFailures.merge(o.upstreamFailures, uniquingKeysWith: +)
        upstreamClosedByReason.merge(o.upstreamClosedByReason, uniquingKeysWith: +)
    }
}

/// A snapshot of every loop's counters, summed.
public struct StatsSnapshot: Sendable {
    public var acceptedConnections: Int
    public var activeConnections: Int
    public var requests: Int
    public var upstreamConnects: Int
    public var upstreamRequests: Int
    public var upstreamReused: Int
    public var upstreamRetries: [String: Int]
    public var upstreamFailures: [String: Int]
    public var upstreamClosed: [String: Int]
    public var downstreamClosed: [String: Int]
    public var idleUpstreamConnections: Int
    /// Learned idle windows, by "upstream server" (milliseconds).
    public var learnedIdleMs: [String: Int64]
}
