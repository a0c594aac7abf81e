#if canImport(Glibc)
import Glibc
#endif

/// A fixed-size byte buffer from a loop's `BufferPool`, owned by one holder at a time (it cannot be
/// copied, only moved), with a read and a write index. Its memory goes back to the pool with
/// `BufferPool.recycle` (or through an `OutboundQueue` that wrote it); dropped any other way it is
/// freed, and the pool still counts it as outstanding, which the tests check stays at zero.
public struct IOBuffer: ~Copyable {
    @usableFromInline let base: UnsafeMutableRawPointer
    public let capacity: Int
    /// Bytes before `readerIndex` were consumed; bytes up to `writerIndex` were filled.
    public var readerIndex = 0
    public private(set) var writerIndex = 0

    init(capacity: Int) {
        base = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        self.capacity = capacity
    }

    deinit { base.deallocate() }

    /// Goes back to `pool`, with nothing retained around the call (`Unretained`): for a pool
    /// reached through a chain of references, where `pool.recycle(buffer)` costs a retain and a
    /// release.
    @inlinable public consuming func recycle(to pool: Unretained<BufferPool>) {
        let capacity = capacity
        let p = take()
        pool {
            precondition(capacity == $0.bufferSize, "a buffer of another pool")
            $0.recycle(memory: p)
        }
    }

    /// A buffer from `pool`, with nothing retained around the call (as `recycle(to:)`).
    @inlinable public static func take(from pool: Unretained<BufferPool>) -> IOBuffer {
        let (memory, size) = pool { ($0.takeMemory(), $0.bufferSize) }
        return IOBuffer(adopting: memory, capacity: size)
    }

    /// Gives up the memory without freeing it (for the pool).
    @usableFromInline consuming func take() -> UnsafeMutableRawPointer {
        let p = base
        discard self
        return p
    }

    @usableFromInline init(adopting base: UnsafeMutableRawPointer, capacity: Int) {
        self.base = base
        self.capacity = capacity
    }

    init(adopting base: UnsafeMutableRawPointer, capacity: Int, range: (start: Int, end: Int)) {
        self.base = base
        self.capacity = capacity
        readerIndex = range.start
        writerIndex = range.end
    }

    public var readableBytes: Int { writerIndex - readerIndex }
    public var writableBytes: Int { capacity - writerIndex }
    public var isEmpty: Bool { readerIndex == writerIndex }

