import ArgumentParser
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import TetherAdmin
import TetherConfig
import TetherCore
import TetherIO
#if canImport(Glibc)
import Glibc
#endif

@main
struct Tether: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tether",
        abstract: "A keepalive-aware HTTP/1.1 reverse proxy with an nginx-style configuration.",
        discussion: """
            Runs in the foreground with the configuration file given by -c (default conf/tether.conf,
            relative to the working directory). Signals: SIGHUP reloads the configuration (a bad file
            leaves the running one in place), SIGUSR1 reopens the log files, SIGTERM and SIGQUIT shut
            down gracefully (listeners close, requests in flight finish within 10 s, idle connections
            close), SIGINT shuts down fast (1 s).

            Examples:
              tether -t -c conf/tether.conf   check a configuration
              tether -T                       check and print the effective configuration
              tether -c conf/tether.conf      run
              tether -s reload                signal the running Tether (needs a pid directive)
              tether doctor -c conf/tether.conf   check the host's settings for this configuration
            """
    )

    @Option(name: .customShort("c"), help: ArgumentHelp("Configuration file.", valueName: "file"))
    var file = "conf/tether.conf"

    @Flag(name: .customShort("t"), help: "Test the configuration and exit.")
    var test = false

    @Flag(name: .customShort("T"), help: "Test the configuration, print the effective configuration with defaults filled in, and exit.")
    var testAndDump = false

    @Option(name: .customShort("s"), help: ArgumentHelp("Send a signal to the running Tether (found through the configuration's pid file): reload, reopen, stop (fast), quit (graceful).", valueName: "signal"))
    var signalName: String?

    @ArgumentParser.Argument(help: ArgumentHelp("doctor: check the host's kernel settings and limits against the configuration, a verdict per line; exits 1 only if something is critical.", valueName: "command"))
    var command: String?

    @Option(name: .long, help: ArgumentHelp("With doctor: where /proc is (for tests).", valueName: "dir"))
    var proc = "/proc"

    @Option(name: .long, help: ArgumentHelp("With doctor: the open-files limit to check instead of this process's own.", valueName: "n"))
    var openFiles: Int?

    @Option(name: .long, help: ArgumentHelp("The event loop that serves: own (Tether's own epoll loop, the default) or nio (SwiftNIO's, the earlier path, kept for comparison).", valueName: "loop"))
    var eventLoop = "own"

    @Option(name: .long, help: .hidden)
    var benchPort = 18480

    @Option(name: .long, help: .hidden)
    var benchUpstream: Int?

    @Flag(name: .customShort("v"), help: "Print the version and exit.")
    var version = false

    @Flag(name: .customShort("V"), help: "Print the version and build details and exit.")
    var versionDetails = false

    func run() throws {
        if version || versionDetails {
            print("tether version: tether/\(tetherVersion)")
            if versionDetails {
                print("built with Swift, SwiftNIO; event loops: epoll; listeners: one SO_REUSEPORT socket per event loop")
            }
            return
        }
        if command == "bench-core" {
            // Measuring tool (bench/core-local.sh): Tether's own loop answering 12 bytes itself.
            do throws(TetherIO.IOError) {
                try LocalAnswerBench.serve(port: UInt16(benchPort), body: "hello world\n", upstream: benchUpstream.map { UInt16($0) })
            } catch {
                printError("tether: [emerg] bench-core: \(error)")
                throw ExitCode(1)
            }
        }
        let config: Configuration
        switch Configuration.load(path: file) {
        case .failure(let errors):
            for e in errors.errors { printError("tether: [emerg] \(e)") }
            printError("tether: configuration file \(file) test failed")
            throw ExitCode(1)
        case .success(let c):
            config = c
        }
        if let command {
            guard command == "doctor" else {
                printError("tether: [emerg] unknown command \"\(command)\" (the only one is \"doctor\")")
                throw ExitCode(1)
            }
            let lines = Doctor.check(config, proc: proc, openFiles: openFiles)
            for l in lines { print(l) }
            if lines.contains(where: { $0.verdict == .critical }) { throw ExitCode(1) }
            return
        }
        if let name = signalName {
            try sendSignal(name, config: config)
            return
        }
        if test || testAndDump {
            do { try TetherServer.validate(config) } catch { throw reportInvalid(error) }
            for w in config.warnings { printError("tether: [warn] \(w)") }
            printError("tether: the configuration file \(file) syntax is ok")
            printError("tether: configuration file \(file) test is successful")
            if testAndDump { print(config.effectiveText(), terminator: "") }
            return
        }
        switch eventLoop {
        case "nio": try serve(config)
        case "own": try serveOnOwnLoop(config)
        default:
            printError("tether: [emerg] invalid option: \"--event-loop \(eventLoop)\" (use nio or own)")
            throw ExitCode(1)
        }
    }

    /// `--event-loop own`: the configuration on Tether's own loop until SIGTERM, SIGINT or SIGQUIT.
    func serveOnOwnLoop(_ config: Configuration) throws {
        for w in config.warnings { printError("tether: [warn] \(w)") }
        if let warning = Self.applyRlimit(config) { printError("tether: [warn] \(warning)") }
        // The signals are taken by sigwait here, so the loops' threads (which inherit the mask) never see them.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        // SIGHUP and SIGUSR1 too: their default action would end the process.
        for s in [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1] { sigaddset(&stopSignals, s) }
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)
        // error_log FILE: the own loop's lines (written to standard error, at error_log's level
        // and above) go to the file from the first request on; a start that fails says why on
        // the terminal, which is kept aside until the start is done.
        let terminal = dup(2)
        func onTerminal(_ line: String) {
            var l = line + "\n"
            l.withUTF8 { _ = write(terminal, $0.baseAddress, $0.count) }
        }
        do {
            try Self.pointStandardErrorAtErrorLog(config)
        } catch {
            onTerminal("tether: [emerg] \(error)")
            throw ExitCode(1)
        }
        let server: CoreServer
        do {
            server = try CoreServer(config, admin: Renderer())
            try server.start()
        } catch {
            for line in error.lines { onTerminal("tether: [emerg] \(line)") }
            throw ExitCode(1)
        }
        close(terminal)
        let log = server.log
        let addresses = server.boundPorts.map { "\($0.address):\($0.port)" }.joined(separator: ", ")
        log(.notice, "serving on Tether's own event loop: \(server.workerCount) loops, listening on \(addresses)")
        if let failure = Self.writePidFile(config) { log(.error, failure) }
        var received: Int32 = 0
        while true {
            sigwait(&stopSignals, &received)
            if received == SIGHUP {
                Self.reloadOwnLoop(server, path: file, log: log)
            } else if received == SIGUSR1 {
                // As logrotate expects: the error log file, moved away, is opened again by its name.
                do {
                    try Self.pointStandardErrorAtErrorLog(config)
                    server.reopenLogs()
                    log(.notice, "log files reopened")
                } catch {
                    log(.alert, "reopening logs failed: \(error)")
                }
            } else {
                break
            }
        }
        // As on the SwiftNIO path: SIGTERM and SIGQUIT let requests in flight finish (10 s),
        // SIGINT gives them 1 s.
        let fast = received == SIGINT
        log(.notice, "\(fast ? "SIGINT" : received == SIGQUIT ? "SIGQUIT" : "SIGTERM") received, shutting down \(fast ? "fast" : "gracefully")")
        server.shutdown(timeoutMs: fast ? 1_000 : 10_000)
        if let pid = config.pidFile { unlink(pid) }
        log(.notice, "exiting")
    }

    /// SIGHUP on the own loop: the file is read and checked again (OpenSSL's checks included), and
    /// swapped in; a file that fails keeps the running configuration, with every error logged at
    /// its place, as the SwiftNIO path does.
    static func reloadOwnLoop(_ server: CoreServer, path: String, log: LoopErrorLog) {
        log(.notice, "SIGHUP received, reloading \(path)")
        switch Configuration.load(path: path) {
        case .failure(let errors):
            for e in errors.errors { log(.error, "\(e)") }
            log(.error, "reload of \(path) failed: the running configuration stays in place")
        case .success(let new):
            let workersBefore = server.configuration.workerProcesses
            do {
                try server.reload(new)
            } catch let errors as ConfigErrors {
                for e in errors.errors { log(.error, "\(e)") }
                log(.error, "reload of \(path) failed: the running configuration stays in place")
                return
            } catch {
                log(.error, "reload of \(path) failed: \(error); the running configuration stays in place")
                return
            }
            if new.workerProcesses != workersBefore {
                log(.warn, "\"worker_processes\" changes take effect at the next start, not on reload")
            }
            if new.errorLog != server.configuration.errorLog {
                log(.warn, "\"error_log\" changes take effect at the next start, not on reload")
            }
        }
    }

    /// `error_log FILE`: standard error, where the own loop writes its lines, becomes that file
    /// (opened for appending); at a reopen, the file by that name now.
    static func pointStandardErrorAtErrorLog(_ config: Configuration) throws {
        guard config.errorLog.path != "stderr" else { return }
        let fd = try FileLogSink.open(config.errorLog.path)
        if fd != 2 { dup2(fd, 2); close(fd) }
    }

    /// `-s NAME`: signals the process whose id the configuration's `pid` file holds, as nginx does.
    /// Errors only OpenSSL finds (certificates, keys, ciphers): `-t` asks for them; a start or a
    /// reload meets them while building the proxy, so the files are read once.
    func reportInvalid(_ errors: ConfigErrors) -> ExitCode {
        for e in errors.errors { printError("tether: [emerg] \(e)") }
        printError("tether: configuration file \(file) test failed")
        return ExitCode(1)
    }

    func sendSignal(_ name: String, config: Configuration) throws {
        let signals: [String: Int32] = ["reload": SIGHUP, "reopen": SIGUSR1, "stop": SIGINT, "quit": SIGQUIT]
        guard let sig = signals[name] else {
            printError("tether: [emerg] invalid option: \"-s \(name)\" (use reload, reopen, stop or quit)")
            throw ExitCode(1)
        }
        guard let pidFile = config.pidFile else {
            printError("tether: [error] no \"pid\" directive in \(file): -s needs it to find the running process")
            throw ExitCode(1)
        }
        let text: String
        do {
            text = try Loader.readFile(pidFile, includedAt: nil)
        } catch {
            printError("tether: [error] \(error)")
            throw ExitCode(1)
        }
        guard let pid = Int32(text.split(separator: "\n").first ?? ""), pid > 0 else {
            printError("tether: [error] invalid PID number \"\(text.trimmingWhitespace())\" in \"\(pidFile)\"")
            throw ExitCode(1)
        }
        if kill(pid, sig) != 0 {
            printError("tether: [error] kill(\(pid), \(name)) failed (\(errno): \(String(cString: strerror(errno))))")
            throw ExitCode(1)
        }
    }

    /// `worker_rlimit_nofile`; a warning when it could not be set.
    static func applyRlimit(_ config: Configuration) -> String? {
        guard let n = config.workerRlimitNofile else { return nil }
        var r = rlimit(rlim_cur: rlim_t(n), rlim_max: rlim_t(n))
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &r) != 0 else { return nil }
        return "setrlimit(RLIMIT_NOFILE, \(n)) failed (\(errno): \(String(cString: strerror(errno))))"
    }

    /// `pid FILE`: this process's id, for `-s`; the error when it could not be written.
    static func writePidFile(_ config: Configuration) -> String? {
        guard let pid = config.pidFile else { return nil }
        let fd = open(pid, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return "open() \"\(pid)\" failed (\(errno): \(String(cString: strerror(errno))))" }
        let text = "\(getpid())\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        return nil
    }

    func serve(_ config: Configuration) throws {
        let level: Logger.Level
        switch config.errorLog.level {
        case .debug: level = .debug
        case .info: level = .info
        case .notice: level = .notice
        case .warn: level = .warning
        case .error: level = .error
        case .crit, .alert, .emerg: level = .critical
        }
        let sink: FileLogSink
        do {
            sink = try FileLogSink(path: config.errorLog.path)
        } catch {
            printError("tether: [emerg] \(error)")
            throw ExitCode(1)
        }
        LoggingSystem.bootstrap { label in
            var h = NginxLogHandler(sink: sink)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "tether")
        if let warning = Self.applyRlimit(config) { logger.warning("\(warning)") }
        let server: TetherServer
        do {
            server = try TetherServer(configuration: config, logger: logger, admin: Renderer())
            try server.start()
        } catch let errors as ConfigErrors {
            for e in errors.errors { logger.critical("\(e)") }
            throw reportInvalid(errors)
        } catch {
            logger.critical("\(error)")
            printError("tether: [emerg] \(error)")
            throw ExitCode(1)
        }
        if let failure = Self.writePidFile(config) { logger.error("\(failure)") }
        // Signals are handled one at a time on one queue: a reload never overlaps another.
        let signals = DispatchQueue(label: "tether.signals")
        let done = DispatchSemaphore(value: 0)
        let drainSeconds = NIOLockedValueBox<Int64>(10)
        var sources: [DispatchSourceSignal] = []
        func on(_ sig: Int32, _ handler: @escaping @Sendable () -> Void) {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: signals)
            s.setEventHandler(handler: handler)
            s.resume()
            sources.append(s)
        }
        let path = file
        on(SIGTERM) { logger.notice("SIGTERM received, shutting down gracefully"); done.signal() }
        on(SIGQUIT) { logger.notice("SIGQUIT received, shutting down gracefully"); done.signal() }
        on(SIGINT) {
            logger.notice("SIGINT received, shutting down fast")
            drainSeconds.withLockedValue { $0 = 1 }
            done.signal()
        }
        on(SIGHUP) {
            // The new file is checked first; a bad one leaves the running configuration in place.
            switch Configuration.load(path: path) {
            case .failure(let errors):
                for e in errors.errors { logger.error("\(e)") }
                logger.error("reload of \(path) failed: the running configuration stays in place")
            case .success(let new):
                let workersBefore = server.configuration.workerProcesses
                do {
                    try server.reload(new)
                } catch let errors as ConfigErrors {
                    for e in errors.errors { logger.error("\(e)") }
                    logger.error("reload of \(path) failed: the running configuration stays in place")
                    return
                } catch {
                    logger.error("reload of \(path) failed: \(error); the running configuration stays in place")
                    return
                }
                if new.workerProcesses != workersBefore {
                    logger.warning("\"worker_processes\" changes take effect at the next start, not on reload")
                }
            }
        }
        on(SIGUSR1) {
            do {
                try sink.reopen()
                try server.reopenLogs()
                logger.notice("log files reopened")
            } catch {
                logger.error("reopening log files failed: \(error)")
            }
        }
        signal(SIGPIPE, SIG_IGN)
        done.wait()
        server.shutdown(timeout: .seconds(drainSeconds.withLockedValue { $0 }))
        if let pid = config.pidFile { unlink(pid) }
        logger.notice("exiting")
        _ = sources
    }
}

