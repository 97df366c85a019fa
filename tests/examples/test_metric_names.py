"""The chart's alert rules and Grafana dashboard query only metrics that tickd exposes.

The chart is rendered with both turned on, every metric name is read out of the rules'
expressions and the dashboard's queries (tests/helm/promql.py), and each is looked up on the
/metrics of a real tickd after a small workload that makes every series appear: fires acked,
nacked and retried, dead-lettered and dropped, occurrences skipped because a queue is full, a
call refused by the auth file, the auth file reloaded, and TLS on so that the certificate's
expiry is reported. A metric renamed in the code, or misspelt in a query, fails here; so does
a label a query matches on that the metric does not carry.
"""

import json
import re
import queue as queue_module
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import AUTH_FILE, TOKEN, make_pki, start_tickd, stop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "helm"))
sys.path.insert(0, str(ROOT / "examples" / "python"))

from promql import selectors  # noqa: E402
from test_alerts import alerts  # noqa: E402
from test_chart import ALL_ON, manifests, of_kind  # noqa: E402
from test_dashboard import targets  # noqa: E402
from tickd_api import connect, pb  # noqa: E402

# Series Prometheus makes itself for each target, not tickd.
PROMETHEUS_OWN = {"up"}
# Labels Prometheus puts on every series it scrapes (the ServiceMonitor's target labels).
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def chart_queries():
    """(where, PromQL) of every alert rule and dashboard query the chart renders."""
    docs = manifests(ALL_ON)
    for rule in alerts(ALL_ON):
        yield f"alert {rule['alert']}", str(rule["expr"])
    (configmap,) = of_kind(docs, "ConfigMap")
    (text,) = configmap["data"].values()
    for panel, target in targets(json.loads(text)):
        if "expr" in target:
            yield f"panel {panel['title']!r}", target["expr"]


def exposed(metrics_addr):
    """The sample names on tickd's /metrics, each with the label names its series carry."""
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ", 1)[0]
        labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', rest.split("}", 1)[0])) if rest else set()
        found.setdefault(name, set()).update(labels)
    return found


def duration(seconds):
    return {"seconds": int(seconds), "nanos": int(round(seconds % 1 * 1e9))}


def job(queue, **fields):
    return pb.Job(queue=queue, trigger=pb.Trigger(after=duration(0.001)), **fields)


class Stream:
    """A Subscribe stream on `queue` that sends what it is given."""

    def __init__(self, stub, queue):
        self.outbox = queue_module.Queue()
        self.outbox.put(pb.SubscribeRequest(open=pb.SubscribeOpen(queue=queue)))
        self.fires = stub.Subscribe(iter(self.outbox.get, None), timeout=30)

    def next(self):
        return next(self.fires)

    def send(self, request):
        self.outbox.put(request)

    def close(self):
        self.outbox.put(None)
        self.fires.cancel()


@pytest.fixture
def busy_tickd(tmp_path, monkeypatch):
    """tickd over TLS with an auth file, queues capped at one fire, after the workload."""
    make_pki(tmp_path)
    auth = tmp_path / "auth.yaml"
    auth.write_text(AUTH_FILE)
    proc, addr = start_tickd(
        tmp_path / "data", "--tls-cert", tmp_path / "server.crt",
        "--tls-key", tmp_path / "server.key", "--auth-file", auth,
        "--reload-interval", "100ms", "--max-queue-backlog", "1")
    monkeypatch.setenv("TICKD_ADDR", f"https://{addr}")
    monkeypatch.setenv("TICKD_CA_FILE", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("TICKD_TLS_SERVER_NAME", "localhost")
    monkeypatch.delenv("TICKD_CLIENT_CERT", raising=False)
    monkeypatch.delenv("TICKD_CLIENT_KEY", raising=False)
    streams = []
    try:
        monkeypatch.delenv("TICKD_TOKEN", raising=False)
        with pytest.raises(grpc.RpcError) as refused:
            connect().GetJob(pb.GetJobRequest(id="x"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        monkeypatch.setenv("TICKD_TOKEN", TOKEN)
        stub = connect()
        # Acked; nacked once, then acked; nacked on its only attempt, into a dead-letter
        # queue; nacked on its only attempt with none: dropped.
        for name, fields in [
            ("py.ok", {}),
            ("py.retry", {"max_attempts": 2}),
            ("py.dead", {"max_attempts": 1, "dead_letter_queue": "py.dlq"}),
            ("py.drop", {"max_attempts": 1}),
        ]:
            stream = Stream(stub, name)
            # Open until the end: closing it at once could drop a nack not yet sent.
            streams.append(stream)
            stub.Schedule(pb.ScheduleRequest(job=job(name, **fields)), timeout=10)
            fire = stream.next()
            if name != "py.ok":
                stream.send(pb.SubscribeRequest(nack=pb.NackFires(fire_ids=[fire.fire_id])))
            if name == "py.retry":
                fire = stream.next()
            if name in ("py.ok", "py.retry"):
                stream.send(pb.SubscribeRequest(ack=pb.AckFires(fire_ids=[fire.fire_id])))
        # Nobody consumes py.full: its first fire fills it, the next occurrences are skipped.
        stub.Schedule(pb.ScheduleRequest(job=pb.Job(
            queue="py.full",
            trigger=pb.Trigger(every=pb.Interval(period=duration(0.05))))), timeout=10)
        # The auth file changes: read again.
        auth.write_text(AUTH_FILE + "  - name: reader\n    token_sha256: " + "0" * 64
                        + "\n    rules:\n      - {verbs: [read], queues: ['*']}\n")
        yield proc.metrics_addr
    finally:
        for stream in streams:
            stream.close()
        stop(proc)


def test_every_metric_the_chart_queries_is_one_tickd_exposes(busy_tickd):
    used = {}
    matched = {}
    for where, expr in chart_queries():
        for name, matchers in selectors(expr):
            used.setdefault(name, where)
            for label in MATCHER.findall(matchers):
                matched.setdefault((name, label), where)
    # The extraction reads something: the rules and the dashboard use a score of metrics.
    assert len(used) >= 15, sorted(used)
    assert "up" in used and "tickd_queue_backlog" in used and "tickd_health" in used
    assert ("tickd_health", "tickd_health_state") in matched

    wanted = set(used) - PROMETHEUS_OWN
    deadline = time.monotonic() + 20
    while True:
        metrics = exposed(busy_tickd)
        missing = wanted - metrics.keys()
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, "queried by the chart, not exposed by tickd: " + ", ".join(
        f"{name} ({used[name]})" for name in sorted(missing))
    unknown = sorted(
        f"{name}{{{label}}} ({where})"
        for (name, label), where in matched.items()
        if name in metrics and label not in metrics[name] | TARGET_LABELS
    )
    assert not unknown, "the chart matches on labels tickd does not put on these: " + ", ".join(unknown)
