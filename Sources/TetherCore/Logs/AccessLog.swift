#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Log files as nginx opens and writes them.
public enum LogFile {
    /// `path` opened for appending (created 0644); `stderr` and `stdout` are those streams.
    public static func open(_ path: String) throws(TetherError) -> Int32 {
        if path == "stderr" { return 2 }
        if path == "stdout" { return 1 }
        let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TetherError.startup("open() \"\(path)\" failed (\(errno): \(String(cString: strerror(errno))))") }
        return fd
    }

    /// Writes all of `bytes` (again after EINTR or a short write); gives up on another error.
    public static func write(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) {
        var off = 0
        while off < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
            if n < 0 { if errno == EINTR { continue }; return }
            off += n
        }
    }
}

/// The current time formatted for `Date:` and `$time_local`, recomputed once a second per loop.
final class DateCache {
    private var second = -1
    private(set) var httpDate: [UInt8] = []
    private(set) var localTime: [UInt8] = []
    private(set) var iso8601: [UInt8] = []

    func refresh() {
        var t = time(nil)
        guard Int(t) != second else { return }
        second = Int(t)
        var tmv = tm()
        gmtime_r(&t, &tmv)
        httpDate = format(&tmv, "%a, %d %b %Y %H:%M:%S GMT")
        var local = tm()
        localtime_r(&t, &local)
        localTime = format(&local, "%d/%b/%Y:%H:%M:%S %z")
        iso8601 = format(&local, "%Y-%m-%dT%H:%M:%S%z")
    }

    private func format(_ t: inout tm, _ f: String) -> [UInt8] {
        var buf = [Int8](repeating: 0, count: 64)
        let n = strftime(&buf, 64, f, &t)
        return buf[0..<n].map { UInt8(bitPattern: $0) }
    }
}

public enum TetherError: Error, CustomStringConvertible {
    case startup(String)

    public var description: String {
        switch self {
        case .startup(let m): return m
        }
    }
}
