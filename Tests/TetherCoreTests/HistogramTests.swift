import Testing
@testable import TetherCore

@Suite struct HistogramTests {
    /// The comparisons that place a value agree with `histogramBuckets` at every edge: a value at a
    /// bucket's upper bound is in it (Prometheus's `le`), a nanosecond more is in the next.
    @Test func bucketsAreTheDeclaredOnes() {
        #expect(histogramBuckets.count == 14)
        #expect(Histogram.bucket(0) == 0)
        for (i, b) in histogramBuckets.enumerated() {
            let ns = Int64((b * 1e9).rounded())
            #expect(Histogram.bucket(ns) == i, "\(b) s")
            #expect(Histogram.bucket(ns + 1) == i + 1, "just above \(b) s")
        }
        #expect(Histogram.bucket(.max) == histogramBuckets.count)
    }

    @Test func observingCountsOnceAndSumsSeconds() {
        var h = Histogram()
        h.observe(nanoseconds: 700_000)
        h.observe(nanoseconds: 20_000_000_000)
        #expect(h.count == 2 && h.buckets[1] == 1 && h.buckets.reduce(0, +) == 1, "above the last bound counts only in +Inf")
        #expect(abs(h.sum - 20.0007) < 1e-9)
    }
}
