import TetherConfig

/// The pages of the admin endpoint.
public enum AdminPage: Sendable, Equatable {
    case stubStatus
    case prometheus
    case json
}

/// What the kernel and the process say, read at scrape time (never on the request path).
public struct HostSnapshot: Sendable {
    /// TCP sockets of Tether's listening ports and upstream peers, by state name
    /// (`established`, `time_wait`, `close_wait`, ...).
    public var sockets: [String: Int] = [:]
    public var openFDs = 0
    public var maxFDs = 0
    public var residentBytes = 0
    public var virtualBytes = 0
    public var cpuSeconds: Double = 0
    public var startTimeSeconds: Double = 0
}

/// Renders admin pages; TetherAdmin provides the implementation (TetherCore only gathers).
public protocol AdminRenderer: Sendable {
    func render(_ page: AdminPage, stats: StatsSnapshot, host: HostSnapshot) -> (contentType: String, body: String)
}
