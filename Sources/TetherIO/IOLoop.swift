import CTether
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a registered descriptor's owner does with its events. Called on the loop's thread only.
public protocol IOHandler: AnyObject {
    /// The poller reported `events` for the descriptor registered under `handle`.
    func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop)
    /// The timer armed for `handle` came due.
    func timerFired(handle: Handle, loop: IOLoop)
}

/// Work a handler asks to do once at the end of the loop's pass, after every event of it (nginx's
/// posted events): writes gathered from many events go out in one.
public protocol PostedWork: AnyObject {
    func runPosted()
}

/// One event loop: a poller, the records of the descriptors registered with it (a slab: an event
/// or timer for a closed descriptor can never reach the record that took its slot), one timer per
/// record in lists per timeout value, and an eventfd through which other threads hand it work.
///
/// Everything but `execute` and `stop` must be called on the loop's own thread (or, in tests, by
/// the one thread that drives `runOnce`).
public final class IOLoop: @unchecked Sendable {
    @usableFromInline struct Registration {
        @usableFromInline let fd: Int32
        @usableFromInline var handler: IOHandler
    }

    public typealias Job = @Sendable (IOLoop) -> Void

    let poller: any Poller
    @usableFromInline var records = Slab<Registration>()
    var timers = TimerLists()
    let wakeFD: Int32
    let jobs = Mutex<(queue: [Job], signalled: Bool)>(([], false))
    var stopping = false
    /// Handlers closed during the pass under way, kept until it ends: a call chain that closed
    /// one (its own, or another handler's, such as an upstream link ending its client's
    /// connection) never runs on in freed memory. Its capacity is kept: no allocation per close.
    var retired: [IOHandler] = []
    /// Work posted for the end of the pass under way (`post`).
    private var posted: [PostedWork] = []
    /// Passes run so far (`runOnce` calls): an object retired during pass N is referenced by no
    /// running call once pass N + 1 begins.
    public private(set) var passes: UInt64 = 0
    /// The monotonic clock in nanoseconds, read once per pass of the loop.
    public private(set) var now: UInt64

    /// The poller's token for the eventfd: no slab record has it (index UInt32.max).
    static let wakeToken = UInt64(UInt32.max)

    public init(poller: any Poller) throws(IOError) {
        self.poller = poller
        // A write to a socket the peer closed must fail with EPIPE, not kill the process.
        signal(SIGPIPE, SIG_IGN)
        wakeFD = tether_eventfd()
        guard wakeFD >= 0 else { throw IOError("eventfd", errno: tether_errno()) }
        now = IOLoop.monotonicNanoseconds()
        try poller.register(wakeFD, token: Self.wakeToken)
    }

    public convenience init() throws(IOError) {
        try self.init(poller: try EpollPoller())
    }

    deinit {
        closeAll()
        Glibc.close(wakeFD)
    }

    /// Closes every registered descriptor and lets its handler go: for a loop that has stopped
    /// (its handlers and the objects they hold may refer back to the loop, so without this the
    /// loop, its listeners and its connections would keep each other alive).
    public func closeAll() {
        for h in records.handles {
            if let r = records.remove(h) {
                timers.cancel(Int(h.index))
                if r.fd >= 0 { Glibc.close(r.fd) }
            }
        }
        retired.removeAll()
    }

    /// The handlers of the records open now (for a shutdown's pass over every connection;
    /// records closed by the caller meanwhile are still in the array it got).
    public var handlers: [IOHandler] {
        records.handles.compactMap { records[$0]?.handler }
    }

    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Descriptors registered.
    public var registered: Int { records.count }

    /// The loop's own heap bytes per registered descriptor: its slab slot and its timer's entry
    /// (deadline, links, list), both in arrays that grow to the most records held at once.
    public static var bytesPerRecord: Int { MemoryLayout<Slab<Registration>.Slot>.stride + 8 + 4 + 4 + 2 }

    // MARK: Descriptors

    /// Registers a non-blocking descriptor for all its events, once; `handler` gets them.
    public func register(_ fd: Int32, handler: IOHandler) throws(IOError) -> Handle {
        let handle = records.insert(Registration(fd: fd, handler: handler))
        do {
            try poller.register(fd, token: handle.token)
        } catch {
            records.remove(handle)
            throw error
        }
        return handle
    }

    /// A record without a descriptor (an HTTP/2 stream's request, which its connection drives):
    /// it has the timer and the generation-checked handle of any record, and no events of its
    /// own; `close` frees it.
    public func registerVirtual(handler: IOHandler) -> Handle {
        records.insert(Registration(fd: -1, handler: handler))
    }

    /// Hands the record's events and timer to `handler` from now on (a connection that turned
    /// out to speak HTTP/2 after its TLS handshake).
    public func replaceHandler(_ handle: Handle, with handler: IOHandler) {
        _ = records.update(handle) { r in
            retired.append(r.handler)
            r.handler = handler
        }
    }

    /// The descriptor `handle` names, while it is registered.
    /// Inlined into callers: it runs several times per request, and as a call it cost a retain
    /// and a release of the loop each time.
    @inlinable public func fd(_ handle: Handle) -> Int32? { records[handle]?.fd }

