import NIOCore
import NIOEmbedded
import Testing
import TetherTestSupport
@testable import TetherTLS

/// Records what reaches the end of a pipeline.
final class Recorder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    var received = ByteBuffer()
    var handshakes: [TLSHandshakeCompleted] = []
    var errors: [Error] = []
    var inactive = false
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        received.writeBuffer(&b)
    }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? TLSHandshakeCompleted { handshakes.append(e) }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { errors.append(error) }
    func channelInactive(context: ChannelHandlerContext) { inactive = true }
    var text: String { String(buffer: received) }
}

final class Counts: TLSObserver {
    var ok: [(String, Bool)] = []
    var failed: [TLSHandshakeFailure] = []
    func tlsHandshakeCompleted(version: String, resumed: Bool) { ok.append((version, resumed)) }
    func tlsHandshakeFailed(_ failure: TLSHandshakeFailure, detail: String) { failed.append(failure) }
}

func serverSettings(_ names: [String] = ["localhost"]) -> TLSServerSettings {
    TLSServerSettings(certificates: names.map { (TestPKI.path("\($0).pem"), TestPKI.path("\($0).key")) })
}

func clientSettings(verify: Bool = true, name: String = "localhost", ca: String = "ca.pem") -> TLSClientSettings {
    var c = TLSClientSettings(name: name)
    c.verify = verify
    c.trustedCertificate = TestPKI.path(ca)
    c.sendServerName = true
    return c
}

/// A server and a client TLS handler in two embedded channels, wired back to back.
struct Pair {
    let server = EmbeddedChannel()
    let client = EmbeddedChannel()
    let serverSide = Recorder()
    let clientSide = Recorder()
    let serverCounts = Counts()
    let clientCounts = Counts()
    /// Delivers ciphertext one byte per read when set (forces WANT_READ at every step).
    var byteAtATime = false

    init(server names: TLSServerNames, client: TLSContext, session: TLSSessionSlot? = nil, byteAtATime: Bool = false) throws {
        self.byteAtATime = byteAtATime
        try self.server.pipeline.syncOperations.addHandler(TLSHandler(server: names, observer: serverCounts))
        try self.server.pipeline.syncOperations.addHandler(serverSide)
        try self.client.pipeline.syncOperations.addHandler(TLSHandler(client: client, session: session, observer: clientCounts))
        try self.client.pipeline.syncOperations.addHandler(clientSide)
        try self.server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try self.client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 443)).wait()
    }

    init(server: TLSServerSettings = serverSettings(), client: TLSClientSettings = clientSettings(), session: TLSSessionSlot? = nil, byteAtATime: Bool = false) throws {
        let ctx = try TLSContext.server(server)
        try self.init(server: TLSServerNames(defaultContext: ctx) { _ in nil }, client: try TLSContext.client(client), session: session, byteAtATime: byteAtATime)
    }

    /// Moves bytes both ways until neither side has anything to send; returns the bytes moved.
    @discardableResult
    func pump() throws -> Int {
        var moved = 0
        while true {
            var progress = false
            for (from, to) in [(client, server), (server, client)] {
                while let b = try from.readOutbound(as: ByteBuffer.self) {
                    progress = true
                    moved += b.readableBytes
                    guard to.isActive else { continue }
                    if byteAtATime {
                        var rest = b
                        while to.isActive, let one = rest.readSlice(length: 1) { try to.writeInbound(one) }
                    } else {
                        try to.writeInbound(b)
                    }
                }
            }
            if !progress { return moved }
        }
    }

    func send(_ text: String, from ch: EmbeddedChannel) throws {
        ch.write(ByteBuffer(string: text), promise: nil)
        ch.flush()
        try pump()
    }
}

@Suite struct TLSHandlerTests {
    @Test func handshakeNegotiatesTLS13AndHTTP11ThenCarriesDataBothWays() throws {
        let p = try Pair()
        try p.pump()
        #expect(p.serverSide.handshakes.first?.version == "TLSv1.3")
        #expect(p.serverSide.handshakes.first?.alpn == "http/1.1")
        #expect(p.clientSide.handshakes.first?.alpn == "http/1.1")
        #expect(p.serverSide.handshakes.first?.serverName == "localhost")
        try p.send("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", from: p.client)
        #expect(p.serverSide.text == "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try p.send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", from: p.server)
        #expect(p.clientSide.text == "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        #expect(p.serverCounts.ok.map(\.0) == ["TLSv1.3"])
        #expect(p.clientCounts.ok.count == 1)
    }

    @Test func tls12IsNegotiatedWhenTheClientStopsThere() throws {
        var c = clientSettings()
        c.protocols = [.tls1_2]
        let p = try Pair(client: c)
        try p.pump()
        #expect(p.serverSide.handshakes.first?.version == "TLSv1.2")
        try p.send("ping", from: p.client)
        #expect(p.serverSide.text == "ping")
    }

