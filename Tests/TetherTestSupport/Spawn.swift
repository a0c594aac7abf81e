#if canImport(Glibc)
import Glibc
#endif
import CTether

/// Runs a program to its end with posix_spawn and returns its exit status and what it wrote.
/// Foundation's `Process.run` crashed once in CI (a bad pointer in its memmove) with many tests
/// starting programs at once; this path has no shared state: nothing on its standard input,
/// both outputs read through pipes with poll until both close.
public enum Spawn {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public static func run(_ exe: String, _ args: [String], cwd: String? = nil) throws -> (status: Int32, out: String, err: String) {
        var outPipe: [Int32] = [-1, -1]
        var errPipe: [Int32] = [-1, -1]
        guard tether_pipe_cloexec(&outPipe) == 0 else { throw Failure(description: "pipe2: errno \(errno)") }
        guard tether_pipe_cloexec(&errPipe) == 0 else {
            close(outPipe[0]); close(outPipe[1])
            throw Failure(description: "pipe2: errno \(errno)")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        if let cwd { _ = withUnsafeMutablePointer(to: &actions) { tether_spawn_actions_chdir($0, cwd) } }
        let argv: [UnsafeMutablePointer<CChar>?] = ([exe] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, nil, argv, environ)
        close(outPipe[1])
        close(errPipe[1])
        guard rc == 0 else {
            close(outPipe[0]); close(errPipe[0])
            throw Failure(description: "posix_spawn \(exe): error \(rc)")
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
                    close(p.fd)
                    open[i] = -1
                }
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS, as the macros compute them.
        let exited = status & 0x7f == 0
        let code = exited ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return (code, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
    }
}
