import Foundation
import Testing
import NIOCore
import TetherConfig
@testable import TetherCore
import TetherTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// proxy_request_buffering and proxy_buffering: slow clients never hold a backend connection.
@Suite struct BufferingTests {
    @Test(arguments: [1_000, 100_000, 3_000_000])
    func aBufferedUploadArrivesIntact(size: Int) throws {
        try withProxy(http: "client_max_body_size 0;") { proxy, backend in
            for chunked in [false, true] {
                let c = try proxy.client()
                try c.send(chunked ? "POST /sum HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   : "POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: \(size)\r\n\r\n")
                try c.sendPattern(count: size, chunked: chunked)
                let r = try c.readResponse()
                #expect(r.bodyText == "\(size) \(Pattern.checksum(count: size).value)", "chunked: \(chunked)")
            }
        }
    }
}

@Suite struct SlowClientTests {
    /// 500 clients trickle their bodies: with proxy_request_buffering on (the default) none of
    /// them holds a backend connection until its body is whole; with it off, each holds one.
    @Test(arguments: [true, false])
    func slowUploadersHoldNoBackendConnection(buffering: Bool) throws {
        let n = 500
        try withProxy(workers: 2, location: buffering ? "" : "proxy_request_buffering off;") { proxy, backend in
            var clients: [TestClient] = []
            for _ in 0..<n {
                let c = try proxy.client()
                try c.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nb")
                clients.append(c)
            }
            // Every head was read: each connection is in its exchange, its body a byte short of whole.
            #expect(eventually { proxy.stats().writing == n })
            if buffering {
                #expect(backend.connectionCount == 0)
            } else {
                #expect(eventually { backend.openConnections == n })
            }
            for c in clients { try c.send("bbb") }
            var sum = Checksum()
            Array("bbbb".utf8).withUnsafeBytes { sum.add($0) }
            var served = 0
            for c in clients where (try? c.readResponse())?.bodyText == "4 \(sum.value)" { served += 1 }
            #expect(served == n)
        }
    }

    /// A client that reads nothing of a 20 MB answer: Tether reads the answer whole (memory,
    /// then a temp file), and its upstream connection goes back to the pool while the client has
    /// not read a byte; then the client gets every byte, the temp file is gone, and the next
    /// request reuses the connection.
    @Test(arguments: ["length", "chunked", "close"])
    func aSlowReaderDoesNotHoldItsUpstreamConnection(mode: String) throws {
        let size = 20_000_000
        try withProxy(workers: 1) { proxy, backend in
            let c = try proxy.client()
            try c.sendGET("/bytes/\(size)?mode=\(mode)")
            #expect(eventually(timeoutMs: 3_000) {
                let s = proxy.stats()
                return s.upstreams[0].servers[0].active == 0 && s.buffered.fileBytes > 5_000_000
            })
            let r = try c.readResponse(keepBody: false)
            #expect(r.status == 200)
            #expect(r.bodySum == Pattern.checksum(count: size))
            let s = proxy.stats()
            #expect(s.buffered.fileBytes == 0 && s.buffered.memoryBytes == 0)
            #expect(s.buffered.filesOpened == 1 && s.buffered.bytesWrittenToFiles > 5_000_000)
            if mode != "close" {
                #expect(s.idleUpstreamConnections == 1)
                #expect(try c.get("/").status == 200)
                #expect(backend.connectionCount == 1, "the connection the slow reader used was reused")
            }
        }
    }

    /// proxy_buffers and proxy_max_temp_file_size bound what one response holds: past them the
    /// upstream is read no faster than the client takes the answer, which still arrives whole.
    @Test(arguments: ["1m", "0"])
    func theBufferLimitsHold(maxTempFile: String) throws {
        let size = 20_000_000
        try withProxy(workers: 1, location: "proxy_buffers 2 4k; proxy_max_temp_file_size \(maxTempFile);") { proxy, _ in
            let fileLimit: Int64 = maxTempFile == "0" ? 0 : 1 << 20
            let c = try proxy.client()
            try c.sendGET("/bytes/\(size)")
            // Filled to its limits, the spool stops there (a buffer over, at most), and the
            // upstream connection stays with the answer.
            #expect(eventually { proxy.stats().buffered.fileBytes >= fileLimit && proxy.stats().buffered.memoryBytes >= 8 << 10 })
            var samples = 0
            #expect(!eventually(timeoutMs: 500) {
                let s = proxy.stats()
                samples += 1
                return s.buffered.fileBytes > fileLimit + (16 << 10) || s.buffered.memoryBytes > (8 + 16) << 10 || s.upstreams[0].servers[0].active != 1
            }, "bounded over \(samples) samples")
            let r = try c.readResponse(keepBody: false)
            #expect(r.bodySum == Pattern.checksum(count: size))
            #expect(proxy.stats().buffered.filesOpened == (fileLimit > 0 ? 1 : 0))
        }
    }

    /// A temp file that cannot be made (its directory was removed after the start): an upload
    /// that needs one gets 500, as from nginx, and a download that needs one is cut, never
    /// ended as if complete. Both are counted and logged.
    @Test func aTempFileThatFailsFailsItsRequestAndNothingElse() throws {
        let dir = "/tmp/tether-temp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        try withProxy(workers: 1, location: "client_body_temp_path \(dir); proxy_temp_path \(dir);") { proxy, _ in
            rmdir(dir)
            let up = try proxy.client()
            try up.send("POST /sum HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
            try up.sendPattern(count: 100_000)
            #expect(try up.readResponse().status == 500)

            let down = try proxy.client()
            try down.sendGET("/bytes/20000000")
            #expect(eventually { proxy.stats().buffered.fileErrors == 2 })
            let got = down.readRawToClose(timeoutMs: 5_000)
            #expect(got.count < 20_000_000)
            // A small request needs no file and is served.
            #expect(try proxy.client().get("/").status == 200)
        }
    }
}
