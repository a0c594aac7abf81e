import TetherHTTP

/// The rules of protocol upgrades: what of a request's `Upgrade` goes upstream,
/// and whether a 101 switches to something the request offered. A tunnel is never opened
/// otherwise: the client's next bytes would reach the backend unparsed.
enum Upgrade {
    /// The protocols of a request's `Upgrade` value (with `Connection: upgrade`) that `allowed`
    /// names, joined as they go upstream; nil when there are none. `h2c` never is (the
    /// configuration refuses it), so a client cannot tunnel HTTP/2 past the locations' rules.
    static func offer(_ value: Substring, allowed: [String]) -> [UInt8]? {
        guard !allowed.isEmpty else { return nil }
        var offer: [UInt8] = []
        for item in value.split(separator: ",") {
            let p = trimmed(item)
            let name = p.split(separator: "/", maxSplits: 1).first.map { $0.lowercased() } ?? ""
            guard !p.isEmpty, name != "h2c", allowed.contains(name),
                  p.utf8.allSatisfy({ ASCII.isToken($0) || $0 == UInt8(ascii: "/") }) else { continue }
            if !offer.isEmpty { offer.append(contentsOf: ", ".utf8) }
            offer.append(contentsOf: p.utf8)
        }
        return offer.isEmpty ? nil : offer
    }

    /// Whether a 101's `Upgrade` value names one protocol of the offer (by name, any case).
    static func offered(_ offer: [UInt8], answer value: Substring) -> Bool {
        let answer = value.lowercased()
        let answerName = answer.split(separator: "/", maxSplits: 1).first.map(String.init) ?? ""
        guard !answerName.isEmpty, !answer.contains(",") else { return false }
        return String(decoding: offer, as: UTF8.self).split(separator: ",").contains { item in
            let name = trimmed(item).lowercased()
            return name == answer || name.split(separator: "/", maxSplits: 1).first.map(String.init) == answerName
        }
    }

    static func trimmed(_ s: Substring) -> Substring {
        var a = s.startIndex, b = s.endIndex
        while a < b, s[a] == " " || s[a] == "\t" { a = s.index(after: a) }
        while b > a, s[s.index(before: b)] == " " || s[s.index(before: b)] == "\t" { b = s.index(before: b) }
        return s[a..<b]
    }

    /// A head's `Upgrade` value (`bytes`: the head's bytes), as text; nil without one.
    static func value(_ head: HeadLayout, _ bytes: UnsafeRawBufferPointer) -> Substring? {
        guard let i = head.upgradeIndex else { return nil }
        let f = head.headers[i]
        return Substring(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[Int(f.valueStart)..<Int(f.valueEnd)]), as: UTF8.self))
    }
}
