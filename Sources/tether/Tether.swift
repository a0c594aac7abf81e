import ArgumentParser
import Dispatch
import Logging
import NIOCore
import TetherAdmin
import TetherConfig
import TetherCore
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
            relative to the working directory). SIGTERM, SIGINT and SIGQUIT shut down gracefully:
            listeners close, requests in flight finish, idle connections close.

            Examples:
              tether -t -c conf/tether.conf   check a configuration
              tether -T                       check and print the effective configuration
              tether -c conf/tether.conf      run
            """
    )

    @Option(name: .customShort("c"), help: ArgumentHelp("Configuration file.", valueName: "file"))
    var file = "conf/tether.conf"

    @Flag(name: .customShort("t"), help: "Test the configuration and exit.")
    var test = false

    @Flag(name: .customShort("T"), help: "Test the configuration, print the effective configuration with defaults filled in, and exit.")
    var testAndDump = false

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
        let config: Configuration
        switch Configuration.load(path: file) {
        case .failure(let errors):
            for e in errors.errors { printError("tether: [emerg] \(e)") }
            printError("tether: configuration file \(file) test failed")
            throw ExitCode(1)
        case .success(let c):
            config = c
        }
        if test || testAndDump {
            for w in config.warnings { printError("tether: [warn] \(w)") }
            printError("tether: the configuration file \(file) syntax is ok")
            printError("tether: configuration file \(file) test is successful")
            if testAndDump { print(config.effectiveText(), terminator: "") }
            return
        }
        try serve(config)
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
        if let n = config.workerRlimitNofile {
            var r = rlimit(rlim_cur: rlim_t(n), rlim_max: rlim_t(n))
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &r) != 0 {
                logger.warning("setrlimit(RLIMIT_NOFILE, \(n)) failed (\(errno): \(String(cString: strerror(errno))))")
            }
        }
        let server: TetherServer
        do {
            server = try TetherServer(configuration: config, logger: logger, admin: Renderer())
            try server.start()
        } catch {
            logger.critical("\(error)")
            printError("tether: [emerg] \(error)")
            throw ExitCode(1)
        }
        if let pid = config.pidFile {
            let fd = open(pid, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd >= 0 {
                let text = "\(getpid())\n"
                _ = text.withCString { write(fd, $0, strlen($0)) }
                close(fd)
            } else {
                logger.error("open() \"\(pid)\" failed (\(errno): \(String(cString: strerror(errno))))")
            }
        }
        let done = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT, SIGQUIT] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                logger.notice("signal \(sig) received, shutting down gracefully")
                done.signal()
            }
            s.resume()
            sources.append(s)
        }
        signal(SIGPIPE, SIG_IGN)
        done.wait()
        server.shutdown(timeout: .seconds(10))
        if let pid = config.pidFile { unlink(pid) }
        logger.notice("exiting")
        _ = sources
    }
}

func printError(_ s: String) {
    var line = s + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Where error log lines go: stderr, or a file opened for appending.
final class FileLogSink: Sendable {
    let fd: Int32

    init(path: String) throws {
        if path == "stderr" { fd = 2; return }
        if path == "stdout" { fd = 1; return }
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TetherError.startup("open() \"\(path)\" failed (\(errno): \(String(cString: strerror(errno))))") }
        self.fd = fd
    }

    func write(_ line: String) {
        var l = line
        l.withUTF8 { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
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
