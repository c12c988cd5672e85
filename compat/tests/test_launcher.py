#!/usr/bin/env python3
"""test_launcher.py MEGAPIPE_RUN — preload.launcher: the launcher's own contract.

Options and exit statuses (usage 2, not found 127, not executable 126, no
preload 1, otherwise the command's own status and pid), what it puts in the environment
(LD_PRELOAD first and only once, LD_LIBRARY_PATH with the build tree's libevent/libuv
directories that exist, MEGAPIPE_VERBOSE/STATS/DISABLE/STREAMS), the preload lookup (--preload,
MEGAPIPE_PRELOAD, next to the launcher), --help's sections; then one real program (python3
with select.epoll) under -v --stats: the preload says it serves epoll and counts the waits,
and under --disable it serves none.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preload_common import *  # noqa: E402,F403

if len(sys.argv) != 2:
    print(__doc__)
    sys.exit(2)
run = os.path.abspath(sys.argv[1])
here_preload = os.path.join(os.path.dirname(run), "libmegapipe-preload.so")
tmp = tmpdir("mprun-launcher-")
checks = 0


def launch(args, env=None, **kw):
    e = dict(os.environ)
    for k in ("MEGAPIPE_PRELOAD", "MEGAPIPE_VERBOSE", "MEGAPIPE_STATS", "MEGAPIPE_DISABLE", "MEGAPIPE_STREAMS",
              "LD_PRELOAD"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([run] + args, capture_output=True, text=True, env=e, timeout=60, **kw)


def check(cond, what, r=None):
    global checks
    if not cond:
        extra = f"\nstatus {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-1500:]}" if r else ""
        fail(what + extra)
    checks += 1


def env_of(r):
    return dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)


# --help, --version, usage errors, --streams.
r = launch(["--help"])
check(r.returncode == 0, "--help exits 0", r)
for word in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "ENVIRONMENT", "EXIT STATUS",
             "EXAMPLES", "LIMITATIONS", "--verbose", "--stats", "--disable", "--preload",
             "--streams", "--no-lib-path", "--version", "MEGAPIPE_DISABLE", "MEGAPIPE_VERBOSE",
             "MEGAPIPE_STATS", "MEGAPIPE_STREAMS", "MEGAPIPE_PRELOAD", "LD_LIBRARY_PATH", "127"):
    check(word in r.stdout, f"--help mentions {word}", r)
lines = r.stdout.splitlines()
i = next(k for k, ln in enumerate(lines) if "LD_LIBRARY_PATH when those directories exist" in ln)
lib_dirs = [lines[i + 2].strip(), lines[i + 3].strip()]  # libevent's, libuv's
r = launch(["--version"])
check(r.returncode == 0 and r.stdout.startswith("megapipe-run "), "--version", r)
for bad in ([], ["--bogus", "true"], ["--preload"], ["-x", "true"]):
    r = launch(bad)
    check(r.returncode == 2 and "usage:" in r.stderr, f"usage error {bad} exits 2 with usage", r)
r = launch(["--streams", "env"])
check(r.returncode == 0 and env_of(r).get("MEGAPIPE_STREAMS") == "1", "--streams sets MEGAPIPE_STREAMS=1", r)
r = launch(["-v", "--streams", "true"])
check(r.returncode == 0 and "megapipe-run: MEGAPIPE_STREAMS=1" in r.stderr, "-v reports MEGAPIPE_STREAMS", r)

# The preload lookup.
check(os.path.exists(here_preload), f"the build put libmegapipe-preload.so next to the launcher "
      f"({here_preload})")
r = launch(["env"])
check(r.returncode == 0 and env_of(r).get("LD_PRELOAD") == os.path.realpath(here_preload),
      "LD_PRELOAD is the preload next to the launcher", r)
fake = os.path.join(tmp, "other-preload.so")
subprocess.run(["cc", "-shared", "-fPIC", "-o", fake, "-x", "c", "/dev/null"], check=True)
r = launch(["env"], env={"MEGAPIPE_PRELOAD": fake, "LD_PRELOAD": "/lib/x-other.so"})
check(env_of(r).get("LD_PRELOAD") == f"{fake}:/lib/x-other.so",
      "MEGAPIPE_PRELOAD is used and put in front of the LD_PRELOAD already set", r)
r = launch(["--preload", here_preload, "env"], env={"MEGAPIPE_PRELOAD": fake})
check(env_of(r).get("LD_PRELOAD") == os.path.realpath(here_preload), "--preload beats MEGAPIPE_PRELOAD", r)
r = launch(["env"], env={"LD_PRELOAD": os.path.realpath(here_preload)})
check(env_of(r).get("LD_PRELOAD") == os.path.realpath(here_preload), "the preload is not added twice", r)
r = launch(["--preload", os.path.join(tmp, "missing.so"), "true"])
check(r.returncode == 1 and "missing.so" in r.stderr, "a missing --preload exits 1", r)
r = launch(["true"], env={"MEGAPIPE_PRELOAD": os.path.join(tmp, "missing.so")})
check(r.returncode == 1, "a missing MEGAPIPE_PRELOAD exits 1 (never silently another)", r)

# LD_LIBRARY_PATH: the build tree's libevent/libuv directories that exist, in front.
r = launch(["env"], env={"LD_LIBRARY_PATH": "/opt/x"})
want = [d for d in lib_dirs if os.path.isdir(d)] + ["/opt/x"]
check(env_of(r).get("LD_LIBRARY_PATH") == ":".join(want),
      f"LD_LIBRARY_PATH is {':'.join(want)} ({lib_dirs} exist: "
      f"{[os.path.isdir(d) for d in lib_dirs]})", r)
r = launch(["--no-lib-path", "env"], env={"LD_LIBRARY_PATH": "/opt/x"})
check(env_of(r).get("LD_LIBRARY_PATH") == "/opt/x", "--no-lib-path leaves LD_LIBRARY_PATH", r)

# The MEGAPIPE_* options, -v's report, options after CMD are CMD's.
r = launch(["-v", "--stats", "--disable", "env"])
e = env_of(r)
check(e.get("MEGAPIPE_VERBOSE") == "1" and e.get("MEGAPIPE_STATS") == "1"
      and e.get("MEGAPIPE_DISABLE") == "1", "-v --stats --disable set MEGAPIPE_*", r)
for what in ("LD_PRELOAD=", "MEGAPIPE_VERBOSE=1", "MEGAPIPE_STATS=1", "MEGAPIPE_DISABLE=1",
             "LD_LIBRARY_PATH", "exec env"):
    check(f"megapipe-run: {what}" in r.stderr, f"-v reports {what}", r)
r = launch(["env"])
e = env_of(r)
check(not any(k in e for k in ("MEGAPIPE_VERBOSE", "MEGAPIPE_STATS", "MEGAPIPE_DISABLE",
                               "MEGAPIPE_STREAMS")),
      "no MEGAPIPE_* without options", r)
r = launch(["sh", "-c", 'echo "$@"', "x", "--stats", "-v", "--", "y"])
check(r.stdout.strip() == "--stats -v -- y", "arguments after CMD are CMD's", r)
r = launch(["--", "sh", "-c", "exit 7"])
check(r.returncode == 7, "CMD's exit status is the launcher's", r)
p = subprocess.Popen([run, "sh", "-c", "echo $$"], stdout=subprocess.PIPE, text=True)
out, _ = p.communicate(timeout=30)
check(out.strip() == str(p.pid), "CMD keeps the launcher's pid (exec)")

# CMD not found / not executable.
r = launch(["no-such-command-megapipe"])
check(r.returncode == 127 and "command not found" in r.stderr, "a missing command exits 127", r)
noexec = os.path.join(tmp, "noexec")
open(noexec, "w").write("#!/bin/sh\n")
os.chmod(noexec, 0o644)
r = launch([noexec])
check(r.returncode == 126, "a non-executable command exits 126", r)

# A real program under the preload: python3's select.epoll, two waits that time out and
# one that sees a readable pipe.
prog = ("import os, select\n"
        "ep = select.epoll(); r, w = os.pipe(); ep.register(r, select.EPOLLIN)\n"
        "assert ep.poll(0.01) == [] and ep.poll(0.01) == []\n"
        "os.write(w, b'x'); ev = ep.poll(1)\n"
        "assert ev == [(r, select.EPOLLIN)], ev\n"
        "print('ok')\n")
r = launch(["-v", "--stats", sys.executable, "-c", prog])
check(r.returncode == 0 and r.stdout.strip() == "ok", "python3 select.epoll under the preload", r)
check("epoll served by io_uring channel" in r.stderr,
      "MEGAPIPE_VERBOSE: the preload says epoll is served by an io_uring channel", r)
waits = check_activity(r.stderr, False, "launcher: python3 select.epoll")
check(sum(waits.values()) >= 3, f"the preload counted the 3 waits: {waits}", r)
r = launch(["-v", "--stats", "--disable", sys.executable, "-c", prog])
check(r.returncode == 0 and r.stdout.strip() == "ok", "python3 select.epoll with --disable", r)
check("epoll served by io_uring channel" not in r.stderr, "--disable: the preload steps aside", r)
check_activity(r.stderr, True, "launcher: python3 select.epoll --disable")
log(f"PASS: launcher ({checks} checks)")
