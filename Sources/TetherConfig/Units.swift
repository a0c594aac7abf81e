/// Parsers for nginx's value syntaxes: times, sizes, flags and counts.
/// Each returns nil for text that is not of its form, or a reason when it is out of range.
public enum Units {
    public enum Failure: Error, Equatable {
        case invalid
        case overflow
    }

    /// A time as nginx writes it: `500ms`, `30s`, `1h30m`, `2d`; a bare number means seconds.
    /// Units (`w d h m s ms`) must come largest first, each at most once. Result in milliseconds.
    public static func time(_ text: String) -> Result<Int64, Failure> {
        let units: [(String, Int64)] = [("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("ms", 1), ("m", 60_000), ("s", 1000)]
        // Rank by size so that "largest first" can be checked: w d h m s ms.
        let rank: [String: Int] = ["w": 0, "d": 1, "h": 2, "m": 3, "s": 4, "ms": 5]
        let b = Array(text.utf8)
        if b.isEmpty { return .failure(.invalid) }
        var i = 0
        var total: Int64 = 0
        var lastRank = -1
        while i < b.count {
            var value: Int64 = 0
            let start = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 {
                let (m, o1) = value.multipliedReportingOverflow(by: 10)
                let (s, o2) = m.addingReportingOverflow(Int64(b[i] - 0x30))
                if o1 || o2 { return .failure(.overflow) }
                value = s
                i += 1
            }
            if i == start { return .failure(.invalid) }
            var unit = "s"
            var bare = true
            if i < b.count {
                bare = false
                var matched = false
                for (name, _) in units {
                    let u = Array(name.utf8)
                    if i + u.count <= b.count, Array(b[i..<(i + u.count)]) == u {
                        // "m" must not swallow the "m" of "ms".
                        unit = name; i += u.count; matched = true; break
                    }
                }
                if !matched { return .failure(.invalid) }
            } else if lastRank >= 0 {
                // A bare number after a unit ("1h30") is not allowed.
                return .failure(.invalid)
            }
            _ = bare
            let r = rank[unit]!
            if r <= lastRank { return .failure(.invalid) }
            lastRank = r
            let scale = units.first(where: { $0.0 == unit })!.1
            let (ms, o1) = value.multipliedReportingOverflow(by: scale)
            let (t, o2) = total.addingReportingOverflow(ms)
            if o1 || o2 || t > Int64(Int32.max) * 1000 { return .failure(.overflow) }
            total = t
        }
        return .success(total)
    }

    /// A size: bare bytes, or with `k`/`K`, `m`/`M`, `g`/`G`.
    public static func size(_ text: String) -> Result<Int64, Failure> {
        var b = Array(text.utf8)
        guard !b.isEmpty else { return .failure(.invalid) }
        var scale: Int64 = 1
        switch b.last! {
        case UInt8(ascii: "k"), UInt8(ascii: "K"): scale = 1 << 10; b.removeLast()
        case UInt8(ascii: "m"), UInt8(ascii: "M"): scale = 1 << 20; b.removeLast()
        case UInt8(ascii: "g"), UInt8(ascii: "G"): scale = 1 << 30; b.removeLast()
        default: break
        }
        guard let v = number(b) else { return .failure(b.isEmpty ? .invalid : (b.allSatisfy { $0 >= 0x30 && $0 <= 0x39 } ? .overflow : .invalid)) }
        let (r, o) = v.multipliedReportingOverflow(by: scale)
        if o { return .failure(.overflow) }
        return .success(r)
    }

    /// A non-negative decimal integer.
    public static func integer(_ text: String) -> Result<Int64, Failure> {
        let b = Array(text.utf8)
        if let v = number(b) { return .success(v) }
        return .failure(!b.isEmpty && b.allSatisfy { $0 >= 0x30 && $0 <= 0x39 } ? .overflow : .invalid)
    }

    static func number(_ b: [UInt8]) -> Int64? {
        guard !b.isEmpty else { return nil }
        var v: Int64 = 0
        for c in b {
            guard c >= 0x30, c <= 0x39 else { return nil }
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(Int64(c - 0x30))
            if o1 || o2 { return nil }
            v = s
        }
        return v
    }

    /// Formats milliseconds the way `-T` prints them: `75s`, `500ms`, `1h30m`.
    public static func formatTime(_ ms: Int64) -> String {
        if ms == 0 { return "0s" }
        if ms % 1000 != 0 { return "\(ms)ms" }
        var s = ms / 1000
        var out = ""
        for (name, unit) in [("d", Int64(86400)), ("h", 3600), ("m", 60), ("s", 1)] where s >= unit {
            out += "\(s / unit)\(name)"
            s %= unit
        }
        return out
    }

    /// Formats a byte count the way nginx users write it: `1m`, `8k`, `100`.
    public static func formatSize(_ n: Int64) -> String {
        if n != 0 && n % (1 << 30) == 0 { return "\(n >> 30)g" }
        if n != 0 && n % (1 << 20) == 0 { return "\(n >> 20)m" }
        if n != 0 && n % (1 << 10) == 0 { return "\(n >> 10)k" }
        return "\(n)"
    }
}
