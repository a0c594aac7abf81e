#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads configuration files and expands `include` directives wherever they stand.
///
/// `include PATH` is relative to the folder of the file that includes it; a pattern with
/// `*`, `?` or `[` is a glob whose matches are read in sorted order (none is fine), while a
/// plain path that does not exist is an error. Cycles are detected by real path.
public struct Loader {
    public init() {}

    /// The directives of `path` with every include expanded.
    public func load(path: String) throws(ConfigError) -> [Directive] {
        var stack: [String] = []
        let text = try Loader.readFile(path, includedAt: nil)
        return try parse(text: text, file: path, stack: &stack)
    }

    /// The directives of `text`, read as if it were the file `file`.
    public func load(text: String, file: String) throws(ConfigError) -> [Directive] {
        var stack: [String] = []
        return try parse(text: text, file: file, stack: &stack)
    }

    private func parse(text: String, file: String, stack: inout [String]) throws(ConfigError) -> [Directive] {
        let real = Loader.realPath(file) ?? file
        if stack.contains(real) {
            throw ConfigError("include cycle: \"\(file)\" includes itself", at: nil)
        }
        stack.append(real)
        defer { stack.removeLast() }
        var parser = Parser(text: text, file: file)
        let tree = try parser.parseFile()
        return try expand(tree, in: file, stack: &stack)
    }

    private func expand(_ directives: [Directive], in file: String, stack: inout [String]) throws(ConfigError) -> [Directive] {
        var out: [Directive] = []
        out.reserveCapacity(directives.count)
        for var d in directives {
            if d.name == "include" {
                guard d.args.count == 1, d.block == nil else {
                    throw ConfigError("invalid number of arguments in \"include\" directive", at: d.location)
                }
                for path in try Loader.matches(d.args[0].text, relativeTo: file, at: d.location) {
                    let real = Loader.realPath(path) ?? path
                    if stack.contains(real) {
                        throw ConfigError("include cycle: \"\(path)\" is already being read", at: d.location)
                    }
                    let text = try Loader.readFile(path, includedAt: d.location)
                    out.append(contentsOf: try parse(text: text, file: path, stack: &stack))
                }
                continue
            }
            if let block = d.block {
                d.block = try expand(block, in: file, stack: &stack)
            }
            out.append(d)
        }
        return out
    }

    static func directory(of file: String) -> String {
        guard let slash = file.lastIndex(of: "/") else { return "." }
        return slash == file.startIndex ? "/" : String(file[..<slash])
    }

    static func matches(_ pattern: String, relativeTo file: String, at location: SourceLocation) throws(ConfigError) -> [String] {
        let full = pattern.hasPrefix("/") ? pattern : directory(of: file) + "/" + pattern
        let isGlob = pattern.contains(where: { $0 == "*" || $0 == "?" || $0 == "[" })
        if !isGlob { return [full] }
        var g = glob_t()
        defer { globfree(&g) }
        let rc = glob(full, 0, nil, &g)
        if rc == GLOB_NOMATCH { return [] }
        guard rc == 0 else { throw ConfigError("glob() \"\(full)\" failed", at: location) }
        var paths: [String] = []
        for i in 0..<Int(g.gl_pathc) {
            if let p = g.gl_pathv[i] { paths.append(String(cString: p)) }
        }
        return paths.sorted()
    }

    static func realPath(_ path: String) -> String? {
        guard let r = realpath(path, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// Reads a whole file, or says why not in nginx's words: `open() "PATH" failed (2: No such file or directory)`.
    public static func readFile(_ path: String, includedAt: SourceLocation?) throws(ConfigError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            throw ConfigError("open() \"\(path)\" failed (\(e): \(String(cString: strerror(e))))", at: includedAt)
        }
        defer { close(fd) }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, 65536) }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw ConfigError("read() \"\(path)\" failed (\(e): \(String(cString: strerror(e))))", at: includedAt)
            }
            if n == 0 { break }
            data.append(contentsOf: chunk[0..<n])
            if data.count > 16 << 20 { throw ConfigError("\"\(path)\" is larger than 16m", at: includedAt) }
        }
        return String(decoding: data, as: UTF8.self)
    }
}
