/// Byte classes of HTTP/1 (RFC 9110 5.6).
public enum ASCII {
    /// A lowercase hexadecimal digit for 0...15.
    @inlinable @inline(__always) public static func hexDigit(_ v: UInt8) -> UInt8 { v < 10 ? 0x30 + v : 0x57 + v }

    @inlinable @inline(__always) public static func lower(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5A ? c | 0x20 : c }

    /// RFC 9110 tchar: ALPHA, DIGIT and "!#$%&'*+-.^_`|~", one load per byte from a table of
    /// 256 flags ("1": a token byte). The table is a string literal's bytes, a constant in the
    /// binary: no global to initialise and check. (Two 64-bit masks cost twice the instructions
    /// in header names, the parser's byte-by-byte loop.)
    @inlinable @inline(__always) public static func isToken(_ c: UInt8) -> Bool {
        tokenTable.utf8Start[Int(c)] == UInt8(ascii: "1")
    }

    @usableFromInline static var tokenTable: StaticString {
        """
        0000000000000000000000000000000001011111001101101111111111000000\
        0111111111111111111111111110001111111111111111111111111111101010\
        0000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000
        """
    }

    /// Field-value bytes: visible ASCII, obs-text, space and tab (no CTLs, no NUL, no bare CR).
    @inlinable @inline(__always) public static func isFieldByte(_ c: UInt8) -> Bool { c >= 0x20 ? c != 0x7F : c == 0x09 }

    /// Whether bytes s..<e are `lit` (lowercase) in any case.
    @inlinable public static func equalsIgnoringCase(_ p: UnsafeRawBufferPointer, _ s: Int, _ e: Int, _ lit: StaticString) -> Bool {
        guard e - s == lit.utf8CodeUnitCount else { return false }
        return lit.withUTF8Buffer { b in
            for k in 0..<b.count where lower(p[s + k]) != b[k] { return false }
            return true
        }
    }
}
