/// One field of a header list, as bytes: HTTP field values need not be UTF-8, and nothing
/// decoded is turned into text that could change it.
public struct H2Field: Equatable, Sendable {
    public var name: [UInt8]
    public var value: [UInt8]
    public init(name: [UInt8], value: [UInt8]) {
        self.name = name
        self.value = value
    }
    public init(_ name: String, _ value: String) {
        self.name = Array(name.utf8)
        self.value = Array(value.utf8)
    }
    /// RFC 7541 §4.1: what the field counts for in a table or a header list.
    public var size: Int { name.count + value.count + 32 }
}

/// HPACK decoding (RFC 7541) of one connection's header blocks: the dynamic table, at most
/// `maxTableSize` bytes (the SETTINGS_HEADER_TABLE_SIZE advertised), Huffman-coded strings, and a
/// bound on the decoded list, checked as it grows, so that a small block referencing a large
/// entry many times (an HPACK bomb) stops at the bound.
public struct H2HeaderDecoder {
    public enum Failure: Error, Equatable {
        /// Not HPACK: the connection's decoding state is lost (COMPRESSION_ERROR).
        case malformed(String)
        /// The decoded list passed `maxListSize`.
        case tooLarge
    }

    /// Newest last.
    private var table: [H2Field] = []
    private var tableSize = 0
    /// The limit the encoder set within what was advertised.
    private var currentMax: Int
    public let maxTableSize: Int
    public var maxListSize: Int

    public init(maxTableSize: Int = 4_096, maxListSize: Int) {
        self.maxTableSize = maxTableSize
        currentMax = maxTableSize
        self.maxListSize = maxListSize
    }

    /// The static table as fields, made once (a lookup copies no bytes: arrays are shared).
    static let staticFields: [H2Field] = StaticTable.entries.map { H2Field($0.name, $0.value) }

    /// The dynamic table's size now (RFC 7541 §4.1).
    public var dynamicTableSize: Int { tableSize }

    public mutating func decode(_ block: UnsafeRawBufferPointer) throws(Failure) -> [H2Field] {
        var fields: [H2Field] = []
        var at = 0
        var listSize = 0
        var fieldSeen = false
        while at < block.count {
            let b = block[at]
            if b & 0x80 != 0 {
                let index = try integer(block, &at, prefix: 7)
                try add(try entry(index), to: &fields, &listSize)
            } else if b & 0xc0 == 0x40 {
                let index = try integer(block, &at, prefix: 6)
                let name = index == 0 ? try string(block, &at) : try entry(index).name
                let field = H2Field(name: name, value: try string(block, &at))
                insert(field)
                try add(field, to: &fields, &listSize)
            } else if b & 0xe0 == 0x20 {
                // §4.2: only at the start of a block.
                guard !fieldSeen else { throw .malformed("a dynamic table size update after a field") }
                let size = try integer(block, &at, prefix: 5)
                guard size <= maxTableSize else { throw .malformed("a dynamic table size of \(size), over \(maxTableSize)") }
                currentMax = size
                evict()
                continue
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let index = try integer(block, &at, prefix: 4)
                let name = index == 0 ? try string(block, &at) : try entry(index).name
                try add(H2Field(name: name, value: try string(block, &at)), to: &fields, &listSize)
            }
            fieldSeen = true
        }
        return fields
    }

    private func add(_ f: H2Field, to fields: inout [H2Field], _ listSize: inout Int) throws(Failure) {
        listSize += f.size
        guard listSize <= maxListSize else { throw .tooLarge }
        fields.append(f)
    }

    private func entry(_ index: Int) throws(Failure) -> H2Field {
        if index >= 1 && index <= Self.staticFields.count {
            return Self.staticFields[index - 1]
        }
        let d = index - StaticTable.entries.count - 1
        guard index > 0, d < table.count else { throw .malformed("index \(index) is in no table") }
        return table[table.count - 1 - d]
    }

    private mutating func insert(_ f: H2Field) {
        tableSize += f.size
        table.append(f)
        evict()
    }

    private mutating func evict() {
        var drop = 0
        while tableSize > currentMax && drop < table.count {
            tableSize -= table[drop].size
            drop += 1
        }
        if drop > 0 { table.removeFirst(drop) }
    }

    /// RFC 7541 §5.1 (values past 2^28 are refused: nothing here is that large).
    private func integer(_ p: UnsafeRawBufferPointer, _ at: inout Int, prefix: Int) throws(Failure) -> Int {
        let max = (1 << prefix) - 1
        var value = Int(p[at]) & max
        at += 1
        guard value == max else { return value }
        var shift = 0
        while true {
            guard at < p.count else { throw .malformed("an integer cut short") }
            let b = p[at]
            at += 1
            value += Int(b & 0x7f) << shift
            if b & 0x80 == 0 { return value }
            shift += 7
            guard shift <= 21 else { throw .malformed("an integer too large") }
        }
    }

    /// RFC 7541 §5.2.
    private func string(_ p: UnsafeRawBufferPointer, _ at: inout Int) throws(Failure) -> [UInt8] {
        guard at < p.count else { throw .malformed("a string cut short") }
        let huffman = p[at] & 0x80 != 0
        let length = try integer(p, &at, prefix: 7)
        guard length <= p.count - at else { throw .malformed("a string longer than its block") }
        let raw = UnsafeRawBufferPointer(rebasing: p[at..<at + length])
        at += length
        guard huffman else { return Array(raw) }
        guard let decoded = Huffman.decode(raw) else { throw .malformed("a Huffman string that does not decode") }
        return decoded
    }
}

/// Huffman decoding (RFC 7541 §5.2, Appendix B) by walking a tree of the code, bit by bit.
enum Huffman {
    /// Node `i`'s children at `2i` (bit 0) and `2i+1` (bit 1): a node index, or a symbol as
    /// `-1 - symbol`; 0 is no child (the root is never a child).
    static let tree: [Int16] = {
        var t = [Int16](repeating: 0, count: 2)
        for symbol in 0..<HuffmanTable.codes.count {
            let code = HuffmanTable.codes[symbol]
            let length = Int(HuffmanTable.lengths[symbol])
            var node = 0
            for i in stride(from: length - 1, through: 0, by: -1) {
                let bit = Int(code >> UInt32(i) & 1)
                let slot = 2 * node + bit
                if i == 0 {
                    t[slot] = Int16(-1 - symbol)
                } else {
                    if t[slot] == 0 {
                        t[slot] = Int16(t.count / 2)
                        t += [0, 0]
                    }
                    node = Int(t[slot])
                }
            }
        }
        return t
    }()

    /// Nil for EOS inside the string, a code no symbol has, or padding that is longer than 7
    /// bits or not all ones.
    static func decode(_ p: UnsafeRawBufferPointer) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(p.count * 8 / 5)
        var node = 0
        var depth = 0
        var ones = true
        for byte in p {
            for i in stride(from: 7, through: 0, by: -1) {
                let bit = Int(byte >> UInt8(i) & 1)
                let next = tree[2 * node + bit]
                if next < 0 {
                    let symbol = -1 - Int(next)
                    if symbol == 256 { return nil }
                    out.append(UInt8(symbol))
                    node = 0
                    depth = 0
                    ones = true
                } else if next == 0 {
                    return nil
                } else {
                    node = Int(next)
                    depth += 1
                    ones = ones && bit == 1
                }
            }
        }
        guard depth <= 7 && ones else { return nil }
        return out
    }
}
