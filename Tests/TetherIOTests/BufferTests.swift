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

    /// What a burst left behind goes back once a whole period has not needed it; spares a steady
    /// load cycles through stay.
    @Test func sparesUnusedForAWholePeriodAreFreed() {
        let pool = BufferPool(bufferSize: 1024, maximumSpare: 100)
        /// Takes `n` buffers at once, then gives them back.
        func cycle(_ n: Int) {
            guard n > 0 else { return }
            let b = pool.take()
            cycle(n - 1)
            pool.recycle(b)
        }
        cycle(50)
        #expect(pool.spareCount == 50)
        // The period of the burst itself used every spare there was: nothing lay unused.
        #expect(pool.trimUnused(keeping: 4) == 0)
        // A steady load of 10 at a time in the next period.
        for _ in 0..<3 { cycle(10) }
        #expect(pool.trimUnused(keeping: 4) == 40, "the 40 the load never reached are freed")
        #expect(pool.spareCount == 10)
        cycle(10)
        #expect(pool.trimUnused(keeping: 4) == 0, "the load's own spares stay")
        #expect(pool.trimUnused(keeping: 4) == 6, "an idle period frees all but those kept")
        #expect(pool.spareCount == 4 && pool.allocations == 50)
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

    /// With `shortReadDrains`, a read that got less than its room is the last one of the event
    /// (no read that would fail with EAGAIN): so the EOF behind the bytes is seen only by the
    /// next read, which a half-close event asks for.
    @Test func aShortReadEndsTheReadsWhenAsked() {
        let pool = BufferPool(bufferSize: 64)
        let (mine, peer) = socketPair()
        defer { Glibc.close(mine) }
        var b = pool.take()
        send(peer, "hello")
        Glibc.close(peer)
        #expect(b.read(from: mine, shortReadDrains: true) == .bytes(5, eof: false), "one read, the EOF not yet seen")
        #expect(b.read(from: mine, shortReadDrains: true) == .eof)
        pool.recycle(b)
        let (mine2, peer2) = socketPair()
        defer { Glibc.close(mine2) }
        var c = pool.take()
        send(peer2, "hello")
        Glibc.close(peer2)
        #expect(c.read(from: mine2) == .bytes(5, eof: true), "without it, reads go on to the EOF")
        pool.recycle(c)
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

    /// A head written straight into the queue fills the last buffer, spills into fresh ones, and
    /// can be taken back to a mark (a header whose value came out empty), across buffers too.
    @Test func bytesAppendedToTheQueueFillItsBuffersAndRollBack() {
        let pool = BufferPool(bufferSize: 16)
        let (mine, peer) = socketPair()
        defer { Glibc.close(mine); Glibc.close(peer) }
        do {
            var q = OutboundQueue(pool: pool)
            var b = pool.take()
            b.append(contentsOf: Array("0123456789".utf8))
            b.consume(2)
            q.enqueue(b)
            func append(_ s: String) { Array(s.utf8).withUnsafeBytes { q.append($0) } }
            append("abcdef")  // fills the first buffer exactly
            #expect(q.count == 1 && q.queuedBytes == 14)
            let mark = q.queuedBytes
            append("ghijklmnopqrstuvwxyz0123456789")  // 30 bytes: two more buffers
            #expect(q.count == 3 && q.queuedBytes == 44)
            q.rollback(to: mark + 3)
            #expect(q.count == 2 && q.queuedBytes == mark + 3, "the emptied last buffer went back")
            q.rollback(to: mark)
            #expect(q.count == 1 && q.queuedBytes == mark)
            append("!")
            q.rollback(to: 4)
            #expect(q.count == 1 && q.queuedBytes == 4)
            append("XYZ")
            #expect(q.flush(to: mine) == .done)
            #expect(drain(peer).map { String(decoding: $0, as: UTF8.self) } == "2345XYZ")
        }
        #expect(pool.outstanding == 0)
    }

    /// An ordinary answer (a head, then a body buffer moved from the upstream) is queued and
    /// written without the queue allocating anything; a third buffer makes its arrays, which go
    /// again once written, in order across the inline slots and the arrays.
    @Test func anAnswerOfTwoBuffersAllocatesNoQueueStorage() {
        let pool = BufferPool(bufferSize: 16)
        let (mine, peer) = socketPair()
        defer { Glibc.close(mine); Glibc.close(peer) }
        do {
            var q = OutboundQueue(pool: pool)
            func append(_ s: String) { Array(s.utf8).withUnsafeBytes { q.append($0) } }
            func buffer(_ s: String) -> IOBuffer { var b = pool.take(); b.append(contentsOf: Array(s.utf8)); return b }
            append("HEAD|")
            q.enqueue(buffer("body-1|"))
            append("tail|")  // goes into the second buffer's room
            #expect(q.count == 2 && !q.holdsStorage)
            #expect(q.flush(to: mine) == .done)
            #expect(drain(peer).map { String(decoding: $0, as: UTF8.self) } == "HEAD|body-1|tail|")
            #expect(q.count == 0 && !q.holdsStorage)
            q.enqueue(buffer("a"))
            q.enqueue(buffer("b"))
            q.enqueue(buffer("c"))
            q.enqueue(buffer("d"))
            #expect(q.count == 4 && q.holdsStorage)
            q.rollback(to: 2)
            #expect(q.count == 2 && q.queuedBytes == 2 && !q.holdsStorage)
            q.enqueue(buffer("e"))
            append("f")
            #expect(q.flush(to: mine) == .done)
            #expect(drain(peer).map { String(decoding: $0, as: UTF8.self) } == "abef")
            #expect(q.isEmpty && !q.holdsStorage)
        }
        #expect(pool.outstanding == 0)
    }
}

@Suite struct CountersTests {
    @Test func countersStartAtZeroAndCountEachIndexApart() {
        let c = Counters(count: 4)
        for i in 0..<4 { #expect(c[i] == 0) }
        c.increment(1)
        c.increment(1)
        c.increment(3)
        #expect((0..<4).map { c[$0] } == [0, 2, 0, 1])
    }
}
