#!/usr/bin/env python3
"""ngxtest.py TEST --module SO --loadgen LOADGEN — functional tests of ngx_megapipe_module.

Debian's stock /usr/sbin/nginx, unmodified, loads the module (`load_module`, `use megapipe`).
Where a test compares with stock behaviour it runs a second nginx with `use epoll` on the
same files.  Every server lives in its own temp prefix on 127.0.0.1 (ngxlib.py).  Exit 0 =
pass, 1 = fail, 77 = skipped (no nginx binary).

Tests:
  load              the module loads into the dpkg-owned binary; each worker's channel is made
                    after the worker dropped privileges; connections use channel I/O
  functional        static files byte-identical to stock (many sizes), keep-alive, pipelining,
                    error pages (404, 403, 400, 405, 413, 414) equal to stock, request bodies
  big_file          a 12 MiB file byte-identical with sendfile on (emulated) and off, with
                    `aio threads` (thread pool: the notify path), and with limit_rate
  https             TLS with a self-signed certificate (readiness path), big and small files
  proxy             proxy_pass to a local upstream: GET, 2 MiB POST echoed, upstream keepalive
  many_connections  10,000 concurrent connections, each gets its response
  reload            HUP (three times), then USR2 + QUIT of the old master, under load from
                    loadgen: no failed request; QUIT lets an in-flight slow download finish
  partition         2 workers, worker_cpu_affinity 01 10, listen reuseport: connections made
                    on CPU 0 go to the worker on CPU 0, those made on CPU 1 to the other
  epoll_engine      the functional checks with the channel on the core's epoll engine
  timers            keepalive_timeout, client_header_timeout, send_timeout (a client that
                    stops reading: the connection ends with writes in flight)
"""
import argparse
import hashlib
import os
import random
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ngxlib  # noqa: E402  (puts <repo>/scripts on sys.path)
from ngxlib import Nginx, http_get, read_response  # noqa: E402
from mputil import free_port  # noqa: E402

ARGS = None


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)


def make_docroot(n):
    """Files of many sizes (0 B .. 300 KiB) in n's docroot; returns {path: bytes}."""
    rnd = random.Random(14)
    files = {}
    for size in (0, 1, 100, 1023, 1024, 1025, 4095, 4096, 4097, 16383, 16384, 16385,
                 65535, 65536, 65537, 131072 + 7, 300 * 1024):
        data = bytes(rnd.getrandbits(8) for _ in range(size)) if size < 5000 else \
            os.urandom(size)
        p = f"/f{size}.bin"
        write_file(n.docroot + p, data)
        files[p] = data
    write_file(n.docroot + "/index.html", b"<html>megapipe</html>\n")
    files["/"] = b"<html>megapipe</html>\n"
    os.makedirs(n.docroot + "/forbidden", exist_ok=True)
    write_file(n.docroot + "/forbidden/x.bin", b"no")
    os.chmod(n.docroot + "/forbidden", 0o700)  # workers run unprivileged: 403
    return files


STATIC_SERVER = """
server {{
  listen 127.0.0.1:{port} {listen_opts};
  root {root};
  keepalive_requests 1000;
  client_max_body_size 64k;
  large_client_header_buffers 4 1k;
  location = /pid {{ return 200 "$pid\\n"; }}
  location = /echo {{ proxy_pass http://127.0.0.1:{port}/echo-sink; }}
  location = /echo-sink {{ client_max_body_size 8m; return 200 "len=$content_length\\n"; }}
  location = /body {{ client_max_body_size 8m; proxy_pass http://127.0.0.1:{port}/echo-sink; }}
}}
"""


def static_server(engine, port, root=None, listen_opts="", **kw):
    n = Nginx(ARGS.module if engine == "megapipe" else None, engine=engine, docroot=root, **kw)
    n.conf = n.conf.replace("  access_log off;", "  access_log off;\n" + STATIC_SERVER.format(
        port=port, root=n.docroot, listen_opts=listen_opts), 1)
    return n


