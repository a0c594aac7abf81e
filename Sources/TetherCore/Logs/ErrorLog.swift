#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TetherConfig

/// The error log of Tether's own loops, in nginx's format (`2026/12/07 07:00:45 [error] 1234#0:
/// message`). A line below `error_log`'s level is dropped before
/// its text is made: `message` is only evaluated for a line that is written. Each line goes out
/// whole in one `write` to standard error, which the executable points at the `error_log` file
/// (and points again at a reopened file on SIGUSR1), so loops on several threads never interleave
/// within a line.
public final class LoopErrorLog: Sendable {
    /// The rank of the lowest level written (`error_log FILE LEVEL`); a reload may change it.
    private let threshold: Atomic<Int>
    /// Where lines go: standard error by default; tests may give a pipe or a file.
    private let fd: Int32

    public init(level: Configuration.LogLevel, fd: Int32 = 2) {
        threshold = Atomic(Self.rank(level))
        self.fd = fd
    }

    /// A reload's `error_log` level, from the next line on.
    public func setLevel(_ level: Configuration.LogLevel) {
        threshold.store(Self.rank(level), ordering: .relaxed)
    }

    /// Every line, on standard error (for tests and tools that make loops by hand).
    public static let all = LoopErrorLog(level: .debug)

    /// Whether lines of `level` are written.
    public func enabled(_ level: Configuration.LogLevel) -> Bool { Self.rank(level) >= threshold.load(ordering: .relaxed) }

    public func callAsFunction(_ level: Configuration.LogLevel, _ message: @autoclosure () -> String) {
        guard enabled(level) else { return }
        var t = time(nil)
        var tmv = tm()
        localtime_r(&t, &tmv)
        var stamp = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        let text = withUnsafeMutableBytes(of: &stamp) { b -> String in
            let chars = b.baseAddress!.assumingMemoryBound(to: CChar.self)
            let n = strftime(chars, 32, "%Y/%m/%d %H:%M:%S", &tmv)
            return String(decoding: UnsafeRawBufferPointer(rebasing: b[0..<n]), as: UTF8.self)
        }
        var line = "\(text) [\(level.rawValue)] \(getpid())#0: \(message())\n"
        line.withUTF8 { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
    }

    private static func rank(_ level: Configuration.LogLevel) -> Int {
        switch level {
        case .debug: 0
        case .info: 1
        case .notice: 2
        case .warn: 3
        case .error: 4
        case .crit: 5
        case .alert: 6
        case .emerg: 7
        }
    }
}
