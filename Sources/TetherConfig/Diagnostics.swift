/// A place in a configuration file.
public struct SourceLocation: Hashable, Sendable, CustomStringConvertible {
    public var file: String
    public var line: Int

    public init(file: String, line: Int) {
        self.file = file
        self.line = line
    }

    public var description: String { "\(file):\(line)" }
}

/// One configuration error, worded as nginx words it, with the place it was found.
public struct ConfigError: Error, Hashable, Sendable, CustomStringConvertible {
    public var location: SourceLocation?
    public var message: String

    public init(_ message: String, at location: SourceLocation?) {
        self.message = message
        self.location = location
    }

    /// `FILE:LINE: message`, or just the message when no place is known.
    public var description: String {
        if let location { return "\(location): \(message)" }
        return message
    }
}

/// Every error a configuration produced; semantic checks report all of them, not only the first.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [ConfigError]

    public init(_ errors: [ConfigError]) { self.errors = errors }

    public var description: String { errors.map(\.description).joined(separator: "\n") }
}

/// A non-fatal remark about a configuration (for example a directive accepted but not acted on).
public struct ConfigWarning: Hashable, Sendable, CustomStringConvertible {
    public var location: SourceLocation?
    public var message: String

    public var description: String {
        if let location { return "\(location): \(message)" }
        return message
    }
}
