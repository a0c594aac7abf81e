/// An argument of a directive as written: its text after unquoting, and whether it was quoted.
public struct Argument: Hashable, Sendable {
    public var text: String
    public var quoted: Bool
    public var location: SourceLocation
}

/// A directive in the syntax tree: `name arg* ;` or `name arg* { ... }`.
public struct Directive: Sendable {
    public var name: String
    public var args: [Argument]
    /// The directives inside `{ ... }`, or nil for a simple directive ending in `;`.
    public var block: [Directive]?
    public var location: SourceLocation

    public init(name: String, args: [Argument], block: [Directive]?, location: SourceLocation) {
        self.name = name
        self.args = args
        self.block = block
        self.location = location
    }
}

/// Tokenises and parses the nginx configuration grammar, as `ngx_conf_read_token` does:
/// whitespace separates words, `;` ends a directive, `{` `}` delimit blocks, `#` starts a
/// comment only at the start of a word, quotes group, and a backslash escapes.
struct Parser {
    private let bytes: [UInt8]
    private let file: String
    private var index = 0
    private var line = 1

    init(text: String, file: String) {
        self.bytes = Array(text.utf8)
        self.file = file
    }

    private enum Token {
        case word(Argument)
        case semicolon(SourceLocation)
        case open(SourceLocation)
        case close(SourceLocation)
        case end(SourceLocation)
    }

    private var here: SourceLocation { SourceLocation(file: file, line: line) }

    /// Parses a whole file into its top-level directives.
    mutating func parseFile() throws(ConfigError) -> [Directive] {
        let (directives, terminator) = try parseBlock(depth: 0)
        if case .close(let at) = terminator {
            throw ConfigError("unexpected \"}\"", at: at)
        }
        return directives
    }

    /// Parses directives until `}` or end of file, and says which ended it.
    private mutating func parseBlock(depth: Int) throws(ConfigError) -> ([Directive], Token) {
        var directives: [Directive] = []
        while true {
            var words: [Argument] = []
            var token = try nextToken()
            while case .word(let w) = token {
                words.append(w)
                token = try nextToken()
            }
            switch token {
            case .word:
                preconditionFailure("word loop ended on a word")
            case .semicolon(let at):
                guard let first = words.first else { throw ConfigError("unexpected \";\"", at: at) }
                directives.append(Directive(name: first.text, args: Array(words.dropFirst()), block: nil, location: first.location))
            case .open(let at):
                guard let first = words.first else { throw ConfigError("unexpected \"{\"", at: at) }
                if depth >= 64 { throw ConfigError("too deeply nested blocks", at: at) }
                let (inner, end) = try parseBlock(depth: depth + 1)
                if case .end(let eof) = end {
                    throw ConfigError("unexpected end of file, expecting \"}\"", at: eof)
                }
                directives.append(Directive(name: first.text, args: Array(words.dropFirst()), block: inner, location: first.location))
            case .close(let at):
                if !words.isEmpty { throw ConfigError("unexpected \"}\"", at: at) }
                return (directives, token)
            case .end(let at):
                if !words.isEmpty { throw ConfigError("unexpected end of file, expecting \";\" or \"}\"", at: at) }
                return (directives, token)
            }
        }
    }

    private static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D }

    private mutating func nextToken() throws(ConfigError) -> Token {
        // Skip white space and comments (a `#` here is at the start of a word).
        while index < bytes.count {
            let c = bytes[index]
            if c == 0x0A { line += 1; index += 1; continue }
            if Parser.isSpace(c) { index += 1; continue }
            if c == UInt8(ascii: "#") {
                while index < bytes.count, bytes[index] != 0x0A { index += 1 }
                continue
            }
            break
        }
        guard index < bytes.count else { return .end(here) }
        let c = bytes[index]
        switch c {
        case UInt8(ascii: ";"): index += 1; return .semicolon(here)
        case UInt8(ascii: "{"): index += 1; return .open(here)
        case UInt8(ascii: "}"): index += 1; return .close(here)
        case UInt8(ascii: "\""), UInt8(ascii: "'"): return .word(try quoted(c))
        default: return .word(try bare())
        }
    }

    private mutating func quoted(_ quote: UInt8) throws(ConfigError) -> Argument {
        let start = here
        index += 1
        var out: [UInt8] = []
        while true {
            guard index < bytes.count else {
                throw ConfigError("unexpected end of file, expecting \(quote == 0x22 ? "'\"'" : "\"'\"")", at: here)
            }
            let c = bytes[index]
            if c == 0x0A { line += 1 }
            if c == UInt8(ascii: "\\"), index + 1 < bytes.count {
                let n = bytes[index + 1]
                Parser.unescape(n, into: &out)
                if n == 0x0A { line += 1 }
                index += 2
                continue
            }
            index += 1
            if c == quote { break }
            out.append(c)
        }
        // As in nginx, a closing quote must be followed by a separator.
        if index < bytes.count {
            let n = bytes[index]
            if !(Parser.isSpace(n) || n == UInt8(ascii: ";") || n == UInt8(ascii: "{") || n == UInt8(ascii: "}")) {
                throw ConfigError("unexpected \"\(Parser.show(n))\"", at: here)
            }
        }
        return Argument(text: String(decoding: out, as: UTF8.self), quoted: true, location: start)
    }

    /// nginx's escapes after a backslash: \" \' \\ \t \r \n; before anything else the backslash stays.
    static func unescape(_ n: UInt8, into out: inout [UInt8]) {
        switch n {
        case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"): out.append(n)
        case UInt8(ascii: "t"): out.append(0x09)
        case UInt8(ascii: "r"): out.append(0x0D)
        case UInt8(ascii: "n"): out.append(0x0A)
        default: out.append(UInt8(ascii: "\\")); out.append(n)
        }
    }

    private mutating func bare() throws(ConfigError) -> Argument {
        let start = here
        var out: [UInt8] = []
        while index < bytes.count {
            let c = bytes[index]
            if Parser.isSpace(c) || c == UInt8(ascii: ";") || c == UInt8(ascii: "}") { break }
            if c == UInt8(ascii: "{") {
                // `${name}` keeps its braces; any other `{` ends the word.
                if out.last == UInt8(ascii: "$") {
                    while index < bytes.count, bytes[index] != UInt8(ascii: "}") {
                        if bytes[index] == 0x0A || bytes[index] == UInt8(ascii: ";") {
                            throw ConfigError("the closing bracket in \"\(String(decoding: out, as: UTF8.self))\" variable is missing", at: here)
                        }
                        out.append(bytes[index]); index += 1
                    }
                    guard index < bytes.count else { throw ConfigError("unexpected end of file, expecting \"}\"", at: here) }
                    out.append(bytes[index]); index += 1
                    continue
                }
                break
            }
            if c == UInt8(ascii: "\\"), index + 1 < bytes.count {
                // As nginx: \" \' \\ \t \r \n are escapes; before anything else the backslash
                // stays (a regex's `\d`, `\.`), and the next character never ends the word.
                let n = bytes[index + 1]
                if n == 0x0A { line += 1 }
                Parser.unescape(n, into: &out)
                index += 2
                continue
            }
            out.append(c)
            index += 1
        }
        return Argument(text: String(decoding: out, as: UTF8.self), quoted: false, location: start)
    }

    private static func show(_ c: UInt8) -> String {
        (0x21...0x7E).contains(c) ? String(UnicodeScalar(c)) : "\\x" + String(c, radix: 16)
    }
}
