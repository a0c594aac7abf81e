#if canImport(Glibc)
import Glibc
#endif
import CTether

/// Starts programs with posix_spawn: to their end (`run`), or in the background while a test
/// talks to them (`start`). Foundation's `Process.run` crashed twice in CI (a bad pointer in its
/// memmove) with many tests starting programs at once; this path shares no state between
/// threads: the descriptors it makes are close-on-exec, and outputs are read with poll.
public enum Spawn {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Where a background program's output goes.
    public enum Output {
        /// The test runner's own (a program left running would keep `swift test` waiting: end it).
        case inherit
        case null
        /// A pipe the test reads (`Child.readLine`, `Child.readToEnd`); standard output only.
        case pipe
    }

    /// Runs `exe` to its end with `input` on its standard input (nothing: /dev/null) and returns
    /// its exit status and what it wrote on each output.
    public static func run(_ exe: String, _ args: [String], cwd: String? = nil, input: String? = nil) throws -> (status: Int32, out: String, err: String) {
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1], inPipe: [Int32] = [-1, -1]
        defer { for fd in outPipe + errPipe + inPipe where fd >= 0 { close(fd) } }
        guard tether_pipe_cloexec(&outPipe) == 0, tether_pipe_cloexec(&errPipe) == 0,
              input == nil || tether_pipe_cloexec(&inPipe) == 0 else { throw Failure(description: "pipe2: errno \(errno)") }
        let pid = try spawn(exe, args, cwd: cwd, stdin: input == nil ? nil : inPipe[0], stdout: outPipe[1], stderr: errPipe[1])
        // The child has its copies: the parent keeps only its own ends, so that EOF comes.
        close(outPipe[1]); outPipe[1] = -1
        close(errPipe[1]); errPipe[1] = -1
        if inPipe[0] >= 0 { close(inPipe[0]); inPipe[0] = -1 }
        if let input {
            // The programs these tests feed read all of it (a few lines) before they write much.
            var bytes = Array(input.utf8)[...]
            while !bytes.isEmpty {
                let n = bytes.withUnsafeBytes { write(inPipe[1], $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { break }
                bytes = bytes.dropFirst(n)
            }
            close(inPipe[1]); inPipe[1] = -1
        }
        var out: [UInt8] = [], err: [UInt8] = []
        var open = [outPipe[0], errPipe[0]]
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while open.contains(where: { $0 >= 0 }) {
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&fds, nfds_t(fds.count), -1)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { break }
            for (i, p) in fds.enumerated() where p.fd >= 0 && p.revents != 0 {
                let n = chunk.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if i == 0 { out += chunk[0..<n] } else { err += chunk[0..<n] }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    open[i] = -1
                }
            }
        }
        return (exitCode(waitFor(pid)), String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
    }

    /// A program running in the background, its standard input /dev/null.
    public final class Child {
        public let pid: pid_t
        /// The read end of its standard output, with `.pipe`.
        private var stdout: Int32
        private var buffered: [UInt8] = []
        private var status: Int32?

        fileprivate init(pid: pid_t, stdout: Int32) {
            self.pid = pid
            self.stdout = stdout
        }

        deinit {
            if status == nil { terminate(); _ = wait() }
            if stdout >= 0 { close(stdout) }
        }

        /// Whether it has not exited yet (reaps it when it has).
        public var isRunning: Bool {
            guard status == nil else { return false }
            var s: Int32 = 0
            guard waitpid(pid, &s, WNOHANG) == pid else { return true }
            status = s
            return false
        }

        /// SIGTERM (nothing once it has been reaped: the pid may be another program's by then).
        public func terminate() {
            if isRunning { kill(pid, SIGTERM) }
        }

        /// Waits for its end; its exit code (128 + the signal when a signal ended it).
        @discardableResult
        public func wait() -> Int32 {
            if status == nil { status = waitFor(pid) }
            return exitCode(status!)
        }

        /// The next line of its output, without the newline; nil at the end.
        public func readLine() -> String? {
            while true {
                if let i = buffered.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = String(decoding: buffered[..<i], as: UTF8.self)
                    buffered.removeFirst(i + 1)
                    return line
                }
                guard fill() else {
                    defer { buffered = [] }
                    return buffered.isEmpty ? nil : String(decoding: buffered, as: UTF8.self)
                }
            }
        }

        /// Everything left of its output, up to its end.
        public func readToEnd() -> String {
            while fill() {}
            defer { buffered = [] }
            return String(decoding: buffered, as: UTF8.self)
        }

        private func fill() -> Bool {
            guard stdout >= 0 else { return false }
            var chunk = [UInt8](repeating: 0, count: 65_536)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(stdout, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return false }
                buffered += chunk[0..<n]
                return true
            }
        }
    }

    /// Starts `exe` in the background.
    public static func start(_ exe: String, _ args: [String], stdout: Output = .inherit, stderr: Output = .inherit) throws -> Child {
        var outPipe: [Int32] = [-1, -1]
        if case .pipe = stdout, tether_pipe_cloexec(&outPipe) != 0 { throw Failure(description: "pipe2: errno \(errno)") }
        let null = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { close(null); if outPipe[1] >= 0 { close(outPipe[1]) } }
        func target(_ o: Output, pipe: Int32) -> Int32? {
            switch o {
            case .inherit: return nil
            case .null: return null
            case .pipe: return pipe
            }
        }
        let pid: pid_t
        do {
            pid = try spawn(exe, args, cwd: nil, stdin: nil, stdout: target(stdout, pipe: outPipe[1]), stderr: target(stderr, pipe: null))
        } catch {
            if outPipe[0] >= 0 { close(outPipe[0]) }
            throw error
        }
        return Child(pid: pid, stdout: outPipe[0])
    }

    /// posix_spawn with these descriptors as 0, 1 and 2 (stdin nil: /dev/null; the others nil:
    /// the runner's own).
    private static func spawn(_ exe: String, _ args: [String], cwd: String?, stdin: Int32?, stdout: Int32?, stderr: Int32?) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdin { posix_spawn_file_actions_adddup2(&actions, stdin, 0) } else { posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0) }
        if let stdout { posix_spawn_file_actions_adddup2(&actions, stdout, 1) }
        if let stderr { posix_spawn_file_actions_adddup2(&actions, stderr, 2) }
        if let cwd { _ = withUnsafeMutablePointer(to: &actions) { tether_spawn_actions_chdir($0, cwd) } }
        let argv: [UnsafeMutablePointer<CChar>?] = ([exe] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, nil, argv, environ)
        guard rc == 0 else { throw Failure(description: "posix_spawn \(exe): error \(rc)") }
        return pid
    }

    private static func waitFor(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }

    /// WIFEXITED / WEXITSTATUS, as the macros compute them; 128 + the signal otherwise.
    private static func exitCode(_ status: Int32) -> Int32 {
        status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}
