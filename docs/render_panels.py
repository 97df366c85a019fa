"""Renders panels of the chart's Grafana dashboard (helm/tickd/dashboards/tickd.json) to
docs/dashboard.png without Grafana: starts a real tickd and a real Prometheus that scrapes it
every second, runs a few minutes of a realistic workload, asks Prometheus for the dashboard's
own PromQL (Grafana's variables filled in) and plots the answers with matplotlib.

    python3 -m venv .ci/.venv && .ci/.venv/bin/pip install -r docs/requirements.txt
    bash .ci/promtool --version      # unpacks Debian's prometheus into .ci/tools/ once
    .ci/.venv/bin/python docs/render_panels.py [--minutes 3] [--out docs/dashboard.png]

TICKD_BIN names the tickd binary (default target/debug/tickd) and PROMETHEUS_BIN the
Prometheus server (default .ci/tools/prometheus/usr/bin/prometheus, else `prometheus` on PATH).
A run takes the workload's minutes plus about 20 s.

The workload: queues `emails` (interval jobs, two workers that ack with the unary Ack, as examples/python/worker.py),
`billing` (interval and a every-5-seconds cron job; its worker nacks some fires and forgets to
ack a few, so there are redeliveries of both reasons and, after three attempts, dead letters in
`billing.dlq`) and `reports` (interval and cron jobs with no subscriber for the first third of
the run, so its backlog grows, then a slow worker drains it). A reader thread calls GetJob and
ListJobs now and then, as a UI would.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import queue as queue_module
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "python"))
sys.path.insert(0, str(ROOT / "tests" / "examples"))

from tickd_api import connect, pb  # noqa: E402
from tickd_process import start_tickd, stop  # noqa: E402

DASHBOARD = ROOT / "helm" / "tickd" / "dashboards" / "tickd.json"

# The panels drawn, by title, in reading order (three rows of two).
PANELS = [
    "Fires/s by queue",
    "Fire lateness p50 / p99 by queue",
    "Backlog by queue",
    "Redeliveries/s by queue and reason",
    "RPC latency p99 by method",
    "Commit latency p50 / p99 by pod",
]

# What the chart's ServiceMonitor would put on each series.
NAMESPACE, JOB, POD = "default", "tickd", "tickd-0"
SCRAPE_SECONDS = 1
STEP_SECONDS = 2

CAPTION = ("rendered from the dashboard's PromQL by docs/render_panels.py against a real tickd "
           "and Prometheus; not a Grafana screenshot")


# ---------------------------------------------------------------------------------------------
# Processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary():
    explicit = os.environ.get("PROMETHEUS_BIN")
    if explicit:
        return explicit
    unpacked = ROOT / ".ci" / "tools" / "prometheus" / "usr" / "bin" / "prometheus"
    if unpacked.exists():
        return str(unpacked)
    found = shutil.which("prometheus")
    if not found:
        sys.exit("no Prometheus: run `bash .ci/promtool --version` or set PROMETHEUS_BIN")
    return found


def start_prometheus(work_dir, metrics_addr):
    """Starts a Prometheus that scrapes `metrics_addr` every second; returns (process, URL)."""
    config = work_dir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s",
                   "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [{
            "job_name": JOB,
            "static_configs": [{
                "targets": [metrics_addr],
                "labels": {"job": JOB, "namespace": NAMESPACE, "pod": POD},
            }],
        }],
    }, indent=2))
    port = free_port()
    log = open(work_dir / "prometheus.log", "w")
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={config}",
         f"--storage.tsdb.path={work_dir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    proc.log_path = work_dir / "prometheus.log"
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"Prometheus did not start:\n{proc.log_path.read_text()[-2000:]}")
        time.sleep(0.2)




# ---------------------------------------------------------------------------------------------
# Workload


def duration(seconds):
    return {"seconds": int(seconds), "nanos": int(round(seconds % 1 * 1e9))}


def every(queue, period, **fields):
    return pb.Job(queue=queue, trigger=pb.Trigger(every=pb.Interval(period=duration(period))),
                  **fields)


def cron(queue, expression, **fields):
    return pb.Job(queue=queue, trigger=pb.Trigger(cron=pb.Cron(expression=expression)),
                  **fields)


def subscribe(stub, queue, stopping, max_in_flight):
    """(fires, outbox): one Subscribe stream on `queue` for the whole run, cancelled when
    `stopping` is set. (A stream closed with fires in flight leaves them to their ack
    deadline, so workers do not reopen theirs.)"""
    outbox = queue_module.Queue()
    outbox.put(pb.SubscribeRequest(open=pb.SubscribeOpen(queue=queue,
                                                         max_in_flight=max_in_flight)))
    fires = stub.Subscribe(iter(outbox.get, None))

    def cancel():
        stopping.wait()
        outbox.put(None)
        fires.cancel()

    threading.Thread(target=cancel, daemon=True).start()
    return fires, outbox


def consume(fires, stopping, handle):
    """Calls `handle(fire)` for each fire until the stream is cancelled at the end."""
    try:
        for fire in fires:
            handle(fire)
    except grpc.RpcError as e:
        if not (stopping.is_set() and e.code() == grpc.StatusCode.CANCELLED):
            raise


def ack_worker(stub, queue, stopping, sleep=(0.005, 0.04)):
    """Acks each fire of `queue` with the unary Ack after a random pause."""
    fires, _ = subscribe(stub, queue, stopping, max_in_flight=10)

    def handle(fire):
        time.sleep(random.uniform(*sleep))
        stub.Ack(pb.AckRequest(queue=queue, fire_ids=[fire.fire_id]), timeout=30)

    consume(fires, stopping, handle)


def flaky_worker(stub, queue, stopping, nack=0.25, forget=0.02):
    """Acks and nacks on the stream: nacks a share of `queue`'s fires (retried after a short
    delay) and never answers a few, whose ack deadline then passes."""
    fires, outbox = subscribe(stub, queue, stopping, max_in_flight=20)

    def handle(fire):
        time.sleep(random.uniform(0.005, 0.03))
        roll = random.random()
        if roll < forget:
            return
        if roll < forget + nack:
            outbox.put(pb.SubscribeRequest(nack=pb.NackFires(
                fire_ids=[fire.fire_id], retry_delay=duration(0.2))))
        else:
            outbox.put(pb.SubscribeRequest(ack=pb.AckFires(fire_ids=[fire.fire_id])))

    consume(fires, stopping, handle)


def reader(stub, job_ids, stopping):
    """Reads jobs now and then, as a UI or a script would."""
    while not stopping.wait(random.uniform(0.5, 1.5)):
        stub.GetJob(pb.GetJobRequest(id=random.choice(job_ids)), timeout=10)
        stub.ListJobs(pb.ListJobsRequest(page_size=20), timeout=10)


def run_workload(addr, seconds):
    stub = connect(addr)
    billing = {"max_attempts": 3, "dead_letter_queue": "billing.dlq",
               "ack_deadline": duration(2)}
    jobs = [
        every("emails", 0.2), every("emails", 0.3), every("emails", 0.5),
        every("billing", 0.25, **billing), every("billing", 0.4, **billing),
        cron("billing", "*/5 * * * * *", **billing),
        every("reports", 0.4), every("reports", 0.5), cron("reports", "*/5 * * * * *"),
    ]
    job_ids = [stub.Schedule(pb.ScheduleRequest(job=j), timeout=10).id for j in jobs]
    # A job scheduled later, as a deploy would add one.
    late_job = every("emails", 0.25)

    stopping = threading.Event()
    threads = []
    errors = []

    def spawn(target, *args):
        def run():
            try:
                target(*args)
            except Exception as e:  # reported after the run; the panels show the rest
                errors.append(f"{target.__name__}{args[1:2]}: {e!r}")
        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)

    spawn(ack_worker, stub, "emails", stopping)
    spawn(ack_worker, stub, "emails", stopping)
    spawn(flaky_worker, stub, "billing", stopping)
    spawn(ack_worker, stub, "billing.dlq", stopping)
    spawn(reader, stub, job_ids, stopping)

    start = time.monotonic()
    print(f"workload: {len(jobs)} jobs on emails, billing, reports; {seconds:.0f} s", flush=True)
    # reports has no subscriber for the first third: its backlog grows; then a slow worker
    # (50-150 ms a fire) drains it. Half way, another emails job is scheduled.
    stopping.wait(seconds / 3)
    print("workload: reports gets a worker", flush=True)
    spawn(ack_worker, stub, "reports", stopping, (0.05, 0.15))
    stopping.wait(max(0.0, start + seconds / 2 - time.monotonic()))
    stub.Schedule(pb.ScheduleRequest(job=late_job), timeout=10)
    stopping.wait(max(0.0, start + seconds - time.monotonic()))
    # The panels end here: what follows is the workers going away, not the workload.
    ended = time.time()
    stopping.set()
    for t in threads:
        t.join(10)
    for e in errors:
        print(f"workload thread failed: {e}", file=sys.stderr)
    return ended


# ---------------------------------------------------------------------------------------------
# Dashboard queries


def panels_by_title():
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    return {p.get("title"): p for p in walk(json.loads(DASHBOARD.read_text())["panels"])}


def fill_variables(expr, range_seconds, rate_interval):
    """Grafana's template variables as this one-pod Prometheus has them."""
    values = {
        "namespace": NAMESPACE, "job": JOB, "queue": ".*", "pod": ".*",
        "__rate_interval": rate_interval, "__interval": f"{STEP_SECONDS}s",
        "__range": f"{int(range_seconds)}s",
    }

    def one(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise ValueError(f"no value for Grafana variable ${name} in {expr}")
        return values[name]

    # $name, ${name} and ${name:format}, [[name]]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", one, expr)


def query_range(url, expr, start, end):
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": f"{STEP_SECONDS}s"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=60) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels, expr):
    if not fmt:
        return expr
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text.strip() or expr


def fetch_panels(url, start, end, rate_interval):
    """[(panel, [(legend, times, values)])] for PANELS."""
    found = panels_by_title()
    missing = [t for t in PANELS if t not in found]
    if missing:
        raise RuntimeError(f"panels not in {DASHBOARD}: {missing}; it has {sorted(found)}")
    out = []
    for title in PANELS:
        panel = found[title]
        series = []
        for target in panel.get("targets", []):
            expr = fill_variables(target["expr"], end - start, rate_interval)
            for result in query_range(url, expr, start, end):
                points = [(float(t), float(v)) for t, v in result["values"]]
                points = [(t, v) for t, v in points if math.isfinite(v)]
                if points:
                    name = legend(target.get("legendFormat", ""), result["metric"], expr)
                    series.append((name, [t for t, _ in points], [v for _, v in points]))
        series.sort(key=lambda s: s[0])
        out.append((panel, series))
    return out


# ---------------------------------------------------------------------------------------------
# Plot

# Grafana's dark theme and classic palette.
BACKGROUND, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9f"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c"]


