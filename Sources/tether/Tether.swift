import ArgumentParser
import TetherAdmin
import TetherConfig
import TetherCore
import TetherIO
import TetherOps
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
                print("built with Swift and OpenSSL 3; event loops: epoll, edge-triggered, one per worker; listeners: one SO_REUSEPORT socket per event loop")
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
            if testAndDump { print(config.effectiveText(resolvedNow: TetherServer.resolvedNow(config)), terminator: "") }
            return
        }
        try serve(config)
    }

    /// Serves the configuration on Tether's event loops until SIGTERM, SIGINT or SIGQUIT.
    func serve(_ config: Configuration) throws {
        for w in config.warnings { printError("tether: [warn] \(w)") }
        if let warning = Self.applyRlimit(config) { printError("tether: [warn] \(warning)") }
        // The signals are taken by sigwait here, so the loops' threads (which inherit the mask) never see them.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        // SIGHUP and SIGUSR1 too: their default action would end the process.
        for s in [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1] { sigaddset(&stopSignals, s) }
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)
        // error_log FILE: the loops' lines (written to standard error, at error_log's level
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
        let server: TetherServer
        do {
            server = try TetherServer(config, admin: Renderer())
            try server.start()
        } catch {
            for line in error.lines { onTerminal("tether: [emerg] \(line)") }
            throw ExitCode(1)
        }
        close(terminal)
        let log = server.log
        let addresses = server.boundPorts.map { "\($0.address):\($0.port)" }.joined(separator: ", ")
        log(.notice, "serving: \(server.workerCount) event loops, listening on \(addresses)")
        if let failure = Self.writePidFile(config) { log(.error, failure) }
        var received: Int32 = 0
        while true {
            sigwait(&stopSignals, &received)
            if received == SIGHUP {
                Self.reload(server, path: file, log: log)
            } else if received == SIGUSR1 {
                // As logrotate expects: the error log file, moved away, is opened again by its name.
                do {
                    // The file the running configuration names (a reload may have changed it).
                    try Self.pointStandardErrorAtErrorLog(server.configuration)
                    server.reopenLogs()
                    log(.notice, "log files reopened")
                } catch {
                    log(.alert, "reopening logs failed: \(error)")
                }
            } else {
                break
            }
        }
        // SIGTERM and SIGQUIT let requests in flight finish (10 s),
        // SIGINT gives them 1 s.
        let fast = received == SIGINT
        log(.notice, "\(fast ? "SIGINT" : received == SIGQUIT ? "SIGQUIT" : "SIGTERM") received, shutting down \(fast ? "fast" : "gracefully")")
        server.shutdown(timeoutMs: fast ? 1_000 : 10_000)
        if let pid = config.pidFile { unlink(pid) }
        log(.notice, "exiting")
    }

    /// SIGHUP: the file is read and checked again (OpenSSL's checks included), and
    /// swapped in; a file that fails keeps the running configuration, with every error logged at
    /// its place.
    static func reload(_ server: TetherServer, path: String, log: LoopErrorLog) {
        log(.notice, "SIGHUP received, reloading \(path)")
        switch Configuration.load(path: path) {
        case .failure(let errors):
            for e in errors.errors { log(.error, "\(e)") }
            log(.error, "reload of \(path) failed: the running configuration stays in place")
        case .success(let new):
            let workersBefore = server.configuration.workerProcesses
            let errorLogBefore = server.configuration.errorLog
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
            // error_log, as nginx's reload applies it: the new level from now on, and lines go
            // to the new file. (Back to stderr needs a restart: the terminal was let go at the start.)
            log.setLevel(new.errorLog.level)
            if new.errorLog.path != errorLogBefore.path {
                if new.errorLog.path == "stderr" {
                    log(.warn, "\"error_log stderr\" takes effect at the next start: lines go on to \(errorLogBefore.path)")
                } else {
                    do {
                        try pointStandardErrorAtErrorLog(new)
                    } catch {
                        log(.alert, "\(error): lines go on to \(errorLogBefore.path)")
                    }
                }
            }
        }
    }

    /// `error_log FILE`: standard error, where the loops write their lines, becomes that file
    /// (opened for appending); at a reopen, the file by that name now.
    static func pointStandardErrorAtErrorLog(_ config: Configuration) throws {
        guard config.errorLog.path != "stderr" else { return }
        let fd = try LogFile.open(config.errorLog.path)
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
}

func printError(_ s: String) {
    var line = s + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}
