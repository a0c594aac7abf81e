/// Timers without an allocation per timer: one list per timeout value.
///
/// Every timer in a list has the same duration and is armed at a time no earlier than the one
/// before it, so appending at the tail keeps each list in deadline order. Arming, re-arming and
/// cancelling are O(1) (unlink, append), and the next deadline is the earliest of the lists'
/// heads. A proxy's timeouts come from its configuration (`keepalive_timeout`,
/// `client_header_timeout`, `proxy_read_timeout`, ...), so there are a handful of lists, each
/// possibly long. Timers are numbered by the caller (a loop uses its slab's slot indices), and
/// the storage grows to the highest number armed; nothing is allocated per arm.
///
/// The timers' fields are one record each (deadline, links, list), and the lists' too, in memory
/// of their own, read and written through pointers: arming is a handful of stores, with no array
/// to check for uniqueness on each of them (a proxied request arms three timers and cancels two).
/// It cannot be copied (its memory is freed with it).
public struct TimerLists: ~Copyable {
    @usableFromInline struct Entry {
        var deadline: UInt64 = 0
        var prev: Int32 = -1
        var next: Int32 = -1
        /// The list the timer is in, or -1 when it is not armed.
        var list: Int32 = -1
    }
    @usableFromInline var entries: UnsafeMutablePointer<Entry>
    /// How many entries there are room for: timers 0..<capacity.
    @usableFromInline private(set) var capacity = 0

    @usableFromInline struct List {
        var duration: UInt64
        var head: Int32 = -1
        var tail: Int32 = -1
    }
    @usableFromInline var lists: UnsafeMutablePointer<List>
    /// Lists kept (`lists[0..<listCount]`): a list whose timers have all gone is given to the
    /// next new duration, so that durations that come and go (a reload's, a learned idle
    /// window's) do not pile up. Beyond a few in use at once, arming still works, at the cost of a
    /// longer scan: a sign that a caller arms computed durations, which belong in fewer lists.
    public private(set) var listCount = 0
    @usableFromInline private(set) var listCapacity = 4
    public private(set) var armed = 0

    public init() {
        entries = .allocate(capacity: 1)
        lists = .allocate(capacity: listCapacity)
    }

    deinit {
        entries.deallocate()
        lists.deallocate()
    }

    public func isArmed(_ id: Int) -> Bool { id >= 0 && id < capacity && entries[id].list >= 0 }

    /// The deadline of an armed timer.
    public func deadline(of id: Int) -> UInt64? { isArmed(id) ? entries[id].deadline : nil }

    /// Arms timer `id` to fire `duration` after `now` (nanoseconds of one monotonic clock, which
    /// must not go backwards between calls), replacing what it was armed for.
    public mutating func arm(_ id: Int, after duration: UInt64, now: UInt64) {
        precondition(id >= 0 && id < Int(Int32.max), "timer \(id)")
        if id >= capacity { grow(to: id) }
        cancel(id)
        let l = list(for: duration)
        let tail = lists[l].tail
        entries[id] = Entry(deadline: now &+ duration, prev: tail, next: -1, list: Int32(l))
        if tail >= 0 { entries[Int(tail)].next = Int32(id) } else { lists[l].head = Int32(id) }
        lists[l].tail = Int32(id)
        armed += 1
    }

    public mutating func cancel(_ id: Int) {
        guard isArmed(id) else { return }
        let e = entries[id]
        let l = Int(e.list)
        if e.prev >= 0 { entries[Int(e.prev)].next = e.next } else { lists[l].head = e.next }
        if e.next >= 0 { entries[Int(e.next)].prev = e.prev } else { lists[l].tail = e.prev }
        entries[id].list = -1
        armed -= 1
    }

    /// The earliest deadline armed, if any.
    public var nextDeadline: UInt64? {
        var best: UInt64?
        for i in 0..<listCount where lists[i].head >= 0 {
            let d = entries[Int(lists[i].head)].deadline
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
        for i in 0..<listCount where lists[i].head >= 0 {
            let d = entries[Int(lists[i].head)].deadline
            if d <= now && d < best { best = d; bestList = i }
        }
        guard bestList >= 0 else { return nil }
        let id = Int(lists[bestList].head)
        cancel(id)
        return id
    }

    /// The list of timers of `duration`: found by a scan of the few lists there are; a new
    /// duration takes a list left empty, or a new one.
    @usableFromInline mutating func list(for duration: UInt64) -> Int {
        // The match first, in a loop of one compare per list (a proxied request arms three timers).
        var i = 0
        while i < listCount {
            if lists[i].duration == duration { return i }
            i += 1
        }
        for free in 0..<listCount where lists[free].head < 0 {
            lists[free].duration = duration
            return free
        }
        if listCount == listCapacity {
            let more = UnsafeMutablePointer<List>.allocate(capacity: listCapacity * 2)
            more.moveInitialize(from: lists, count: listCount)
            lists.deallocate()
            lists = more
            listCapacity *= 2
        }
        (lists + listCount).initialize(to: List(duration: duration))
        listCount += 1
        return listCount - 1
    }

    @usableFromInline mutating func grow(to id: Int) {
        let n = max(id + 1, capacity * 2, 64)
        let more = UnsafeMutablePointer<Entry>.allocate(capacity: n)
        more.moveInitialize(from: entries, count: capacity)
        (more + capacity).initialize(repeating: Entry(), count: n - capacity)
        entries.deallocate()
        entries = more
        capacity = n
    }
}