    @Test func byteAtATimeDeliveryCompletesTheHandshakeAndTheData() throws {
        let p = try Pair(byteAtATime: true)
        try p.pump()
        #expect(p.serverSide.handshakes.count == 1)
        try p.send("hello, one byte at a time", from: p.client)
        try p.send("and back", from: p.server)
        #expect(p.serverSide.text == "hello, one byte at a time")
        #expect(p.clientSide.text == "and back")
    }

    @Test func writesMadeDuringTheHandshakeAreSentWhenItIsDone() throws {
        let p = try Pair()
        // The client has sent its hello only; these writes must wait for the handshake.
        let written = p.client.eventLoop.makePromise(of: Void.self)
        p.client.write(ByteBuffer(string: "early "), promise: nil)
        p.client.write(ByteBuffer(string: "data"), promise: written)
        p.client.flush()
        final class Done { var value = false }
        let done = Done()
        written.futureResult.assumeIsolated().whenSuccess { done.value = true }
        #expect(!done.value)
        try p.pump()
        #expect(p.serverSide.text == "early data")
        #expect(done.value)
    }

    @Test func largeWritesArriveWhole() throws {
        let p = try Pair()
        try p.pump()
        var big = ByteBuffer()
        for i in 0..<(1 << 20) { big.writeInteger(UInt8(truncatingIfNeeded: i &* 31 &+ i >> 9)) }
        let expected = big
        p.client.write(big, promise: nil)
        p.client.flush()
        try p.pump()
        #expect(p.serverSide.received.readableBytes == 1 << 20)
        #expect(p.serverSide.received == expected)
    }

    @Test func closeNotifyFromTheClientIsAnsweredAndClosesTheServerSide() throws {
        let p = try Pair()
        try p.pump()
        let closed = p.client.close()
        try p.pump()
        try closed.wait()
        #expect(!p.server.isActive, "the server closes after the client's close_notify")
        #expect(p.serverSide.errors.isEmpty, "a clean close is not an error")
    }

    @Test func closeNotifyFromTheServerClosesTheClientCleanly() throws {
        let p = try Pair()
        try p.pump()
        try p.send("last words", from: p.server)
        _ = p.server.close()
        try p.pump()
        #expect(p.clientSide.text == "last words")
        #expect(!p.client.isActive)
        #expect(p.clientSide.errors.isEmpty)
    }

    @Test func outputCloseSendsCloseNotifyAfterPendingData() throws {
        let p = try Pair()
        try p.pump()
        p.server.write(ByteBuffer(string: "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"), promise: nil)
        p.server.close(mode: .output, promise: nil)
        try p.pump()
        #expect(p.clientSide.text.hasPrefix("HTTP/1.1 400"))
        #expect(!p.client.isActive, "the client saw close_notify after the response")
    }

    @Test func raggedEOFIsReportedAsUncleanShutdown() throws {
        let p = try Pair()
        try p.pump()
        p.server.pipeline.fireChannelInactive()
        #expect(p.serverSide.errors.contains { if case TLSError.uncleanShutdown = $0 { return true }; return false })
        #expect(p.serverSide.inactive)
    }

    @Test(arguments: ["GET / HTTP/1.1\r\nHost: x\r\n\r\n", "\u{16}\u{03}\u{01}\u{00}\u{05}garbagegarbage", "SSH-2.0-OpenSSH_9.2\r\n"])
    func notTLSIsRejectedAndCounted(_ input: String) throws {
        let server = EmbeddedChannel()
        let counts = Counts()
        let rec = Recorder()
        try server.pipeline.syncOperations.addHandler(TLSHandler(server: TLSServerNames(defaultContext: try TLSContext.server(serverSettings())) { _ in nil }, observer: counts))
        try server.pipeline.syncOperations.addHandler(rec)
        try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try server.writeInbound(ByteBuffer(string: input))
        #expect(!server.isActive)
        #expect(counts.failed.count == 1)
        #expect(counts.failed == [.notTLS])
        #expect(rec.received.readableBytes == 0)
    }

    @Test func aTLS11ClientIsRefusedWithAProtocolFailure() throws {
        var c = clientSettings()
        c.protocols = [.tls1_1]
        c.ciphers = "DEFAULT:@SECLEVEL=0"
        let p = try Pair(client: c)
        try p.pump()
        #expect(p.serverCounts.failed == [.protocolVersion])
        #expect(!p.server.isActive)
        #expect(!p.client.isActive)
    }

    @Test func aCertificateFromAnotherAuthorityFailsVerification() throws {
        let p = try Pair(client: clientSettings(ca: "other-ca.pem"))
        try p.pump()
        #expect(p.clientCounts.failed == [.certificate])
        #expect(p.clientSide.errors.contains { "\($0)".contains("certificate verify failed") })
    }