    /// The bytes not yet consumed.
    public func withReadableBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: base + readerIndex, count: writerIndex - readerIndex))
    }

    /// Appends what fits of `bytes`; returns how many were taken.
    @discardableResult
    public mutating func append<C: Collection>(contentsOf bytes: C) -> Int where C.Element == UInt8 {
        let fast = bytes.withContiguousStorageIfAvailable { src -> Int in
            let n = min(src.count, capacity - writerIndex)
            if n > 0 { (base + writerIndex).copyMemory(from: src.baseAddress!, byteCount: n) }
            writerIndex += n
            return n
        }
        if let fast { return fast }
        var n = 0
        for b in bytes {
            guard writerIndex < capacity else { break }
            base.storeBytes(of: b, toByteOffset: writerIndex, as: UInt8.self)
            writerIndex += 1
            n += 1
        }
        return n
    }

    /// Marks `n` readable bytes consumed; an emptied buffer starts again at its front.
    public mutating func consume(_ n: Int) {
        precondition(n >= 0 && n <= readableBytes, "consume \(n) of \(readableBytes) readable bytes")
        readerIndex += n
        if readerIndex == writerIndex { readerIndex = 0; writerIndex = 0 }
    }

    /// Keeps only the first `n` readable bytes (the rest belongs to someone else, or to nobody).
    public mutating func truncate(toReadable n: Int) {
        precondition(n >= 0 && n <= readableBytes, "truncate to \(n) of \(readableBytes) readable bytes")
        writerIndex = readerIndex + n
    }

    /// Moves the unread bytes to the front, making room at the end.
    public mutating func compact() {
        guard readerIndex > 0 else { return }
        let n = readableBytes
        if n > 0 { (base).copyMemory(from: base + readerIndex, byteCount: n) }
        readerIndex = 0
        writerIndex = n
    }

    /// Lets `body` write into the free space (a TLS layer decrypting into it); `body` returns how
    /// many bytes it wrote there.
    public mutating func fill(_ body: (UnsafeMutableRawBufferPointer) -> Int) {
        let n = body(UnsafeMutableRawBufferPointer(start: base + writerIndex, count: capacity - writerIndex))
        precondition(n >= 0 && n <= capacity - writerIndex, "filled \(n) of \(capacity - writerIndex) free bytes")
        writerIndex += n
    }

    /// Reads from `fd` into the free space, until it is full or the socket has nothing more.
    /// `shortReadDrains`: a read that returns less than the room it was given took all the
    /// socket had (a stream socket returns what is there), so no further read is tried: under
    /// edge triggering the next arrival raises a new event. nginx does the same, and it saves a
    /// read that would fail with EAGAIN on every event. Not while an end of input is pending (the
    /// event reported a half-close): that read must happen to see the EOF.
    public mutating func read(from fd: Int32, shortReadDrains: Bool = false) -> ReadResult {
        var total = 0
        while writerIndex < capacity {
            let room = capacity - writerIndex
            let n = Glibc.read(fd, base + writerIndex, room)
            if n > 0 {
                writerIndex += n
                total += n
                if shortReadDrains && n < room { return .bytes(total, eof: false) }
                continue
            }
            if n == 0 { return total > 0 ? .bytes(total, eof: true) : .eof }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return total > 0 ? .bytes(total, eof: false) : .wouldBlock }
            return .error(e)
        }
        return .bytes(total, eof: false)
    }

}

public enum ReadResult: Equatable, Sendable {
    /// `n` bytes read; `eof`: the peer then closed its side.
    case bytes(Int, eof: Bool)
    /// Nothing to read now (EAGAIN): wait for the next readable event.
    case wouldBlock
    /// The peer closed its side and nothing was left to read.
    case eof
    case error(Int32)
}

/// A loop's buffers: taken for a read or a response and given back as soon as they are empty,
/// so an idle connection holds none. Keeps up to `maximumSpare` for reuse; `trim` frees spares
/// beyond what the open connections could need (after a burst).
public final class BufferPool {
    public let bufferSize: Int
    public var maximumSpare: Int
    var spare: [UnsafeMutableRawPointer] = []
    /// Buffers handed out and not yet given back.
    public private(set) var outstanding = 0
    /// Buffers allocated since the start (a new one only when no spare was there).
    public private(set) var allocations = 0
    /// The fewest spares there were since the last `trimUnused`: that many lay unused all along.
    var lowWater = 0
    /// What the loop's spools hold (bytes buffered for a slow side, in memory and temp files).
    public let spools = SpoolCounters()

    public init(bufferSize: Int = 16 * 1024, maximumSpare: Int = 1024) {
        self.bufferSize = bufferSize
        self.maximumSpare = maximumSpare
    }

    deinit { for p in spare { p.deallocate() } }

    public var spareCount: Int { spare.count }

    public func take() -> IOBuffer { IOBuffer(adopting: takeMemory(), capacity: bufferSize) }

