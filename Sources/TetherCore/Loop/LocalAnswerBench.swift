import TetherHTTP
import TetherIO

/// Tether's own loop answering every request itself with a fixed body: what `tether bench-core`
/// runs for `bench/core-local.sh`, which counts its instructions per request against nginx's
/// `return 200` and against the SwiftNIO path's. A measuring tool for the new core's client
/// side, not a server to deploy.
public enum LocalAnswerBench {
    final class Answer: ClientRequestHandler {
        let body: [UInt8]
        init(_ body: [UInt8]) { self.body = body }
        func request(_ head: HeadLayout, bytes: UnsafeRawBufferPointer, connection: ClientConnection) {
            connection.respond(status: 200, body: body, head: head)
        }
    }

    /// Listens on 127.0.0.1:`port` with one loop on the calling thread, until the process ends.
    public static func serve(port: UInt16, body: String) throws(IOError) -> Never {
        let loop = try IOLoop()
        var settings = ClientSettings()
        settings.keepaliveRequests = 1_000_000
        settings.keepaliveTimeoutMs = 300_000
        let clients = ClientLoop(loop: loop, pool: BufferPool(), settings: settings, handler: Answer(Array(body.utf8)))
        let (fd, _) = try Sockets.listenTCP(port: port, backlog: 4096)
        let listener = Listener(fd: fd, accepted: { c, _ in _ = try? clients.adopt(c) }, failed: { _, _ in })
        try listener.start(on: loop)
        while true { try loop.run() }
    }
}
