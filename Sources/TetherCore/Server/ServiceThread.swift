#if canImport(Glibc)
import Glibc
#endif
import CTether
import Synchronization

/// A thread of its own for slow, blocking work that no event loop may wait for (the resolver's
/// DNS lookups, OCSP fetches): woken through an eventfd, and told to end without being joined,
/// since the work under way may take a timeout's length and a shutdown waits for neither.
final class ServiceThread: @unchecked Sendable {
    private let wake: Int32
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?

    init() { wake = eventfd(0, Int32(EFD_CLOEXEC)) }
    deinit { Glibc.close(wake) }

    var isRunning: Bool { thread != nil }
    var isStopping: Bool { stopping.load(ordering: .acquiring) }

    /// Runs `body` on a new thread named `name` (it holds what it captures until it returns);
    /// false when the thread could not be made.
    func start(name: String, _ body: @escaping () -> Void) -> Bool {
        final class Job { let name: String; let body: () -> Void; init(_ n: String, _ b: @escaping () -> Void) { name = n; body = b } }
        let box = Unmanaged.passRetained(Job(name, body))
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let job = Unmanaged<Job>.fromOpaque(arg!).takeRetainedValue()
            tether_set_thread_name(job.name)
            job.body()
            return nil
        }, box.toOpaque())
        guard rc == 0 else { box.release(); return false }
        thread = t
        return true
    }

    /// Wakes the thread from `sleep`.
    func poke() {
        var one: UInt64 = 1
        _ = Glibc.write(wake, &one, 8)
    }

    /// Until `poke` or `ms` milliseconds (nil: until `poke`).
    func sleep(ms: Int32?) {
        var p = pollfd(fd: wake, events: Int16(POLLIN), revents: 0)
        if poll(&p, 1, ms ?? -1) > 0 {
            var v: UInt64 = 0
            _ = Glibc.read(wake, &v, 8)
        }
    }

    /// Tells the thread to end (its body checks `isStopping`) and lets it go.
    func stop() {
        stopping.store(true, ordering: .releasing)
        poke()
        if let t = thread {
            pthread_detach(t)
            thread = nil
        }
    }
}
