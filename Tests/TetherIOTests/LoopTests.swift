import CTether
import Synchronization
import Testing
@testable import TetherIO
#if canImport(Glibc)
import Glibc
#endif

/// A connected pair of non-blocking Unix stream sockets.
func socketPair() -> (Int32, Int32) {
    var fds: [Int32] = [0, 0]
    let rc = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
    precondition(rc == 0)
    return (fds[0], fds[1])
}

func send(_ fd: Int32, _ text: String) {
    let n = text.utf8CString.withUnsafeBufferPointer { Glibc.write(fd, $0.baseAddress, $0.count - 1) }
    precondition(n == text.utf8.count)
}

/// Reads what there is until EAGAIN; nil at EOF.
func drain(_ fd: Int32) -> [UInt8]? {
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = Glibc.read(fd, &buf, buf.count)
        if n > 0 { out += buf[0..<n]; continue }
        if n == 0 { return out.isEmpty ? nil : out }
        return out
    }
}

/// Records what the loop tells it; `onEvent` may act on it.
final class Recorder: IOHandler {
    var events: [IOEvents] = []
    var timers = 0
    var onEvent: ((IOEvents, Handle, IOLoop) -> Void)?
    var onTimer: ((Handle, IOLoop) -> Void)?
    func ioEvent(_ e: IOEvents, handle: Handle, loop: IOLoop) {
        events.append(e)
        onEvent?(e, handle, loop)
    }
    func timerFired(handle: Handle, loop: IOLoop) {
        timers += 1
        onTimer?(handle, loop)
    }
    var readableEvents: Int { events.filter { $0.contains(.readable) }.count }
}

@Suite struct LoopTests {
    /// Edge-triggered: one event per arrival of bytes; bytes left unread raise no new event until
    /// more arrive. So a handler must read until EAGAIN, and the loop never spins on data it left.
    @Test func oneEventPerArrivalUnderEdgeTriggering() throws {
        let loop = try IOLoop()
        let (mine, peer) = socketPair()
        defer { Glibc.close(peer) }
        let r = Recorder()
        let h = try loop.register(mine, handler: r)
        try loop.runOnce(timeoutMs: 1_000)
        #expect(r.events == [.writable], "a new socket is writable once")
        send(peer, "hello")
        try loop.runOnce(timeoutMs: 1_000)
        #expect(r.readableEvents == 1)
        var two = [UInt8](repeating: 0, count: 2)
        #expect(Glibc.read(mine, &two, 2) == 2)  // leave "llo" unread
        #expect(try loop.runOnce(timeoutMs: 0) == 0, "no new edge for bytes left unread")
        send(peer, "!")
        try loop.runOnce(timeoutMs: 1_000)
        #expect(r.readableEvents == 2)
        #expect(drain(mine) == Array("llo!".utf8))
        loop.close(h)
        #expect(loop.registered == 0 && loop.fd(h) == nil)
    }

    /// A request that arrives a byte at a time is read whole: each byte raises one event.
    @Test func aRequestArrivingAByteAtATimeIsReadWhole() throws {
        let loop = try IOLoop()
        let (mine, peer) = socketPair()
        defer { Glibc.close(peer) }
        let request = "GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
        var got: [UInt8] = []
        let r = Recorder()
        r.onEvent = { e, _, _ in if e.contains(.readable) { got += drain(mine) ?? [] } }
        _ = try loop.register(mine, handler: r)
        for byte in request.utf8 {
            send(peer, String(UnicodeScalar(byte)))
            try loop.runOnce(timeoutMs: 1_000)
        }
        #expect(String(decoding: got, as: UTF8.self) == request)
        #expect(r.readableEvents == request.utf8.count)
    }

