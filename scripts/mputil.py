"""mputil.py — small helpers the project's Python scripts share (stdlib only).

Benchmarks (bench/, backends/*/bench*, compat/bench_preload.py) and test harnesses
(compat/tests/preload_common.py, backends/nginx/tests/ngxlib.py, ...) import it by path,
relative to their own file:

    sys.path.insert(0, os.path.join(<repo>, "scripts"))
    import mputil

Contents:
  ports      free_port, wait_port                    (127.0.0.1 only)
  processes  stop_proc (a Popen we started: signal, wait, kill), pid_alive, child_pids,
             proc_cmdline, proc_cpu, wait_exit, read_pidfile (from /proc: only look, never
             signal)
  machine    machine_busy, wait_quiet                (other users of a shared machine)
  results    parse_kv, number, find_result, loadgen_result
             (the "result key=value ..." lines of bench/loadgen and bench/mpserver)
"""
import os
import signal
import socket
import subprocess
import time

# ---- ports -------------------------------------------------------------------------------


def free_port(kind=socket.SOCK_STREAM):
    """A port on 127.0.0.1 that nothing is bound to right now (kind: SOCK_STREAM or
    SOCK_DGRAM).  The caller's server binds it soon after; a race with others is possible."""
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=5.0, proc=None, connect_timeout=0.2):
    """Wait up to timeout seconds until a TCP connect to 127.0.0.1:port succeeds: True then,
    False on timeout, or at once when proc (a Popen, optional) has exited."""
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=connect_timeout).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


# ---- processes (/proc) -------------------------------------------------------------------


def stop_proc(p, sig=signal.SIGTERM, timeout=10):
    """Stop a process we started (a Popen): send sig unless it has exited, wait up to timeout
    seconds, then SIGKILL and reap it.  True if it exited by itself."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return False


def _stat_fields(pid):
    """/proc/PID/stat's fields after the command name (field 3, the state, first)."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    return st[st.rindex(")") + 2:].split()


def pid_alive(pid):
    """pid exists and is not a zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def child_pids(pid):
    """The PIDs whose parent is pid (direct children only)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(_stat_fields(d)[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def proc_cmdline(pid):
    """pid's command line, arguments joined by spaces ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_cpu(pid):
    """utime + stime of every thread of pid, in seconds (clock-tick resolution)."""
    v = _stat_fields(pid)
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def wait_exit(pids, timeout=10.0, poll=0.05):
    """Wait up to timeout seconds until none of pids is alive; True when all are gone."""
    end = time.time() + timeout
    while time.time() < end and any(pid_alive(p) for p in pids):
        time.sleep(poll)
    return not any(pid_alive(p) for p in pids)


def read_pidfile(path, timeout=10.0, poll=0.02):
    """The PID a daemon writes to path, waiting up to timeout seconds for it; 0 if none."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            time.sleep(poll)
    return 0


# ---- the machine -------------------------------------------------------------------------


def machine_busy(interval=0.5):
    """CPUs busy (all tasks) over interval seconds, from /proc/stat, scaled to the CPUs this
    process may use."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0), sum(v[:8])
    b0, t0 = sample()
    time.sleep(interval)
    b1, t1 = sample()
    return len(os.sched_getaffinity(0)) * (b1 - b0) / max(1, t1 - t0)


def wait_quiet(limit, threshold=0.2):
    """Before a run on a shared machine: wait (up to limit seconds; none when limit <= 0)
    until the machine uses fewer than threshold CPUs (bench/mpbench.py's QUIET_WAIT rule)."""
    end = time.time() + limit
    while limit > 0 and time.time() < end:
        if machine_busy() < threshold:
            return
        time.sleep(0.5)


# ---- result lines ------------------------------------------------------------------------


def number(v):
    """A result value as mpbench reads it: float when it has '.' or 'e' (and is not hex),
    else int (base prefixes allowed); ValueError when it is neither."""
    return float(v) if any(ch in v for ch in ".e") and not v.startswith("0x") else int(v, 0)


def parse_kv(line, conv=str):
    """'TAG k=v k=v ...' -> {k: conv(v)}: the first word skipped, words without '=' too; a
    value conv rejects (ValueError) is kept as the string."""
    d = {}
    for tok in line.split()[1:]:
        if "=" in tok:
            k, v = tok.split("=", 1)
            try:
                d[k] = conv(v)
            except ValueError:
                d[k] = v
    return d


def find_result(text, tag="result", conv=str):
    """parse_kv of the first line of text that starts with 'TAG '; None when there is none."""
    for line in text.splitlines():
        if line.startswith(tag + " "):
            return parse_kv(line, conv)
    return None


def loadgen_result(out):
    """bench/loadgen's result line from a finished subprocess.run(..., capture_output=True,
    text=True): {key: float} (all but mode); RuntimeError with its output when there is none."""
    r = find_result(out.stdout)
    if r is None:
        raise RuntimeError("loadgen: " + out.stdout[-2000:] + out.stderr[-2000:])
    return {k: float(v) for k, v in r.items() if k != "mode"}