    @Test func theWrongNameFailsVerification() throws {
        let p = try Pair(client: clientSettings(name: "a.test"))
        try p.pump()
        #expect(p.clientCounts.failed == [.certificate])
    }

    @Test func aChainFileVerifiesAgainstTheRootOnly() throws {
        let p = try Pair(server: serverSettings(["chain.test"]), client: clientSettings(name: "chain.test"))
        try p.pump()
        #expect(p.clientCounts.ok.count == 1)
        #expect(p.clientCounts.failed.isEmpty)
    }

    @Test func sniSelectsTheNamedServersCertificateAndUnknownNamesGetTheDefault() throws {
        let def = try TLSContext.server(serverSettings(["localhost"]))
        let a = try TLSContext.server(serverSettings(["a.test"]))
        let b = try TLSContext.server(serverSettings(["b.test"]))
        let names = TLSServerNames(defaultContext: def) { ["a.test": a, "b.test": b][$0] }
        for name in ["a.test", "b.test"] {
            // Verification of `name` passes only if the server presented `name`'s certificate.
            let p = try Pair(server: names, client: try TLSContext.client(clientSettings(name: name)))
            try p.pump()
            #expect(p.clientCounts.ok.count == 1, "\(name)")
        }
        var unknown = clientSettings(name: "unknown.test")
        unknown.verify = false
        let p = try Pair(server: names, client: try TLSContext.client(unknown))
        try p.pump()
        #expect(p.clientCounts.ok.count == 1)
        // The default certificate is localhost's: the same handshake verifying localhost passes.
        var check = clientSettings(name: "localhost")
        check.sendServerName = true
        let q = try Pair(server: names, client: try TLSContext.client(check))
        try q.pump()
        #expect(q.clientCounts.ok.count == 1)
    }

    @Test(arguments: [TLSVersion.tls1_2, .tls1_3])
    func sessionsAreResumed(_ version: TLSVersion) throws {
        let server = try TLSContext.server(serverSettings())
        let names = TLSServerNames(defaultContext: server) { _ in nil }
        var c = clientSettings()
        c.protocols = [version]
        let client = try TLSContext.client(c)
        let slot = TLSSessionSlot()
        let first = try Pair(server: names, client: client, session: slot)
        try first.pump()
        try first.send("x", from: first.server)  // TLS 1.3 tickets are read with application data
        #expect(first.clientCounts.ok.first?.1 == false)
        #expect(slot.stored >= 1)
        let second = try Pair(server: names, client: client, session: slot)
        try second.pump()
        #expect(second.clientCounts.ok.first?.1 == true, "resumed")
        #expect(second.serverCounts.ok.first?.1 == true)
    }

    @Test func rsaAndECDSACertificatesCanServeTogether() throws {
        let both = TLSServerSettings(certificates: [(TestPKI.path("localhost.pem"), TestPKI.path("localhost.key")),
                                                    (TestPKI.path("localhost-rsa.pem"), TestPKI.path("localhost-rsa.key"))])
        var rsaOnly = clientSettings()
        rsaOnly.protocols = [.tls1_2]
        rsaOnly.ciphers = "ECDHE-RSA-AES128-GCM-SHA256"
        let p = try Pair(server: both, client: rsaOnly)
        try p.pump()
        #expect(p.clientCounts.ok.count == 1)
        var ecdsaOnly = rsaOnly
        ecdsaOnly.ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256"
        let q = try Pair(server: both, client: ecdsaOnly)
        try q.pump()
        #expect(q.clientCounts.ok.count == 1)
    }
}

@Suite struct TLSContextTests {
    @Test func aMissingCertificateFileIsAnError() {
        #expect { try TLSContext.server(TLSServerSettings(certificates: [("/nonexistent.pem", TestPKI.path("localhost.key"))])) } throws: { e in
            "\(e)".contains("cannot load certificate \"/nonexistent.pem\"")
        }
    }

    @Test func aKeyThatDoesNotMatchItsCertificateIsAnError() {
        #expect { try TLSContext.server(TLSServerSettings(certificates: [(TestPKI.path("localhost.pem"), TestPKI.path("a.test.key"))])) } throws: { e in
            "\(e)".contains("does not match certificate")
        }
    }

    @Test func unknownCiphersAndCurvesAreErrors() {
        var s = serverSettings()
        s.ciphers = "NOT-A-CIPHER"
        #expect { try TLSContext.server(s) } throws: { "\($0)".contains("no cipher in \"ssl_ciphers NOT-A-CIPHER\"") }
        s = serverSettings()
        s.ecdhCurve = "nosuchcurve"
        #expect { try TLSContext.server(s) } throws: { "\($0)".contains("unknown curve") }
    }
}
