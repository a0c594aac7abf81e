import TetherHTTP

/// How a response from an upstream is relayed, decided once from its head and the request's facts.
struct ResponsePlan: Equatable {
    /// How response body bytes are written to the client.
    enum Relay: Equatable {
        /// As they come (Content-Length, or close-delimited to a client that reads until close).
        case verbatim
        /// Chunked from the upstream, chunked again (canonically) to an HTTP/1.1 client.
        case rechunk
        /// Chunked from the upstream, plain to an HTTP/1.0 client that reads until close.
        case dechunk
        /// Close-delimited from the upstream, chunked to an HTTP/1.1 client so it can stay alive.
        case chunkify
    }

    enum Phase: Equatable {
        /// No body follows the head.
        case done
        case body
        /// 101 Switching Protocols: bytes flow both ways untouched until either side closes.
        case tunnel
    }

    var relay: Relay
    /// The client connection stays open after this response.
    var clientKeepAlive: Bool
    /// The upstream connection may serve another request once this response is read.
    var upstreamReusable: Bool
    var phase: Phase
    /// The response's framing from the upstream.
    var framing: BodyFraming

    /// What the exchange knows about its request when the response head arrives.
    struct Request: Equatable {
        var minorVersion: Int
        /// nginx's keep-alive rules allow the client connection to stay (see `KeepAlivePolicy`).
        var keepAliveAllowed: Bool
        var bodyDone: Bool
        /// `proxy_http_version 1.0`: the upstream connection is not kept.
        var upstreamHTTP10: Bool
    }

    /// - Parameters:
    ///   - framing: the response's body framing (`ParsedHead.responseFraming`).
    ///   - headKeepsConnection: the upstream did not ask to close (1.1 without `Connection: close`).
    init(framing: BodyFraming, upgrading: Bool, headKeepsConnection: Bool, request r: Request) {
        self.framing = framing
        upstreamReusable = headKeepsConnection && framing != .untilClose && !upgrading && !r.upstreamHTTP10
        var keepAlive = r.keepAliveAllowed && r.bodyDone
        switch framing {
        case .chunked:
            relay = r.minorVersion == 1 ? .rechunk : .dechunk
        case .untilClose:
            relay = r.minorVersion == 1 ? .chunkify : .verbatim
        case .none, .length:
            relay = .verbatim
        }
        // An HTTP/1.0 client learns where the body ends only from the close.
        if relay == .dechunk || (framing == .untilClose && relay == .verbatim) { keepAlive = false }
        if upgrading { keepAlive = false }
        clientKeepAlive = keepAlive
        phase = upgrading ? .tunnel : (framing == .none ? .done : .body)
    }

    /// The client reads this response until the connection closes, so a FIN would make a cut
    /// response look complete (a reset must end it instead).
    var closeDelimitedToClient: Bool { Self.closeDelimited(relay: relay, framing: framing) }

    static func closeDelimited(relay: Relay, framing: BodyFraming) -> Bool {
        relay == .dechunk || (relay == .verbatim && framing == .untilClose)
    }
}
