#!/usr/bin/env python3
"""A deterministic load for instruction counts: exactly TOTAL requests over CONNS connections.

  loadgen.py keepalive PORT CONNS TOTAL   each connection sends its next request when the
                                          response to the last one is in (no pipelining)
  loadgen.py close PORT CONNS TOTAL       a new connection per request (Connection: close),
                                          CONNS at a time

The count of requests is fixed (unlike wrk's, which depends on time), so instructions counted
over a run divide by a known number. Exits non-zero on any answer other than 200.
"""
import selectors, socket, sys

mode, port, conns, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
KEEP = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
sel = selectors.DefaultSelector()
sent = done = 0


def response_end(buf):
    """Length of the first complete response in buf, or 0."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].decode("latin-1").lower()
    if not head.startswith("http/1.1 200"):
        sys.exit("loadgen: unexpected response: " + head.split("\r\n")[0])
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip() == "content-length":
            length = int(value)
    return end + 4 + length if len(buf) >= end + 4 + length else 0


def start():
    global sent
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(KEEP if mode == "keepalive" else CLOSE)
    sent += 1
    sel.register(s, selectors.EVENT_READ, bytearray())


for _ in range(min(conns, total)):
    start()
while done < total:
    events = sel.select(timeout=30)
    if not events:
        sys.exit(f"loadgen: no answer for 30 s ({done} of {total} answered)")
    for key, _ in events:
        s, buf = key.fileobj, key.data
        data = s.recv(65536)
        if not data:
            sys.exit("loadgen: connection closed before its response was complete")
        buf += data
        n = response_end(bytes(buf))
        if not n:
            continue
        del buf[:n]
        done += 1
        if mode == "keepalive":
            if sent < total:
                s.sendall(KEEP)
                sent += 1
            else:
                sel.unregister(s)
                s.close()
        else:
            sel.unregister(s)
            s.close()
            if sent < total:
                start()
if done != total:
    sys.exit(f"loadgen: {done} of {total} answered")