    /// The peer's FIN is reported (EPOLLRDHUP) with what it sent before it; our own half-close
    /// leaves the other direction open.
    @Test func halfCloseInEachDirection() throws {
        let loop = try IOLoop()
        let (mine, peer) = socketPair()
        defer { Glibc.close(peer) }
        let r = Recorder()
        _ = try loop.register(mine, handler: r)
        try loop.runOnce(timeoutMs: 1_000)
        send(peer, "last words")
        shutdown(peer, Int32(SHUT_WR))
        try loop.runOnce(timeoutMs: 1_000)
        #expect(r.events.last?.contains(.readHangup) == true, "\(r.events)")
        #expect(r.events.last?.contains(.hangup) == false, "only one direction is closed")
        #expect(drain(mine) == Array("last words".utf8))
        var b: UInt8 = 0
        #expect(Glibc.read(mine, &b, 1) == 0, "then EOF")
        // We can still write to the peer, and after our own shutdown it sees EOF.
        send(mine, "reply")
        shutdown(mine, Int32(SHUT_WR))
        var buf = [UInt8](repeating: 0, count: 16)
        #expect(Glibc.read(peer, &buf, 16) == 5)
        #expect(Glibc.read(peer, &buf, 16) == 0)
        try loop.runOnce(timeoutMs: 1_000)
        #expect(r.events.last?.contains(.hangup) == true, "both directions closed: \(r.events)")
    }

    /// Two connections ready in one batch: handling the first closes the second and registers a
    /// new socket that takes its slot (and, by the kernel's lowest-number rule, usually its
    /// descriptor number). The second's event, still in the batch, must reach neither.
    @Test func anEventForAClosedDescriptorNeverReachesTheOneThatReusedIt() throws {
        let loop = try IOLoop()
        let (a, pa) = socketPair()
        let (b, pb) = socketPair()
        defer { Glibc.close(pa); Glibc.close(pb) }
        let ra = Recorder(), rb = Recorder(), rc = Recorder()
        let ha = try loop.register(a, handler: ra)
        let hb = try loop.register(b, handler: rb)
        try loop.runOnce(timeoutMs: 1_000)  // the first writable events
        ra.events = []; rb.events = []
        var newcomer: (fd: Int32, handle: Handle, peer: Int32)?
        // (Other tests open descriptors meanwhile, so the number is not asserted; the slot is.)
        func takeOver(closing victim: Handle) {
            guard newcomer == nil else { return }
            loop.close(victim)
            let (c, pc) = socketPair()
            let hc = try! loop.register(c, handler: rc)
            newcomer = (c, hc, pc)
            #expect(hc.index == victim.index && hc.generation != victim.generation)
        }
        ra.onEvent = { _, _, _ in takeOver(closing: hb) }
        rb.onEvent = { _, _, _ in takeOver(closing: ha) }
        send(pa, "x"); send(pb, "y")
        try loop.runOnce(timeoutMs: 1_000)
        #expect(ra.events.count + rb.events.count == 1, "only the first of the two was handled")
        #expect(rc.events.isEmpty, "the closed one's event reached the newcomer: \(rc.events)")
        if let n = newcomer { Glibc.close(n.peer) }
    }

    /// A handler closed during a pass (by itself or by another handler, as an upstream link
    /// ends its client's connection) stays alive until the pass ends, so the call chain that
    /// closed it never runs on in freed memory; the loop then lets it go.
    @Test func aHandlerClosedDuringAPassLivesUntilThePassEnds() throws {
        let loop = try IOLoop()
        let (a, pa) = socketPair()
        let (b, pb) = socketPair()
        defer { Glibc.close(pa); Glibc.close(pb) }
        var victim: Recorder? = Recorder()
        weak let watched = victim
        let closer = Recorder()
        let hb = try loop.register(b, handler: victim!)
        victim = nil
        _ = try loop.register(a, handler: closer)
        try loop.runOnce(timeoutMs: 1_000)  // the first writable events
        var aliveAfterClose: Bool?
        closer.onEvent = { _, _, loop in
            guard aliveAfterClose == nil else { return }
            loop.close(hb)
            aliveAfterClose = watched != nil
            watched?.timers += 0  // touching it after its close is safe
        }
        send(pa, "x")
        try loop.runOnce(timeoutMs: 1_000)
        #expect(aliveAfterClose == true, "the closed handler was freed inside the pass")
        #expect(watched == nil, "the loop still holds the closed handler after the pass")
        #expect(loop.registered == 1)
    }

