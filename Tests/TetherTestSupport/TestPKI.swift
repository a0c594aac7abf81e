import Foundation

/// A certificate authority and server certificates made at test time with the `openssl` command
/// (installed by scripts/test), once per test process. Nothing secret is committed.
///
/// - `ca.pem`: the root every certificate chains to.
/// - `NAME.pem` / `NAME.key` (ECDSA P-256) for `localhost`, `a.test`, `b.test`: the leaf for the
///   name (SANs: the name and 127.0.0.1), signed by the root.
/// - `localhost-rsa.pem` / `.key`: an RSA 2048 leaf for localhost.
/// - `chain.test.pem` / `.key`: a leaf signed by an intermediate CA, the file holding both.
/// - `other-ca.pem`: an unrelated root, for verification failures.
public enum TestPKI {
    public static let directory: String = {
        let dir = NSTemporaryDirectory() + "tether-pki-\(getpid())"
        do {
            try make(in: dir)
        } catch {
            fatalError("could not make the test certificates with openssl: \(error)")
        }
        return dir
    }()

    public static func path(_ file: String) -> String { directory + "/" + file }

    struct Failed: Error, CustomStringConvertible { var description: String }

    @discardableResult
    static func openssl(_ args: [String], in dir: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        p.arguments = args
        p.currentDirectoryURL = URL(fileURLWithPath: dir)
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else { throw Failed(description: "openssl \(args.joined(separator: " ")): \(text)") }
        return text
    }

    static func make(in dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        func root(_ name: String, _ cn: String) throws {
            try openssl(["req", "-x509"] + ec + ["-keyout", "\(name).key", "-out", "\(name).pem", "-days", "3", "-subj", "/CN=\(cn)",
                         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], in: dir)
        }
        func leaf(_ file: String, cn: String, key: [String], signer: String, ca: Bool = false) throws {
            try openssl(["req"] + key + ["-keyout", "\(file).key", "-out", "\(file).csr", "-subj", "/CN=\(cn)"], in: dir)
            let ext = ca ? "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                : "subjectAltName=DNS:\(cn),IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
            try ext.write(toFile: "\(dir)/\(file).ext", atomically: true, encoding: .utf8)
            try openssl(["x509", "-req", "-in", "\(file).csr", "-CA", "\(signer).pem", "-CAkey", "\(signer).key", "-CAcreateserial",
                         "-out", "\(file).pem", "-days", "2", "-extfile", "\(file).ext"], in: dir)
        }
        try root("ca", "Tether Test CA")
        try root("other-ca", "Unrelated Test CA")
        for name in ["localhost", "a.test", "b.test"] { try leaf(name, cn: name, key: ec, signer: "ca") }
        try leaf("localhost-rsa", cn: "localhost", key: ["-newkey", "rsa:2048", "-nodes"], signer: "ca")
        try leaf("intermediate", cn: "Tether Test Intermediate", key: ec, signer: "ca", ca: true)
        try leaf("chain.test", cn: "chain.test", key: ec, signer: "intermediate")
        let chain = try String(contentsOfFile: "\(dir)/chain.test.pem", encoding: .utf8) + String(contentsOfFile: "\(dir)/intermediate.pem", encoding: .utf8)
        try chain.write(toFile: "\(dir)/chain.test.pem", atomically: true, encoding: .utf8)
    }
}
