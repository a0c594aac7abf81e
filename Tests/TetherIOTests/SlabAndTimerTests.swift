import Testing
@testable import TetherIO

@Suite struct SlabTests {
    @Test func aHandleGoesStaleWhenItsRecordIsRemovedAndTheSlotReused() {
        var slab = Slab<String>()
        let a = slab.insert("a")
        let b = slab.insert("b")
        #expect(slab[a] == "a" && slab[b] == "b" && slab.count == 2)
        #expect(slab.remove(a) == "a")
        #expect(slab[a] == nil)
        #expect(slab.remove(a) == nil, "removing twice does nothing")
        let c = slab.insert("c")
        #expect(c.index == a.index, "the freed slot is reused")
        #expect(c.generation == a.generation &+ 1)
        #expect(slab[a] == nil, "the old handle does not reach the new record")
        #expect(slab[c] == "c")
        #expect(slab.update(a) { $0 = "x" } == nil)
        #expect(slab[c] == "c")
        #expect(slab.capacity == 2, "no slot added while one was free")
    }

    @Test func tokensRoundTrip() {
        let h = Handle(index: 123_456, generation: 0xfeed_beef)
        #expect(Handle(token: h.token) == h)
    }

    @Test func slotsAreReusedLastFreedFirst() {
        var slab = Slab<Int>()
        let hs = (0..<100).map { slab.insert($0) }
        for h in hs.reversed() { slab.remove(h) }
        let again = (0..<100).map { slab.insert($0 + 100) }
        #expect(again.map(\.index) == hs.map(\.index), "refilled from the front")
        #expect(slab.capacity == 100 && slab.count == 100)
        #expect(hs.allSatisfy { slab[$0] == nil })
    }
}

@Suite struct TimerListsTests {
    @Test func timersFireInDeadlineOrderAcrossLists() {
        var t = TimerLists()
        t.arm(1, after: 300, now: 0)   // 300
        t.arm(2, after: 100, now: 50)  // 150
        t.arm(3, after: 300, now: 10)  // 310
        t.arm(4, after: 100, now: 60)  // 160
        #expect(t.nextDeadline == 150)
        #expect(t.popExpired(now: 149) == nil)
        var fired: [Int] = []
        while let id = t.popExpired(now: 1_000) { fired.append(id) }
        #expect(fired == [2, 4, 1, 3])
        #expect(t.armed == 0 && t.nextDeadline == nil)
    }

    @Test func reArmingMovesATimerAndCancellingRemovesIt() {
        var t = TimerLists()
        for id in 0..<5 { t.arm(id, after: 100, now: UInt64(id)) }
        t.arm(0, after: 100, now: 50)  // now last: 150
        t.cancel(2)
        t.cancel(2)
        #expect(t.armed == 4)
        #expect(!t.isArmed(2) && t.deadline(of: 0) == 150)
        var fired: [Int] = []
        while let id = t.popExpired(now: 1_000) { fired.append(id) }
        #expect(fired == [1, 3, 4, 0])
    }

    @Test func onlyDueTimersFire() {
        var t = TimerLists()
        t.arm(7, after: 1_000, now: 0)
        t.arm(8, after: 10, now: 0)
        #expect(t.popExpired(now: 10) == 8)
        #expect(t.popExpired(now: 999) == nil)
        #expect(t.isArmed(7) && t.nextDeadline == 1_000)
    }

    /// Arming and re-arming a thousand timers many times grows nothing past the first round.
    /// Durations that come and go reuse the lists of those gone, and many at once still work in
    /// deadline order (no limit that would stop the process).
    @Test func manyDistinctDurationsWork() {
        var t = TimerLists()
        for round in 0..<10 {
            for i in 0..<100 { t.arm(i, after: UInt64(round * 1000 + i + 1), now: 0) }
            var fired: [Int] = []
            while let id = t.popExpired(now: .max) { fired.append(id) }
            #expect(fired == Array(0..<100), "round \(round)")
        }
        #expect(t.listCount == 100, "the lists of durations gone were reused")
        for i in 0..<1_000 { t.arm(i, after: UInt64(5_000 + i), now: 0) }
        #expect(t.listCount == 1_000 && t.nextDeadline == 5_000)
        var last: UInt64 = 0
        while let id = t.popExpired(now: .max) {
            #expect(UInt64(5_000 + id) >= last)
            last = UInt64(5_000 + id)
        }
        #expect(t.armed == 0)
    }

    @Test func reArmingAllocatesNothingOnceGrown() {
        var t = TimerLists()
        for id in 0..<1_000 { t.arm(id, after: 5, now: 0) }
        let capacity = t.capacity, storage = t.entries
        for round in 1...10 { for id in 0..<1_000 { t.arm(id, after: 5, now: UInt64(round)) } }
        #expect(t.capacity == capacity && t.entries == storage && t.listCount == 1 && t.armed == 1_000)
    }
}