def format_value(unit):
    """A tick formatter for a Grafana unit."""

    def seconds(v, _pos=None):
        a = abs(v)
        if a == 0:
            return "0"
        if a < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if a < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"

    def short(v, _pos=None):
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:.3g} M"
        if a >= 1e3:
            return f"{v / 1e3:.3g} K"
        return f"{v:.3g}"

    if unit == "s":
        return seconds
    if unit == "reqps":
        return lambda v, p=None: f"{short(v)} req/s"
    return short


def render(panels, out, start):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 10, "text.color": TEXT,
        "axes.labelcolor": MUTED, "xtick.color": MUTED, "ytick.color": MUTED,
        "axes.edgecolor": GRID, "axes.facecolor": PANEL, "figure.facecolor": BACKGROUND,
    })
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(16, 10), dpi=100)
    for ax, (panel, series) in zip(axes.flat, panels):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.set_title(panel["title"], loc="left", fontsize=12, color=TEXT, pad=8)
        ax.grid(True, color=GRID, linewidth=0.6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        # A queue's p50 and p99 share a colour; the p50 (and expiry redeliveries) are dashed.
        colours = {}
        for name, times, values in series:
            stem = re.sub(r" (p50|p99)$", "", name)
            colour = colours.setdefault(stem, PALETTE[len(colours) % len(PALETTE)])
            minutes = [(t - start) / 60 for t in times]
            dashed = name.endswith("p50") or name.endswith("expired")
            ax.plot(minutes, values, color=colour, linewidth=1.4,
                    linestyle="--" if dashed else "-", label=name)
        if not series:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center",
                    color=MUTED, fontsize=14)
        ax.yaxis.set_major_formatter(FuncFormatter(format_value(unit)))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("minutes into the run", fontsize=9)
        if series:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8.5,
                      labelcolor=TEXT, handlelength=1.6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.text(0.01, 0.01, CAPTION, color=MUTED, fontsize=10, style="italic")
    fig.suptitle("tickd dashboard (helm/tickd/dashboards/tickd.json)", x=0.01, ha="left",
                 color=TEXT, fontsize=14)
    fig.tight_layout(rect=(0, 0.025, 1, 0.97), h_pad=1.6, w_pad=1.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=BACKGROUND)
    plt.close(fig)
    # A 256-colour palette keeps the file small; the plot has few colours.
    try:
        from PIL import Image

        Image.open(out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            out, optimize=True)
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="workload length (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--rate-interval", default="15s",
                        help="what $__rate_interval becomes (default 15s)")
    args = parser.parse_args()

    tickd = prometheus = None
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tickd-render-") as tmp:
        tmp = Path(tmp)
        try:
            tickd, addr = start_tickd(tmp / "data")
            metrics_addr = tickd.metrics_addr
            prometheus, url = start_prometheus(tmp, metrics_addr)
            print(f"tickd {addr} (metrics {metrics_addr}), Prometheus {url}", flush=True)
            start = time.time()
            end = run_workload(addr, args.minutes * 60)
            # Scrapes up to `end` are in by now.
            time.sleep(max(0.0, end + 3 * SCRAPE_SECONDS - time.time()))
            panels = fetch_panels(url, start, end, args.rate_interval)
            for panel, series in panels:
                print(f"  {panel['title']}: {len(series)} series", flush=True)
            render(panels, args.out, start)
            print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) "
                  f"in {time.monotonic() - began:.0f} s", flush=True)
        finally:
            for proc in (tickd, prometheus):
                if proc is not None:
                    stop(proc)


if __name__ == "__main__":
    main()
