#if canImport(Glibc)
import Glibc
#endif
import CTether

/// What a loop's spools hold now and have written, summed over its spools (read by the admin
/// pages at a scrape, on the loop's thread).
public final class SpoolCounters {
    /// Bytes held now in memory and in temp files.
    public internal(set) var memoryBytes = 0
    public internal(set) var fileBytes: Int64 = 0
    /// Temp files opened, and bytes written to them, since the start.
    public internal(set) var filesOpened = 0
    public internal(set) var bytesWrittenToFiles: Int64 = 0
    /// Writes or reads of a temp file that failed (the exchange failed with them).
    public internal(set) var fileErrors = 0

    public init() {}
}

/// Bytes held for the slower side of an exchange, in order: in pool buffers up to
/// `memoryLimit`, then in a temp file up to `fileLimit` (nginx's `proxy_buffers` and
/// `proxy_max_temp_file_size`, `client_body_buffer_size` and `client_body_temp_path`). Taken
/// out from the front: the memory first (buffers moved, not copied), then the file, read back
/// one buffer at a time into pool buffers. The file is anonymous (`O_TMPFILE`, or unlinked as
/// soon as it is created), is emptied (`ftruncate`) whenever everything in it was read, and is
/// closed by `reset`.
///
/// The file is written and read on the loop's thread, one buffer (16 KiB) per call: a regular
/// file has no non-blocking mode, and these calls copy into and out of the page cache without
/// waiting for the disk, as nginx's temp files are written without `aio threads`. A call could
/// wait only where the kernel throttles a process that dirties pages faster than the disk takes
/// them, which `fileLimit` bounds; a temp path on tmpfs rules that out.
public final class Spool {
    private var memory: OutboundQueue
    private let pool: BufferPool
    private var counters: SpoolCounters { pool.spools }
    private var fd: Int32 = -1
    /// The file holds bytes [readOffset, writeOffset).
    private var readOffset: Int64 = 0
    private var writeOffset: Int64 = 0
    public private(set) var memoryLimit = 0
    public private(set) var fileLimit: Int64 = 0
    private var directory = "/tmp"

    /// Counted in `pool.spools`.
    public init(pool: BufferPool) {
        self.pool = pool
        memory = OutboundQueue(pool: pool, limit: .max)
    }

    deinit { reset() }

    /// The limits for the next use (an exchange's location's settings).
    public func configure(memoryLimit: Int, fileLimit: Int64, directory: String) {
        self.memoryLimit = memoryLimit
        self.fileLimit = fileLimit
        if directory != self.directory { self.directory = directory }
    }

    public var isEmpty: Bool { memory.isEmpty && readOffset == writeOffset }
    public var memoryBytes: Int { memory.queuedBytes }
    public var fileBytes: Int64 { writeOffset - readOffset }
    public var bytes: Int64 { Int64(memory.queuedBytes) + writeOffset - readOffset }
    /// A temp file is open.
    public var hasFile: Bool { fd >= 0 }

    /// It takes more: memory below its limit (with nothing in the file, which would come
    /// first), or room in the file.
    public var hasRoom: Bool {
        (writeOffset == readOffset && memory.queuedBytes < memoryLimit) || writeOffset < fileLimit
    }

    /// Appends the buffer's bytes (the buffer itself while they go to memory).
    public func append(_ buffer: consuming IOBuffer) throws(IOError) {
        if writeOffset == readOffset && memory.queuedBytes < memoryLimit {
            counters.memoryBytes += buffer.readableBytes
            return memory.enqueue(buffer)
        }
        let failure = buffer.withReadableBytes { p -> IOError? in
            do throws(IOError) { try write(p) } catch { return error }
            return nil
        }
        pool.recycle(buffer)
        if let failure { throw failure }
    }

    /// Appends a copy of `bytes`.
    public func append(copying bytes: UnsafeRawBufferPointer) throws(IOError) {
        if writeOffset == readOffset && memory.queuedBytes < memoryLimit {
            counters.memoryBytes += bytes.count
            return memory.append(bytes)
        }
        try write(bytes)
    }

    private func write(_ bytes: UnsafeRawBufferPointer) throws(IOError) {
        guard !bytes.isEmpty else { return }
        if fd < 0 {
            fd = directory.withCString { tether_open_temp($0) }
            guard fd >= 0 else {
                counters.fileErrors += 1
                throw IOError("open", errno: errno)
            }
            counters.filesOpened += 1
        }
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(writeOffset))
            if n < 0 {
                if errno == EINTR { continue }
                counters.fileErrors += 1
                throw IOError("pwrite", errno: errno)
            }
            done += n
            writeOffset += Int64(n)
            counters.fileBytes += Int64(n)
            counters.bytesWrittenToFiles += Int64(n)
        }
    }

    /// The front of what is held: a memory buffer as it is, or a pool buffer filled from the
    /// file. Nil when empty.
    public func takeFront() throws(IOError) -> IOBuffer? {
        if let b = memory.takeFront() {
            counters.memoryBytes -= b.readableBytes
            return b
        }
        guard readOffset < writeOffset else { return nil }
        var b = pool.take()
        var failure: Int32 = 0
        let want = Int(min(Int64(b.writableBytes), writeOffset - readOffset))
        let offset = readOffset
        let fd = self.fd
        b.fill { room in
            while true {
                let n = pread(fd, room.baseAddress!, want, off_t(offset))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { failure = n < 0 ? errno : EIO; return 0 }
                return n
            }
        }
        guard failure == 0 else {
            pool.recycle(b)
            counters.fileErrors += 1
            throw IOError("pread", errno: failure)
        }
        readOffset += Int64(b.readableBytes)
        counters.fileBytes -= Int64(b.readableBytes)
        if readOffset == writeOffset {
            // Everything written was read: the file starts again empty (its pages are freed).
            readOffset = 0
            writeOffset = 0
            _ = ftruncate(fd, 0)
        }
        return b
    }

    /// Drops what is held and closes the file.
    public func reset() {
        counters.memoryBytes -= memory.queuedBytes
        counters.fileBytes -= writeOffset - readOffset
        memory = OutboundQueue(pool: pool, limit: .max)
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
        readOffset = 0
        writeOffset = 0
    }
}
