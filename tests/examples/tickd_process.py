"""Starts and stops a real tickd for the example tests and docs/render_panels.py (standard
library only): the binary that `cargo build` made, or $TICKD_BIN, on free ports."""

import os
import re
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_tickd(data_dir, *args):
    """Starts tickd with `args`; returns (process, address it serves on). The process's
    `metrics_addr` is where it serves /metrics. Its output is read to the end, so that tickd
    never blocks on a full pipe."""
    binary = os.environ.get("TICKD_BIN", str(ROOT / "target" / "debug" / "tickd"))
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--data-dir", str(data_dir), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TICKD_LOG": "info", "TICKD_LOG_FORMAT": "text"},
    )
    found = threading.Event()
    addr = {}

    def read():
        for line in proc.stdout:
            m = re.search(r"\baddr=(\S+)", line)
            if m and not found.is_set():
                addr["value"] = m.group(1)
                metrics = re.search(r"\bmetrics_addr=(\S+)", line)
                proc.metrics_addr = metrics and metrics.group(1)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(20):
        proc.kill()
        raise RuntimeError(f"{binary} {' '.join(map(str, args))} did not log its address")
    return proc, addr["value"]


def stop(proc):
    """Stops tickd with SIGTERM (its ordered shutdown), killing it after 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
