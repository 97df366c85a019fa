"""The Grafana dashboard the chart ships (helm/tickd/dashboards/tickd.json) and the ConfigMap
that hands it to the Grafana sidecar, checked without Grafana.

The queries are read with promql.py and held to the README's metrics table: every selector of a
metric that carries tickd_queue filters on the queue variable, every selector on namespace and
job.
"""

import json
import re
from urllib.parse import unquote

import helm_python as helm
import pytest

from promql import metric_names, selectors
from test_chart import ALL_ON, CHART, ROOT, manifests, of_kind

DASHBOARD = CHART / "dashboards" / "tickd.json"
# Grafana 10.4 to 11.2 write schemaVersion 39; newer Grafanas migrate it up when they load it,
# older ones (before 10.4) would load a dashboard newer than they know.
SCHEMA_VERSION = 39
ON = {"grafanaDashboard": {"enabled": True}}
PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}


def dashboard():
    return json.loads(DASHBOARD.read_text())


def dashboard_configmaps(values):
    return [d for d in of_kind(manifests(values), "ConfigMap") if "tickd.json" in d.get("data", {})]


def panels(board):
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(board):
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield panel, target


def variables(board):
    return {v["name"]: v for v in board["templating"]["list"]}


def readme_metrics():
    """Prometheus name -> set of labels, from the README's metrics table; a histogram also
    under its _bucket, _sum and _count series."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n#", 1)[0]
    metrics = {}
    for name, kind, labels in re.findall(r"^\| `([a-z_]+)` \| (\w+) \|([^|]*)\|", section, re.M):
        label_set = set(re.findall(r"`([a-z_]+)`", labels))
        metrics[name] = label_set
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                metrics[name + suffix] = label_set
    return metrics


def links(panel):
    yield from panel.get("links", [])
    yield from panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])


def test_dashboard_is_off_by_default():
    """No dashboard ConfigMap unless grafanaDashboard.enabled."""
    assert dashboard_configmaps(None) == []


def test_dashboard_configmap_carries_the_json_untemplated():
    """Enabled, the chart renders one ConfigMap in the release's namespace, labelled
    grafana_dashboard: "1" for the sidecar, whose tickd.json is the file byte for byte (Helm does
    not template it, so the "{{tickd_queue}}" legends survive) and parses as JSON."""
    (configmap,) = dashboard_configmaps(ON)
    assert configmap["metadata"]["namespace"] == "scheduling"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/name"] == "tickd"
    assert "annotations" not in configmap["metadata"]
    text = configmap["data"]["tickd.json"]
    assert text == DASHBOARD.read_text().rstrip("\n")
    assert "{{tickd_queue}}" in text
    assert json.loads(text)["uid"] == "tickd"


def test_dashboard_label_annotations_and_namespace_can_be_set():
    """label and labelValue name the sidecar's label, annotations (a folder) are passed on,
    namespace puts the ConfigMap into Grafana's namespace; a numeric labelValue from --set is
    rendered as a string."""
    values = {
        "grafanaDashboard": {
            "enabled": True,
            "label": "example.com/dashboard",
            "labelValue": "tickd",
            "annotations": {"grafana_folder": "Scheduling"},
            "namespace": "monitoring",
        }
    }
    (configmap,) = dashboard_configmaps(values)
    assert configmap["metadata"]["labels"]["example.com/dashboard"] == "tickd"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Scheduling"}
    assert configmap["metadata"]["namespace"] == "monitoring"
    (configmap,) = dashboard_configmaps({"grafanaDashboard": {"enabled": True, "labelValue": 1}})
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboard_configmap_name_stays_within_kubernetes_limits():
    """A 63-character fullnameOverride still gives a valid ConfigMap name."""
    (configmap,) = dashboard_configmaps({**ON, "fullnameOverride": "x" * 63})
    assert len(configmap["metadata"]["name"]) <= 63
    assert configmap["metadata"]["name"].endswith("-dashboard")


@pytest.mark.parametrize(
    "values",
    [
        {"grafanaDashboard": {"enabled": "yes"}},
        {"grafanaDashboard": {"label": "not a label"}},
        {"grafanaDashboard": {"labelValue": "not a value"}},
        {"grafanaDashboard": {"namespace": "Monitoring"}},
        {"grafanaDashboard": {"annotations": {"grafana_folder": 1}}},
        {"grafanaDashboard": {"folder": "tickd"}},
    ],
    ids=["enabled", "label", "label-value", "namespace", "annotation", "unknown"],
)
def test_schema_refuses_bad_dashboard_values(values):
    """values.schema.json refuses a bad label, value, namespace or annotation, and unknown keys."""
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)


def test_all_on_values_include_the_dashboard():
    """The all-on values (linted and validated by test_chart.py) turn the dashboard on."""
    assert dashboard_configmaps(ALL_ON)


def test_dashboard_identity_and_schema_version():
    """uid and title are fixed (links to /d/tickd keep working), the tag is tickd, and the
    schemaVersion is the one chosen: 39, and at least 36 (from which every panel and target
    carries a {type, uid} datasource reference, as here)."""
    board = dashboard()
    assert board["uid"] == "tickd"
    assert board["title"] == "tickd"
    assert board["tags"] == ["tickd"]
    assert board["schemaVersion"] == SCHEMA_VERSION >= 36
    assert "id" not in board or board["id"] is None


def test_dashboard_variables():
    """A Prometheus datasource variable, namespace and job from tickd_info, a multi-value queue
    variable with All, a Tempo datasource variable and the trace service name, whose default is
    the service name tickd reports (src/telemetry/mod.rs)."""
    found = variables(dashboard())
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    assert found["namespace"]["query"]["query"] == "label_values(tickd_info, namespace)"
    assert metric_names(found["job"]["query"]["query"].removeprefix("label_values(")[:-len(", job)")]) == {"tickd_info"}
    queue = found["queue"]
    assert queue["query"]["query"].startswith('label_values(tickd_queue_backlog{namespace="$namespace"')
    assert queue["query"]["query"].endswith(", tickd_queue)")
    assert queue["multi"] is True and queue["includeAll"] is True
    for name in ("namespace", "job", "queue"):
        assert found[name]["datasource"] == PROMETHEUS, name
    assert found["traces"]["type"] == "datasource"
    assert found["traces"]["query"] == "tempo"
    telemetry = (ROOT / "src" / "telemetry" / "mod.rs").read_text()
    (default,) = re.findall(r'DEFAULT_SERVICE_NAME: &str = "([^"]+)"', telemetry)
    assert found["service"]["query"] == found["service"]["current"]["value"] == default


def test_every_query_uses_the_datasource_variable():
    """Every panel and every target queries ${datasource}: the dashboard works with whatever
    the Prometheus data source is called."""
    board = dashboard()
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == PROMETHEUS, panel["title"]
    for panel, target in targets(board):
        assert target["datasource"] == PROMETHEUS, panel["title"]


def test_panels_have_unique_ids_and_a_place():
    """Panel ids are unique, every panel has a gridPos within the 24 columns, and every panel
    but a row has a description saying what to look for."""
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert len(panel.get("description", "")) > 40, panel["title"]


def test_every_selector_filters_namespace_job_and_queue():
    """Every metric selector filters namespace and job; every selector of a metric that carries
    tickd_queue (per the README's table) filters tickd_queue=~"$queue"."""
    queued = {name for name, labels in readme_metrics().items() if "tickd_queue" in labels}
    assert {"tickd_fires_total", "tickd_fire_lateness_seconds_bucket", "tickd_queue_backlog"} <= queued
    for panel, target in targets(dashboard()):
        found = selectors(target["expr"])
        assert found, (panel["title"], target["expr"])
        for name, matchers in found:
            where = (panel["title"], name)
            assert 'namespace = "$namespace"' in matchers, where
            assert 'job = "$job"' in matchers, where
            if name in queued:
                assert 'tickd_queue =~ "$queue"' in matchers, where


def test_every_metric_used_is_documented():
    """Each metric the dashboard queries is in the README's metrics table, so a typo fails
    here."""
    documented = readme_metrics().keys()
    used = set()
    for _, target in targets(dashboard()):
        used |= metric_names(target["expr"])
    assert used - documented == set()


def panel(title):
    (found,) = [p for p in panels(dashboard()) if p["title"] == title]
    return found


def exprs(found):
    return " ".join(t["expr"] for t in found["targets"])


# Title -> metrics its queries must use.
REQUIRED = {
    "Health": {"tickd_health"},
    "Store and version": {"tickd_info"},
    "Certificate expires in": {"tickd_tls_certificate_not_after_seconds"},
    "Auth refusals (time range)": {"tickd_auth_refusals_total"},
    "Fires/s by queue": {"tickd_fires_total"},
    "Fire lateness p50 / p99 by queue": {"tickd_fire_lateness_seconds_bucket"},
    "Backlog by queue": {"tickd_queue_backlog"},
    "In flight by queue": {"tickd_deliveries_in_flight"},
    "Subscribers by queue": {"tickd_queue_subscribers"},
    "Redeliveries/s by queue and reason": {"tickd_redeliveries_total"},
    "Dead letters and drops/s by queue": {"tickd_dead_letters_total", "tickd_fires_dropped_total"},
    "Skipped occurrences/s by queue and reason": {"tickd_occurrences_skipped_total"},
    "RPC calls/s by method": {"rpc_server_call_duration_seconds_count"},
    "RPC errors/s by method and code": {"rpc_server_call_duration_seconds_count"},
    "RPC latency p99 by method": {"rpc_server_call_duration_seconds_bucket"},
    "Commit latency p50 / p99 by pod": {"tickd_store_commit_duration_seconds_bucket"},
    "Commit batch size by pod": {"tickd_store_commit_writes_bucket"},
    "Failing commits/s by pod": {"tickd_store_commit_duration_seconds_count"},
    "Jobs by state": {"tickd_jobs"},
    "Auth refusals/s by reason and principal": {"tickd_auth_refusals_total"},
}


@pytest.mark.parametrize("title", REQUIRED)
def test_each_topic_has_its_panel(title):
    """Each topic of issue 13 has its panel, querying the metric it is about."""
    found = panel(title)
    used = set().union(*(metric_names(t["expr"]) for t in found["targets"]))
    assert REQUIRED[title] <= used


def test_rows_group_the_panels():
    """Rows in order: Overview, Fires & delivery, Failures, API, Store, Security."""
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Fires & delivery", "Failures", "API", "Store", "Security"]


def test_queries_aggregate_as_the_store_reports():
    """With PostgreSQL every replica reports the database-wide backlog, in-flight and job
    counts (max over pods), but only its own subscribers (sum); errors exclude OK; failing
    commits select tickd_commit_ok="false"; quantiles keep le."""
    assert exprs(panel("Backlog by queue")).startswith("max by (tickd_queue) (tickd_queue_backlog{")
    assert exprs(panel("In flight by queue")).startswith("max by (tickd_queue) (tickd_deliveries_in_flight{")
    assert exprs(panel("Jobs by state")).startswith("max by (tickd_job_state) (tickd_jobs{")
    assert exprs(panel("Subscribers by queue")).startswith("sum by (tickd_queue) (tickd_queue_subscribers{")
    assert 'rpc_grpc_status_code!="0"' in exprs(panel("RPC errors/s by method and code"))
    assert 'tickd_commit_ok="false"' in exprs(panel("Failing commits/s by pod"))
    for _, target in targets(dashboard()):
        if "histogram_quantile" in target["expr"]:
            assert re.search(r"by \([a-z_, ]*\ble\)", target["expr"]), target["expr"]
            assert "[$__rate_interval]" in target["expr"]


def test_latency_panels_show_seconds_and_ask_for_no_exemplars():
    """Lateness and RPC latency show seconds. tickd's /metrics carries no exemplars (the
    Prometheus text format), so no query asks for them: the trace links below are searches."""
    for title in ("Fire lateness p50 / p99 by queue", "RPC latency p99 by method"):
        found = panel(title)
        assert found["fieldConfig"]["defaults"]["unit"] == "s"
    assert not any(t.get("exemplar") for _, t in targets(dashboard()))


SAMPLE = {
    "${traces}": "tempo",
    "${__from}": "1700000000000",
    "${__to}": "1700003600000",
    "${service:percentencode}": "tickd",
    "${__field.labels.tickd_queue}": "emails",
    "${__field.labels.rpc_service}": "tickd.v1.Scheduler",
    "${__field.labels.rpc_method}": "Schedule",
    "${__value.raw}": "0.25",
}


def test_trace_links_open_explore_on_the_traces_datasource():
    """Every panel or data link opens Grafana Explore on ${traces} over the panel's time range
    with a TraceQL query for tickd's service name; with Grafana's variables filled in, the
    panes parameter is valid JSON. The latency panels have such links."""
    count = 0
    for found in panels(dashboard()):
        for item in links(found):
            count += 1
            url = item["url"]
            assert url.startswith("/explore?schemaVersion=1&"), url
            assert item.get("targetBlank") is True
            panes = unquote(url.split("&panes=", 1)[1])
            for variable, value in SAMPLE.items():
                panes = panes.replace(variable, value)
            assert "${" not in panes, panes
            (pane,) = json.loads(panes).values()
            (query,) = pane["queries"]
            assert pane["datasource"] == query["datasource"]["uid"] == "tempo"
            assert query["datasource"]["type"] == "tempo"
            assert pane["range"] == {"from": "1700000000000", "to": "1700003600000"}
            assert query["query"].startswith('{resource.service.name="tickd"')
            assert "Tempo" in found["description"] or "Tempo" in item["title"]
    assert count >= 8
    for title in ("Fire lateness p50 / p99 by queue", "RPC latency p99 by method"):
        assert list(links(panel(title))), title
