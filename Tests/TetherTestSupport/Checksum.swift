import NIOCore

/// FNV-1a over a byte stream, with a count: enough to show bytes arrived unchanged.
public struct Checksum: Sendable, Equatable {
    public private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    public private(set) var count = 0

    public init() {}

    public mutating func add(_ p: UnsafeRawBufferPointer) {
        var h = value
        for b in p {
            h = (h ^ UInt64(b)) &* 0x100_0000_01b3
        }
        value = h
        count += p.count
    }

    public mutating func add(_ b: ByteBuffer) {
        b.withUnsafeReadableBytes { add($0) }
    }
}

/// The deterministic bytes the test backend and client send: byte i is `i % 251`.
public enum Pattern {
    public static func fill(_ p: UnsafeMutableRawBufferPointer, offset: Int, count: Int) {
        var v = offset % 251
        for i in 0..<count {
            p[i] = UInt8(v)
            v += 1
            if v == 251 { v = 0 }
        }
    }

    public static func checksum(count: Int) -> Checksum {
        var c = Checksum()
        var buf = [UInt8](repeating: 0, count: 65536)
        var off = 0
        while off < count {
            let n = min(65536, count - off)
            buf.withUnsafeMutableBytes { fill($0, offset: off, count: n) }
            buf.withUnsafeBytes { c.add(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            off += n
        }
        return c
    }
}
