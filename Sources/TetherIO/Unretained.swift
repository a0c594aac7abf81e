/// A reference that is not counted, and through which calls are made with nothing retained or
/// released around them.
///
/// Swift makes a strong copy of a reference it loads from a `var`, an `unowned` or an
/// `unowned(unsafe)` field, from a field of an `inout` value, or through a chain of fields, and
/// holds it across each call made on it: a retain and a release, both atomic, per call. (A `let`
/// field of `self` is the one case it reliably borrows.) On a proxied request that was about a
/// hundred of them, some 2,000 instructions, most of them on the loop and its buffer pool.
/// An `Unretained` is a plain pointer to load, and `callAsFunction` lends the object to the
/// call borrowed (`Unmanaged._withUnsafeGuaranteedRef`).
///
/// Only for an object that something else keeps alive for longer than the reference is used,
/// whatever the calls do: the loop and its buffer pool (owned by the loop's thread, which
/// outlives every connection and exchange on it), a pool its upstream holds, or a client
/// connection while its exchange runs.
@frozen public struct Unretained<Object: AnyObject> {
    @usableFromInline let reference: Unmanaged<Object>

    @inlinable public init(_ object: Object) { reference = .passUnretained(object) }

    /// `body` with the object, borrowed.
    @_transparent
    public func callAsFunction<Result>(_ body: (Object) throws -> Result) rethrows -> Result {
        try reference._withUnsafeGuaranteedRef(body)
    }

    /// The object, counted (a retain and a release): for uses off the hot paths.
    @inlinable public var object: Object { reference.takeUnretainedValue() }
}
