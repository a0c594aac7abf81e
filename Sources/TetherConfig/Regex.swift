import CPCRE2

/// A `location ~ REGEX` (or `~*`) pattern, compiled once by PCRE2 with its JIT, as nginx does.
/// Read-only once made, so every loop shares it; each loop matches with match data of its own
/// (`Regex.MatchData`). A match is bounded (`matchLimit`, `depthLimit`): a pattern that would
/// backtrack catastrophically gives up instead of holding a loop.
public final class Regex: @unchecked Sendable, Hashable, CustomStringConvertible {
    let code: OpaquePointer
    public let source: String
    public let caseInsensitive: Bool
    /// Capturing groups (`$1`… count them).
    public let captureCount: Int
    /// Named groups (`(?<name>…)`) and their numbers.
    public let names: [String: Int]
    /// Whether PCRE2's JIT compiled it (no JIT on some platforms: the interpreter then runs).
    public let jit: Bool
    /// Backtracking steps and nesting depth a match may take (PCRE2's match and depth limits).
    public static let matchLimit: UInt32 = 100_000
    public static let depthLimit: UInt32 = 10_000

    /// nginx's error wording: `pcre2_compile() failed: missing closing parenthesis in "(a" at ""`.
    public init(_ pattern: String, caseInsensitive: Bool) throws(ConfigErrorReason) {
        var error: Int32 = 0
        var offset = 0
        let bytes = Array(pattern.utf8)
        let options = UInt32(PCRE2_UTF) | (caseInsensitive ? UInt32(PCRE2_CASELESS) : 0)
        guard let code = bytes.withUnsafeBufferPointer({ b in pcre2_compile_8(b.baseAddress, b.count, options, &error, &offset, nil) }) else {
            var message = [UInt8](repeating: 0, count: 256)
            let n = pcre2_get_error_message_8(error, &message, 256)
            let text = n > 0 ? String(decoding: message[0..<Int(n)], as: UTF8.self) : "error \(error)"
            let at = offset <= bytes.count ? String(decoding: bytes[offset...], as: UTF8.self) : ""
            throw ConfigErrorReason("pcre2_compile() failed: \(text) in \"\(pattern)\" at \"\(at)\"")
        }
        self.code = code
        source = pattern
        self.caseInsensitive = caseInsensitive
        jit = pcre2_jit_compile_8(code, UInt32(PCRE2_JIT_COMPLETE)) == 0
        var count: UInt32 = 0
        pcre2_pattern_info_8(code, UInt32(PCRE2_INFO_CAPTURECOUNT), &count)
        captureCount = Int(count)
        var nameCount: UInt32 = 0, entrySize: UInt32 = 0
        var table: UnsafeMutablePointer<UInt8>?
        pcre2_pattern_info_8(code, UInt32(PCRE2_INFO_NAMECOUNT), &nameCount)
        pcre2_pattern_info_8(code, UInt32(PCRE2_INFO_NAMEENTRYSIZE), &entrySize)
        pcre2_pattern_info_8(code, UInt32(PCRE2_INFO_NAMETABLE), &table)
        var names: [String: Int] = [:]
        if let table {
            for i in 0..<Int(nameCount) {
                let entry = table + i * Int(entrySize)
                let number = Int(entry[0]) << 8 | Int(entry[1])
                var end = 2
                while end < Int(entrySize) && entry[end] != 0 { end += 1 }
                names[String(decoding: UnsafeBufferPointer(start: entry + 2, count: end - 2), as: UTF8.self)] = number
            }
        }
        self.names = names
    }

    deinit { pcre2_code_free_8(code) }

    public static func == (a: Regex, b: Regex) -> Bool { a.source == b.source && a.caseInsensitive == b.caseInsensitive }
    public func hash(into h: inout Hasher) { h.combine(source); h.combine(caseInsensitive) }
    public var description: String { (caseInsensitive ? "~* " : "~ ") + source }

    /// One loop's match data and limits (not shared between threads).
    public final class MatchData {
        let data: OpaquePointer
        let context: OpaquePointer
        /// Room for this many groups' offsets (the whole match is group 0).
        public static let groups: UInt32 = 32

        public init() {
            data = pcre2_match_data_create_8(Self.groups, nil)
            context = pcre2_match_context_create_8(nil)
            pcre2_set_match_limit_8(context, Regex.matchLimit)
            pcre2_set_depth_limit_8(context, Regex.depthLimit)
        }

        deinit {
            pcre2_match_data_free_8(data)
            pcre2_match_context_free_8(context)
        }

        /// The offsets of group `i` of the last match (nil when it took no part).
        public func group(_ i: Int) -> Range<Int>? {
            guard i >= 0, i < Int(Self.groups) else { return nil }
            let v = pcre2_get_ovector_pointer_8(data)!
            let s = v[2 * i], e = v[2 * i + 1]
            guard s != Int.max && s != ~0, e >= s else { return nil }
            return Int(s)..<Int(e)
        }
    }

    public enum Outcome: Equatable { case match, noMatch, failed(String) }

    /// Matches `subject`; the groups' offsets are in `data` after a match.
    public func match(_ subject: UnsafeRawBufferPointer, _ data: MatchData) -> Outcome {
        let base = subject.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? UnsafePointer(bitPattern: 1)!
        let rc = pcre2_match_8(code, base, subject.count, 0, 0, data.data, data.context)
        if rc >= 0 { return .match }
        if rc == PCRE2_ERROR_NOMATCH { return .noMatch }
        var message = [UInt8](repeating: 0, count: 256)
        let n = pcre2_get_error_message_8(rc, &message, 256)
        return .failed(n > 0 ? String(decoding: message[0..<Int(n)], as: UTF8.self) : "error \(rc)")
    }
}