def requests_pipelined(port, reqs, timeout=10):
    """Send all requests in one write on one connection; read all responses."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(b"".join(reqs))
        f = s.makefile("rb")
        return [read_response(f, r.split(b" ", 1)[0].decode()) for r in reqs]
    finally:
        s.close()


def functional_checks(mp_port, stock_port, files):
    # static files, byte-identical to the files and to stock nginx
    for p, data in files.items():
        st, h, body = http_get(mp_port, p)
        check(st == 200, f"{p}: status {st}")
        check(body == data, f"{p}: body differs ({len(body)} vs {len(data)} bytes)")
        st2, h2, body2 = http_get(stock_port, p)
        check(body2 == body and h.get("content-length") == h2.get("content-length")
              and h.get("etag") == h2.get("etag"), f"{p}: differs from stock")
    # HEAD
    st, h, body = http_get(mp_port, "/f65536.bin", method="HEAD")
    check(st == 200 and h["content-length"] == "65536" and body == b"", "HEAD")
    # keep-alive: several requests on one connection, answered in order
    s = socket.create_connection(("127.0.0.1", mp_port), timeout=10)
    f = s.makefile("rb")
    for p in ("/f100.bin", "/f65537.bin", "/f0.bin", "/f4096.bin", "/pid", "/f16385.bin"):
        s.sendall(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        st, h, body = read_response(f)
        check(st == 200, f"keep-alive {p}: {st}")
        if p in files:
            check(body == files[p], f"keep-alive {p}: body differs")
    s.close()
    # pipelining: 40 requests in one write, mixed sizes, one connection
    paths = [p for p in files if p != "/"] * 2 + ["/nope"] * 6
    random.Random(3).shuffle(paths)
    reqs = [f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths]
    reqs[-1] = reqs[-1].replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    for p, (st, h, body) in zip(paths, requests_pipelined(mp_port, reqs)):
        if p == "/nope":
            check(st == 404, f"pipelined 404: {st}")
        else:
            check(st == 200 and body == files[p], f"pipelined {p}: {st}, {len(body)} B")
    # error pages: same status and same body as stock
    cases = [
        ("GET", "/nope", None, {}),
        ("GET", "/forbidden/x.bin", None, {}),
        ("DELETE", "/f100.bin", None, {}),
        ("POST", "/echo", b"x" * 100000, {}),                       # 413
        ("GET", "/" + "a" * 3000, None, {}),                         # 414
    ]
    for method, path, body, hdr in cases:
        a = http_get(mp_port, path, method=method, body=body, headers=hdr)
        b = http_get(stock_port, path, method=method, body=body, headers=hdr)
        check(a[0] == b[0] and a[2] == b[2], f"{method} {path}: {a[0]} vs stock {b[0]}")
        check(a[0] >= 400, f"{method} {path}: expected an error, got {a[0]}")
    # a malformed request: 400 like stock
    got = []
    for port in (mp_port, stock_port):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GARBAGE\r\n\r\n")
        got.append(read_response(s.makefile("rb")))
        s.close()
    check(got[0][0] == 400 and got[0][0] == got[1][0] and got[0][2] == got[1][2],
          f"malformed request: {got[0][0]} vs stock {got[1][0]}")
    # request bodies: read through the channel, proxied on (small and 2 MiB, chunked too)
    for size in (10, 70000, 2 * 1024 * 1024):
        st, h, body = http_get(mp_port, "/body", method="POST", body=os.urandom(size))
        check(st == 200 and body == f"len={size}\n".encode(), f"POST {size}: {st} {body[:40]!r}")
    s = socket.create_connection(("127.0.0.1", mp_port), timeout=10)
    s.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    st, h, body = read_response(s.makefile("rb"))
    s.close()
    check(st == 200, f"chunked POST: {st}")


def t_load():
    out = subprocess.run(["dpkg", "-S", ngxlib.NGINX], capture_output=True, text=True)
    check(out.returncode == 0 and out.stdout.startswith("nginx"),
          f"{ngxlib.NGINX} is not Debian's packaged binary: {out.stdout}{out.stderr}")
    port = free_port()
    n = static_server("megapipe", port, workers=2)
    n.start()
    try:
        ws = n.wait_workers(2)
        for w in ws:
            with open(f"/proc/{w}/status") as f:
                uid = re.search(r"^Uid:\s+(\d+)", f.read(), re.M).group(1)
            if os.getuid() == 0:
                check(uid != "0", f"worker {w} runs as root")
            fds = [os.readlink(f"/proc/{w}/fd/{x}") for x in os.listdir(f"/proc/{w}/fd")]
            check(any("io_uring" in x for x in fds) or "engine \"epoll\"" in n.log(),
                  f"worker {w} holds no io_uring")
        check(not any("io_uring" in os.readlink(f"/proc/{n.master}/fd/{x}")
                      for x in os.listdir(f"/proc/{n.master}/fd")), "the master holds a ring")
        log = n.log()
        check('using the "megapipe" event method' in log, "megapipe not in use")
        check("channel I/O connections" in log, "listener not on channel I/O")
        st, h, body = http_get(port, "/pid")
        check(st == 200 and int(body) in ws, f"/pid: {st} {body!r}")
        check(not n.problems(), "\n".join(n.problems()))
        check(n.stop(), "nginx did not stop on QUIT")
    finally:
        n.cleanup()


def with_pair(fn, env=None):
    mp_port, stock_port = free_port(), free_port()
    mp = static_server("megapipe", mp_port, env=env)
    files = make_docroot(mp)
    stock = static_server("epoll", stock_port, root=mp.docroot)
    mp.start()
    stock.start()
    try:
        mp.wait_workers(1)
        fn(mp_port, stock_port, files, mp)
        check(not mp.problems(), "\n".join(mp.problems()))
        check(mp.stop(), "nginx did not stop on QUIT")
    finally:
        mp.cleanup()
        stock.cleanup()


def t_functional():
    with_pair(lambda a, b, files, mp: functional_checks(a, b, files))


def t_epoll_engine():
    def run(a, b, files, mp):
        check('engine "epoll"' in mp.log(), "not on the epoll engine")
        functional_checks(a, b, files)
    with_pair(run, env={"MP_ENGINE": "epoll"})


def t_big_file():
    port = free_port()
    n = Nginx(ARGS.module, main="thread_pool tp threads=2;")
    big = os.urandom(12 * 1024 * 1024 + 12345)
    write_file(n.docroot + "/big.bin", big)
    want = hashlib.sha256(big).hexdigest()
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  server {{
    listen 127.0.0.1:{port};
    root {n.docroot};
    location /sf/ {{ alias {n.docroot}/; sendfile on; }}
    location /nosf/ {{ alias {n.docroot}/; sendfile off; }}
    location /aio/ {{ alias {n.docroot}/; sendfile off; aio threads=tp; output_buffers 2 64k; }}
    location /slow/ {{ alias {n.docroot}/; limit_rate 8m; }}
  }}""", 1)
    n.start()
    try:
        n.wait_workers(1)
        for loc in ("/sf/", "/nosf/", "/aio/", "/slow/"):
            t0 = time.time()
            st, h, body = http_get(port, loc + "big.bin")
            check(st == 200 and hashlib.sha256(body).hexdigest() == want,
                  f"{loc}big.bin: {st}, {len(body)} of {len(big)} bytes")
            if loc == "/slow/":
                check(time.time() - t0 > 0.8, "limit_rate not applied")
        # a range request
        st, h, body = http_get(port, "/sf/big.bin", headers={"Range": "bytes=1000000-1999999"})
        check(st == 206 and body == big[1000000:2000000], f"range: {st}")
        # several big downloads at once on one worker
        res = []

        def get():
            res.append(http_get(port, "/sf/big.bin")[2] == big)
        ts = [threading.Thread(target=get) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        check(res == [True] * 4, f"parallel downloads: {res}")
        check(not n.problems(), "\n".join(n.problems()))
        check(n.stop(), "nginx did not stop on QUIT")
    finally:
        n.cleanup()


def t_https():
    port, plain = free_port(), free_port()
    n = Nginx(ARGS.module)
    key, crt = os.path.join(n.dir, "k.pem"), os.path.join(n.dir, "c.pem")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        key, "-out", crt, "-days", "2", "-subj", "/CN=localhost"],
                       capture_output=True)
    check(r.returncode == 0, f"openssl: {r.stderr}")
    os.chmod(key, 0o644)
    small, big = os.urandom(3000), os.urandom(3 * 1024 * 1024 + 7)
    write_file(n.docroot + "/s.bin", small)
    write_file(n.docroot + "/b.bin", big)
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  server {{
    listen 127.0.0.1:{port} ssl;
    listen 127.0.0.1:{plain};
    ssl_certificate {crt};
    ssl_certificate_key {key};
    root {n.docroot};
    keepalive_requests 100;
  }}""", 1)
    n.start()
    try:
        n.wait_workers(1)
        check("channel I/O connections" in n.log() and "readiness connections" in n.log(),
              "expected one channel-I/O and one readiness (TLS) listener")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", port), timeout=15)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            f = s.makefile("rb")
            for p, data in (("/s.bin", small), ("/b.bin", big), ("/s.bin", small)):
                s.sendall(f"GET {p} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                st, h, body = read_response(f)
                check(st == 200 and body == data, f"https {p}: {st}, {len(body)} B")
            s.close()
        # plain HTTP sent to the TLS port: nginx's 400 page (it peeks at the socket first)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        st, h, body = read_response(s.makefile("rb"))
        s.close()
        check(st == 400, f"plain request on TLS port: {st}")
        check(http_get(plain, "/b.bin")[2] == big, "plain listener beside the TLS one")
        check(not n.problems(), "\n".join(n.problems()))
        check(n.stop(), "nginx did not stop on QUIT")
    finally:
        n.cleanup()


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = f"upstream {self.path} conn={id(self.connection)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def t_proxy():
    up_port, port = free_port(), free_port()
    up = ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    th = threading.Thread(target=up.serve_forever, daemon=True)
    th.start()
    n = Nginx(ARGS.module)
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  upstream back {{ server 127.0.0.1:{up_port}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 16m;
    location / {{ proxy_pass http://back; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
    location /buffered/ {{ proxy_pass http://back/; proxy_buffering on; proxy_buffers 4 4k; }}
  }}""", 1)
    n.start()
    try:
        n.wait_workers(1)
        conns = set()
        for i in range(20):
            st, h, body = http_get(port, f"/x{i}")
            check(st == 200 and body.startswith(f"upstream /x{i} ".encode()), f"GET: {st} {body!r}")
            conns.add(body.split(b"conn=")[1])
        check(len(conns) < 20, "upstream keepalive not used")
        for size in (1, 100000, 2 * 1024 * 1024):
            data = os.urandom(size)
            st, h, body = http_get(port, "/post", method="POST", body=data)
            check(st == 200 and body == data, f"POST {size}: {st}, {len(body)} B")
            st, h, body = http_get(port, "/buffered/post", method="POST", body=data)
            check(st == 200 and body == data, f"buffered POST {size}: {st}, {len(body)} B")
        # the upstream goes away: 502 from nginx
        up.shutdown()
        up.server_close()
        st, h, body = http_get(port, "/gone")
        check(st == 502, f"dead upstream: {st}")
        check(not n.problems(), "\n".join(n.problems()))
        check(n.stop(), "nginx did not stop on QUIT")
    finally:
        n.cleanup()


