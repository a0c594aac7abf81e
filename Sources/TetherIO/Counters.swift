/// A fixed number of counters owned by one loop, in memory of their own: counting is an add at
/// an index, with no array to check for uniqueness and nothing to retain, which an `[Int]` in a
/// class costs on every count. It cannot be copied (its memory is freed with it); readers on the
/// loop's thread sum it into whatever they report.
public struct Counters: ~Copyable {
    @usableFromInline let base: UnsafeMutablePointer<Int>
    public let count: Int

    public init(count: Int) {
        self.count = count
        base = .allocate(capacity: max(count, 1))
        base.initialize(repeating: 0, count: max(count, 1))
    }

    deinit { base.deallocate() }

    /// Adds one to counter `i`; an index out of range is a bug of the caller.
    @inlinable @inline(__always) public func increment(_ i: Int) {
        precondition(i >= 0 && i < count, "counter out of range")
        base[i] += 1
    }

    /// Adds `n` to counter `i` (carrying counts over into a resized set).
    public func add(_ n: Int, to i: Int) {
        precondition(i >= 0 && i < count, "counter out of range")
        base[i] += n
    }

    @inlinable public subscript(_ i: Int) -> Int {
        precondition(i >= 0 && i < count, "counter \(i) of \(count)")
        return base[i]
    }
}
