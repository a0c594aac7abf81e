/// Where the head writers put bytes: a connection's outbound queue, a pool buffer, an array for
/// tests and local bodies. One writer per
/// piece of HTTP, whatever the buffers under it.
public protocol HeadSink: ~Copyable {
    mutating func put(_ bytes: UnsafeRawBufferPointer)
    /// How many bytes were put so far: a mark to go back to.
    var mark: Int { get }
    /// Takes back what was put after `mark` (a header whose value came out empty is not sent).
    mutating func rollback(to mark: Int)
}

extension HeadSink where Self: ~Copyable {
    @inline(__always)
    public mutating func put(_ s: StaticString) {
        s.withUTF8Buffer { put(UnsafeRawBufferPointer($0)) }
    }

    @inline(__always)
    public mutating func put(_ a: [UInt8]) {
        a.withUnsafeBytes { put($0) }
    }

    /// A `String`'s bytes. Labelled so that a literal never comes here: with `put(_: String)`
    /// next to `put(_: StaticString)`, Swift took every `put("…")` as a `String` (its default
    /// literal type), made one and released it.
    public mutating func put(string s: String) {
        var s = s
        s.withUTF8 { put(UnsafeRawBufferPointer($0)) }
    }

    public mutating func put(substring s: Substring) {
        var s = s
        s.withUTF8 { put(UnsafeRawBufferPointer($0)) }
    }

    /// `n` in decimal, without a String.
    public mutating func putDecimal<I: BinaryInteger>(_ n: I) {
        var v = UInt64(n < 0 ? -Int64(n) : Int64(n))
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 21) { d in
            var i = 21
            repeat { i -= 1; d[i] = UInt8(0x30 + v % 10); v /= 10 } while v > 0
            if n < 0 { i -= 1; d[i] = UInt8(ascii: "-") }
            put(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: d[i...])))
        }
    }

    /// `n` in lowercase hexadecimal, without a String.
    public mutating func putHex(_ n: UInt64) {
        var v = n
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 16) { d in
            var i = 16
            repeat { i -= 1; d[i] = ASCII.hexDigit(UInt8(v & 0xF)); v >>= 4 } while v > 0
            put(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: d[i...])))
        }
    }

    /// `n` in lowercase hexadecimal, zero-padded to `width` digits (at most 16).
    public mutating func putHex(_ n: UInt64, width: Int) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 16) { d in
            let w = min(max(width, 1), 16)
            for k in 0..<w { d[k] = ASCII.hexDigit(UInt8(truncatingIfNeeded: n >> (4 * UInt64(w - 1 - k))) & 0xF) }
            put(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: d[0..<w])))
        }
    }

    /// Milliseconds as nginx writes seconds in logs (`1.234`).
    public mutating func putSeconds(milliseconds ms: Int64) {
        let m = max(0, ms)
        putDecimal(m / 1000)
        put(".")
        let r = m % 1000
        if r < 100 { put("0") }
        if r < 10 { put("0") }
        putDecimal(r)
    }
}

extension Array: HeadSink where Element == UInt8 {
    public mutating func put(_ bytes: UnsafeRawBufferPointer) { append(contentsOf: bytes) }
    public var mark: Int { count }
    public mutating func rollback(to mark: Int) { removeLast(count - mark) }
}
