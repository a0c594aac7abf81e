/// Byte classes of HTTP/1 (RFC 9110 5.6), without tables.
public enum ASCII {
    /// A lowercase hexadecimal digit for 0...15.
    @inlinable @inline(__always) public static func hexDigit(_ v: UInt8) -> UInt8 { v < 10 ? 0x30 + v : 0x57 + v }

    @inlinable @inline(__always) public static func lower(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5A ? c | 0x20 : c }

    /// RFC 9110 tchar: ALPHA, DIGIT and "!#$%&'*+-.^_`|~", as two 64-bit masks (bytes 0-63 and
    /// 64-127) rather than a table: no global to initialise and check on every byte.
    @inlinable @inline(__always) public static func isToken(_ c: UInt8) -> Bool {
        if c < 64 { return (0x03FF_6CFA_0000_0000 as UInt64) >> UInt64(c) & 1 != 0 }
        if c < 128 { return (0x57FF_FFFF_C7FF_FFFE as UInt64) >> UInt64(c - 64) & 1 != 0 }
        return false
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
