#if canImport(Glibc)
import Glibc
#endif
import CTether
import TetherConfig
import TetherHTTP
import TetherIO

/// The access log files of Tether's own loops and the thread that writes them, so that a loop
/// never waits for a disk. Loops hand over batches of lines (`LoopAccessLog`), never single
/// lines. The files are opened at start (an error there is a start error, as nginx's) and again
/// by name at `reopen` (SIGUSR1, after logrotate moved them).
final class AccessLogWriter: @unchecked Sendable {
    let paths: [String]
    /// The descriptors, by `paths` index: read and replaced on the writer's thread only.
    private var fds: [Int32]
    private let thread: IOLoopThread

    init(paths: [String]) throws(SetupError) {
        var fds: [Int32] = []
        for p in paths {
            do {
                fds.append(try Self.open(p))
            } catch {
                for fd in fds where fd > 2 { close(fd) }
                throw error
            }
        }
        self.paths = paths
        self.fds = fds
        do {
            thread = IOLoopThread(loop: try IOLoop(), name: "tether-log")
        } catch {
            for fd in fds where fd > 2 { close(fd) }
            throw SetupError("\(error)")
        }
    }

    private static func open(_ path: String) throws(SetupError) -> Int32 {
        do {
            return try LogFile.open(path)
        } catch {
            throw SetupError(error.description)
        }
    }

    /// The number of `path` among the files (a location's `access_log` names one of them).
    func file(_ path: String) -> Int? { paths.firstIndex(of: path) }

    /// Writes `bytes` to file `file` on the writer's thread.
    func write(_ file: Int, _ bytes: [UInt8]) {
        thread.loop.execute { [self] _ in
            let fd = fds[file]
            bytes.withUnsafeBytes { LogFile.write(fd, $0) }
        }
    }

    /// Opens every file again by its name; `failed` is told of each that could not be (it keeps
    /// its old descriptor, as nginx keeps writing to the old file).
    func reopen(failed: @escaping @Sendable (String) -> Void) {
        thread.loop.execute { [self] _ in
            for (i, p) in paths.enumerated() where fds[i] > 2 {
                do {
                    let new = try Self.open(p)
                    close(fds[i])
                    fds[i] = new
                } catch {
                    failed("\(error)")
                }
            }
        }
    }

    /// Writes what was handed over, then stops the thread and closes the files.
    func stop() {
        thread.stopAndJoin()
        for fd in fds where fd > 2 { close(fd) }
    }
}

/// What a log line says of the answer; the request's part was drafted when its head was read.
struct AnswerFacts {
    var status: Int
    /// Bytes of the response head and body queued for the client.
    var headBytes = 0
    var bodyBytes = 0
    /// The upstream's part, for a proxied request.
    var upstream: UpstreamFacts?
}

/// `$upstream_*` of a proxied request.
struct UpstreamFacts {
    var address: String
    /// The upstream's status, 0 when no response head came.
    var status: Int
    /// Nanoseconds; negative where unknown (`-` in the line).
    var connectNs: Int64
    var headerNs: Int64
    var responseNs: Int64
    var reused: Bool
}

/// One loop's access log: lines are made on the loop and gathered per file, then handed to the
/// writer at 32 KiB or 100 ms after the batch's first line, whichever comes first.
///
/// A line is made in two steps, because the request's head bytes are gone by the time its answer
/// ends: `draft` writes the values the request gives (`$request`, `$http_*`, `$remote_addr`...)
/// when the head is read, `finish` writes the line from the draft and the answer's facts
/// (`$status`, `$body_bytes_sent`, `$upstream_*`, `$request_time`, `$time_local`, taken at the
/// end as nginx's are). Nothing of this runs for a location without `access_log`.
///
/// A batch is handed over when it reaches 32 KiB or 100 ms after its first line (`timer`).
final class LoopAccessLog {
    let writer: AccessLogWriter
    private let formats: [String: LogFormat]
    private unowned(unsafe) let loop: IOLoop
    private var timer: LoopTimer!
    private var pending: [[UInt8]]
    static let batchBytes = 32 * 1024
    static let batchNanoseconds: UInt64 = 100_000_000

    init(writer: AccessLogWriter, formats: [String: LogFormat], loop: IOLoop) throws(IOError) {
        self.writer = writer
        self.formats = formats
        self.loop = loop
        pending = writer.paths.map { _ in [] }
        // Unowned, not weak (a weak reference would put every retain of the log on the runtime's
        // slow path); the timer is closed with the log.
        timer = try LoopTimer(loop: loop) { [unowned(unsafe) self] _ in self.flush() }
    }

    deinit { timer?.close() }

    /// Ends its record in the loop (a reload made another); `flush` first.
    func close() {
        timer.close()
    }

