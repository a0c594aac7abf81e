import Foundation
import Testing
import TetherTestSupport

/// Runs a program to its end: nothing on its standard input (`openssl s_client` would wait for
/// it), both outputs returned (posix_spawn: see `Spawn`).
func run(_ exe: String, _ args: [String], cwd: String? = nil) throws -> (status: Int32, out: String, err: String) {
    try Spawn.run(exe, args, cwd: cwd)
}

@Suite struct DeployTests {
    /// The Kubernetes manifests parse as YAML, have the kinds the README promises, and the
    /// ConfigMap's tether.conf passes `tether -t`.
    @Test func kubernetesManifests() throws {
        let dir = packageRoot() + "/deploy/kubernetes"
        let script = """
            import sys, yaml, glob, json
            kinds = {}
            conf = None
            for f in sorted(glob.glob(sys.argv[1] + "/*.yaml")):
                for doc in yaml.safe_load_all(open(f)):
                    kinds[doc["kind"]] = doc["metadata"]["name"]
                    if doc["kind"] == "ConfigMap":
                        conf = doc["data"]["tether.conf"]
                    if doc["kind"] == "Deployment":
                        c = doc["spec"]["template"]["spec"]["containers"][0]
                        assert c["readinessProbe"]["httpGet"]["path"] == "/status"
                        assert "preStop" in c["lifecycle"]
                        assert "requests" in c["resources"]
            open(sys.argv[2], "w").write(conf)
            print(json.dumps(sorted(kinds)))
            """
        let conf = NSTemporaryDirectory() + "tether-k8s-\(UUID().uuidString).conf"
        defer { try? FileManager.default.removeItem(atPath: conf) }
        let r = try run("/usr/bin/env", ["python3", "-c", script, dir, conf])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.trimmingCharacters(in: .whitespacesAndNewlines) == #"["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]"#)
        let check = try runTether(["-t", "-c", conf])
        #expect(check.status == 0, "\(check.err)")
    }

    /// systemd accepts the unit (with the binary path pointed at the one just built).
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze"), "needs systemd-analyze"))
    func systemdUnitVerifies() throws {
        let unit = try String(contentsOfFile: packageRoot() + "/deploy/systemd/tether.service", encoding: .utf8)
            .replacingOccurrences(of: "/usr/local/bin/tether", with: try tetherExecutable().path)
        let dir = NSTemporaryDirectory() + "tether-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try unit.write(toFile: dir + "/tether.service", atomically: true, encoding: .utf8)
        let r = try run("/usr/bin/systemd-analyze", ["verify", dir + "/tether.service"])
        #expect(r.status == 0 && r.err.isEmpty, "\(r.err)")
    }

    /// The Dockerfile builds what the README builds and runs the shipped configuration
    /// (no Docker engine runs here, so this reads it rather than building it).
    @Test func dockerfileMatchesTheBuild() throws {
        let text = try String(contentsOfFile: packageRoot() + "/deploy/docker/Dockerfile", encoding: .utf8)
        #expect(text.contains("swift build -c release --product tether"))
        #expect(text.contains("libssl-dev") && text.contains("libssl3"))
        #expect(text.contains("USER tether"))
        #expect(text.contains("HEALTHCHECK") && text.contains("/status"))
        #expect(text.contains("tether -t -c /etc/tether/tether.conf"))
    }
}
