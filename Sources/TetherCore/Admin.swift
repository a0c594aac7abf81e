import NIOConcurrencyHelpers
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
///
/// Scrapes that arrive while a page is being gathered and rendered wait for that round and share
/// its answer: a hundred concurrent scrapers cost the loops one gathering (a hop to each loop) and
/// the helper one read of /proc per round, not a hundred, and none queues behind another.
final class AdminService: Sendable {
    typealias Page = (contentType: String, body: String)
    let renderer: AdminRenderer
    /// The loops' figures, and with `true` the kernel's and the process's too.
    let snapshot: @Sendable (_ withHost: Bool) -> EventLoopFuture<(StatsSnapshot, HostSnapshot)>
    /// The scrapes waiting for the round of each page under way.
    private let waiting = NIOLockedValueBox<[AdminPage: [EventLoopPromise<Page>]]>([:])

    init(renderer: AdminRenderer, snapshot: @escaping @Sendable (_ withHost: Bool) -> EventLoopFuture<(StatsSnapshot, HostSnapshot)>) {
        self.renderer = renderer
        self.snapshot = snapshot
    }

    /// The page, completed on `loop`.
    func page(_ page: AdminPage, on loop: EventLoop) -> EventLoopFuture<Page> {
        let promise = loop.makePromise(of: Page.self)
        let first = waiting.withLockedValue { w -> Bool in
            if w[page] != nil {
                w[page]!.append(promise)
                return false
            }
            w[page] = [promise]
            return true
        }
        guard first else { return promise.futureResult }
        let renderer = self.renderer
        let waiting = self.waiting
        // stub_status shows no socket or process figures: skip reading /proc for it.
        snapshot(page != .stubStatus).map { stats, host in renderer.render(page, stats: stats, host: host) }.whenComplete { result in
            let round = waiting.withLockedValue { $0.removeValue(forKey: page) ?? [] }
            for p in round { p.completeWith(result) }
        }
        return promise.futureResult
    }
}
