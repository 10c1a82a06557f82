"""A Postgres of the benchmark's own, configured as an operator would for this machine.

The shared test server keeps initdb's defaults (128 MB of shared buffers, checkpoints every
1 GB of WAL), sized for a laptop: a drain of a few hundred thousand records outgrows its buffers
and spends its CPU evicting pages and writing checkpoints. The benchmark's server gets a
production sizing instead. Durability is untouched: fsync and synchronous commit stay on, so a
batch acknowledged to a proxy is on disk, as in production.
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# A quarter of memory would be the usual rule; 2 GB is ample for what a run writes.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "shared_buffers": "2GB",
    "wal_buffers": "64MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "fsync": "on",
    "synchronous_commit": "on",
}


def start(port, pin=None):
    """Starts a fresh Postgres on `port` (trust auth, user `postgres`); returns (process, data
    dir), or (None, data dir) if it did not become ready. `pin`: a taskset core list."""
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    # Postgres will not run as root; its data lives where the postgres user can reach it.
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="tokn-bench-pg-"))
    if as_pg:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(as_pg + [str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = [arg for name, value in SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    proc = subprocess.Popen(
        (["taskset", "-c", pin] if pin else []) + as_pg
        + [str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data)] + settings,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
            return proc, data
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    return None, data
