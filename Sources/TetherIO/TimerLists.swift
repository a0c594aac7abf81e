/// Timers without an allocation per timer: one list per timeout value.
///
/// Every timer in a list has the same duration and is armed at a time no earlier than the one
/// before it, so appending at the tail keeps each list in deadline order. Arming, re-arming and
/// cancelling are O(1) (unlink, append), and the next deadline is the earliest of the lists'
/// heads. A proxy's timeouts come from its configuration (`keepalive_timeout`,
/// `client_header_timeout`, `proxy_read_timeout`, ...), so there are a handful of lists, each
/// possibly long. Timers are numbered by the caller (a loop uses its slab's slot indices), and
/// the arrays grow to the highest number armed; nothing is allocated per arm.
public struct TimerLists {
    @usableFromInline var deadline: ContiguousArray<UInt64> = []
    @usableFromInline var prev: ContiguousArray<Int32> = []
    @usableFromInline var next: ContiguousArray<Int32> = []
    /// The list a timer is in, or -1 when it is not armed.
    @usableFromInline var listOf: ContiguousArray<Int16> = []

    @usableFromInline struct List {
        var duration: UInt64
        var head: Int32 = -1
        var tail: Int32 = -1
    }
    @usableFromInline var lists: [List] = []
    public private(set) var armed = 0

    /// Lists kept: a list whose timers have all gone is given to the next new duration, so that
    /// durations that come and go (a reload's, a learned idle window's) do not pile up. Beyond
    /// this many in use at once, arming still works, at the cost of a longer scan: a sign that a
    /// caller arms computed durations, which belong in fewer lists.
    public var listCount: Int { lists.count }

    public init() {}

    public func isArmed(_ id: Int) -> Bool { id < listOf.count && listOf[id] >= 0 }

    /// The deadline of an armed timer.
    public func deadline(of id: Int) -> UInt64? { isArmed(id) ? deadline[id] : nil }

    /// Arms timer `id` to fire `duration` after `now` (nanoseconds of one monotonic clock, which
    /// must not go backwards between calls), replacing what it was armed for.
    public mutating func arm(_ id: Int, after duration: UInt64, now: UInt64) {
        grow(to: id)
        cancel(id)
        let l = list(for: duration)
        deadline[id] = now &+ duration
        listOf[id] = Int16(l)
        prev[id] = lists[l].tail
        next[id] = -1
        if lists[l].tail >= 0 { next[Int(lists[l].tail)] = Int32(id) } else { lists[l].head = Int32(id) }
        lists[l].tail = Int32(id)
        armed += 1
    }

    public mutating func cancel(_ id: Int) {
        guard isArmed(id) else { return }
        let l = Int(listOf[id])
        let p = prev[id], n = next[id]
        if p >= 0 { next[Int(p)] = n } else { lists[l].head = n }
        if n >= 0 { prev[Int(n)] = p } else { lists[l].tail = p }
        listOf[id] = -1
        armed -= 1
    }

    /// The earliest deadline armed, if any.
    public var nextDeadline: UInt64? {
        var best: UInt64?
        for l in lists where l.head >= 0 {
            let d = deadline[Int(l.head)]
            if best == nil || d < best! { best = d }
        }
        return best
    }

    /// Disarms and returns one timer whose deadline is at or before `now`, the earliest first
    /// among the lists' heads; nil when none is due. Call it until nil: a fired timer's handler
    /// may arm or cancel others in between.
    public mutating func popExpired(now: UInt64) -> Int? {
        var bestList = -1
        var best = UInt64.max
        for (i, l) in lists.enumerated() where l.head >= 0 {
            let d = deadline[Int(l.head)]
            if d <= now && d < best { best = d; bestList = i }
        }
        guard bestList >= 0 else { return nil }
        let id = Int(lists[bestList].head)
        cancel(id)
        return id
    }

    @usableFromInline mutating func list(for duration: UInt64) -> Int {
        if let i = lists.firstIndex(where: { $0.duration == duration }) { return i }
        if let i = lists.firstIndex(where: { $0.head < 0 }) {
            lists[i].duration = duration
            return i
        }
        lists.append(List(duration: duration))
        return lists.count - 1
    }

    @usableFromInline mutating func grow(to id: Int) {
        guard id >= listOf.count else { return }
        let n = max(id + 1, listOf.count * 2, 64)
        let more = n - listOf.count
        deadline.append(contentsOf: repeatElement(0, count: more))
        prev.append(contentsOf: repeatElement(-1, count: more))
        next.append(contentsOf: repeatElement(-1, count: more))
        listOf.append(contentsOf: repeatElement(-1, count: more))
    }
}
