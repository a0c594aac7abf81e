import Testing
@testable import TetherCore

@Suite struct DNSTests {
    /// An answer to `query` with the given records (each: owner bytes, type, ttl, data).
    static func answer(to query: [UInt8], rcode: UInt8 = 0, flags: UInt8 = 0x81, records: [([UInt8], UInt16, UInt32, [UInt8])]) -> [UInt8] {
        var m = Array(query[0..<2]) + [flags, 0x80 | rcode, 0, 1, 0, UInt8(records.count), 0, 0, 0, 0]
        m += query[12...]
        for (owner, type, ttl, data) in records {
            m += owner
            m += [UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
            m += [UInt8(ttl >> 24), UInt8(ttl >> 16 & 0xFF), UInt8(ttl >> 8 & 0xFF), UInt8(ttl & 0xFF)]
            m += [UInt8(data.count >> 8), UInt8(data.count & 0xFF)] + data
        }
        return m
    }

    /// A pointer to the question's name (offset 12).
    static let q: [UInt8] = [0xC0, 12]

    @Test func aQueryIsRFC1035() throws {
        let m = try #require(DNS.query(id: 0xABCD, name: "api.Example.test.", type: .a))
        #expect(m == [0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
                      3, 0x61, 0x70, 0x69, 7, 0x45, 0x78, 0x61, 0x6D, 0x70, 0x6C, 0x65, 4, 0x74, 0x65, 0x73, 0x74, 0, 0, 1, 0, 1])
        #expect(DNS.query(id: 1, name: "a..b", type: .a) == nil)
        #expect(DNS.query(id: 1, name: String(repeating: "x", count: 64) + ".test", type: .a) == nil)
        #expect(DNS.query(id: 1, name: "sp ace.test", type: .a) == nil)
    }

    @Test func addressesAndTheSmallestTTL() throws {
        let query = try #require(DNS.query(id: 7, name: "api.test", type: .a))
        let m = Self.answer(to: query, records: [(Self.q, 1, 30, [10, 0, 0, 1]), (Self.q, 1, 20, [10, 0, 0, 2])])
        #expect(DNS.parse(m, id: 7, name: "API.test", type: .a) == .success(.init(addresses: ["10.0.0.1", "10.0.0.2"], ttl: 20)))
    }

    /// The chain a recursive resolver returns: CNAME, then the target's A records; records for
    /// names outside the chain are not taken.
    @Test func aCNAMEChainIsFollowed() throws {
        let query = try #require(DNS.query(id: 9, name: "www.test", type: .a))
        // Records follow the question (12 + 14 bytes): the CNAME's target is written out at 26 + 12.
        let target: [UInt8] = [3, 0x6C, 0x62, 0x31, 4, 0x74, 0x65, 0x73, 0x74, 0]  // lb1.test
        let m = Self.answer(to: query, records: [
            (Self.q, 5, 300, target),
            ([0xC0, 38], 1, 60, [192, 0, 2, 7]),
            ([5, 0x6F, 0x74, 0x68, 0x65, 0x72, 0], 1, 60, [192, 0, 2, 99]),  // "other": not in the chain
        ])
        #expect(DNS.parse(m, id: 9, name: "www.test", type: .a) == .success(.init(addresses: ["192.0.2.7"], ttl: 60)))
    }

    @Test func failuresAreTold() throws {
        let query = try #require(DNS.query(id: 3, name: "api.test", type: .a))
        #expect(DNS.parse(Self.answer(to: query, rcode: 2, records: []), id: 3, name: "api.test", type: .a) == .failure(.rcode(2)))
        #expect(DNS.parse(Self.answer(to: query, rcode: 3, records: []), id: 3, name: "api.test", type: .a) == .failure(.rcode(3)))
        // Another ID, another question, not a response: not ours.
        #expect(DNS.parse(Self.answer(to: query, records: []), id: 4, name: "api.test", type: .a) == .failure(.mismatch))
        #expect(DNS.parse(Self.answer(to: query, records: []), id: 3, name: "web.test", type: .a) == .failure(.mismatch))
        #expect(DNS.parse(Self.answer(to: query, flags: 0x01, records: []), id: 3, name: "api.test", type: .a) == .failure(.mismatch))
        #expect(DNS.parse(Self.answer(to: query, flags: 0x83, records: []), id: 3, name: "api.test", type: .a) == .failure(.truncated))
        // No address: an empty answer (the name exists, with no A record).
        #expect(DNS.parse(Self.answer(to: query, records: []), id: 3, name: "api.test", type: .a) == .success(.init(addresses: [], ttl: 0)))
    }

    /// Hostile answers end the parse, never the process.
    @Test func malformedAnswersAreRefused() throws {
        let query = try #require(DNS.query(id: 5, name: "api.test", type: .a))
        // A record whose length runs past the message.
        var cut = Self.answer(to: query, records: [(Self.q, 1, 30, [10, 0, 0, 1])])
        cut.removeLast(2)
        #expect(DNS.parse(cut, id: 5, name: "api.test", type: .a) == .failure(.malformed))
        // An A record of 5 bytes.
        #expect(DNS.parse(Self.answer(to: query, records: [(Self.q, 1, 30, [1, 2, 3, 4, 5])]), id: 5, name: "api.test", type: .a) == .failure(.malformed))
        // A name that points at itself.
        let loop = Self.answer(to: query, records: [([0xC0, 26], 1, 30, [10, 0, 0, 1])])
        #expect(DNS.parse(loop, id: 5, name: "api.test", type: .a) == .failure(.malformed))
        // Every prefix of a good answer, and every byte flipped: no crash.
        let good = Self.answer(to: query, records: [(Self.q, 5, 30, [3, 0x6C, 0x62, 0x31, 0xC0, 16]), ([0xC0, 38], 1, 30, [10, 0, 0, 1])])
        for n in 0..<good.count { _ = DNS.parse(Array(good[0..<n]), id: 5, name: "api.test", type: .a) }
        for i in good.indices {
            for v: UInt8 in [0, 0x3F, 0xC0, 0xFF] {
                var m = good
                m[i] = v
                _ = DNS.parse(m, id: 5, name: "api.test", type: .a)
            }
        }
    }
}
