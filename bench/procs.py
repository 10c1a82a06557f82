"""Processes the benchmarks start and watch: waiting for a port, CPU and memory from /proc.
Shared by run.py, drain.py and scale.py."""
import os
import socket
import time
import urllib.request
from pathlib import Path


def wait_port(port, timeout_s=60.0, proc=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def tree_pids(pid):
    """The process and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ns(pid):
    """CPU time of a process tree in nanoseconds (per-thread schedstat: ns resolution)."""
    total = 0
    for p in tree_pids(pid):
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                total += int(Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            pass
    return total


def rss_kib(pid):
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid):
    """User + system CPU of one process, from /proc/PID/stat (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spool_empty(metrics_port):
    """Whether the proxy whose metrics are on `metrics_port` holds no unshipped usage (its
    spool's bytes are 0): every record it wrote is in the ledger."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return any(line.split()[-1] == "0" for line in text.splitlines()
               if line.startswith("tokn_usage_spool_bytes "))
