/// Where a record lives in a `Slab`, and which of the records that lived there it names.
///
/// A slot is reused once its record is removed; its generation goes up each time, so a handle kept
/// from before (an event for a closed descriptor still in the batch, a timer, a job from another
/// thread) no longer finds anything, and can never reach the record that took the slot since.
public struct Handle: Hashable, Sendable, CustomStringConvertible {
    public let index: UInt32
    public let generation: UInt32

    @inlinable init(index: UInt32, generation: UInt32) {
        self.index = index
        self.generation = generation
    }

    /// The 64 bits the poller hands back with an event.
    @inlinable public var token: UInt64 { UInt64(generation) << 32 | UInt64(index) }

    @inlinable public init(token: UInt64) {
        index = UInt32(truncatingIfNeeded: token)
        generation = UInt32(truncatingIfNeeded: token >> 32)
    }

    public var description: String { "#\(index).\(generation)" }

    public static func == (a: Handle, b: Handle) -> Bool { a.token == b.token }

    public func hash(into hasher: inout Hasher) { hasher.combine(token) }

    /// Pools and exchanges key dictionaries by handle on every request; SipHash (`Hasher`) cost
    /// four of them about 770 instructions per proxied request. Handles are the loop's own slot
    /// numbers, never chosen by a peer, so a multiplicative mix with the table's seed is enough
    /// (hash flooding needs keys an attacker picks). `_rawHashValue` is the entry point the
    /// standard library's hashed collections call.
    public func _rawHashValue(seed: Int) -> Int {
        let x = (token ^ UInt64(UInt(bitPattern: seed))) &* 0x9E37_79B9_7F4A_7C15
        return Int(Int64(bitPattern: x ^ (x >> 29)))
    }
}

/// Records in slots of one growing array: no allocation per record once the array has grown to
/// the most records held at once; a freed slot is the next one used (the last freed first, so
/// the records in use stay packed at the front).
public struct Slab<Record> {
    @usableFromInline struct Slot {
        @usableFromInline var generation: UInt32
        @usableFromInline var record: Record?
        /// While free: the next free slot, or -1.
        @usableFromInline var nextFree: Int32
    }

    @usableFromInline var slots: ContiguousArray<Slot> = []
    @usableFromInline var firstFree: Int32 = -1
    public private(set) var count = 0

    public init() {}

    /// The slots allocated: the most records held at once so far.
    public var capacity: Int { slots.count }

    public mutating func insert(_ record: Record) -> Handle {
        count += 1
        if firstFree >= 0 {
            let i = Int(firstFree)
            firstFree = slots[i].nextFree
            slots[i].record = record
            slots[i].nextFree = -1
            return Handle(index: UInt32(i), generation: slots[i].generation)
        }
        slots.append(Slot(generation: 0, record: record, nextFree: -1))
        return Handle(index: UInt32(slots.count - 1), generation: 0)
    }

    /// The record `handle` names, if it is still there.
    @inlinable public subscript(handle: Handle) -> Record? {
        let i = Int(handle.index)
        guard i < slots.count, slots[i].generation == handle.generation else { return nil }
        return slots[i].record
    }

    /// Runs `body` on the record in place, if `handle` still names one.
    @inlinable public mutating func update<R>(_ handle: Handle, _ body: (inout Record) -> R) -> R? {
        let i = Int(handle.index)
        guard i < slots.count, slots[i].generation == handle.generation, slots[i].record != nil else { return nil }
        return body(&slots[i].record!)
    }

    public func contains(_ handle: Handle) -> Bool { self[handle] != nil }

    /// Removes and returns the record; the slot's generation moves on, so `handle` is stale from now.
    @discardableResult
    public mutating func remove(_ handle: Handle) -> Record? {
        let i = Int(handle.index)
        guard i < slots.count, slots[i].generation == handle.generation, let record = slots[i].record else { return nil }
        slots[i].record = nil
        slots[i].generation &+= 1
        slots[i].nextFree = firstFree
        firstFree = Int32(i)
        count -= 1
        return record
    }

    /// The handles of every record held, in slot order.
    public var handles: [Handle] {
        slots.indices.compactMap { i in slots[i].record == nil ? nil : Handle(index: UInt32(i), generation: slots[i].generation) }
    }
}
