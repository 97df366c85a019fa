"""The PromQL reader the dashboard and rule tests use to find metric names (promql.py)."""

import pytest

from promql import metric_names, selectors


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("tickd_jobs", {"tickd_jobs"}),
        ('tickd_jobs{tickd_job_state="SCHEDULED"}', {"tickd_jobs"}),
        ("rate(tickd_fires_total[5m])", {"tickd_fires_total"}),
        (
            'histogram_quantile(0.99, sum by (tickd_queue, le) (rate('
            'tickd_fire_lateness_seconds_bucket{namespace="$namespace", tickd_queue=~"$queue"}'
            "[$__rate_interval])))",
            {"tickd_fire_lateness_seconds_bucket"},
        ),
        (
            "sum(rate(x_sum[5m])) without (pod) / sum(rate(x_count[5m])) without (pod)",
            {"x_sum", "x_count"},
        ),
        (
            "a * on (pod) group_left (tickd_version) b",
            {"a", "b"},
        ),
        ("a > bool 0 and b unless c or d", {"a", "b", "c", "d"}),
        ("a offset 1h30m", {"a"}),
        ("a @ start()", {"a"}),
        ("max_over_time(a[1h:5m]) - 1e3 + 0x1F * .5", {"a"}),
        ("tickd_tls_certificate_not_after_seconds - time()", {"tickd_tls_certificate_not_after_seconds"}),
        ('count_values("version", tickd_info) or vector(0)', {"tickd_info"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
        ('{__name__="tickd_jobs", pod="p"}', {"tickd_jobs"}),
        ("topk by (tickd_queue) (3, tickd_queue_backlog)", {"tickd_queue_backlog"}),
        ("sum:recorded:rate5m", {"sum:recorded:rate5m"}),
        ("Inf > NaN", set()),
    ],
)
def test_metric_names_finds_the_selected_metrics(expr, names):
    """metric_names returns the metric selectors as written, and nothing else: no function,
    aggregation, label, keyword, number, duration, string or Grafana variable."""
    assert metric_names(expr) == names


def test_selectors_keep_the_matchers_of_each_metric():
    """selectors pairs each metric with its own matchers, in order."""
    expr = 'a{x="1", y=~"$queue"} / on (x) b{z!="0"} + c'
    assert selectors(expr) == [("a", 'x = "1" , y =~ "$queue"'), ("b", 'z != "0"'), ("c", "")]


def test_unreadable_input_is_refused():
    """An unbalanced bracket is an error, not a silent miss."""
    with pytest.raises(ValueError):
        metric_names("sum(rate(a[5m])")
