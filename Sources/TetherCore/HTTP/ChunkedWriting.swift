import NIOCore
import TetherHTTP

extension ChunkedDecoder {
    /// A canonical chunk-size line: lowercase hex without leading zeros, no extension, CRLF.
    static func writeSize(_ n: Int64, into out: inout ByteBuffer) {
        var digits = 1
        while digits < 16, n >> (4 * Int64(digits)) != 0 { digits += 1 }
        for k in stride(from: digits - 1, through: 0, by: -1) {
            let v = UInt8(truncatingIfNeeded: n >> (4 * Int64(k))) & 15
            out.writeInteger(v < 10 ? v + 0x30 : v - 10 + 0x61)
        }
        out.writeStaticString("\r\n")
    }
}
