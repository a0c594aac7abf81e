import Testing
@testable import TetherIO
#if canImport(Glibc)
import Glibc
#endif

@Suite struct BufferTests {
    @Test func thePoolReusesItsBuffers() {
        let pool = BufferPool(bufferSize: 1024, maximumSpare: 4)
        for _ in 0..<1_000 {
            var b = pool.take()
            b.append(contentsOf: [1, 2, 3])
            pool.recycle(b)
        }
        #expect(pool.allocations == 1 && pool.outstanding == 0 && pool.spareCount == 1)
        // Ten at once: nine more allocated, then all ten given back.
        func hold(_ n: Int) {
            guard n > 0 else {
                #expect(pool.outstanding == 10 && pool.allocations == 10)
                return
            }
            let b = pool.take()
            hold(n - 1)
            pool.recycle(b)
        }
        hold(10)
        #expect(pool.outstanding == 0)
        #expect(pool.spareCount == 4, "no more spares kept than maximumSpare")
        pool.trim(keeping: 1)
        #expect(pool.spareCount == 1)
    }

    @Test func readsFillTheBufferThenReportWouldBlockAndEOF() {
        let pool = BufferPool(bufferSize: 8)
        let (mine, peer) = socketPair()
        defer { Glibc.close(mine) }
        var b = pool.take()
        #expect(b.read(from: mine) == .wouldBlock)
        send(peer, "0123456789")
        #expect(b.read(from: mine) == .bytes(8, eof: false), "stops when full")
        #expect(b.withReadableBytes { Array($0) } == Array("01234567".utf8))
        b.consume(8)
        #expect(b.isEmpty && b.writableBytes == 8, "an emptied buffer starts again at the front")
        Glibc.close(peer)
        #expect(b.read(from: mine) == .bytes(2, eof: true))
        b.consume(1)
        b.compact()
        #expect(b.readerIndex == 0 && b.withReadableBytes { Array($0) } == Array("9".utf8))
        b.consume(1)
        #expect(b.read(from: mine) == .eof)
        pool.recycle(b)
        #expect(pool.outstanding == 0)
    }

    /// Queued buffers go out in order with writev, across partial writes, and each goes back to
    /// the pool once written; `isFull` tells the other side to stop reading.
    @Test func theOutboundQueueWritesInOrderAcrossPartialWrites() {
        let pool = BufferPool(bufferSize: 4096)
        let (mine, peer) = socketPair()
        defer { Glibc.close(mine); Glibc.close(peer) }
        var small: Int32 = 4096
        setsockopt(mine, SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        var expected: [UInt8] = []
        do {
            var q = OutboundQueue(pool: pool, limit: 32 * 1024)
            var i = 0
            while !q.isFull {
                var b = pool.take()
                let bytes = (0..<4000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
                b.append(contentsOf: bytes)
                b.consume(i % 3)  // a buffer partly consumed already
                expected += bytes[(i % 3)...]
                q.enqueue(b)
                i += 1
            }
            #expect(q.queuedBytes == expected.count && q.queuedBytes >= 32 * 1024)
            var received: [UInt8] = []
            var rounds = 0
            while true {
                let r = q.flush(to: mine)
                if r == .done { break }
                #expect(r == .wouldBlock)
                received += drain(peer) ?? []
                rounds += 1
                if rounds > 10_000 { break }
            }
            received += drain(peer) ?? []
            #expect(rounds > 0, "the small send buffer made writes partial")
            #expect(received == expected)
            #expect(q.isEmpty && q.count == 0)
        }
        #expect(pool.outstanding == 0, "every written buffer went back to the pool")
    }

    @Test func aQueueDroppedUnwrittenGivesItsBuffersBack() {
        let pool = BufferPool(bufferSize: 64)
        do {
            var q = OutboundQueue(pool: pool)
            var b = pool.take()
            b.append(contentsOf: Array("pending".utf8))
            q.enqueue(b)
            q.enqueue(pool.take())  // empty: straight back
            #expect(q.count == 1 && pool.outstanding == 1)
        }
        #expect(pool.outstanding == 0)
    }
}
