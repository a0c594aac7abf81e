import NIOCore
import TetherHTTP
import TetherConfig
import TetherPool

/// One request and its response, from the moment its head is parsed to the last response byte.
/// A class: it is mutated in place many times per request, and copying a struct of this many
/// references cost measurable retain/release traffic.
final class Exchange {
    enum ResponsePhase {
        /// Waiting for (or reading) the upstream's response head.
        case head
        case body
        /// 101 Switching Protocols: bytes flow both ways untouched until either side closes.
        case tunnel
        case done
    }

    typealias Relay = ResponsePlan.Relay

    var head: ParsedHead
    let route: CompiledLocation
    let number: Int
    let startedAt: NIODeadline
    let clientKeepAlive: Bool

    // Request body.
    var requestFraming: BodyFraming
    var requestRemaining: Int64 = 0
    var requestChunks = ChunkedDecoder()
    var requestBodyDone = false
    var requestBodyBytes: Int64 = 0
    var bodyStarted = false
    /// The protocols of the client's `Upgrade` that the location allows (`proxy_allow_upgrade`),
    /// as they go upstream: nil when no upgrade is asked for or none is allowed.
    var upgradeOffer: [UInt8]?
    /// Local responses (return, errors) read and drop the body.
    var discardBody = false

    // Upstream.
    var group: UpstreamGroup?
    var server: ServerPool?
    var upstream: UpstreamConnection?
    var reused = false
    /// The balancer counts this exchange as active on `server` (least_conn), until `ended`.
    var balancerActive = false
    var idleMsAtLease: Int64 = 0
    var tried = PeerSet()
    var tries = 0
    var retriedFresh = false
    var connectStartedAt: NIODeadline?
    var connectedAt: NIODeadline?
    var headerAt: NIODeadline?
    /// When the request head went to the upstream (for the response time histogram).
    var requestSentAt: NIODeadline?
    var lastUpstreamActivity: NIODeadline
    /// The server tried last, as configured (`$upstream_addr`); empty when none was.
    var upstreamAddrText: String { server?.addressText ?? "" }
    var upstreamStatus = 0

    // Response.
    var phase = ResponsePhase.head
    var responseHeadBuffer: ByteBuffer?
    var responseFraming = BodyFraming.none
    var responseRemaining: Int64 = 0
    var responseChunks = ChunkedDecoder()
    var relay = Relay.verbatim
    var responseStarted = false
    var responseDone = false
    var upstreamReusable = false
    var backendKeepAlive: ConnectionPool<ObjectIdentifier>.BackendKeepAlive?
    var closeAfter = false
    var status = 0
    var bytesSent = 0
    var bodyBytesSent = 0
    var requestID: String?

    init(head: consuming ParsedHead, route: CompiledLocation, number: Int, clientKeepAlive: Bool, now: NIODeadline) {
        self.route = route
        self.number = number
        self.startedAt = now
        self.lastUpstreamActivity = now
        self.clientKeepAlive = clientKeepAlive
        if head.chunked {
            requestFraming = .chunked
        } else if let n = head.contentLength, n > 0 {
            requestFraming = .length(n)
            requestRemaining = n
        } else {
            requestFraming = .none
            requestBodyDone = true
        }
        self.head = head
    }

    /// Whether a failure before any response byte may be retried (RFC 9110 §9.2.2, and nginx's
    /// `non_idempotent` switch): nothing of a body was sent, and the method allows it.
    /// The client reads this response until the connection closes (see `ResponsePlan`).
    var closeDelimitedToClient: Bool { ResponsePlan.closeDelimited(relay: relay, framing: responseFraming) }

    var mayRetry: Bool {
        !bodyStarted && requestFraming == .none && (head.isIdempotent || route.settings.proxyNextUpstream.contains(.nonIdempotent))
    }
}
