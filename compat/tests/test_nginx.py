#!/usr/bin/env python3
"""test_nginx.py [--disable] MEGAPIPE_RUN — preload.nginx.

Debian's stock /usr/sbin/nginx, unmodified, stock `epoll` event method, a master and 2
workers, started by megapipe-run --stats with a config in a temp prefix (ngxlib.py of
backends/nginx/tests, listening on 127.0.0.1:PORT).  Checks, with curl:
  * GETs of small files byte for byte, a 404;
  * keep-alive: one curl with 5 URLs makes one connection (num_connects 1, then 0s);
  * a 12 MiB file, SHA-256 identical, 4 downloads at once;
  * 200 concurrent keep-alive connections, 3 requests each (python http.client);
  * graceful stop with `nginx -s quit`: master and workers gone, no process left, no alert;
  * both workers' epoll waits served by the preload (MEGAPIPE_STATS lines in the error log,
    where nginx sends its stderr; none with --disable).
nginx clears its workers' environment: the config keeps MEGAPIPE_STATS (and
MEGAPIPE_DISABLE) with `env` directives.
"""
import concurrent.futures
import hashlib
import http.client
import os
import shutil
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "..", "backends", "nginx", "tests"))
from preload_common import *  # noqa: E402,F403
import ngxlib  # noqa: E402

NGINX = ngxlib.NGINX  # MP_NGINX_BIN or /usr/sbin/nginx
disabled, args = parse_args(1, __doc__)
launcher = os.path.abspath(args[0])
if not os.access(NGINX, os.X_OK):
    skip(f"no {NGINX} (scripts/setup.sh --full installs Debian's nginx)")
CURL = shutil.which("curl")
if not CURL:
    skip("no curl (scripts/setup.sh --full installs it)")
tag = "nginx" + (" --disable" if disabled else "")

# ngxlib starts "NGINX -p DIR -c CONF": make that the launcher with the stock binary.
tmp = tmpdir("mprun-nginx-run-")
wrapper = os.path.join(tmp, "nginx-preload")
flags = "--stats --no-lib-path" + (" --disable" if disabled else "")
with open(wrapper, "w") as f:
    f.write(f'#!/bin/sh\nexec "{launcher}" {flags} "{NGINX}" "$@"\n')
os.chmod(wrapper, 0o755)
ngxlib.NGINX = wrapper

port = free_port()
env = {"MEGAPIPE_STATS": "1"}
if streams_mode():
    env["MEGAPIPE_STREAMS"] = "1"
if disabled:
    env["MEGAPIPE_DISABLE"] = "1"
ngx = ngxlib.Nginx(None, engine="epoll", workers=2, env=env,
                   http=f"server {{ listen 127.0.0.1:{port}; root {{DOCROOT}}; "
                        f"keepalive_requests 1000; }}")
ngx.conf = ngx.conf.replace("{DOCROOT}", ngx.docroot)
rng = random.Random(5)
files = {"index.html": b"<html>megapipe-run</html>\n", "small.bin": payload(rng, 3000),
         "mid.bin": payload(rng, 200000), "big.bin": payload(rng, 12 << 20)}
