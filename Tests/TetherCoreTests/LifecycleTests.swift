import Testing
import TetherConfig
import TetherHTTP
@testable import TetherCore

/// The client connection's lifecycle and the exchange's decisions, as values: no socket, no clock.
@Suite struct ClientConnectionStateTests {
    let ms: Int64 = 1_000_000
    func fresh() -> ClientConnectionState { ClientConnectionState(acceptedAt: 1_000 * 1_000_000, headerTimeoutMs: 60_000) }

    @Test func aNewConnectionWaitsForItsFirstHeadUnderTheHeaderTimeout() {
        let c = fresh()
        #expect(c.activity == .waiting)
        #expect(c.deadline == c.acceptedAt + 60_000 * ms)
        // Nothing arrived: a quiet close, counted as a header timeout.
        #expect(c.expired(bufferedBytes: false) == .close(.clientHeaderTimeout))
        // Bytes arrived but not a whole head: 408, as nginx.
        #expect(c.expired(bufferedBytes: true) == .requestTimeout)
    }

    @Test func theHeaderTimerRunsFromTheFirstByteOfAHeadNotTheLast() {
        var c = fresh()
        c.headBytesArrived(now: c.acceptedAt + 5 * ms)
        c.headBytesArrived(now: c.acceptedAt + 50_000 * ms)
        #expect(c.activity == .reading)
        #expect(c.deadline == c.acceptedAt + 5 * ms + 60_000 * ms)
        #expect(c.expired(bufferedBytes: true) == .requestTimeout)
    }

    @Test func anExchangeHasNoConnectionTimerAndCountsRequests() {
        var c = fresh()
        c.headBytesArrived(now: c.acceptedAt)
        #expect(c.headParsed() == 1)
        #expect(c.activity == .writing)
        #expect(c.deadline == nil)
        #expect(c.expired(bufferedBytes: false) == nil)
        c.exchangeFinished(keepaliveTimeoutMs: 5_000, now: c.acceptedAt + 10 * ms)
        #expect(c.headParsed() == 2)
    }

    @Test func betweenRequestsTheKeepaliveTimeoutOfTheLastLocationApplies() {
        var c = fresh()
        _ = c.headParsed()
        let end = c.acceptedAt + 30 * ms
        c.exchangeFinished(keepaliveTimeoutMs: 5_000, now: end)
        #expect(c.activity == .waiting)
        #expect(c.deadline == end + 5_000 * ms)
        #expect(c.expired(bufferedBytes: false) == .close(.keepaliveTimeout))
        // A pipelined head that started arriving is under the header timer again.
        c.headBytesArrived(now: end + ms)
        #expect(c.deadline == end + ms + 60_000 * ms)
        #expect(c.expired(bufferedBytes: true) == .requestTimeout)
    }

    @Test func aCloseIsCountedOnceWithTheFirstReason() {
        var c = fresh()
        c.pendingReason = .keepaliveRequests
        #expect(c.close() == .keepaliveRequests)
        #expect(c.close(.error) == nil)
        #expect(c.isClosed)
        #expect(c.deadline == nil)
        var d = fresh()
        d.pendingReason = .keepaliveRequests
        #expect(d.close(.tlsError) == .tlsError)
    }

    @Test func drainClosesOnlyAConnectionWithNothingOfAHead() {
        var c = fresh()
        #expect(c.closesOnDrain(bufferedBytes: false))
        #expect(!c.closesOnDrain(bufferedBytes: true))
        c.headBytesArrived(now: c.acceptedAt)
        #expect(!c.closesOnDrain(bufferedBytes: false))
        _ = c.headParsed()
        #expect(!c.closesOnDrain(bufferedBytes: false))
    }
}

@Suite struct ExchangeTimerTests {
    static let ms: Int64 = 1_000_000
    static let t = ExchangeTimer.Timeouts(clientBodyMs: 60_000, sendMs: 30_000, proxySendMs: 20_000, proxyReadMs: 10_000)
    static func facts(bodyDone: Bool = true, paused: Bool = false, clientStuck: Int64? = nil, upstreamStuck: Int64? = nil,
                      waiting: Bool = true, lastUpstream: Int64 = 100, restart: Int64 = 0) -> ExchangeTimer.Facts {
        .init(requestBodyDone: bodyDone, readPaused: paused, lastClientRead: 50 * ms, clientUnwritableSince: clientStuck.map { $0 * ms },
              upstreamUnwritableSince: upstreamStuck.map { $0 * ms }, waitingForUpstream: waiting,
              lastUpstreamActivity: lastUpstream * ms, readTimerRestart: restart * ms)
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var facts: ExchangeTimer.Facts
        var expected: ExchangeTimer?
        var atMs: Int64 = 0
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "waiting for the response: proxy_read_timeout from the last upstream read", facts: facts(), expected: .proxyRead, atMs: 100 + 10_000),
        Case(name: "the read timer restarted later (client took data again)", facts: facts(restart: 400), expected: .proxyRead, atMs: 400 + 10_000),
        Case(name: "body still arriving: client_body_timeout, never proxy_read", facts: facts(bodyDone: false), expected: .clientBody, atMs: 50 + 60_000),
        Case(name: "body arriving but Tether stopped reading: nothing blames the client", facts: facts(bodyDone: false, paused: true), expected: nil),
        Case(name: "the client does not take the response: send_timeout, and no proxy_read", facts: facts(clientStuck: 200), expected: .send, atMs: 200 + 30_000),
        Case(name: "the upstream does not take the request: proxy_send_timeout", facts: facts(bodyDone: false, paused: true, upstreamStuck: 70), expected: .proxySend, atMs: 70 + 20_000),
        Case(name: "no upstream attached: no upstream timer", facts: facts(upstreamStuck: 70, waiting: false), expected: nil),
        Case(name: "the earliest deadline wins", facts: facts(bodyDone: false, clientStuck: 0, upstreamStuck: 0), expected: .proxySend, atMs: 20_000),
    ]

    @Test(arguments: cases) func theTimerThatRunsBlamesTheSideHoldingThingsUp(_ c: Case) {
        let next = ExchangeTimer.next(c.facts, Self.t)
        #expect(next?.timer == c.expected)
        if c.expected != nil { #expect(next?.deadline == c.atMs * Self.ms) }
    }
}