def t_many_connections():
    import resource
    N = 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = N + 1000
    if hard < need:
        print(f"SKIP: RLIMIT_NOFILE hard limit {hard} < {need}")
        sys.exit(77)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    # A response's file stays open until its write completed (docs/nginx.md): with all N
    # requests in one burst, up to N files would be open beside the N connections; the
    # open_file_cache shares one descriptor, as a server with that many clients would.
    n = Nginx(ARGS.module, main=f"worker_rlimit_nofile {need};",
              events=f"worker_connections {N + N // 8 + 100};")  # nginx reuses idle connections below 1/16 free
    n.conf = n.conf.replace("worker_connections 4096;", "")
    write_file(n.docroot + "/i.txt", b"ok\n")
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  open_file_cache max=100;
  server {{ listen 127.0.0.1:{port} backlog=4096; root {n.docroot}; keepalive_timeout 120s; }}""", 1)
    n.start()
    socks = []
    try:
        n.wait_workers(1)
        sel = selectors.DefaultSelector()
        # open all connections first (they all stay open), then one request on each
        for i in range(N):
            for attempt in range(50):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise Fail(f"connect {i} failed")
            socks.append(s)
        for s in socks:
            s.sendall(b"GET /i.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, bytearray())
        done, deadline = 0, time.time() + 60
        while done < N and time.time() < deadline:
            for key, _ in sel.select(timeout=1):
                buf = key.data
                try:
                    d = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                buf += d
                if not d or buf.endswith(b"\r\n\r\nok\n"):
                    check(buf.startswith(b"HTTP/1.1 200") and buf.endswith(b"ok\n"),
                          f"bad response {bytes(buf[:60])!r}")
                    sel.unregister(key.fileobj)
                    done += 1
        check(done == N, f"{done} of {N} responses")
        # all still open: one more request on a few of them (keep-alive after the crowd)
        for s in socks[::1000]:
            s.setblocking(True)
            s.sendall(b"GET /i.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            check(read_response(s.makefile("rb"))[0] == 200, "second request")
        check(not n.problems(), "\n".join(n.problems()))
    finally:
        for s in socks:
            s.close()
        n.cleanup()


def t_timers():
    port = free_port()
    n = Nginx(ARGS.module)
    big = os.urandom(8 * 1024 * 1024)
    write_file(n.docroot + "/big.bin", big)
    write_file(n.docroot + "/i.txt", b"ok\n")
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  server {{ listen 127.0.0.1:{port}; root {n.docroot};
           keepalive_timeout 1s; client_header_timeout 1s; send_timeout 1s;
           reset_timedout_connection on; }}""", 1)
    n.start()
    try:
        n.wait_workers(1)

        def closed_within(s, secs):
            s.settimeout(secs)
            t0 = time.time()
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            except socket.timeout:
                return None
            return time.time() - t0
        # keepalive_timeout: an idle keep-alive connection is closed after about 1 s
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /i.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        check(read_response(s.makefile("rb"))[0] == 200, "first request")
        t = closed_within(s, 5)
        check(t is not None and 0.5 < t < 3, f"keepalive_timeout: closed after {t}")
        s.close()
        # client_header_timeout: half a request line, then silence
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /i.txt HT")
        t = closed_within(s, 5)
        check(t is not None and 0.5 < t < 3, f"client_header_timeout: closed after {t}")
        s.close()
        # send_timeout: a client that stops reading an 8 MiB response; nginx gives up with
        # writes still queued (the handle ends with a write in flight), resets the connection
        # (reset_timedout_connection: SO_LINGER 0, effective when the channel let go of the
        # socket) and stays healthy
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.5)
        check("timed out" in n.log().split("while reading client request headers")[-1],
              "send_timeout not logged")
        got, reset = 0, False
        s.settimeout(5)
        try:
            while True:
                d = s.recv(1 << 20)
                if not d:
                    break
                got += len(d)
        except ConnectionResetError:
            reset = True
        s.close()
        check(reset and got < len(big), f"send_timeout: reset {reset}, {got} B arrived")
        st, h, body = http_get(port, "/big.bin")
        check(st == 200 and body == big, "a request after the timeouts")
        check(not n.problems(), "\n".join(n.problems()))
        check(n.stop(), "nginx did not stop on QUIT")
    finally:
        n.cleanup()