    @Test func timersFireNotBeforeTheirTimeAndCloseCancelsThem() throws {
        let loop = try IOLoop()
        let (a, pa) = socketPair()
        let (b, pb) = socketPair()
        defer { Glibc.close(pa); Glibc.close(pb) }
        let ra = Recorder(), rb = Recorder()
        let ha = try loop.register(a, handler: ra)
        let hb = try loop.register(b, handler: rb)
        try loop.runOnce(timeoutMs: 1_000)
        let armedAt = IOLoop.monotonicNanoseconds()
        loop.arm(ha, afterNanoseconds: 30_000_000)
        loop.arm(hb, afterNanoseconds: 30_000_000)
        loop.close(hb)
        var firedAt: UInt64 = 0
        ra.onTimer = { _, _ in firedAt = IOLoop.monotonicNanoseconds() }
        for _ in 0..<100 where ra.timers == 0 { try loop.runOnce(timeoutMs: 1_000) }
        #expect(ra.timers == 1 && rb.timers == 0)
        #expect(firedAt - armedAt >= 30_000_000, "fired \((firedAt - armedAt) / 1_000) µs after arming")
        #expect(!loop.isTimerArmed(ha))
        loop.arm(ha, afterNanoseconds: 1_000_000)
        loop.cancelTimer(ha)
        #expect(try loop.runOnce(timeoutMs: 20) == 0)
        #expect(ra.timers == 1)
    }

    /// A timer armed while handling an event counts from when the event came, not from when the
    /// loop began to wait for it (the loop's clock is read after each wait).
    @Test func aTimerArmedAfterALongWaitIsNotEarly() throws {
        let loop = try IOLoop()
        let (mine, peer) = socketPair()
        defer { Glibc.close(peer) }
        let r = Recorder()
        var eventAt: UInt64 = 0, firedAt: UInt64 = 0
        r.onEvent = { e, h, loop in
            guard e.contains(.readable), eventAt == 0 else { return }
            eventAt = IOLoop.monotonicNanoseconds()
            loop.arm(h, afterNanoseconds: 100_000_000)
        }
        r.onTimer = { _, _ in firedAt = IOLoop.monotonicNanoseconds() }
        _ = try loop.register(mine, handler: r)
        try loop.runOnce(timeoutMs: 1_000)  // writable
        // The scenario: the loop waits 80 ms for the byte (it is sent from another thread).
        let writer = IOLoopThread(loop: try IOLoop(), name: "writer")
        writer.loop.execute { _ in usleep(80_000); send(peer, "x") }
        for _ in 0..<100 where firedAt == 0 { try loop.runOnce(timeoutMs: 2_000) }
        writer.stopAndJoin()
        #expect(eventAt > 0 && firedAt > 0)
        #expect(firedAt - eventAt >= 100_000_000, "fired \((firedAt - eventAt) / 1_000_000) ms after the event")
    }

    /// A timer armed late in a long pass counts from about when it was armed, not from the pass's
    /// start: 200 events of 1 ms or more each in one pass, each arming 300 ms. Were the clock read
    /// only once per pass, the last would fire over 200 ms early; it is read every 32 events, so
    /// none is early by more than 32 events' work (about 35 ms here; microseconds in practice).
    @Test func aTimerArmedLateInALongPassIsNotEarly() throws {
        let loop = try IOLoop()
        var pairs: [(Int32, Int32)] = []
        defer { for (a, b) in pairs { Glibc.close(a); Glibc.close(b) } }
        var armedAt: [Handle: UInt64] = [:]
        var early: [Int64] = []
        let r = Recorder()
        r.onEvent = { e, h, loop in
            guard e.contains(.readable), armedAt[h] == nil else { return }
            usleep(1_000)
            armedAt[h] = IOLoop.monotonicNanoseconds()
            loop.arm(h, afterNanoseconds: 300_000_000)
        }
        r.onTimer = { h, _ in early.append(Int64(armedAt[h]! + 300_000_000) - Int64(IOLoop.monotonicNanoseconds())) }
        for _ in 0..<200 {
            let p = socketPair()
            pairs.append(p)
            _ = try loop.register(p.0, handler: r)
        }
        try loop.runOnce(timeoutMs: 1_000)  // writable, all of them
        for p in pairs { send(p.1, "x") }
        for _ in 0..<200 where early.count < 200 { try loop.runOnce(timeoutMs: 2_000) }
        #expect(armedAt.count == 200 && early.count == 200)
        let worst = early.max() ?? 0
        #expect(worst < 100_000_000, "a timer fired \(worst / 1_000_000) ms early")
    }