func printError(_ s: String) {
    var line = s + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Where error log lines go: stderr, or a file opened for appending (reopened on SIGUSR1).
final class FileLogSink: Sendable {
    let path: String
    let fd: NIOLockedValueBox<Int32>

    init(path: String) throws {
        self.path = path
        fd = NIOLockedValueBox(try FileLogSink.open(path))
    }

    static func open(_ path: String) throws -> Int32 { try LogFile.open(path) }

    func reopen() throws {
        let new = try FileLogSink.open(path)
        let old = fd.withLockedValue { f -> Int32 in let o = f; f = new; return o }
        if old > 2 { close(old) }
    }

    func write(_ line: String) {
        var l = line
        fd.withLockedValue { fd in l.withUTF8 { _ = Glibc.write(fd, $0.baseAddress, $0.count) } }
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}

/// Lines as nginx's error log writes them: `2026/11/25 11:00:45 [error] 1234#0: message`.
struct NginxLogHandler: LogHandler {
    let sink: FileLogSink
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var t = time(nil)
        var tmv = tm()
        localtime_r(&t, &tmv)
        var buf = [Int8](repeating: 0, count: 32)
        let n = strftime(&buf, 32, "%Y/%m/%d %H:%M:%S", &tmv)
        let stamp = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let name: String
        switch event.level {
        case .trace, .debug: name = "debug"
        case .info: name = "info"
        case .notice: name = "notice"
        case .warning: name = "warn"
        case .error: name = "error"
        case .critical: name = "crit"
        }
        sink.write("\(stamp) [\(name)] \(getpid())#0: \(event.message)\n")
    }
}
