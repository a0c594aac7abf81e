import Testing
@testable import TetherConfig

@Suite struct UnitsTests {
    @Test(arguments: [
        ("0", 0), ("75", 75_000), ("75s", 75_000), ("500ms", 500), ("1m", 60_000), ("1h30m", 5_400_000),
        ("2d", 172_800_000), ("1w", 604_800_000), ("1h1s", 3_601_000), ("1m500ms", 60_500), ("10ms", 10),
    ] as [(String, Int64)])
    func timeValues(text: String, ms: Int64) {
        #expect(Units.time(text) == .success(ms))
    }

    @Test(arguments: ["", "s", "-1", "1x", "30m1h", "1h1h", "1.5s", "1h30", "ms", "1 s", "m5"])
    func timeInvalid(text: String) {
        #expect(Units.time(text) == .failure(.invalid))
    }

    @Test(arguments: ["99999999999999999999", "9999999999w", "3000000000"])
    func timeOverflow(text: String) {
        #expect(Units.time(text) == .failure(.overflow))
    }

    @Test(arguments: [("0", 0), ("512", 512), ("8k", 8192), ("8K", 8192), ("1m", 1 << 20), ("2G", 2 << 30)] as [(String, Int64)])
    func sizeValues(text: String, bytes: Int64) {
        #expect(Units.size(text) == .success(bytes))
    }

    @Test func sizeErrors() {
        #expect(Units.size("") == .failure(.invalid))
        #expect(Units.size("k") == .failure(.invalid))
        #expect(Units.size("-1k") == .failure(.invalid))
        #expect(Units.size("1t") == .failure(.invalid))
        #expect(Units.size("99999999999999999999") == .failure(.overflow))
        #expect(Units.size("9999999999999g") == .failure(.overflow))
    }

    @Test func formatting() {
        #expect(Units.formatTime(5_400_000) == "1h30m")
        #expect(Units.formatTime(500) == "500ms")
        #expect(Units.formatTime(75_000) == "1m15s")
        #expect(Units.formatSize(8192) == "8k")
        #expect(Units.formatSize(1 << 20) == "1m")
        #expect(Units.formatSize(100) == "100")
    }
}