    @usableFromInline func takeMemory() -> UnsafeMutableRawPointer {
        outstanding += 1
        if let p = spare.popLast() {
            if spare.count < lowWater { lowWater = spare.count }
            return p
        }
        allocations += 1
        return UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 16)
    }

    public func recycle(_ buffer: consuming IOBuffer) {
        precondition(buffer.capacity == bufferSize, "a buffer of another pool")
        recycle(memory: buffer.take())
    }

    @usableFromInline func recycle(memory p: UnsafeMutableRawPointer) {
        outstanding -= 1
        if spare.count < maximumSpare { spare.append(p) } else { p.deallocate() }
    }

    /// Frees spares beyond `keep`.
    public func trim(keeping keep: Int) {
        while spare.count > keep { spare.removeLast().deallocate() }
        lowWater = min(lowWater, spare.count)
    }

    /// Frees the spares that lay unused since the last call, keeping at least `keep` (called periodically:
    /// what a burst left behind goes back to malloc once a whole period has not needed it, while
    /// a steady load keeps the spares it cycles through). Returns how many were freed.
    @discardableResult
    public func trimUnused(keeping keep: Int) -> Int {
        let free = max(0, min(lowWater, spare.count - keep))
        for _ in 0..<free { spare.removeLast().deallocate() }
        lowWater = spare.count
        return free
    }
}

/// What a connection has to write, in order: buffers moved in (never copied), written with
/// `writev`, bounded by `limit` for backpressure (the producer stops while `isFull`). Emptied
/// buffers go back to the pool at once. The first two buffers are held inline (an answer's head
/// and a body buffer moved from the upstream) and the rest in arrays made only when more than
/// two are waiting and dropped when they empty, so that an ordinary answer allocates nothing and
/// an idle connection's queue holds no storage.
public struct OutboundQueue: ~Copyable {
    var first: UnsafeMutableRawPointer?
    var firstRange = (start: 0, end: 0)
    var second: UnsafeMutableRawPointer?
    var secondRange = (start: 0, end: 0)
    var more: [UnsafeMutableRawPointer] = []
    var moreRanges: [(start: Int, end: Int)] = []
    public private(set) var queuedBytes = 0
    public let limit: Int
    /// Not counted (`Unretained`: calls through it retain nothing, and an idle connection's queue
    /// stays a word smaller): whoever holds the queue holds the pool for longer.
    let pool: Unretained<BufferPool>

    /// `pool` must outlive the queue: its holder keeps it (a connection through its loop's
    /// shared state, an upstream link and a spool in a field of their own).
    public init(pool: BufferPool, limit: Int = 64 * 1024) {
        self.pool = Unretained(pool)
        self.limit = limit
    }

    deinit {
        if let p = first { pool { $0.recycle(memory: p) } }
        if let p = second { pool { $0.recycle(memory: p) } }
        for p in more { pool { $0.recycle(memory: p) } }
    }

    public var isEmpty: Bool { queuedBytes == 0 }
    public var isFull: Bool { queuedBytes >= limit }
    public var count: Int { (first == nil ? 0 : 1) + (second == nil ? 0 : 1) + more.count }
    /// Whether the queue holds array storage (it should not while idle).
    public var holdsStorage: Bool { more.capacity > 0 || moreRanges.capacity > 0 }

    /// Queues the readable bytes of `buffer` (an empty one goes straight back to the pool).
    public mutating func enqueue(_ buffer: consuming IOBuffer) {
        guard !buffer.isEmpty else { return buffer.recycle(to: pool) }
        let range = (start: buffer.readerIndex, end: buffer.writerIndex)
        queuedBytes += range.end - range.start
        if first == nil {
            first = buffer.take()
            firstRange = range
        } else if second == nil {
            second = buffer.take()
            secondRange = range
        } else {
            moreRanges.append(range)
            more.append(buffer.take())
        }
    }

    /// Takes the front buffer out of the queue, its unwritten bytes readable (moved, not copied).
    public mutating func takeFront() -> IOBuffer? {
        guard let f = first else { return nil }
        let buffer = IOBuffer(adopting: f, capacity: pool { $0.bufferSize }, range: firstRange)
        queuedBytes -= firstRange.end - firstRange.start
        first = second
        firstRange = secondRange
        if more.isEmpty {
            second = nil
        } else {
            second = more.removeFirst()
            secondRange = moreRanges.removeFirst()
            if more.isEmpty { more = []; moreRanges = [] }
        }
        return buffer
    }

