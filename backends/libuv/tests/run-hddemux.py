#!/usr/bin/env python3
"""run-hddemux.py LIBDIR — Debian's hddemux (an HTTP/1.x and DNS-over-TCP demultiplexer that
links libuv.so.1 dynamically), unmodified, on the build tree's libuv with UV_USE_MEGAPIPE=1.

hddemux takes its listening socket from systemd-style socket activation (LISTEN_FDS) and
splices every connection to HTTP_TARGET or DNS_TARGET by its first bytes.  This script plays
both: a listening socket on 127.0.0.1 (free port) given as fd 3, an HTTP server and a DNS-over-
TCP server of its own on 127.0.0.1, then real traffic through hddemux (HTTP GETs with
different bodies, DNS queries with different ids, many at once and one after another) and every
response checked byte for byte.  It also checks that the hddemux process mapped LIBDIR's
libuv.so.1 and holds an io_uring (the loop runs on a channel), then stops it by PID.
Exit 0 pass, 1 fail, 77 skip (no /usr/bin/hddemux: scripts/setup.sh --full installs it).
"""
import http.server
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

HDDEMUX = "/usr/bin/hddemux"


class HTTPHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("path=%s\n" % self.path).encode() * 20
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class DNSHandler(socketserver.BaseRequestHandler):
    """DNS over TCP: 2-byte length + message; answers every query with the question echoed, the
    QR bit set and one A record whose address encodes the query id."""

    def handle(self):
        s = self.request
        while True:
            hdr = recvall(s, 2)
            if not hdr:
                return
            (n,) = struct.unpack("!H", hdr)
            q = recvall(s, n)
            if q is None:
                return
            s.sendall(dns_answer(q))


class TS(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def recvall(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            return None if b or n else b""
        b += c
    return b


def dns_query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def dns_answer(q):
    qid = struct.unpack("!H", q[:2])[0]
    question = q[12:]
    ans = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
    ans += struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + bytes([10, 0, qid >> 8, qid & 255])
    return struct.pack("!H", len(ans)) + ans


def http_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("GET %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n" % path).encode())
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
    head, _, body = data.partition(b"\r\n\r\n")
    want = ("path=%s\n" % path).encode() * 20
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] or body != want:
        raise AssertionError("bad HTTP response for %s: %r" % (path, data[:200]))


def dns_ask(port, qids):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for qid in qids:
            q = dns_query(qid, "host%d.example" % qid)
            s.sendall(struct.pack("!H", len(q)) + q)
            (n,) = struct.unpack("!H", recvall(s, 2))
            a = recvall(s, n)
            exp = dns_answer(q)[2:]
            if a != exp:
                raise AssertionError("bad DNS answer for id %d: %r" % (qid, a))


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    libdir = os.path.abspath(sys.argv[1])
    if not os.access(HDDEMUX, os.X_OK):
        print("run-hddemux: SKIP (no %s; scripts/setup.sh --full installs it)" % HDDEMUX)
        return 77
    httpd = TS(("127.0.0.1", 0), HTTPHandler)
    dnsd = TS(("127.0.0.1", 0), DNSHandler)
    for srv in (httpd, dnsd):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    port = ls.getsockname()[1]

    env = dict(os.environ)
    env.update({"LD_LIBRARY_PATH": libdir, "UV_USE_MEGAPIPE": "1", "LISTEN_FDS": "1",
                "HTTP_TARGET": "127.0.0.1:%d" % httpd.server_address[1],
                "DNS_TARGET": "127.0.0.1:%d" % dnsd.server_address[1]})
    lfd = ls.fileno()
    # sd_listen_fds() wants the socket as fd 3 and LISTEN_PID = hddemux's own pid: a shell sets
    # both and execs hddemux.
    p = subprocess.Popen(["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" 3<&%d %d<&-' % (lfd, lfd),
                          HDDEMUX], env=env, pass_fds=(lfd,), stderr=subprocess.PIPE)
    ok = False
    try:
        time.sleep(0.3)
        if p.poll() is not None:
            raise AssertionError("hddemux exited: %s" % p.stderr.read().decode()[-500:])
        with open("/proc/%d/maps" % p.pid) as f:
            maps = f.read()
        if os.path.join(libdir, "libuv.so.1") not in maps:
            raise AssertionError("hddemux did not load %s/libuv.so.1" % libdir)
        links = [os.readlink("/proc/%d/fd/%s" % (p.pid, fd)) for fd in os.listdir("/proc/%d/fd" % p.pid)]
        if not any("io_uring" in l for l in links):
            raise AssertionError("hddemux holds no io_uring: the loop is not on MegaPipe")

        # one after another, then many at once, HTTP and DNS mixed
        for i in range(20):
            http_get(port, "/seq/%d" % i)
            dns_ask(port, [i + 1])
        dns_ask(port, list(range(100, 150)))  # 50 queries on one connection
        errors = []

        def worker(k):
            try:
                for j in range(10):
                    http_get(port, "/par/%d/%d" % (k, j))
                    dns_ask(port, [1000 + k * 10 + j, 2000 + k * 10 + j])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        if errors:
            raise AssertionError("; ".join(errors[:3]))
        if p.poll() is not None:
            raise AssertionError("hddemux died during the test")
        ok = True
        print("run-hddemux: ok (hddemux %d on %s/libuv.so.1 with io_uring: 180 HTTP requests "
              "and 390 DNS queries through it, all answers checked)" % (p.pid, libdir))
    except AssertionError as e:
        print("run-hddemux: FAILED: %s" % e)
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        httpd.shutdown()
        dnsd.shutdown()
        ls.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
