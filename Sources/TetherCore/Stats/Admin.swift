import TetherConfig
@_exported import TetherOps

/// The pages of the admin endpoint.
public enum AdminPage: Sendable, Equatable {
    case stubStatus
    case prometheus
    case json
}

/// Renders admin pages; TetherAdmin provides the implementation (TetherCore only gathers).
public protocol AdminRenderer: Sendable {
    func render(_ page: AdminPage, stats: StatsSnapshot, host: HostSnapshot) -> (contentType: String, body: String)
}