    /// Cancels the record's timer, forgets it and closes its descriptor (which also leaves epoll).
    /// Later events and timers for `handle` go nowhere, even those already in this batch.
    public func close(_ handle: Handle) {
        guard let r = records.remove(handle) else { return }
        timers.cancel(Int(handle.index))
        if r.fd >= 0 { Glibc.close(r.fd) }
        retired.append(r.handler)
    }

    /// Runs `work.runPosted()` once the events of this pass are handled (the caller posts it
    /// once: it keeps its own flag).
    public func post(_ work: PostedWork) {
        posted.append(work)
    }

    // MARK: Timers

    /// Arms the record's one timer to fire `nanoseconds` from now, replacing what it was set to.
    public func arm(_ handle: Handle, afterNanoseconds nanoseconds: UInt64) {
        guard records.contains(handle) else { return }
        timers.arm(Int(handle.index), after: nanoseconds, now: now)
    }

    public func cancelTimer(_ handle: Handle) {
        guard records.contains(handle) else { return }
        timers.cancel(Int(handle.index))
    }

    public func isTimerArmed(_ handle: Handle) -> Bool {
        records.contains(handle) && timers.isArmed(Int(handle.index))
    }

    // MARK: Work from other threads

    /// Runs `job` on the loop soon. Callable from any thread; the loop is woken through its
    /// eventfd, once per batch of jobs.
    public func execute(_ job: @escaping Job) {
        let signal = jobs.withLock { j -> Bool in
            j.queue.append(job)
            if j.signalled { return false }
            j.signalled = true
            return true
        }
        if signal {
            var one: UInt64 = 1
            _ = Glibc.write(wakeFD, &one, 8)
        }
    }

    /// Makes `run` return after the pass under way. Callable from any thread.
    public func stop() {
        execute { $0.stopping = true }
    }

    private func runJobs() {
        var counter: UInt64 = 0
        _ = Glibc.read(wakeFD, &counter, 8)
        let batch = jobs.withLock { j -> [Job] in
            j.signalled = false
            defer { j.queue.removeAll(keepingCapacity: true) }
            return j.queue
        }
        for job in batch { job(self) }
    }

    // MARK: Running

    /// One pass: waits for events (at most `timeoutMs`, and never past the next timer), handles
    /// them, then the timers that came due. Returns how many events and timers were handled.
    @discardableResult
    public func runOnce(timeoutMs: Int32 = -1) throws(IOError) -> Int {
        passes &+= 1
        now = Self.monotonicNanoseconds()
        var wait = timeoutMs
        if let d = timers.nextDeadline {
            let ms = d <= now ? 0 : Int32(min((d - now + 999_999) / 1_000_000, UInt64(Int32.max)))
            if wait < 0 || ms < wait { wait = ms }
        }
        var handled = try poller.wait(timeoutMs: wait)
        // The time after the wait: timers armed while handling these events count from it.
        now = Self.monotonicNanoseconds()
        for i in 0..<handled {
            // A long pass (hundreds of events, each with work) must not leave the clock behind:
            // a timer armed late in it would count from the pass's start and fire early. Read
            // again every 32 events, so that it is at most 32 events' work behind.
            if i & 31 == 31 { now = Self.monotonicNanoseconds() }
            let (token, events) = poller.event(i)
            if token == Self.wakeToken { runJobs(); continue }
            let handle = Handle(token: token)
            // A record closed earlier in this batch (its slot perhaps reused) is not found.
            guard let r = records[handle] else { continue }
            r.handler.ioEvent(events, handle: handle, loop: self)
        }
        if !posted.isEmpty { runPosted() }
        now = Self.monotonicNanoseconds()
        while let id = timers.popExpired(now: now) {
            let handle = records.handle(at: id)
            guard let handle, let r = records[handle] else { continue }
            handled += 1
            r.handler.timerFired(handle: handle, loop: self)
        }
        if !posted.isEmpty { runPosted() }
        retired.removeAll(keepingCapacity: true)
        return handled
    }

    private func runPosted() {
        var i = 0
        // Work may post more work: it runs in this pass too.
        while i < posted.count {
            posted[i].runPosted()
            i += 1
        }
        posted.removeAll(keepingCapacity: true)
    }

    /// Runs passes until `stop`.
    public func run() throws(IOError) {
        stopping = false
        while !stopping { try runOnce() }
    }
}

extension Slab {
    /// The handle of the record in slot `index`, if one is there.
    func handle(at index: Int) -> Handle? {
        guard index < slots.count, slots[index].record != nil else { return nil }
        return Handle(index: UInt32(index), generation: slots[index].generation)
    }
}

/// A thread of its own running a loop (`worker_processes` of them).
public final class IOLoopThread: Sendable {
    public let loop: IOLoop
    private let thread: pthread_t

    /// Starts a thread that runs `loop` until it is stopped; `failed` gets a poller error.
    public init(loop: IOLoop, name: String, failed: @escaping @Sendable (IOError) -> Void = { _ in }) {
        self.loop = loop
        final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
        let name = String(decoding: name.utf8.prefix(15), as: UTF8.self)
        let box = Unmanaged.passRetained(Box {
            tether_set_thread_name(name)
            do throws(IOError) { try loop.run() } catch { failed(error) }
        })
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let b = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
            b.body()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create failed: \(rc)")
        thread = t
    }

    /// Stops the loop and waits for its thread to end.
    public func stopAndJoin() {
        loop.stop()
        pthread_join(thread, nil)
    }
}