@Suite struct NextUpstreamTests {
    static func facts(started: Bool = false, closeDelimited: Bool = false, reused: Bool = false, retriedFresh: Bool = false,
                      replayable: Bool = true, tries: Int = 1, conditions: Set<NextUpstreamCondition> = [.error, .timeout],
                      maxTries: Int = 0, bodyDone: Bool = true) -> NextUpstream.Facts {
        .init(responseStarted: started, closeDelimitedToClient: closeDelimited, reused: reused, retriedFresh: retriedFresh,
              replayable: replayable, tries: tries, conditions: conditions, maxTries: maxTries, requestBodyDone: bodyDone)
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var kind: UpstreamFailureKind
        var facts: NextUpstream.Facts
        var candidate = true
        var expected: NextUpstream.Action
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "cut after the head went out: end the connection, counted truncated", kind: .error, facts: facts(started: true),
             expected: .abort(reset: false, counted: .truncated)),
        Case(name: "cut in a close-delimited response: a reset, so it cannot look complete", kind: .error,
             facts: facts(started: true, closeDelimited: true), expected: .abort(reset: true, counted: .truncated)),
        Case(name: "a timeout after the head: counted as a timeout", kind: .timeout, facts: facts(started: true),
             expected: .abort(reset: false, counted: .timeout)),
        Case(name: "a reused connection failed before any byte: once more on a fresh one", kind: .error, facts: facts(reused: true),
             expected: .retryFresh),
        Case(name: "the fresh retry failed too: the next server", kind: .error, facts: facts(reused: true, retriedFresh: true),
             expected: .nextServer),
        Case(name: "a POST on a reused connection is not sent twice", kind: .error, facts: facts(reused: true, replayable: false),
             expected: .respond(status: 502, closeAfter: false, counted: .error)),
        Case(name: "a timeout on a reused connection is not a stale connection", kind: .timeout, facts: facts(reused: true, conditions: []),
             expected: .respond(status: 504, closeAfter: false, counted: .timeout)),
        Case(name: "proxy_next_upstream off: answer 502", kind: .error, facts: facts(conditions: []),
             expected: .respond(status: 502, closeAfter: false, counted: .error)),
        Case(name: "invalid_header not configured: 502", kind: .invalidHeader, facts: facts(),
             expected: .respond(status: 502, closeAfter: false, counted: .invalidHeader)),
        Case(name: "proxy_next_upstream_tries reached", kind: .error, facts: facts(tries: 2, maxTries: 2),
             expected: .respond(status: 502, closeAfter: false, counted: .error)),
        Case(name: "no server left to try", kind: .error, facts: facts(), candidate: false,
             expected: .respond(status: 502, closeAfter: false, counted: .error)),
        Case(name: "an unread request body: answer and close", kind: .timeout, facts: facts(replayable: false, bodyDone: false),
             expected: .respond(status: 504, closeAfter: true, counted: .timeout)),
    ]

    @Test(arguments: cases) func aFailureGoesWhereItIsSafeTo(_ c: Case) {
        #expect(NextUpstream.afterFailure(c.kind, c.facts, hasCandidate: { c.candidate }) == c.expected)
    }

    @Test func theBalancerIsAskedOnlyWhenEverythingElseAllowsAnotherServer() {
        var asked = 0
        _ = NextUpstream.afterFailure(.error, Self.facts(conditions: []), hasCandidate: { asked += 1; return true })
        _ = NextUpstream.afterFailure(.error, Self.facts(replayable: false), hasCandidate: { asked += 1; return true })
        _ = NextUpstream.afterFailure(.error, Self.facts(started: true), hasCandidate: { asked += 1; return true })
        #expect(asked == 0)
        _ = NextUpstream.afterFailure(.error, Self.facts(), hasCandidate: { asked += 1; return true })
        #expect(asked == 1)
    }

    @Test func statusesGoToTheNextServerOnlyWhenConfigured() {
        let f = Self.facts(conditions: [.http502, .http404])
        #expect(NextUpstream.afterStatus(502, f, hasCandidate: { true }) == .http502)
        #expect(NextUpstream.afterStatus(503, f, hasCandidate: { true }) == nil)
        #expect(NextUpstream.afterStatus(200, f, hasCandidate: { true }) == nil)
        #expect(NextUpstream.afterStatus(502, f, hasCandidate: { false }) == nil)
        #expect(NextUpstream.afterStatus(502, Self.facts(replayable: false, conditions: [.http502]), hasCandidate: { true }) == nil)
        // 404 tries elsewhere without marking the server failed; 502 marks it.
        #expect(NextUpstream.afterStatus(404, f, hasCandidate: { true }) == .http404)
        #expect(!NextUpstream.countsAsServerFailure(.http404))
        #expect(NextUpstream.countsAsServerFailure(.http502))
        #expect(NextUpstream.retryReason(.http502).label == "http_502")
        #expect(NextUpstream.retryReason(.timeout) == .nextUpstream)
    }
}

