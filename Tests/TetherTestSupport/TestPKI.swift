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
        let r = try Spawn.run("/usr/bin/openssl", args, cwd: dir)
        let text = r.out + r.err
        guard r.status == 0 else { throw Failed(description: "openssl \(args.joined(separator: " ")): \(text)") }
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
        try clientCertificates(in: dir, root: root, ec: ec)
    }

    /// An OCSP response (DER) from the test CA about localhost.pem, saying `good` or `revoked`
    /// (made with `openssl ocsp` from an index of its own); returns its path.
    public static func ocspResponse(_ status: String) throws -> String {
        let dir = directory
        let serial = try openssl(["x509", "-in", "localhost.pem", "-serial", "-noout"], in: dir)
            .trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "=").last.map(String.init) ?? ""
        let line = status == "revoked" ? "R\t301231000000Z\t240101000000Z\t\(serial)\tunknown\t/CN=localhost\n"
                                       : "V\t301231000000Z\t\t\(serial)\tunknown\t/CN=localhost\n"
        try line.write(toFile: "\(dir)/ocsp-\(status).idx", atomically: true, encoding: .utf8)
        _ = try openssl(["ocsp", "-issuer", "ca.pem", "-cert", "localhost.pem", "-reqout", "ocsp-\(status).req", "-no_nonce"], in: dir)
        _ = try openssl(["ocsp", "-index", "ocsp-\(status).idx", "-CA", "ca.pem", "-rsigner", "ca.pem", "-rkey", "ca.key",
                         "-reqin", "ocsp-\(status).req", "-respout", "ocsp-\(status).der", "-ndays", "1"], in: dir)
        return "\(dir)/ocsp-\(status).der"
    }

    /// Client certificates for `ssl_verify_client`, issued by `openssl ca` (so that one can be
    /// expired and one revoked): client.pem (valid), client-expired.pem, client-revoked.pem (in
    /// client-crl.pem) from client-ca.pem, and client-other.pem from an unrelated CA.
    static func clientCertificates(in dir: String, root: (String, String) throws -> Void, ec: [String]) throws {
        try root("client-ca", "Tether Test Client CA")
        let ca = dir + "/client-ca.d"
        try FileManager.default.createDirectory(atPath: ca + "/newcerts", withIntermediateDirectories: true)
        try "".write(toFile: ca + "/index.txt", atomically: true, encoding: .utf8)
        try "1000\n".write(toFile: ca + "/serial", atomically: true, encoding: .utf8)
        try "1000\n".write(toFile: ca + "/crlnumber", atomically: true, encoding: .utf8)
        try """
            [ca]
            default_ca = client_ca
            [client_ca]
            dir = \(ca)
            database = $dir/index.txt
            new_certs_dir = $dir/newcerts
            certificate = \(dir)/client-ca.pem
            private_key = \(dir)/client-ca.key
            serial = $dir/serial
            crlnumber = $dir/crlnumber
            default_md = sha256
            default_crl_days = 30
            policy = any
            unique_subject = no
            [any]
            commonName = supplied
            organizationName = optional
            """.write(toFile: ca + "/ca.cnf", atomically: true, encoding: .utf8)
        try "extendedKeyUsage=clientAuth\n".write(toFile: dir + "/client.ext", atomically: true, encoding: .utf8)
        for (name, start, end) in [("client", "20250101000000Z", "20991231000000Z"), ("client-expired", "20200101000000Z", "20200201000000Z"),
                                   ("client-revoked", "20250101000000Z", "20991231000000Z")] {
            try openssl(["req"] + ec + ["-keyout", "\(name).key", "-out", "\(name).csr", "-subj", "/CN=\(name)/O=Tether Tests"], in: dir)
            try openssl(["ca", "-batch", "-config", ca + "/ca.cnf", "-in", "\(name).csr", "-out", "\(name).pem",
                         "-startdate", start, "-enddate", end, "-extfile", "client.ext", "-notext"], in: dir)
        }
        try openssl(["ca", "-config", ca + "/ca.cnf", "-revoke", "client-revoked.pem"], in: dir)
        try openssl(["ca", "-config", ca + "/ca.cnf", "-gencrl", "-out", "client-crl.pem"], in: dir)
        try openssl(["req"] + ec + ["-keyout", "client-other.key", "-out", "client-other.csr", "-subj", "/CN=client-other"], in: dir)
        try openssl(["x509", "-req", "-in", "client-other.csr", "-CA", "other-ca.pem", "-CAkey", "other-ca.key", "-CAcreateserial",
                     "-out", "client-other.pem", "-days", "2", "-extfile", "client.ext"], in: dir)
    }
}
