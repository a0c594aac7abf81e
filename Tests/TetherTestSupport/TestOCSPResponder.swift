import Foundation
import NIOConcurrencyHelpers

/// An OCSP responder on 127.0.0.1 for stapling tests: each HTTP request (`GET /PATH/BASE64`, or a
/// `POST` with the DER request) is answered by `openssl ocsp` itself, run on the request with an
/// index that gives every certificate the status set now (`good`, `revoked`, or `unknown`:
/// not in the index), signed by the test CA. `openssl ocsp -port` listens on every interface, so
/// the HTTP side is the test's own (ScriptedBackend) and only the OCSP side is openssl's.
public final class TestOCSPResponder: @unchecked Sendable {
    public var port: Int { backend.port }
    public var url: String { "http://127.0.0.1:\(port)/ocsp" }
    private var backend: ScriptedBackend!
    private let state = NIOLockedValueBox<(status: String, targets: [String])>(("good", []))
    private let dir = TestPKI.directory

    public init(status: String = "good") throws {
        state.withLockedValue { $0.status = status }
        let state = self.state
        let dir = self.dir
        backend = try ScriptedBackend { c in
            defer { c.close() }
            guard let head = c.read(through: "\r\n\r\n") else { return }
            let requestLine = head.split(separator: "\r\n").first.map(String.init) ?? ""
            let parts = requestLine.split(separator: " ")
            guard parts.count == 3 else { return }
            state.withLockedValue { $0.targets.append(String(parts[1])) }
            let der: [UInt8]
            if parts[0] == "POST" {
                let length = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
                    .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
                der = c.read(count: length) ?? []
            } else {
                let last = parts[1].split(separator: "/").last.map(String.init) ?? ""
                der = Array(Data(base64Encoded: last.removingPercentEncoding ?? "") ?? Data())
            }
            let status = state.withLockedValue { $0.status }
            guard let answer = try? TestOCSPResponder.answer(der, status: status, dir: dir) else {
                c.send("HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                return
            }
            c.send("HTTP/1.0 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: \(answer.count)\r\n\r\n")
            c.send(answer)
        }
    }

    /// What the next requests are told about every certificate.
    public func set(status: String) { state.withLockedValue { $0.status = status } }

    /// The request targets received, in order.
    public var targets: [String] { state.withLockedValue { $0.targets } }

    public func stop() { backend.stop() }

    /// `openssl ocsp` answering `request` (DER): the serials it asks about come from the
    /// request itself (`-reqin ... -req_text`), and the index lists them with `status`.
    static func answer(_ request: [UInt8], status: String, dir: String) throws -> [UInt8] {
        let name = "ocsp-req-\(UUID().uuidString)"
        let reqPath = "\(dir)/\(name).der"
        try Data(request).write(to: URL(fileURLWithPath: reqPath))
        defer {
            for f in [reqPath, "\(dir)/\(name).idx", "\(dir)/\(name).idx.attr", "\(dir)/\(name).resp"] { try? FileManager.default.removeItem(atPath: f) }
        }
        let text = try TestPKI.openssl(["ocsp", "-reqin", reqPath, "-req_text"], in: dir)
        let serials = text.split(separator: "\n").compactMap { line -> String? in
            let t = line.trimmingCharacters(in: .whitespaces)
            guard t.hasPrefix("Serial Number:") else { return nil }
            return t.dropFirst("Serial Number:".count).trimmingCharacters(in: .whitespaces)
        }
        var index = ""
        for s in serials where status != "unknown" {
            index += status == "revoked" ? "R\t301231000000Z\t240101000000Z\t\(s)\tunknown\t/CN=x\n" : "V\t301231000000Z\t\t\(s)\tunknown\t/CN=x\n"
        }
        try index.write(toFile: "\(dir)/\(name).idx", atomically: true, encoding: .utf8)
        try TestPKI.openssl(["ocsp", "-index", "\(name).idx", "-CA", "ca.pem", "-rsigner", "ca.pem", "-rkey", "ca.key",
                             "-reqin", "\(name).der", "-respout", "\(name).resp", "-ndays", "1"], in: dir)
        return Array(try Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(name).resp")))
    }
}

extension TestPKI {
    /// A leaf for localhost signed by the test CA whose Authority Information Access names
    /// `responder` as its OCSP responder; returns the certificate's and key's paths.
    public static func leaf(ocspResponder responder: String) throws -> (certificate: String, key: String) {
        let dir = directory
        let name = "aia-\(UUID().uuidString.prefix(8))"
        try openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "\(name).key", "-out", "\(name).csr",
                     "-subj", "/CN=localhost"], in: dir)
        try "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nauthorityInfoAccess=OCSP;URI:\(responder)\n"
            .write(toFile: "\(dir)/\(name).ext", atomically: true, encoding: .utf8)
        // A serial of its own (tests make leaves in parallel; a shared serial file would race).
        let serial = "0x" + String(Int.random(in: 1...7)) + (0..<15).map { _ in String(UInt8.random(in: 0...15), radix: 16) }.joined()
        try openssl(["x509", "-req", "-in", "\(name).csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", serial,
                     "-out", "\(name).pem", "-days", "2", "-extfile", "\(name).ext"], in: dir)
        return ("\(dir)/\(name).pem", "\(dir)/\(name).key")
    }
}