    /// Work handed over from another thread wakes a loop that waits without a time limit.
    @Test func workFromAnotherThreadWakesTheLoop() throws {
        let loop = try IOLoop()
        let thread = IOLoopThread(loop: loop, name: "tether-test")
        let done = Mutex(0)
        for _ in 0..<1_000 { loop.execute { _ in done.withLock { $0 += 1 } } }
        var waited = 0
        while done.withLock({ $0 }) < 1_000 && waited < 5_000 { usleep(1_000); waited += 1 }
        thread.stopAndJoin()
        #expect(done.withLock { $0 } == 1_000)
    }
}

@Suite struct ListenerTests {
    func connect(_ port: UInt16) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        precondition(rc == 0, "connect: \(errno)")
        return fd
    }

    /// One readiness edge accepts every queued connection (until EAGAIN).
    @Test func acceptsEveryQueuedConnectionOnOneEdge() throws {
        let loop = try IOLoop()
        let (fd, port) = try Sockets.listenTCP()
        var accepted: [Int32] = []
        let listener = Listener(fd: fd, accepted: { c, _ in accepted.append(c) }, failed: { _, _ in })
        try listener.start(on: loop)
        let clients = (0..<50).map { _ in connect(port) }
        defer { for c in clients + accepted { Glibc.close(c) } }
        for _ in 0..<20 where accepted.count < 50 { try loop.runOnce(timeoutMs: 1_000) }
        #expect(accepted.count == 50)
        #expect(accepted.allSatisfy { fcntl($0, F_GETFL) & O_NONBLOCK != 0 }, "accepted sockets are non-blocking")
        #expect(listener.acceptCalls <= 50 + 20, "\(listener.acceptCalls) accept calls")
    }

    /// Out of descriptors: the listener reports it, stops accepting for its back-off (no spinning:
    /// no accept call meanwhile), and accepts the waiting connections once descriptors are back.
    @Test func outOfDescriptorsBacksOffAndRecovers() throws {
        let loop = try IOLoop()
        let (fd, port) = try Sockets.listenTCP()
        var failuresLeft = 3
        var reported: [IOError] = []
        var accepted: [Int32] = []
        let listener = Listener(fd: fd, backoffNanoseconds: 50_000_000, accept: { l in
            if failuresLeft > 0 { failuresLeft -= 1; return (-1, EMFILE) }
            let c = tether_accept(l)
            return (c, c < 0 ? tether_errno() : 0)
        }, accepted: { c, _ in accepted.append(c) }, failed: { e, _ in reported.append(e) })
        try listener.start(on: loop)
        let clients = (0..<5).map { _ in connect(port) }
        defer { for c in clients + accepted { Glibc.close(c) } }
        let started = IOLoop.monotonicNanoseconds()
        try loop.runOnce(timeoutMs: 1_000)
        #expect(reported.count == 1 && listener.backingOff && accepted.isEmpty)
        #expect(reported.first?.description.hasPrefix("accept4() failed (24: Too many open files)") == true)
        let calls = listener.acceptCalls
        // While backing off, events and passes do not make it call accept4() again.
        let extra = connect(port)
        defer { Glibc.close(extra) }
        try loop.runOnce(timeoutMs: 10)
        #expect(listener.acceptCalls == calls, "accept4() called while backing off")
        for _ in 0..<100 where accepted.count < 6 { try loop.runOnce(timeoutMs: 1_000) }
        #expect(accepted.count == 6, "every waiting connection accepted once descriptors came back")
        #expect(reported.count == 3)
        #expect(IOLoop.monotonicNanoseconds() - started >= 150_000_000, "three back-offs of 50 ms")
        #expect(listener.acceptCalls == 3 + 6 + 1, "3 failures, 6 accepted, 1 EAGAIN: \(listener.acceptCalls)")
    }
}

