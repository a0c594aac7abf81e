import NIOCore
import NIOPosix
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

/// Gathers a snapshot and renders a page, for any loop that serves an admin location.
final class AdminService: Sendable {
    let renderer: AdminRenderer
    /// The loops' figures, and with `true` the kernel's and the process's too.
    let snapshot: @Sendable (_ withHost: Bool) -> EventLoopFuture<(StatsSnapshot, HostSnapshot)>

    init(renderer: AdminRenderer, snapshot: @escaping @Sendable (_ withHost: Bool) -> EventLoopFuture<(StatsSnapshot, HostSnapshot)>) {
        self.renderer = renderer
        self.snapshot = snapshot
    }

    func page(_ page: AdminPage) -> EventLoopFuture<(contentType: String, body: String)> {
        let renderer = self.renderer
        // stub_status shows no socket or process figures: skip reading /proc for it.
        return snapshot(page != .stubStatus).map { stats, host in renderer.render(page, stats: stats, host: host) }
    }
}
