"""A real tickd server for the example tests: the binary that `cargo test` built (or
$TICKD_BIN), on free ports, with a temporary data directory."""

import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tickd_addr(tmp_path_factory):
    binary = os.environ.get("TICKD_BIN", str(ROOT / "target" / "debug" / "tickd"))
    data = tmp_path_factory.mktemp("data")
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--data-dir", str(data)],
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
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(20):
        proc.kill()
        raise RuntimeError("tickd did not log its address")
    try:
        yield addr["value"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