@Suite struct ExpiryTests {
    /// 2,000 idle connections, each armed to close 100 ms after it was registered (as a keep-alive
    /// timeout would): every one closes, none before its time, and the loop holds nothing after.
    @Test func manyIdleConnectionsExpire() throws {
        let loop = try IOLoop()
        final class Idle: IOHandler {
            let armedAt: UInt64
            var peer: Int32 = -1
            var early = false
            var closed = false
            init(armedAt: UInt64) { self.armedAt = armedAt }
            func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {}
            func timerFired(handle: Handle, loop: IOLoop) {
                early = loop.now < armedAt + 100_000_000
                closed = true
                loop.close(handle)
                Glibc.close(peer)
            }
        }
        var idle: [Idle] = []
        for _ in 0..<2_000 {
            let (mine, peer) = socketPair()
            let i = Idle(armedAt: loop.now)
            i.peer = peer
            let h = try loop.register(mine, handler: i)
            loop.arm(h, afterNanoseconds: 100_000_000)
            idle.append(i)
        }
        #expect(loop.registered == 2_000)
        for _ in 0..<1_000 where loop.registered > 0 { try loop.runOnce(timeoutMs: 1_000) }
        #expect(loop.registered == 0)
        let closed = idle.filter(\.closed).count, early = idle.filter(\.early).count
        #expect(closed == 2_000)
        #expect(early == 0, "\(early) timers fired early")
    }
}

/// What HTTP/2 needs of the loop: records without a descriptor (a stream's request), a record
/// handed to another handler (a connection that turned out to speak HTTP/2), and work posted to
/// the end of a pass (writes gathered from many events).
@Suite struct LoopRecordTests {
    final class Posted: PostedWork {
        var runs = 0
        var seenEvents = 0
        let recorder: Recorder
        init(_ r: Recorder) { recorder = r }
        func runPosted() {
            runs += 1
            seenEvents = recorder.events.count
        }
    }

    @Test func postedWorkRunsOnceAfterThePassesEvents() throws {
        let loop = try IOLoop()
        let (a, pa) = socketPair()
        let (b, pb) = socketPair()
        defer { Glibc.close(pa); Glibc.close(pb) }
        let ra = Recorder(), rb = Recorder()
        _ = try loop.register(a, handler: ra)
        _ = try loop.register(b, handler: rb)
        try loop.runOnce(timeoutMs: 1_000)
        let work = Posted(rb)
        // Both events in one pass; the first handler posts the work, which must see the second's event.
        ra.onEvent = { _, _, loop in loop.post(work) }
        let before = rb.events.count
        send(pa, "x")
        send(pb, "y")
        usleep(10_000)
        try loop.runOnce(timeoutMs: 1_000)
        #expect(work.runs == 1 && work.seenEvents == before + 1, "ran once, after both events")
        try loop.runOnce(timeoutMs: 10)
        #expect(work.runs == 1, "posted for one pass only")
    }

    @Test func aRecordWithoutADescriptorHasATimerAndClosesNothing() throws {
        let loop = try IOLoop()
        let (a, pa) = socketPair()
        defer { Glibc.close(pa) }
        let r = Recorder()
        let v = loop.registerVirtual(handler: r)
        #expect(loop.fd(v) == -1)
        loop.arm(v, afterNanoseconds: 5_000_000)
        for _ in 0..<100 where r.timers == 0 { try loop.runOnce(timeoutMs: 100) }
        #expect(r.timers == 1 && r.events.isEmpty)
        loop.close(v)
        #expect(loop.fd(v) == nil)
        // No descriptor was closed with it: a descriptor of the test's is still open.
        #expect(fcntl(a, F_GETFD) >= 0)
        Glibc.close(a)
    }

    @Test func aRecordHandedToAnotherHandler() throws {
        let loop = try IOLoop()
        let (a, pa) = socketPair()
        defer { Glibc.close(pa) }
        let first = Recorder(), second = Recorder()
        let h = try loop.register(a, handler: first)
        try loop.runOnce(timeoutMs: 1_000)
        let seen = first.events.count
        loop.replaceHandler(h, with: second)
        send(pa, "z")
        loop.arm(h, afterNanoseconds: 1_000_000)
        for _ in 0..<100 where second.timers == 0 { try loop.runOnce(timeoutMs: 100) }
        #expect(first.events.count == seen && first.timers == 0)
        #expect(second.readableEvents == 1 && second.timers == 1, "events and the timer go to the new handler")
        loop.close(h)
    }
}