@Suite struct ResponsePlanTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var framing: BodyFraming
        var upgrading = false
        var headKeeps = true
        var minor = 1
        var allowed = true
        var bodyDone = true
        var http10 = false
        var relay: ResponsePlan.Relay
        var keepAlive: Bool
        var reusable: Bool
        var phase: ResponsePlan.Phase
        var closeDelimited = false
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "Content-Length to 1.1", framing: .length(12), relay: .verbatim, keepAlive: true, reusable: true, phase: .body),
        Case(name: "Content-Length to 1.0 keep-alive", framing: .length(12), minor: 0, relay: .verbatim, keepAlive: true, reusable: true, phase: .body),
        Case(name: "no body", framing: .none, relay: .verbatim, keepAlive: true, reusable: true, phase: .done),
        Case(name: "chunked to 1.1: re-chunked", framing: .chunked, relay: .rechunk, keepAlive: true, reusable: true, phase: .body),
        Case(name: "chunked to 1.0: de-chunked, ends with the close", framing: .chunked, minor: 0, relay: .dechunk, keepAlive: false,
             reusable: true, phase: .body, closeDelimited: true),
        Case(name: "close-delimited to 1.1: chunked so the client stays", framing: .untilClose, relay: .chunkify, keepAlive: true,
             reusable: false, phase: .body),
        Case(name: "close-delimited to 1.0: as it came, ends with the close", framing: .untilClose, minor: 0, relay: .verbatim,
             keepAlive: false, reusable: false, phase: .body, closeDelimited: true),
        Case(name: "101: a tunnel, neither side kept", framing: .none, upgrading: true, relay: .verbatim, keepAlive: false,
             reusable: false, phase: .tunnel),
        Case(name: "keep-alive rules say close", framing: .length(1), allowed: false, relay: .verbatim, keepAlive: false, reusable: true, phase: .body),
        Case(name: "request body unread: the client connection closes", framing: .length(1), bodyDone: false, relay: .verbatim,
             keepAlive: false, reusable: true, phase: .body),
        Case(name: "upstream said Connection: close", framing: .length(1), headKeeps: false, relay: .verbatim, keepAlive: true,
             reusable: false, phase: .body),
        Case(name: "proxy_http_version 1.0", framing: .length(1), http10: true, relay: .verbatim, keepAlive: true, reusable: false, phase: .body),
    ]

    @Test(arguments: cases) func aResponseIsRelayedAndKeptAsItsFramingAllows(_ c: Case) {
        let p = ResponsePlan(framing: c.framing, upgrading: c.upgrading, headKeepsConnection: c.headKeeps,
                             request: .init(minorVersion: c.minor, keepAliveAllowed: c.allowed, bodyDone: c.bodyDone, upstreamHTTP10: c.http10))
        #expect(p.relay == c.relay)
        #expect(p.clientKeepAlive == c.keepAlive)
        #expect(p.upstreamReusable == c.reusable)
        #expect(p.phase == c.phase)
        #expect(p.closeDelimitedToClient == c.closeDelimited)
    }
}

@Suite struct ReasonCountsTests {
    @Test func labelsAreUniqueAndCountsReadLikeTheDictionaryTheyReplace() {
        #expect(Set(ReasonCounts<DownstreamCloseReason>.labels).count == DownstreamCloseReason.allCases.count)
        #expect(Set(ReasonCounts<UpstreamRetryReason>.labels).count == UpstreamRetryReason.allCases.count)
        var c = ReasonCounts<DownstreamCloseReason>()
        c[.keepaliveTimeout] += 2
        #expect(c["keepalive_timeout"] == 2)
        #expect(c["error"] == nil)
        #expect(c.byLabel == ["keepalive_timeout": 2])
        var d = ReasonCounts<DownstreamCloseReason>()
        d[.error] += 1
        d.add(c)
        #expect(d.byLabel == ["keepalive_timeout": 2, "error": 1])
    }
}
