import NIOCore
import NIOHPACK
import Testing
@testable import TetherH2

/// Tether's HPACK decoder against NIOHPACK's encoder (Huffman coding and its dynamic table, over
/// many blocks in a row, as one connection sends them), and against blocks that are not HPACK.
@Suite struct HPACKDecoderTests {
    static func encode(_ encoder: inout HPACKEncoder, _ fields: [(String, String)]) -> [UInt8] {
        var buffer = ByteBufferAllocator().buffer(capacity: 256)
        try! encoder.encode(headers: HPACKHeaders(fields), to: &buffer)
        return Array(buffer.readableBytesView)
    }

    @Test(arguments: [true, false])
    func decodesWhatAnEncoderWrites(_ huffman: Bool) throws {
        var encoder = HPACKEncoder(allocator: ByteBufferAllocator(), useHuffmanEncoding: huffman)
        var decoder = H2HeaderDecoder(maxListSize: 1 << 20)
        var rng = SystemRandomNumberGenerator()
        let names = ["user-agent", "accept", "cookie", "x-custom", "x-trace-id", "content-type", "authorization", "referer"]
        for round in 0..<300 {
            var fields = [(":method", round % 2 == 0 ? "GET" : "POST"), (":scheme", "https"), (":path", "/r/\(round)"), (":authority", "a.test")]
            for _ in 0..<Int.random(in: 0...8, using: &rng) {
                // Values over every byte a field may hold (visible ASCII and obs-text as UTF-8).
                let value = String((0..<Int.random(in: 0...40, using: &rng)).map { _ in
                    Character(Unicode.Scalar(UInt8.random(in: 0x21...0x7e, using: &rng)))
                })
                fields.append((names.randomElement(using: &rng)!, round % 7 == 0 ? value + "é" : value))
            }
            let block = Self.encode(&encoder, fields)
            let decoded = try block.withUnsafeBytes { b throws(H2HeaderDecoder.Failure) in try decoder.decode(b) }
            #expect(decoded == fields.map { H2Field($0.0, $0.1) }, "round \(round)")
        }
        #expect(decoder.dynamicTableSize <= 4_096)
    }

    /// Every byte value through the Huffman code.
    @Test func everyByteThroughHuffman() throws {
        var encoder = HPACKEncoder(allocator: ByteBufferAllocator(), useHuffmanEncoding: true)
        var buffer = ByteBufferAllocator().buffer(capacity: 1024)
        let all = (0..<256).map { UInt8($0) }
        // A value outside UTF-8 cannot go through NIOHPACK's String API: ASCII-safe chunks, then
        // the raw Huffman decoder over every symbol's code directly.
        try encoder.encode(headers: HPACKHeaders([("x", String(decoding: all.filter { $0 >= 0x20 && $0 < 0x7f }, as: UTF8.self))]), to: &buffer)
        var decoder = H2HeaderDecoder(maxListSize: 1 << 20)
        let d = try Array(buffer.readableBytesView).withUnsafeBytes { b throws(H2HeaderDecoder.Failure) in try decoder.decode(b) }
        #expect(d.first?.value == all.filter { $0 >= 0x20 && $0 < 0x7f })
        for symbol in 0..<256 {
            // The symbol's code, then EOS's leading ones as padding to the byte.
            let code = UInt64(HuffmanTable.codes[symbol])
            let length = Int(HuffmanTable.lengths[symbol])
            let padded = (length + 7) / 8 * 8
            let bits = (code << UInt64(padded - length)) | ((1 << UInt64(padded - length)) - 1)
            let bytes = (0..<padded / 8).reversed().map { UInt8(truncatingIfNeeded: bits >> UInt64($0 * 8)) }
            #expect(bytes.withUnsafeBytes { Huffman.decode($0) } == [UInt8(symbol)], "symbol \(symbol)")
        }
    }

    @Test(arguments: [
        ("index 0", [0x80], "index 0 is in no table"),
        ("an index past both tables", [0xbe], "index 62 is in no table"),
        ("an integer cut short", [0xff], "an integer cut short"),
        ("an integer too large", [0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], "an integer too large"),
        ("a string longer than the block", [0x00, 0x05, 0x61], "a string longer than its block"),
        ("a string cut short", [0x00], "a string cut short"),
        ("padding of zeros", [0x00, 0x81, 0x61, 0x81, 0x00], "a Huffman string that does not decode"),
        ("EOS in a string", [0x00, 0x81, 0x61, 0x84, 0xff, 0xff, 0xff, 0xff], "a Huffman string that does not decode"),
        ("a size update after a field", [0x82, 0x20], "a dynamic table size update after a field"),
        ("a size update over the limit", [0x3f, 0xe2, 0x1f], "a dynamic table size of 4097, over 4096"),
    ] as [(String, [UInt8], String)])
    func malformedBlocks(_ name: String, _ block: [UInt8], _ why: String) {
        var decoder = H2HeaderDecoder(maxListSize: 1 << 20)
        let r = block.withUnsafeBytes { b -> H2HeaderDecoder.Failure? in
            do throws(H2HeaderDecoder.Failure) { _ = try decoder.decode(b); return nil } catch { return error }
        }
        #expect(r == .malformed(why), "\(name)")
    }

    @Test func aSizeUpdateEvicts() throws {
        var decoder = H2HeaderDecoder(maxListSize: 1 << 20)
        // Literal with indexing, new name "a: b" (34 bytes), then a size update to 0, then index 62.
        let insert: [UInt8] = [0x40, 0x01, 0x61, 0x01, 0x62]
        _ = try insert.withUnsafeBytes { b throws(H2HeaderDecoder.Failure) in try decoder.decode(b) }
        #expect(decoder.dynamicTableSize == 34)
        let again = try [UInt8]([0xbe]).withUnsafeBytes { b throws(H2HeaderDecoder.Failure) in try decoder.decode(b) }
        #expect(again == [H2Field("a", "b")])
        let r = [UInt8]([0x20, 0xbe]).withUnsafeBytes { b -> H2HeaderDecoder.Failure? in
            do throws(H2HeaderDecoder.Failure) { _ = try decoder.decode(b); return nil } catch { return error }
        }
        #expect(r == .malformed("index 62 is in no table") && decoder.dynamicTableSize == 0)
    }
}