def loadgen(port, seconds, conns=32, txns=1, extra=()):
    return subprocess.Popen([ARGS.loadgen, "-p", str(port), "-m", "http", "-c", str(conns),
                             "-n", str(txns), "-d", str(seconds), "-w", "0", "-T", "5000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result_of(out):
    m = re.search(r"^result (.*)$", out, re.M)
    if not m:
        raise Fail("loadgen printed no result:\n" + out)
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def t_reload():
    port = free_port()
    stock = ARGS.engine == "epoll"
    n = Nginx(None if stock else ARGS.module, engine=ARGS.engine, workers=2)
    write_file(n.docroot + "/index.html", b"reload\n")
    slow = os.urandom(4 * 1024 * 1024)
    write_file(n.docroot + "/slow.bin", slow)
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  server {{ listen 127.0.0.1:{port} reuseport; root {n.docroot};
           location /slow.bin {{ limit_rate 1m; }} }}""", 1)
    n.start()
    try:
        first = n.wait_workers(2)
        lg = loadgen(port, 9, txns=ARGS.txns)
        time.sleep(1)
        for _ in range(3):       # reload: new workers, old ones finish and quit
            n.signal(signal.SIGHUP)
            time.sleep(1.2)
        # binary upgrade: a new master from the same binary, then the old one quits
        old_master = n.master
        n.signal(signal.SIGUSR2)
        deadline = time.time() + 10
        while time.time() < deadline and not os.path.exists(n.pidfile + ".oldbin"):
            time.sleep(0.05)
        check(os.path.exists(n.pidfile + ".oldbin"), "USR2: no new master")
        time.sleep(0.5)
        with open(n.pidfile) as f:
            new_master = int(f.read())
        check(new_master != old_master, "USR2: same master")
        os.kill(old_master, signal.SIGQUIT)
        n.master = new_master
        out = lg.communicate(timeout=60)[0]
        r = result_of(out)
        check(int(r["txns"]) > 1000, f"too little load: {r['txns']} txns")
        bad = int(r["errors"]) + int(r["connect_errors"]) + int(r["timeouts"]) + \
            int(r["proto_errors"])
        check(bad == 0, "failed requests during reload/upgrade:\n" + out)
        check(all(p not in n.workers() for p in first), "old workers still there")
        # QUIT lets an in-flight response finish
        res = []

        def get():
            try:
                res.append(http_get(port, "/slow.bin")[2] == slow)
            except Exception as e:  # noqa: BLE001
                res.append(repr(e))
        t = threading.Thread(target=get)
        t.start()
        time.sleep(0.5)
        clean = n.stop(signal.SIGQUIT, timeout=20)
        t.join()
        check(res == [True], f"download during QUIT: {res}")
        check(clean, "nginx did not stop on QUIT")
        check(not n.problems(), "\n".join(n.problems()))
    finally:
        n.cleanup()


def run_on_cpu(cpu, port, count):
    """pids answering count fresh connections made from a process pinned to cpu."""
    code = f"""
import os, socket, sys
os.sched_setaffinity(0, {{{cpu}}})
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from ngxlib import http_get
print(" ".join(http_get({port}, "/pid")[2].decode().strip() for _ in range({count})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    check(out.returncode == 0, out.stderr)
    return [int(x) for x in out.stdout.split()]


def t_partition():
    if os.cpu_count() < 2:
        print("SKIP: needs 2 CPUs")
        sys.exit(77)
    port = free_port()
    n = Nginx(ARGS.module, workers=2, main="worker_cpu_affinity 01 10;")
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off;
  server {{ listen 127.0.0.1:{port} reuseport; location = /pid {{ return 200 "$pid\\n"; }} }}""", 1)
    n.start()
    try:
        ws = n.wait_workers(2)
        check(n.log().count("(partition, channel I/O connections)") >= 2, "no partitions")
        cpu_of = {}
        for w in ws:
            with open(f"/proc/{w}/status") as f:
                cpu_of[w] = re.search(r"^Cpus_allowed_list:\s+(\S+)", f.read(), re.M).group(1)
        on0 = run_on_cpu(0, port, 40)
        on1 = run_on_cpu(1, port, 40)
        w0 = [w for w in ws if cpu_of[w] == "0"]
        w1 = [w for w in ws if cpu_of[w] == "1"]
        check(w0 and w1, f"affinity: {cpu_of}")
        share0 = sum(p == w0[0] for p in on0) / len(on0)
        share1 = sum(p == w1[0] for p in on1) / len(on1)
        print(f"connections from CPU 0 served by the CPU-0 worker: {share0:.0%}; "
              f"from CPU 1 by the CPU-1 worker: {share1:.0%}")
        check(share0 >= 0.9 and share1 >= 0.9, f"not split by CPU: {on0} / {on1}")
        check(not n.problems(), "\n".join(n.problems()))
        check(n.stop(), "nginx did not stop on QUIT")
    finally:
        n.cleanup()


TESTS = {"load": t_load, "functional": t_functional, "big_file": t_big_file, "https": t_https,
         "proxy": t_proxy, "many_connections": t_many_connections, "reload": t_reload,
         "partition": t_partition, "epoll_engine": t_epoll_engine, "timers": t_timers}


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("test", choices=sorted(TESTS))
    ap.add_argument("--module", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--engine", default="megapipe", help="reload: epoll = stock nginx")
    ap.add_argument("--txns", type=int, default=1, help="reload: requests per connection")
    ARGS = ap.parse_args()
    ARGS.module = os.path.abspath(ARGS.module)
    ARGS.loadgen = os.path.abspath(ARGS.loadgen)
    if not os.access(ngxlib.NGINX, os.X_OK):
        print(f"SKIP: {ngxlib.NGINX} not installed (scripts/setup.sh --full)")
        return 77
    t0 = time.time()
    try:
        TESTS[ARGS.test]()
    except Fail as e:
        print(f"FAIL {ARGS.test}: {e}")
        return 1
    print(f"PASS {ARGS.test} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