    /// Appends bytes to the queue's last buffer while it has room, then to fresh pool buffers:
    /// how a head is written straight into what goes out (no intermediate copy).
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        // The common case first: everything goes into the one buffer queued so far (an answer's
        // head, written piece by piece), without looking at the arrays.
        let size = pool { $0.bufferSize }
        if second == nil, let f = first, bytes.count <= size - firstRange.end, bytes.count > 0 {
            (f + firstRange.end).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            firstRange.end += bytes.count
            queuedBytes += bytes.count
            return
        }
        appendSpreading(bytes, size: size)
    }

    /// `append` past the common case: into the last buffer, then into new ones (kept out of
    /// `append`, whose few instructions run for every piece of every head).
    @inline(never)
    private mutating func appendSpreading(_ bytes: UnsafeRawBufferPointer, size: Int) {
        var rest = bytes
        while !rest.isEmpty {
            let n: Int
            if let last = more.last {
                let end = moreRanges[moreRanges.count - 1].end
                n = min(rest.count, size - end)
                if n > 0 {
                    (last + end).copyMemory(from: rest.baseAddress!, byteCount: n)
                    moreRanges[moreRanges.count - 1].end += n
                }
            } else if let b = second {
                n = min(rest.count, size - secondRange.end)
                if n > 0 {
                    (b + secondRange.end).copyMemory(from: rest.baseAddress!, byteCount: n)
                    secondRange.end += n
                }
            } else if let f = first {
                n = min(rest.count, size - firstRange.end)
                if n > 0 {
                    (f + firstRange.end).copyMemory(from: rest.baseAddress!, byteCount: n)
                    firstRange.end += n
                }
            } else {
                n = 0
            }
            if n > 0 {
                queuedBytes += n
                rest = UnsafeRawBufferPointer(rebasing: rest[n...])
            } else {
                var b = IOBuffer.take(from: pool)
                let k = b.append(contentsOf: rest)
                rest = UnsafeRawBufferPointer(rebasing: rest[k...])
                enqueue(b)
            }
        }
    }

    /// Takes back the bytes appended after the queue held `mark` bytes (`queuedBytes` then):
    /// nothing between was written out, since writing happens only in `flush`.
    public mutating func rollback(to mark: Int) {
        precondition(mark <= queuedBytes, "rollback to \(mark) of \(queuedBytes) queued bytes")
        var excess = queuedBytes - mark
        while excess > 0 {
            if let last = more.last {
                let len = moreRanges[moreRanges.count - 1].end - moreRanges[moreRanges.count - 1].start
                if len > excess {
                    moreRanges[moreRanges.count - 1].end -= excess
                    queuedBytes -= excess
                    return
                }
                more.removeLast()
                moreRanges.removeLast()
                queuedBytes -= len
                excess -= len
                pool { $0.recycle(memory: last) }
                if more.isEmpty { more = []; moreRanges = [] }
            } else if let b = second {
                let len = secondRange.end - secondRange.start
                if len > excess {
                    secondRange.end -= excess
                    queuedBytes -= excess
                    return
                }
                second = nil
                queuedBytes -= len
                excess -= len
                pool { $0.recycle(memory: b) }
            } else if let f = first {
                let len = firstRange.end - firstRange.start
                if len > excess {
                    firstRange.end -= excess
                    queuedBytes -= excess
                    return
                }
                first = nil
                queuedBytes -= len
                excess -= len
                pool { $0.recycle(memory: f) }
            } else {
                return
            }
        }
    }

    public enum FlushResult: Equatable, Sendable {
        /// Everything went out.
        case done
        /// The socket took part (or none): wait for the next writable event.
        case wouldBlock
        case error(Int32)
    }

    /// Writes what is queued with `writev` (up to 64 buffers a call) until done or EAGAIN.
    public mutating func flush(to fd: Int32) -> FlushResult {
        while let f = first {
            let written: Int
            if let b = second {
                let n = min(2 + more.count, 64)
                written = withUnsafeTemporaryAllocation(of: Glibc.iovec.self, capacity: n) { iov in
                    iov[0] = Glibc.iovec(iov_base: f + firstRange.start, iov_len: firstRange.end - firstRange.start)
                    iov[1] = Glibc.iovec(iov_base: b + secondRange.start, iov_len: secondRange.end - secondRange.start)
                    for i in 2..<n {
                        iov[i] = Glibc.iovec(iov_base: more[i - 2] + moreRanges[i - 2].start, iov_len: moreRanges[i - 2].end - moreRanges[i - 2].start)
                    }
                    return Glibc.writev(fd, iov.baseAddress, Int32(n))
                }
            } else {
                written = Glibc.write(fd, f + firstRange.start, firstRange.end - firstRange.start)
            }
            if written < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
                return .error(e)
            }
            consume(written)
        }
        return .done
    }

    /// What a writer other than the socket's (a TLS layer) did with the bytes it was given.
    public enum WriteOutcome: Equatable, Sendable {
        case wrote(Int)
        /// It can take nothing now; the loop's next event lets it go on.
        case wouldBlock
        case failed
    }

    /// Writes what is queued through `write` until done or it can take no more. `write` gets the
    /// front buffer's bytes, or, when the front buffer holds less than `gather` bytes and more
    /// follow, up to `gather` bytes of the queue copied together (a head and a short body go in
    /// one TLS record instead of two). What `write` took is consumed.
    public mutating func flush(gather: Int = 16 * 1024, through write: (UnsafeRawBufferPointer) -> WriteOutcome) -> FlushResult {
        while let f = first {
            let frontLength = firstRange.end - firstRange.start
            let outcome: WriteOutcome
            if second != nil && frontLength < gather {
                outcome = withUnsafeTemporaryAllocation(byteCount: gather, alignment: 16) { scratch in
                    write(UnsafeRawBufferPointer(rebasing: scratch[0..<gathered(into: scratch)]))
                }
            } else {
                outcome = write(UnsafeRawBufferPointer(start: f + firstRange.start, count: frontLength))
            }
            switch outcome {
            case .wrote(let n): consume(n)
            case .wouldBlock: return .wouldBlock
            case .failed: return .error(EIO)
            }
        }
        return .done
    }

    /// Copies the front of the queue into `scratch`, as much as fits; returns how much.
    private func gathered(into scratch: UnsafeMutableRawBufferPointer) -> Int {
        var n = 0
        func put(_ p: UnsafeMutableRawPointer?, _ r: (start: Int, end: Int)) {
            guard let p, n < scratch.count else { return }
            let k = min(r.end - r.start, scratch.count - n)
            (scratch.baseAddress! + n).copyMemory(from: p + r.start, byteCount: k)
            n += k
        }
        put(first, firstRange)
        put(second, secondRange)
        for i in more.indices { put(more[i], moreRanges[i]) }
        return n
    }

    mutating func consume(_ written: Int) {
        var left = written
        queuedBytes -= written
        var done = 0
        while let f = first, left > 0 {
            let len = firstRange.end - firstRange.start
            guard left >= len else { firstRange.start += left; break }
            left -= len
            pool { $0.recycle(memory: f) }
            // The next buffer moves up: second to first, the arrays' first to second.
            first = second
            firstRange = secondRange
            if done < more.count {
                second = more[done]
                secondRange = moreRanges[done]
                done += 1
            } else {
                second = nil
            }
        }
        if done > 0 {
            if done == more.count {
                more = []
                moreRanges = []
            } else {
                more.removeFirst(done)
                moreRanges.removeFirst(done)
            }
        }
    }
}
