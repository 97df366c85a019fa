"""The chart's alerts (templates/prometheusrule.yaml), checked as Prometheus will run them.

The rules are taken from the rendered chart, never from a copy: `promtool check rules` checks
them and `promtool test rules` runs tests/helm/alerts_test.yaml against them (.ci/promtool
provides promtool). The rest checks what promtool cannot: that every alert has its
annotations, a runbook section and a firing and a quiet test case, and that every expression
selects only the release's own series.
"""

import re
import subprocess

import helm_python as helm
import pytest
import yaml

from test_chart import ALL_ON, CHART, ROOT, manifests, of_kind, render

PROMTOOL = ROOT / ".ci" / "promtool"
UNIT_TESTS = ROOT / "tests" / "helm" / "alerts_test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
ON = {"prometheusRule": {"enabled": True}}
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]


def prometheus_rule(values=None):
    (rule,) = of_kind(manifests(values or ON), "PrometheusRule")
    return rule


def alerts(values=None):
    return [r for g in prometheus_rule(values)["spec"]["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args, cwd):
    """Runs .ci/promtool; its output is the assertion message when it fails."""
    done = subprocess.run(
        [str(PROMTOOL), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def rules_file(tmp_path):
    """The rendered PrometheusRule's spec as a Prometheus rules file."""
    path = tmp_path / "tickd-rules.yaml"
    path.write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False))
    return path


def unit_tests():
    return yaml.safe_load(UNIT_TESTS.read_text())


def test_rendered_rules_pass_promtool_check(rules_file):
    """promtool check rules accepts the rendered rules: PromQL parses, durations and
    templates are valid."""
    out = promtool("check", "rules", rules_file, cwd=rules_file.parent)
    assert f"SUCCESS: {len(alerts())} rules found" in out, out


def test_alerts_pass_their_unit_tests(rules_file):
    """alerts_test.yaml passes against the rendered rules: each alert fires on its series with
    the expected labels and annotations, and stays quiet on its near misses."""
    tests = unit_tests()
    tests["rule_files"] = [rules_file.name]
    path = rules_file.parent / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    promtool("test", "rules", path.name, cwd=rules_file.parent)


def test_every_alert_has_annotations_and_a_severity():
    """Each alert has a summary, a description, a runbook_url and a severity label of
    critical or warning."""
    names = []
    for alert in alerts():
        names.append(alert["alert"])
        annotations = alert["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), (alert["alert"], key)
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
    assert len(names) == len(set(names)), names


def test_descriptions_name_the_pod_or_the_queue():
    """Each description names what is wrong: the pod or the queue (TickdAbsent has no pod:
    it names the release's namespace)."""
    for alert in alerts():
        description = alert["annotations"]["description"]
        if alert["alert"] == "TickdAbsent":
            assert "scheduling" in description
        else:
            assert "$labels.pod" in description or "$labels.tickd_queue" in description, alert["alert"]


def runbook_sections():
    """Alert sections of docs/runbook.md: `## <AlertName>` headings."""
    return re.findall(r"^## (Tickd[A-Za-z]+)$", RUNBOOK.read_text(), re.M)


def test_every_alert_links_to_its_runbook_section_and_every_section_to_an_alert():
    """Each runbook_url is the runbook's URL plus the anchor of a `## <AlertName>` heading in
    docs/runbook.md (GitHub's anchor: the name in lower case), and each such heading belongs
    to an alert."""
    sections = runbook_sections()
    assert len(sections) == len(set(sections)), sections
    anchors = {s.lower(): s for s in sections}
    for alert in alerts():
        url, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert url == DEFAULTS["runbookUrl"], alert["alert"]
        assert anchors.get(anchor) == alert["alert"], (alert["alert"], anchor)
    assert set(sections) == {a["alert"] for a in alerts()}


def test_every_alert_is_tested_firing_and_quiet():
    """alerts_test.yaml has, for every alert, a case where it fires and one where it does not,
    and tests no alert the chart does not have."""
    firing, quiet = set(), set()
    for test in unit_tests()["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "never fired"
    assert names - quiet == set(), "never tested quiet"
    assert (firing | quiet) - names == set(), "not an alert of the chart"


# A metric selector in PromQL: a name, then its matchers if any. Grouping clauses, whose label
# names look alike, are taken out first.
SELECTOR = re.compile(r"\b(up|tickd_[a-z_]+)\b(\{[^}]*\})?")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


@pytest.mark.parametrize(
    "values, job, namespace",
    [(ON, "tickd", "scheduling"), ({**ON, "fullnameOverride": "jobs-scheduler"}, "jobs-scheduler", "scheduling")],
    ids=["release-name", "fullname-override"],
)
def test_every_expression_selects_only_the_release(values, job, namespace):
    """Each metric an expression reads is selected by the release's job (the Service's name,
    which the ServiceMonitor makes the job label) and namespace, so that two releases' alerts
    never see each other's series."""
    (service,) = [s for s in of_kind(manifests(values), "Service") if "clusterIP" not in s["spec"]]
    assert service["metadata"]["name"] == job
    own = f'{{job="{job}", namespace="{namespace}"'
    for alert in alerts(values):
        selectors = SELECTOR.findall(GROUPING.sub("", alert["expr"]))
        assert selectors, alert["alert"]
        for name, matchers in selectors:
            assert matchers.startswith(own), (alert["alert"], name, matchers)


def test_thresholds_come_from_values():
    """latenessP99Seconds, commitP99Seconds, certificateExpiryDays and backlogStandingFor
    reach the expressions."""
    values = {
        "prometheusRule": {
            "enabled": True,
            "latenessP99Seconds": 30,
            "commitP99Seconds": 0.25,
            "certificateExpiryDays": 21,
            "backlogStandingFor": "2h",
        }
    }
    exprs = {a["alert"]: a["expr"] for a in alerts(values)}
    assert exprs["TickdFireLatenessHigh"].endswith("> 30")
    assert exprs["TickdStoreCommitSlow"].endswith("> 0.25")
    assert "< 21 * 86400" in exprs["TickdCertificateExpiring"]
    assert "[2h]" in exprs["TickdQueueBacklogWithoutSubscribers"]
    assert "offset 2h" in exprs["TickdQueueBacklogWithoutSubscribers"]


def test_for_severity_and_runbook_can_be_overridden():
    """`for` and severity overrides apply to the alert they name only, and runbookUrl moves
    every link."""
    values = {
        "prometheusRule": {
            "enabled": True,
            "runbookUrl": "https://wiki.example.com/tickd",
            "for": {"TickdFireLatenessHigh": "30m", "TickdDeadLetters": "15m"},
            "severity": {"TickdDeadLetters": "critical"},
        }
    }
    by_name = {a["alert"]: a for a in alerts(values)}
    defaults = {a["alert"]: a for a in alerts()}
    assert by_name["TickdFireLatenessHigh"]["for"] == "30m"
    assert by_name["TickdDeadLetters"]["for"] == "15m"
    assert "for" not in defaults["TickdDeadLetters"]
    assert by_name["TickdDeadLetters"]["labels"]["severity"] == "critical"
    for name, alert in by_name.items():
        if name not in ("TickdFireLatenessHigh", "TickdDeadLetters"):
            assert alert.get("for") == defaults[name].get("for"), name
            assert alert["labels"] == defaults[name]["labels"], name
        assert alert["annotations"]["runbook_url"] == f"https://wiki.example.com/tickd#{name.lower()}"


def test_queues_without_subscribers_are_left_out_of_the_backlog_alert():
    """queuesWithoutSubscribers excludes matching queues (e.g. dead-letter queues read by
    hand) from TickdQueueBacklogWithoutSubscribers, and from no other alert."""
    values = {"prometheusRule": {"enabled": True, "queuesWithoutSubscribers": ".*-dlq"}}
    by_name = {a["alert"]: a["expr"] for a in alerts(values)}
    assert by_name["TickdQueueBacklogWithoutSubscribers"].count('tickd_queue!~".*-dlq"') == 4
    defaults = {a["alert"]: a["expr"] for a in alerts()}
    for name, expr in by_name.items():
        if name != "TickdQueueBacklogWithoutSubscribers":
            assert expr == defaults[name], name


@pytest.mark.parametrize(
    "values",
    [
        {"prometheusRule": {"severity": {"TickdDwon": "critical"}}},
        {"prometheusRule": {"severity": {"TickdDown": "page"}}},
        {"prometheusRule": {"for": {"TickdDown": "soon"}}},
        {"prometheusRule": {"latenessP99Seconds": "5s"}},
        {"prometheusRule": {"runbookUrl": "docs/runbook.md"}},
        {"prometheusRule": {"labels": {"release": "prometheus"}}},
    ],
    ids=["unknown-alert", "unknown-severity", "bad-for", "threshold-not-a-number", "relative-runbook", "unknown-key"],
)
def test_schema_refuses_bad_rule_values(values):
    """values.schema.json refuses a misspelt alert name, an unknown severity, a bad duration,
    a threshold with a unit, a relative runbook URL and an unknown key."""
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)


def test_rule_is_off_by_default():
    """No PrometheusRule without prometheusRule.enabled (it needs the operator's CRD)."""
    assert DEFAULTS["enabled"] is False
    assert not of_kind(manifests(), "PrometheusRule")
    assert "tickd/templates/prometheusrule.yaml" not in {
        path for path, text in render().items() if text.strip()
    }


def test_additional_labels_reach_the_rule_metadata():
    """additionalLabels are added to the chart's labels on the PrometheusRule, where the
    operator's ruleSelector looks; the all-on values use them."""
    rule = prometheus_rule({"prometheusRule": {"enabled": True, "additionalLabels": {"release": "kube-prom"}}})
    labels = rule["metadata"]["labels"]
    assert labels["release"] == "kube-prom"
    assert labels["app.kubernetes.io/instance"] == "tickd"
    assert rule["metadata"]["name"] == "tickd"
    (all_on,) = of_kind(manifests(ALL_ON), "PrometheusRule")
    assert all_on["metadata"]["labels"]["release"] == "prometheus"

