import Testing
@testable import TetherIO
#if canImport(Glibc)
import Glibc
#endif

@Suite struct SpoolTests {
    /// Bytes 0..<n of a repeating pattern, so that order and integrity show in the bytes themselves.
    static func pattern(_ from: Int, _ count: Int) -> [UInt8] { (from..<(from + count)).map { UInt8($0 % 251) } }

    /// Appends a copy of `bytes`.
    static func put(_ s: Spool, _ bytes: [UInt8]) throws(IOError) {
        let failure = bytes.withUnsafeBytes { p -> IOError? in
            do throws(IOError) { try s.append(copying: p) } catch { return error }
            return nil
        }
        if let failure { throw failure }
    }

    /// Drains the spool into an array.
    static func drain(_ s: Spool, _ pool: BufferPool) throws -> [UInt8] {
        var out: [UInt8] = []
        while let b = try s.takeFront() {
            b.withReadableBytes { out.append(contentsOf: $0) }
            pool.recycle(b)
        }
        return out
    }

    @Test func memoryFirstThenTheFileInOrder() throws {
        let pool = BufferPool(bufferSize: 1024)
        let s = Spool(pool: pool)
        let counters = pool.spools
        s.configure(memoryLimit: 4096, fileLimit: 1 << 20, directory: "/tmp")
        var sent = 0
        // 20 KiB in pieces of 700 bytes, alternately moved in buffers and copied.
        while sent < 20 * 1024 {
            let piece = Self.pattern(sent, 700)
            if sent / 700 % 2 == 0 {
                var b = pool.take()
                b.append(contentsOf: piece)
                try s.append(b)
            } else {
                try Self.put(s, piece)
            }
            sent += 700
        }
        #expect(s.hasFile)
        #expect(s.memoryBytes >= 4096 && s.memoryBytes < 4096 + 1024, "memory holds up to its limit, a buffer over at most")
        #expect(s.bytes == Int64(sent))
        #expect(counters.memoryBytes == s.memoryBytes && counters.fileBytes == s.fileBytes && counters.filesOpened == 1)
        #expect(try Self.drain(s, pool) == Self.pattern(0, sent))
        #expect(s.isEmpty && counters.memoryBytes == 0 && counters.fileBytes == 0)
        s.reset()
        #expect(pool.outstanding == 0)
    }

    /// While anything is in the file, new bytes go behind it even when memory has room again.
    @Test func bytesNeverOvertakeTheFile() throws {
        let pool = BufferPool(bufferSize: 512)
        let s = Spool(pool: pool)
        s.configure(memoryLimit: 1024, fileLimit: 1 << 20, directory: "/tmp")
        var out: [UInt8] = []
        var sent = 0
        for round in 0..<50 {
            let piece = Self.pattern(sent, 300 + round * 7)
            try Self.put(s, piece)
            sent += piece.count
            // Take one buffer out every other round: memory empties while the file still holds bytes.
            if round % 2 == 1, let b = try s.takeFront() {
                b.withReadableBytes { out.append(contentsOf: $0) }
                pool.recycle(b)
            }
        }
        out += try Self.drain(s, pool)
        #expect(out == Self.pattern(0, sent))
        s.reset()
        #expect(pool.outstanding == 0)
    }

    @Test func theFileLimitEndsTheRoom() throws {
        let pool = BufferPool(bufferSize: 1024)
        let s = Spool(pool: pool)
        let counters = pool.spools
        s.configure(memoryLimit: 2048, fileLimit: 4096, directory: "/tmp")
        let kb = [UInt8](repeating: 7, count: 1024)
        var pieces = 0
        while s.hasRoom {
            try Self.put(s, kb)
            pieces += 1
        }
        #expect(pieces == 6, "2 KiB in memory, 4 KiB in the file")
        #expect(s.fileBytes == 4096)
        // Emptied, the file starts again from nothing.
        _ = try Self.drain(s, pool)
        #expect(s.hasRoom && s.fileBytes == 0 && counters.bytesWrittenToFiles == 4096)
        // Without a file (limit 0) only memory takes bytes.
        s.configure(memoryLimit: 1024, fileLimit: 0, directory: "/tmp")
        try Self.put(s, kb)
        #expect(!s.hasRoom)
        s.reset()
        #expect(pool.outstanding == 0 && counters.memoryBytes == 0)
    }

    @Test func aDirectoryThatCannotHoldFilesIsAnError() throws {
        let pool = BufferPool(bufferSize: 1024)
        let s = Spool(pool: pool)
        let counters = pool.spools
        s.configure(memoryLimit: 0, fileLimit: 1 << 20, directory: "/nonexistent/tether")
        let kb = [UInt8](repeating: 7, count: 1024)
        #expect(throws: IOError.self) { try Self.put(s, kb) }
        #expect(counters.fileErrors == 1)
        s.reset()
        #expect(pool.outstanding == 0)
    }

    /// The temp file has no name: nothing of it is left in the directory, even while it is open.
    @Test func theTempFileHasNoName() throws {
        let dir = "/tmp/tether-spool-\(getpid())"
        mkdir(dir, 0o700)
        defer { rmdir(dir) }
        let pool = BufferPool(bufferSize: 1024)
        let s = Spool(pool: pool)
        s.configure(memoryLimit: 0, fileLimit: 1 << 20, directory: dir)
        try Self.put(s, [UInt8](repeating: 1, count: 5000))
        #expect(s.hasFile)
        let d = try #require(opendir(dir))
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(d)
        #expect(names.isEmpty)
        s.reset()
    }
}
