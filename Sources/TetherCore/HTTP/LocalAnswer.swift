import TetherHTTP

/// An answer Tether makes itself (`return`, an error page, an admin page), written into any
/// `HeadSink`: the status line, `Server` (with the version when
/// `server_tokens` is on), `Date`, the body's type and length, a redirect's `Location` with
/// nginx's small HTML page, the keep-alive headers, and the body unless the request was HEAD or
/// the status has none.
struct LocalAnswer {
    var status: Int
    /// `return`'s text: the body, or for 301, 302, 303, 307 and 308 the `Location`. Nil: an
    /// error status (300 and up) gets nginx's HTML page, others an empty body.
    var text: UnsafeRawBufferPointer?
    var contentType = "text/plain"
    var serverTokens = true
    /// `Allow: GET, HEAD` (a 405 from an admin page).
    var allow = false
    /// `Retry-After: N` (a 503 from a full upstream queue).
    var retryAfterSeconds: Int?
    /// nginx's pages that say more than the status (its 495 and 496, answered as 400): the
    /// title says this instead of the reason, and a line under the heading says it again.
    var detail: StaticString?
    var keepAlive: Bool
    /// The client's HTTP minor version: an HTTP/1.0 client kept alive is told so.
    var clientMinor = 1
    var isHEAD = false
    /// The location's `Keep-Alive: timeout=N` line, or empty.
    var keepAliveHeader: [UInt8] = []

    /// nginx's reason phrases (a switch: a dictionary lookup hashed the status on every answer).
    static func reason(_ status: Int) -> StaticString {
        switch status {
        case 100: "Continue"
        case 200: "OK"
        case 201: "Created"
        case 204: "No Content"
        case 301: "Moved Permanently"
        case 302: "Moved Temporarily"
        case 303: "See Other"
        case 304: "Not Modified"
        case 307: "Temporary Redirect"
        case 308: "Permanent Redirect"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Not Allowed"
        case 408: "Request Time-out"
        case 411: "Length Required"
        case 413: "Request Entity Too Large"
        case 414: "Request-URI Too Large"
        case 429: "Too Many Requests"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 502: "Bad Gateway"
        case 503: "Service Temporarily Unavailable"
        case 504: "Gateway Time-out"
        case 505: "HTTP Version Not Supported"
        default: "Unknown"
        }
    }

    private static let serverWithVersion = Array("\r\nServer: tether/\(tetherVersion)\r\nDate: ".utf8)
    private static let serverWithoutVersion = Array("\r\nServer: tether\r\nDate: ".utf8)

    /// What was written, for the access log.
    struct Written {
        var status: Int
        var headBytes: Int
        var bodyBytes: Int
    }

    /// The body's length as written (`$body_bytes_sent`).
    var bodyLength: Int {
        let bodyless = status == 204 || status == 304 || status < 200
        if bodyless || isHEAD { return 0 }
        if let text, !isRedirect { return text.count }
        return status >= 300 ? Self.pageLength(status, Self.reason(status), detail) : 0
    }

    var isRedirect: Bool {
        switch status {
        case 301, 302, 303, 307, 308: true
        default: false
        }
    }

    /// Writes the answer; `date` is the loop's cached HTTP date. Returns the bytes written.
    @discardableResult
    func write<S: HeadSink & ~Copyable>(date: [UInt8], into out: inout S) -> Int {
        let start = out.mark
        let reason = Self.reason(status)
        out.put("HTTP/1.1 ")
        out.putDecimal(status)
        out.put(" ")
        out.put(reason)
        out.put(serverTokens ? Self.serverWithVersion : Self.serverWithoutVersion)
        out.put(date)
        out.put("\r\n")
        if allow { out.put("Allow: GET, HEAD\r\n") }
        if let n = retryAfterSeconds {
            out.put("Retry-After: ")
            out.putDecimal(n)
            out.put("\r\n")
        }
        let bodyless = status == 204 || status == 304 || status < 200
        var page = false
        if let text, !isRedirect {
            out.put("Content-Type: ")
            out.put(string: contentType)
            out.put("\r\n")
            if !bodyless { putLength(text.count, &out) }
        } else if status >= 300 && status != 304 {
            if isRedirect, let text {
                out.put("Location: ")
                out.put(text)
                out.put("\r\n")
            }
            out.put("Content-Type: text/html\r\n")
            page = true
            putLength(Self.pageLength(status, reason, detail), &out)
        } else if !bodyless {
            putLength(0, &out)
        }
        if !keepAlive {
            out.put("Connection: close\r\n")
        } else {
            if clientMinor == 0 { out.put("Connection: keep-alive\r\n") }
            out.put(keepAliveHeader)
        }
        out.put("\r\n")
        if !bodyless && !isHEAD {
            if page {
                Self.putPage(status, reason, detail, &out)
            } else if let text, !isRedirect {
                out.put(text)
            }
        }
        return out.mark - start
    }

    private func putLength<S: HeadSink & ~Copyable>(_ n: Int, _ out: inout S) {
        out.put("Content-Length: ")
        out.putDecimal(n)
        out.put("\r\n")
    }

    // nginx's error page, in pieces (no String is built per answer): the title, the heading, a
    // line of detail when there is one, the signature.
    private static let pageParts: (StaticString, StaticString, StaticString, StaticString) = (
        "<html>\r\n<head><title>",
        "</title></head>\r\n<body>\r\n<center><h1>",
        "</h1></center>",
        "\r\n<hr><center>tether</center>\r\n</body>\r\n</html>\r\n"
    )
    private static let detailParts: (StaticString, StaticString) = ("\r\n<center>", "</center>")

    private static func pageLength(_ status: Int, _ reason: StaticString, _ detail: StaticString?) -> Int {
        let digits = decimalDigits(status) + 1
        let fixed = pageParts.0.utf8CodeUnitCount + pageParts.1.utf8CodeUnitCount + pageParts.2.utf8CodeUnitCount + pageParts.3.utf8CodeUnitCount
        let more = detail.map { detailParts.0.utf8CodeUnitCount + $0.utf8CodeUnitCount + detailParts.1.utf8CodeUnitCount } ?? 0
        return fixed + 2 * digits + (detail ?? reason).utf8CodeUnitCount + reason.utf8CodeUnitCount + more
    }

    private static func putPage<S: HeadSink & ~Copyable>(_ status: Int, _ reason: StaticString, _ detail: StaticString?, _ out: inout S) {
        out.put(pageParts.0)
        out.putDecimal(status); out.put(" "); out.put(detail ?? reason)
        out.put(pageParts.1)
        out.putDecimal(status); out.put(" "); out.put(reason)
        out.put(pageParts.2)
        if let detail { out.put(detailParts.0); out.put(detail); out.put(detailParts.1) }
        out.put(pageParts.3)
    }

    private static func decimalDigits(_ n: Int) -> Int {
        var v = max(n, 0), d = 1
        while v >= 10 { v /= 10; d += 1 }
        return d
    }
}
