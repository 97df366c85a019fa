"""The Python example's scripts against a secured tickd, configured only by the environment
variables tickctl reads: TLS with mutual TLS and a bearer token (the round trip, and what
happens without the token, the client certificate or the queue's grant), and a token over
plaintext."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python"


def run(script, *args, env):
    """Runs an example script with only `env`'s TICKD_* settings; returns the finished process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TICKD_")}
    return subprocess.run(
        [sys.executable, script, *args], cwd=EXAMPLE, env={**clean, **env},
        capture_output=True, text=True, timeout=60,
    )


def without(env, *names):
    return {k: v for k, v in env.items() if k not in names}


def test_scheduler_and_worker_over_mutual_tls_with_a_token(mtls_tickd):
    scheduled = run("scheduler.py", "py.tls", "1", env=mtls_tickd.env)
    assert scheduled.returncode == 0, scheduled.stderr
    assert "scheduled" in scheduled.stdout and "py.tls" in scheduled.stdout

    # A bare host:port: TICKD_CA_FILE alone makes it TLS.
    bare = {**mtls_tickd.env, "TICKD_ADDR": mtls_tickd.addr}
    worked = run("worker.py", "py.tls", "1", env=bare)
    assert worked.returncode == 0, worked.stderr
    assert "b'hello from python'" in worked.stdout


def test_without_the_token_calls_are_unauthenticated(mtls_tickd):
    # The client certificate alone names no principal of the auth file.
    refused = run("scheduler.py", "py.tls", env=without(mtls_tickd.env, "TICKD_TOKEN"))
    assert refused.returncode == 1
    assert "refused: UNAUTHENTICATED" in refused.stderr, refused.stderr

    refused = run("worker.py", "py.tls", "1", env=without(mtls_tickd.env, "TICKD_TOKEN"))
    assert refused.returncode == 1
    assert "error: UNAUTHENTICATED" in refused.stderr, refused.stderr


def test_a_queue_not_granted_is_permission_denied(mtls_tickd):
    refused = run("scheduler.py", "payroll", env=mtls_tickd.env)
    assert refused.returncode == 1
    assert "refused: PERMISSION_DENIED" in refused.stderr, refused.stderr
    assert '"payroll"' in refused.stderr


def test_without_the_client_certificate_the_server_refuses_the_connection(mtls_tickd):
    env = without(mtls_tickd.env, "TICKD_CLIENT_CERT", "TICKD_CLIENT_KEY")
    refused = run("scheduler.py", "py.tls", env=env)
    assert refused.returncode == 1
    assert "refused: UNAVAILABLE" in refused.stderr, refused.stderr


def test_a_token_over_plaintext(token_tickd):
    scheduled = run("scheduler.py", "py.plain", "1", env=token_tickd.env)
    assert scheduled.returncode == 0, scheduled.stderr
    worked = run("worker.py", "py.plain", "1", env=token_tickd.env)
    assert worked.returncode == 0, worked.stderr
    assert "b'hello from python'" in worked.stdout

    refused = run("scheduler.py", "py.plain", env=without(token_tickd.env, "TICKD_TOKEN"))
    assert "refused: UNAUTHENTICATED" in refused.stderr, refused.stderr
