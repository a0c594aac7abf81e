import Testing
import TetherTLS

/// The pieces of OCSP fetching that need no socket: the responder URL, the request as it goes
/// out, the responder's answer, and when to ask again.
@Suite struct OCSPQueryTests {
    @Test func responderURLs() {
        #expect(OCSPQuery.responder("http://ocsp.example.com")! == ("ocsp.example.com", 80, "/"))
        #expect(OCSPQuery.responder("HTTP://127.0.0.1:8080/ocsp/x")! == ("127.0.0.1", 8080, "/ocsp/x"))
        #expect(OCSPQuery.responder("http://[::1]:2560/")! == ("::1", 2560, "/"))
        #expect(OCSPQuery.responder("http://[::1]")! == ("::1", 80, "/"))
        for bad in ["https://ocsp.example.com/", "ocsp.example.com", "http://", "http://host:0/", "http://host:99999/",
                    "http://[::1/", "http://user@host/", "http://host/a b", "http://host:x/"] {
            #expect(OCSPQuery.responder(bad) == nil, "\(bad)")
        }
    }

    @Test func theRequestIsAGetWithTheDERInEscapedBase64() {
        // Bytes whose base64 holds '+', '/' and '=' (0xfb 0xff 0xbf -> "+/+/", then one byte -> "QQ==").
        let q = OCSPQuery(url: "http://127.0.0.1:2560/ocsp", host: "127.0.0.1", port: 2560, path: "/ocsp", request: [0xfb, 0xff, 0xbf, 0x41])
        #expect(String(decoding: q.httpRequest, as: UTF8.self) == "GET /ocsp/%2B%2F%2B%2FQQ%3D%3D HTTP/1.0\r\nHost: 127.0.0.1:2560\r\n\r\n")
        let root = OCSPQuery(url: "http://[::1]/", host: "::1", port: 80, path: "/", request: Array("ab".utf8))
        #expect(String(decoding: root.httpRequest, as: UTF8.self) == "GET /YWI%3D HTTP/1.0\r\nHost: [::1]\r\n\r\n")
    }

    @Test func theAnswerMustBeA200OCSPResponse() {
        func body(_ s: String) -> Result<[UInt8], OCSPFailure> { OCSPQuery.responseBody(Array(s.utf8)) }
        #expect(body("HTTP/1.0 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: 3\r\n\r\nabcdef") == .success(Array("abc".utf8)))
        #expect(body("HTTP/1.1 200 OK\r\ncontent-type:  Application/OCSP-Response \r\n\r\nabc") == .success(Array("abc".utf8)), "close-delimited")
        #expect(body("HTTP/1.0 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: 9\r\n\r\nabc")
            == .failure(.http("the responder's answer was cut short (3 of 9 bytes)")))
        #expect(body("HTTP/1.0 404 Not Found\r\n\r\n") == .failure(.http("the responder answered 404")))
        #expect(body("HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>")
            == .failure(.http("the responder's Content-Type is \"text/html\", not \"application/ocsp-response\"")))
        #expect(body("HTTP/1.0 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
            == .failure(.http("the responder's Content-Length is invalid")))
        #expect(body("HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            == .failure(.http("the responder's answer is chunked (it was asked over HTTP/1.0)")))
        #expect(body("SSH-2.0-OpenSSH\r\n\r\n") == .failure(.http("the responder's answer is not HTTP")))
        #expect(body("HTTP/1.0 200 OK\r\nContent-Type: application/ocsp-response\r\n") == .failure(.http("the responder's answer has no complete header")))
        #expect(OCSPQuery.isComplete(Array("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nab".utf8)))
        #expect(!OCSPQuery.isComplete(Array("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\na".utf8)))
        #expect(!OCSPQuery.isComplete(Array("HTTP/1.0 200 OK\r\n\r\nab".utf8)), "close-delimited: whole only at the close")
    }

    /// nginx's schedule: a good response five minutes before its nextUpdate, at least hourly and
    /// no sooner than five minutes; anything else after five minutes.
    @Test func whenToAskAgain() {
        let now = 1_000_000
        #expect(StapleOutcome.stapled(validUntil: now + 86_400).nextFetch(now: now) == now + 3600)
        #expect(StapleOutcome.stapled(validUntil: now + 1_200).nextFetch(now: now) == now + 900)
        #expect(StapleOutcome.stapled(validUntil: now + 400).nextFetch(now: now) == now + 300)
        #expect(StapleOutcome.stapled(validUntil: .max).nextFetch(now: now) == now + 3600)
        #expect(StapleOutcome.revoked("revoked").nextFetch(now: now) == now + 300)
        #expect(StapleOutcome.refused("stale").nextFetch(now: now) == now + 300)
    }
}
