"""ngxlib.py — run Debian's stock nginx with ngx_megapipe_module in a private prefix.

Used by the tests (ngxtest.py) and the benchmark (bench_nginx.py).  Each server gets its own
temp directory (conf, pid, logs, temp paths), listens on 127.0.0.1 on free ports, runs its
workers as an unprivileged user when started as root, and is stopped by the PIDs it started
(QUIT, then KILL of the master and its workers), also when the caller fails.
"""
import atexit
import os
import re
import shutil
import signal as _sig
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "scripts"))
from mputil import child_pids, pid_alive, proc_cmdline, read_pidfile, wait_exit  # noqa: E402

NGINX = os.environ.get("MP_NGINX_BIN", "/usr/sbin/nginx")
_live = []


def unprivileged_user():
    """(user, group) for worker processes when running as root."""
    import grp
    import pwd
    for u in ("nobody", "www-data"):
        try:
            pw = pwd.getpwnam(u)
            return u, grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            continue
    return None


class Nginx:
    """One nginx master (daemonized) with its own prefix.  engine: 'megapipe' or 'epoll'."""

    def __init__(self, module, engine="megapipe", workers=1, http="", main="", events="",
                 env=None, docroot=None):
        self.module, self.engine = module, engine
        self.dir = tempfile.mkdtemp(prefix="ngx-mp-")
        os.chmod(self.dir, 0o755)
        for d in ("logs", "tmp"):
            os.mkdir(os.path.join(self.dir, d))
            os.chmod(os.path.join(self.dir, d), 0o777)
        self.docroot = docroot or os.path.join(self.dir, "html")
        os.makedirs(self.docroot, exist_ok=True)
        self.pidfile = os.path.join(self.dir, "nginx.pid")
        self.errlog = os.path.join(self.dir, "logs", "error.log")
        self.master = None
        user = ""
        if os.getuid() == 0:
            ug = unprivileged_user()
            if ug:
                user = f"user {ug[0]} {ug[1]};"
        envs = "".join(f"env {k}={v};\n" for k, v in (env or {}).items())
        t = os.path.join(self.dir, "tmp")
        self.conf = f"""
{"load_module " + module + ";" if module else ""}
{user}
worker_processes {workers};
pid {self.pidfile};
error_log {self.errlog} info;
{envs}
{main}
events {{ {"use " + engine + ";" if engine else ""} worker_connections 4096; {events} }}
http {{
  access_log off;
  default_type application/octet-stream;
  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi;
  uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
  {http}
}}
"""
        self.confpath = os.path.join(self.dir, "nginx.conf")

    def start(self):
        with open(self.confpath, "w") as f:
            f.write(self.conf)
        r = subprocess.run([NGINX, "-p", self.dir, "-c", self.confpath],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"nginx failed to start: {r.stderr}\n{self.log()}")
        self.master = read_pidfile(self.pidfile, timeout=10) or None
        if not self.master:
            raise RuntimeError("nginx wrote no pid file\n" + self.log())
        _live.append(self)
        return self

    def workers(self):
        return [p for p in child_pids(self.master) if "worker" in proc_cmdline(p)]

    def wait_workers(self, n, timeout=10, exclude=()):
        deadline = time.time() + timeout
        while time.time() < deadline:
            w = [p for p in self.workers() if p not in exclude]
            if len(w) >= n and all(self._worker_ready(p) for p in w):
                return w
            time.sleep(0.05)
        raise RuntimeError(f"workers not up: {self.workers()}\n" + self.log())

    def _worker_ready(self, pid):
        if self.engine != "megapipe":
            return True
        return f"{pid}#{pid}: megapipe: channel on engine" in self.log()

    def signal(self, sig):
        os.kill(self.master, sig)

    def log(self):
        try:
            with open(self.errlog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def problems(self):
        """Log lines that must not appear: alerts, crashes, emergencies."""
        bad = []
        for line in self.log().splitlines():
            if re.search(r"\[(alert|emerg|crit)\]", line) or "exited on signal" in line:
                bad.append(line)
        return bad

    def stop(self, sig=_sig.SIGQUIT, timeout=15):
        if not self.master:
            return True
        pids = [self.master] + child_pids(self.master)
        try:
            os.kill(self.master, sig)
        except ProcessLookupError:
            pass
        clean = wait_exit(pids, timeout)
        for p in pids:
            if pid_alive(p):
                try:
                    os.kill(p, _sig.SIGKILL)
                except ProcessLookupError:
                    pass
        self.master = None
        if self in _live:
            _live.remove(self)
        return clean

    def cleanup(self):
        self.stop()
        if os.environ.get("NGX_KEEP") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)


@atexit.register
def _stop_all():
    for n in list(_live):
        n.stop(_sig.SIGTERM, timeout=5)


def http_get(port, path, host="127.0.0.1", timeout=30, headers=None, method="GET", body=None):
    """One request on a fresh connection (HTTP/1.1, Connection: close): (status, headers, body)."""
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        h = {"Host": "localhost", "Connection": "close"}
        h.update(headers or {})
        if body is not None:
            h["Content-Length"] = str(len(body))
        req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        s.sendall(req.encode() + b"\r\n" + (body or b""))
        return read_response(s.makefile("rb"), method)
    finally:
        s.close()


def read_response(f, method="GET"):
    line = f.readline()
    if not line:
        raise ConnectionError("no response")
    parts = line.decode().split(" ", 2)
    status = int(parts[1])
    hdrs = {}
    while True:
        line = f.readline().decode()
        if line in ("\r\n", "\n", ""):
            break
        k, v = line.split(":", 1)
        hdrs[k.strip().lower()] = v.strip()
    if method == "HEAD" or status in (204, 304):
        return status, hdrs, b""
    if "content-length" in hdrs:
        n = int(hdrs["content-length"])
        body = f.read(n)
        if len(body) != n:
            raise ConnectionError(f"short body {len(body)}/{n}")
    elif hdrs.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            n = int(f.readline().split(b";")[0], 16)
            if n == 0:
                f.readline()
                break
            body += f.read(n)
            f.readline()
    else:
        body = f.read()
    return status, hdrs, body
