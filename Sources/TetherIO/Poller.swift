import CTether
#if canImport(Glibc)
import Glibc
#endif

/// What happened on a descriptor, as the poller reports it.
public struct IOEvents: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Bytes to read (or, on a listener, connections to accept).
    public static let readable = IOEvents(rawValue: 1)
    /// Room in the send buffer.
    public static let writable = IOEvents(rawValue: 2)
    /// The peer will send nothing more (its FIN, `EPOLLRDHUP`); what it sent before may still be unread.
    public static let readHangup = IOEvents(rawValue: 4)
    /// Both directions are gone (`EPOLLHUP`), or the socket has an error pending (`EPOLLERR`).
    public static let hangup = IOEvents(rawValue: 8)
    public static let error = IOEvents(rawValue: 16)

    public var description: String {
        var parts: [String] = []
        if contains(.readable) { parts.append("readable") }
        if contains(.writable) { parts.append("writable") }
        if contains(.readHangup) { parts.append("readHangup") }
        if contains(.hangup) { parts.append("hangup") }
        if contains(.error) { parts.append("error") }
        return "[" + parts.joined(separator: ",") + "]"
    }
}

/// The kernel's readiness interface, as the loop needs it: one registration per descriptor for
/// everything it will ever wait for, edge-triggered, carrying a 64-bit token. Linux's epoll is the
/// one built and tested; a kqueue poller (EVFILT_READ and EVFILT_WRITE with EV_CLEAR) would fit
/// the same four calls.
public protocol Poller: AnyObject {
    /// Registers `fd` for reads, writes and the peer's half-close, edge-triggered.
    func register(_ fd: Int32, token: UInt64) throws(IOError)
    /// Removes `fd` (closing it does this too, when no other descriptor shares its file).
    func deregister(_ fd: Int32)
    /// Waits up to `timeoutMs` (-1: without limit, 0: not at all); returns how many events came.
    func wait(timeoutMs: Int32) throws(IOError) -> Int
    /// Event `i` of those the last `wait` returned: its descriptor's token and what happened.
    func event(_ i: Int) -> (token: UInt64, events: IOEvents)
}

/// A failed system call: its name and errno.
public struct IOError: Error, Equatable, CustomStringConvertible, Sendable {
    public let call: String
    public let errno: Int32
    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call)() failed (\(errno): \(String(cString: strerror(errno))))" }
}

/// epoll, edge-triggered: `EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET` once per descriptor, so a
/// connection costs one `epoll_ctl` for its whole life and no call when it stops or starts wanting
/// to write. The event buffer is allocated once.
public final class EpollPoller: Poller {
    public let fd: Int32
    let buffer: UnsafeMutableRawPointer
    let capacity: Int32

    public init(capacity: Int32 = 512) throws(IOError) {
        let fd = tether_epoll_create()
        guard fd >= 0 else { throw IOError("epoll_create1", errno: tether_errno()) }
        self.fd = fd
        self.capacity = capacity
        buffer = UnsafeMutableRawPointer.allocate(byteCount: tether_epoll_event_size() * Int(capacity), alignment: 8)
    }

    deinit {
        buffer.deallocate()
        Glibc.close(fd)
    }

    static let all = UInt32(truncatingIfNeeded: TETHER_EPOLLIN | TETHER_EPOLLOUT | TETHER_EPOLLRDHUP | TETHER_EPOLLET)

    public func register(_ fd: Int32, token: UInt64) throws(IOError) {
        guard tether_epoll_add(self.fd, fd, Self.all, token) == 0 else { throw IOError("epoll_ctl", errno: tether_errno()) }
    }

    public func deregister(_ fd: Int32) {
        _ = tether_epoll_delete(self.fd, fd)
    }

    public func wait(timeoutMs: Int32) throws(IOError) -> Int {
        let n = tether_epoll_wait(fd, buffer, capacity, timeoutMs)
        guard n >= 0 else { throw IOError("epoll_wait", errno: tether_errno()) }
        return Int(n)
    }

    public func event(_ i: Int) -> (token: UInt64, events: IOEvents) {
        let e = tether_epoll_event_events(buffer, Int32(i))
        var events: IOEvents = []
        if e & UInt32(truncatingIfNeeded: TETHER_EPOLLIN) != 0 { events.insert(.readable) }
        if e & UInt32(truncatingIfNeeded: TETHER_EPOLLOUT) != 0 { events.insert(.writable) }
        if e & UInt32(truncatingIfNeeded: TETHER_EPOLLRDHUP) != 0 { events.insert(.readHangup) }
        if e & UInt32(truncatingIfNeeded: TETHER_EPOLLHUP) != 0 { events.insert(.hangup) }
        if e & UInt32(truncatingIfNeeded: TETHER_EPOLLERR) != 0 { events.insert(.error) }
        return (tether_epoll_event_token(buffer, Int32(i)), events)
    }
}
