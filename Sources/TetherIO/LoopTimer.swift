#if canImport(Glibc)
import Glibc
#endif
import CTether

/// A timer of its own on a loop, for work that is not a connection's (a batch to flush,
/// housekeeping): `fired` runs on the loop when it comes due. Its record in the loop is an
/// eventfd that nothing writes, so that the record can carry the timer: arming it allocates
/// nothing and needs no thread.
public final class LoopTimer: IOHandler {
    /// Held strongly: an owner's deinit may close the timer after its loop was let go (a stopped
    /// server), and an unowned reference would then close whatever descriptor reused the number.
    /// (The loop holds the timer only until `close` or `closeAll`, so there is no lasting cycle.)
    private let loop: IOLoop
    private var handle = Handle(token: UInt64(UInt32.max))
    private let fired: (LoopTimer) -> Void

    /// On the loop's thread (or before it runs).
    public init(loop: IOLoop, fired: @escaping (LoopTimer) -> Void) throws(IOError) {
        self.loop = loop
        self.fired = fired
        let fd = tether_eventfd()
        guard fd >= 0 else { throw IOError("eventfd", errno: tether_errno()) }
        do {
            handle = try loop.register(fd, handler: self)
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    /// Fires `nanoseconds` from now (replacing an earlier arming).
    public func arm(afterNanoseconds nanoseconds: UInt64) { loop.arm(handle, afterNanoseconds: nanoseconds) }

    public var isArmed: Bool { loop.isTimerArmed(handle) }

    /// Ends its record in the loop: it never fires again.
    public func close() { loop.close(handle) }

    /// A timer that fires every `interval` nanoseconds from now on.
    public static func repeating(loop: IOLoop, intervalNanoseconds interval: UInt64, _ tick: @escaping () -> Void) throws(IOError) -> LoopTimer {
        let t = try LoopTimer(loop: loop) { t in
            t.arm(afterNanoseconds: interval)
            tick()
        }
        t.arm(afterNanoseconds: interval)
        return t
    }

    public func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {}

    public func timerFired(handle: Handle, loop: IOLoop) { fired(self) }
}
