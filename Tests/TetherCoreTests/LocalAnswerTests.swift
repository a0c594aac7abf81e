import Testing
@testable import TetherCore

/// Answers Tether makes itself, as both paths write them (nginx's shapes).
@Suite struct LocalAnswerTests {
    static let date = Array("Sun, 06 Dec 2026 04:00:00 GMT".utf8)

    func text(_ a: LocalAnswer) -> String {
        var out: [UInt8] = []
        let n = a.write(date: Self.date, into: &out)
        #expect(n == out.count)
        return String(decoding: out, as: UTF8.self)
    }

    func text(_ a: LocalAnswer, body: String) -> String {
        Array(body.utf8).withUnsafeBytes { p in
            var a = a
            a.text = p
            return text(a)
        }
    }

    @Test func aReturnWithTextIsItsBody() {
        let t = text(LocalAnswer(status: 200, keepAlive: true), body: "hello\n")
        #expect(t == "HTTP/1.1 200 OK\r\nServer: tether/\(tetherVersion)\r\nDate: Sun, 06 Dec 2026 04:00:00 GMT\r\n"
            + "Content-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n")
    }

    @Test func aRedirectCarriesLocationAndNginxsPage() {
        let t = text(LocalAnswer(status: 301, serverTokens: false, keepAlive: true), body: "https://example.com/x")
        let page = "<html>\r\n<head><title>301 Moved Permanently</title></head>\r\n<body>\r\n"
            + "<center><h1>301 Moved Permanently</h1></center>\r\n<hr><center>tether</center>\r\n</body>\r\n</html>\r\n"
        #expect(t == "HTTP/1.1 301 Moved Permanently\r\nServer: tether\r\nDate: Sun, 06 Dec 2026 04:00:00 GMT\r\n"
            + "Location: https://example.com/x\r\nContent-Type: text/html\r\nContent-Length: \(page.utf8.count)\r\n\r\n" + page)
    }

    @Test func anErrorGetsThePageAndCloseWhenNotKeptAlive() {
        let t = text(LocalAnswer(status: 404, keepAlive: false))
        #expect(t.contains("\r\nContent-Type: text/html\r\n") && t.contains("\r\nConnection: close\r\n\r\n<html>"))
        let length = Int(t.split(separator: "Content-Length: ")[1].prefix { $0.isNumber })!
        #expect(t.split(separator: "\r\n\r\n", maxSplits: 1)[1].utf8.count == length)
    }

    @Test func headAnd204And304HaveNoBody() {
        let head = text(LocalAnswer(status: 200, keepAlive: true, isHEAD: true), body: "hello")
        #expect(head.hasSuffix("Content-Length: 5\r\n\r\n"))
        let noContent = text(LocalAnswer(status: 204, keepAlive: true), body: "x")
        #expect(!noContent.contains("Content-Length") && noContent.hasSuffix("\r\n\r\n"))
        let notModified = text(LocalAnswer(status: 304, keepAlive: true))
        #expect(!notModified.contains("Content-Length") && !notModified.contains("<html>"))
    }

    @Test func anHTTP10ClientKeptAliveIsToldSoWithTheKeepAliveLine() {
        let t = text(LocalAnswer(status: 200, keepAlive: true, clientMinor: 0, keepAliveHeader: Array("Keep-Alive: timeout=5\r\n".utf8)), body: "")
        #expect(t.hasSuffix("Content-Length: 0\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n"))
    }
}