for name, data in files.items():
    path = os.path.join(ngx.docroot, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
try:
    ngx.start()
    master = ngx.master
    track_pid(master)
    workers = ngx.wait_workers(2)
    for w in workers:
        track_pid(w)
    wait_port(port)
    base = f"http://127.0.0.1:{port}"
    log(f"{tag}: {wrapper} (megapipe-run {flags} {NGINX}): master {master}, workers {workers}, "
        f"port {port}")

    def curl(*a, timeout=60):
        return subprocess.run([CURL, "-sS", "--max-time", str(timeout)] + list(a),
                              capture_output=True, timeout=timeout + 10)

    for name in ("index.html", "small.bin", "mid.bin"):
        r = curl(f"{base}/{name}")
        if r.returncode != 0 or r.stdout != files[name]:
            fail(f"{tag}: GET /{name}: curl status {r.returncode}, {len(r.stdout)} bytes "
                 f"({len(files[name])} expected) {r.stderr.decode()[-300:]}")
    r = curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/missing")
    if r.stdout != b"404":
        fail(f"{tag}: GET /missing: {r.stdout!r}, 404 expected")
    log(f"{tag}: GETs byte-identical, 404 for a missing file")

    # Keep-alive: 5 URLs on one curl; every transfer after the first reuses the connection.
    urls = [f"{base}/{n}" for n in ("index.html", "small.bin", "mid.bin", "index.html", "small.bin")]
    outs = [os.path.join(tmp, f"ka{i}") for i in range(5)]
    a = []
    for u, o in zip(urls, outs):
        a += ["-o", o, u]
    r = curl("-w", "%{num_connects} %{http_code}\n", *a)
    lines = r.stdout.decode().split()
    if r.returncode != 0 or lines[0::2] != ["1", "0", "0", "0", "0"] or set(lines[1::2]) != {"200"}:
        fail(f"{tag}: keep-alive: curl status {r.returncode}, connects/status {lines} "
             f"(1 0 0 0 0, all 200 expected) {r.stderr.decode()[-300:]}")
    for u, o in zip(urls, outs):
        if open(o, "rb").read() != files[u.rsplit("/", 1)[1]]:
            fail(f"{tag}: keep-alive: {u} differs")
    log(f"{tag}: keep-alive: 5 requests on one connection (num_connects 1 0 0 0 0)")

    # The 12 MiB file, 4 downloads at once.
    want = hashlib.sha256(files["big.bin"]).hexdigest()

    def big(i):
        out = os.path.join(tmp, f"big{i}")
        r = curl("-o", out, f"{base}/big.bin")
        h = hashlib.sha256(open(out, "rb").read()).hexdigest() if r.returncode == 0 else None
        os.unlink(out) if os.path.exists(out) else None
        return r.returncode, h

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        res = list(ex.map(big, range(4)))
    if any(rc != 0 or h != want for rc, h in res):
        fail(f"{tag}: 12 MiB file: {res} (sha256 {want} expected)")
    log(f"{tag}: 12 MiB file x4 at once, sha256 identical")

    # 200 keep-alive connections at once, 3 requests each.
    def client(i):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for name in ("index.html", "small.bin", "mid.bin"):
                c.request("GET", "/" + name)
                resp = c.getresponse()
                body = resp.read()
                if resp.status != 200 or body != files[name]:
                    return f"conn {i}: /{name}: {resp.status}, {len(body)} bytes"
        finally:
            c.close()
        return None

    errs = concurrent_errors(client, 200)
    if errs:
        fail(f"{tag}: concurrent keep-alive: {errs[:5]}")
    log(f"{tag}: 200 concurrent keep-alive connections x 3 requests")

    # Graceful stop, by nginx's own signal command.
    pids = [master] + children(master)
    r = subprocess.run([NGINX, "-p", ngx.dir, "-c", ngx.confpath, "-s", "quit"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        fail(f"{tag}: nginx -s quit: {r.returncode} {r.stderr}")
    wait_exit(pids, timeout=20)
    left = [p for p in pids if alive(p)]
    if left:
        fail(f"{tag}: processes left after nginx -s quit: {left}")
    ngx.master = None
    log(f"{tag}: nginx -s quit: master and workers {pids} gone")
    text = ngx.log()
    bad = ngx.problems()
    if bad:
        fail(f"{tag}: error log: {bad[:5]}")
    waits = check_activity(text, disabled, tag, min_procs=2)
    if not disabled and not all(waits.get(w, 0) > 0 for w in workers):
        fail(f"{tag}: not every worker {workers} had its epoll waits served: {waits}")
    log(f"PASS: {tag}")
finally:
    ngx.cleanup()
