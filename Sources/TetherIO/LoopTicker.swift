#if canImport(Glibc)
import Glibc
#endif
import CTether

/// Runs `tick` on its loop every `interval` nanoseconds, for work that is periodic rather than
/// tied to a connection (housekeeping). Its record in the loop is an eventfd that nothing writes:
/// the record carries the timer, so a tick costs no allocation and no extra thread.
public final class LoopTicker: IOHandler {
    private unowned(unsafe) let loop: IOLoop
    private var handle = Handle(token: UInt64(UInt32.max))
    private let interval: UInt64
    private let tick: (IOLoop) -> Void

    /// On the loop's thread (or before it runs).
    public init(loop: IOLoop, intervalNanoseconds: UInt64, tick: @escaping (IOLoop) -> Void) throws(IOError) {
        self.loop = loop
        self.interval = intervalNanoseconds
        self.tick = tick
        let fd = tether_eventfd()
        guard fd >= 0 else { throw IOError("eventfd", errno: tether_errno()) }
        do {
            handle = try loop.register(fd, handler: self)
        } catch {
            Glibc.close(fd)
            throw error
        }
        loop.arm(handle, afterNanoseconds: interval)
    }

    public func ioEvent(_ events: IOEvents, handle: Handle, loop: IOLoop) {}

    public func timerFired(handle: Handle, loop: IOLoop) {
        loop.arm(handle, afterNanoseconds: interval)
        tick(loop)
    }

    /// Ends the ticks (on the loop's thread).
    public func cancel() {
        loop.close(handle)
    }
}