    /// Hands every batch to the writer.
    func flush() {
        for i in pending.indices where !pending[i].isEmpty {
            writer.write(i, pending[i])
            pending[i].removeAll(keepingCapacity: true)
        }
    }

    /// Variables a line takes from the answer, or from the moment it is written (nginx's
    /// `$time_local` and `$msec` are the log's time); the others are the request's.
    static func isAnswers(_ v: Variable) -> Bool {
        switch v {
        case .status, .bodyBytesSent, .bytesSent, .requestTime, .timeLocal, .timeISO8601, .msec, .upstreamAddr, .upstreamStatus,
             .upstreamConnectTime, .upstreamHeaderTime, .upstreamResponseTime, .upstreamReused, .sentHTTPHeader:
            true
        default:
            false
        }
    }

    /// The format an `access_log` line names (`combined` is built in).
    private func format(_ name: String) -> LogFormat? {
        name == "combined" ? LogFormat.combined : formats[name]
    }

    /// Writes the request's values of every line `route` logs into `draft`, in template order,
    /// each as a 4-byte length and its bytes.
    func draft<V: VariableSource>(_ route: CompiledLocation, _ variables: V, into draft: inout [UInt8]) {
        draft.removeAll(keepingCapacity: true)
        for entry in route.settings.accessLog {
            guard case .file(_, let name) = entry, let f = format(name) else { continue }
            for case .variable(let v) in f.template.parts where !Self.isAnswers(v) {
                let at = draft.count
                draft.append(contentsOf: [0, 0, 0, 0] as [UInt8])
                variables.writeVariable(v, into: &draft)
                let n = UInt32(draft.count - at - 4)
                for k in 0..<4 { draft[at + k] = UInt8(truncatingIfNeeded: n >> (8 * UInt32(k))) }
            }
        }
    }

    /// The lines of a request whose answer ended: its draft, and the answer's facts.
    func finish(_ draft: [UInt8], route: CompiledLocation, startedAt: UInt64, facts: AnswerFacts, dates: DateCache) {
        dates.refresh()
        var at = 0
        for entry in route.settings.accessLog {
            guard case .file(let path, let name) = entry, let f = format(name), let file = writer.file(path) else { continue }
            var line = pending[file]
            pending[file] = []
            for part in f.template.parts {
                switch part {
                case .literal(let s):
                    line.put(string: s)
                case .variable(let v):
                    let mark = line.count
                    if Self.isAnswers(v) {
                        answer(v, facts, startedAt: startedAt, dates: dates, into: &line)
                    } else if at + 4 <= draft.count {
                        var n = 0
                        for k in 0..<4 { n |= Int(draft[at + k]) << (8 * k) }
                        line.append(contentsOf: draft[(at + 4)..<(at + 4 + n)])
                        at += 4 + n
                    }
                    if line.count == mark { line.append(UInt8(ascii: "-")) }
                }
            }
            line.append(UInt8(ascii: "\n"))
            pending[file] = line
            if line.count >= Self.batchBytes {
                writer.write(file, line)
                pending[file].removeAll(keepingCapacity: true)
            } else if !timer.isArmed {
                timer.arm(afterNanoseconds: Self.batchNanoseconds)
            }
        }
    }

    private func answer(_ v: Variable, _ a: AnswerFacts, startedAt: UInt64, dates: DateCache, into out: inout [UInt8]) {
        let u = a.upstream
        func ms(_ ns: Int64) -> Int64 { ns / 1_000_000 }
        switch v {
        case .status: out.putDecimal(a.status)
        case .bodyBytesSent: out.putDecimal(a.bodyBytes)
        case .bytesSent: out.putDecimal(a.headBytes + a.bodyBytes)
        case .requestTime: out.putSeconds(milliseconds: ms(Int64(loop.now &- startedAt)))
        case .timeLocal: out.put(dates.localTime)
        case .timeISO8601: out.put(dates.iso8601)
        case .msec:
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            out.putSeconds(milliseconds: Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec / 1_000_000))
        case .upstreamAddr: if let u { out.put(string: u.address) }
        case .upstreamStatus: if let u, u.status > 0 { out.putDecimal(u.status) }
        case .upstreamConnectTime: if let u, u.connectNs >= 0 { out.putSeconds(milliseconds: ms(u.connectNs)) }
        case .upstreamHeaderTime: if let u, u.headerNs >= 0 { out.putSeconds(milliseconds: ms(u.headerNs)) }
        case .upstreamResponseTime: if let u, u.responseNs >= 0 { out.putSeconds(milliseconds: ms(u.responseNs)) }
        case .upstreamReused: if let u { out.put(u.reused ? "1" : "0") }
        default: break
        }
    }
}
