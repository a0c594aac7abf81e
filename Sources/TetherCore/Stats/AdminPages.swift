#if canImport(Glibc)
import Glibc
#endif
import CTether
import TetherConfig
import TetherIO

/// The admin pages on Tether's own loops (`stub_status`, `stats prometheus`, `stats json`).
///
/// A scrape on any loop is answered from every loop's figures, and no serving loop ever waits:
/// a helper thread (a loop of its own, with no sockets) asks each serving loop for its part
/// through that loop's eventfd, sums the parts, reads the kernel's socket table and the
/// process's figures (not for `stub_status`, which shows none), renders the page, and hands it
/// back to the loop that got the scrape, which writes it. Scrapes of a page that arrive while
/// one is being gathered share that round: a hundred concurrent scrapers cost each loop one
/// job and the helper one read of /proc, and none queues behind another.
///
/// All of its state lives on the helper's thread; the loops only hand it jobs.
final class AdminPages: @unchecked Sendable {
    typealias Page = (contentType: String, body: String)

    /// What the helper asks of one serving loop, run on that loop's thread.
    struct Source: @unchecked Sendable {
        let loop: IOLoop
        let part: (_ index: Int) -> SnapshotPart
    }

    /// A page's receiver: run on `loop`, the thread of the connection it answers.
    struct Receiver: @unchecked Sendable {
        let loop: IOLoop
        let deliver: (Page) -> Void
    }

    let renderer: AdminRenderer?
    private let helper: IOLoopThread
    /// The running configuration (the pages list its upstreams and servers); helper's thread.
    private var configuration: Configuration
    /// Set by `TetherServer.start` before any loop serves, read only on the helper's thread after.
    private var sources: [Source] = []
    private var listenPorts = Set<Int>()
    /// The rounds under way, by page, with the receivers waiting for each (helper's thread only).
    private var rounds: [AdminPage: [Receiver]] = [:]

    /// The OCSP fetches by result (any thread).
    private let stapling: @Sendable () -> [String: Int]

    init(renderer: AdminRenderer?, configuration: Configuration, stapling: @escaping @Sendable () -> [String: Int] = { [:] }) throws(IOError) {
        self.renderer = renderer
        self.configuration = configuration
        self.stapling = stapling
        helper = IOLoopThread(loop: try IOLoop(), name: "tether-admin")
    }

    /// The serving loops and the ports they listen on; before any scrape can arrive.
    func serve(_ sources: [Source], configuration: Configuration, listenPorts: Set<Int>) {
        helper.loop.execute { [self] _ in
            self.sources = sources
            self.configuration = configuration
            self.listenPorts = listenPorts
        }
    }

    /// A reload: the pages show the new configuration's upstreams and servers.
    func reconfigure(_ configuration: Configuration, listenPorts: Set<Int>) {
        helper.loop.execute { [self] _ in
            self.configuration = configuration
            self.listenPorts = listenPorts
        }
    }

    /// Renders `page` from every loop's figures and calls `receiver.deliver` with it on
    /// `receiver.loop`.
    func page(_ page: AdminPage, to receiver: Receiver) {
        helper.loop.execute { [self] _ in
            if rounds[page] != nil {
                rounds[page]!.append(receiver)
                return
            }
            rounds[page] = [receiver]
            gather { stats in
                // stub_status shows no socket or process figures: /proc is not read for it.
                let host = page == .stubStatus ? HostSnapshot() : self.hostSnapshot()
                let rendered = self.renderer?.render(page, stats: stats, host: host) ?? ("text/plain", "")
                for r in self.rounds.removeValue(forKey: page) ?? [] {
                    r.loop.execute { _ in r.deliver(rendered) }
                }
            }
        }
    }

    /// Every loop's figures summed, passed to `done` on the helper's thread (for tests and tools:
    /// `TetherServer.stats`). Callable from any thread.
    func snapshot(_ done: @escaping @Sendable (StatsSnapshot) -> Void) {
        helper.loop.execute { [self] _ in gather(done) }
    }

    /// Asks each serving loop for its part, then calls `done` with their sum (helper's thread).
    private func gather(_ done: @escaping (StatsSnapshot) -> Void) {
        let sources = self.sources
        guard !sources.isEmpty else { return done(combine([])) }
        let round = Round(expected: sources.count, done: done)
        for (i, s) in sources.enumerated() {
            s.loop.execute { [helper] _ in
                let part = s.part(i)
                helper.loop.execute { [self] _ in
                    round.parts.append(part)
                    if round.parts.count == round.expected { round.done(self.combine(round.parts.sorted { $0.index < $1.index })) }
                }
            }
        }
    }

    /// The parts of one gathering, collected on the helper's thread.
    private final class Round: @unchecked Sendable {
        let expected: Int
        let done: (StatsSnapshot) -> Void
        var parts: [SnapshotPart] = []
        init(expected: Int, done: @escaping (StatsSnapshot) -> Void) {
            self.expected = expected
            self.done = done
        }
    }

    private func combine(_ parts: [SnapshotPart]) -> StatsSnapshot {
        var s = StatsSnapshot.combining(parts, upstreams: configuration.upstreams, servers: configuration.servers)
        s.ocspFetches = stapling()
        return s
    }

    private func hostSnapshot() -> HostSnapshot {
        let peers = Set(configuration.upstreams.flatMap { u in u.servers.map { HostProbe.Peer(address: $0.address, port: $0.port) } })
        return HostProbe.read(listenPorts: listenPorts, upstreamPeers: peers)
    }

    /// Asks malloc to give back to the system what it holds free, when that is more than 8 MiB
    /// (a loop freed what a burst left behind). On the helper's thread: `malloc_trim` walks
    /// every arena, which no serving loop should wait for.
    func giveBackMemory() {
        helper.loop.execute { _ in
            guard tether_malloc_free_bytes() > AdminPages.trimThreshold else { return }
            _ = tether_malloc_trim()
        }
    }
    static let trimThreshold = 8 << 20

    /// Stops the helper's thread (once the serving loops have stopped).
    func stop() {
        helper.stopAndJoin()
    }

    /// The helper's loop, which also runs the process's health checks (`HealthChecks`).
    var helperLoop: IOLoop { helper.loop }
}
