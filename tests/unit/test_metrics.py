"""The metrics registry and its text exposition format 0.0.4."""

from __future__ import annotations

import dataclasses

import pytest

from scire_schema import metrics


def test_counters_and_gauges_render_in_the_text_format() -> None:
    registry = metrics.Registry()
    calls = registry.counter("demo_calls_total", "calls by method", ("method", "fault"))
    depth = registry.gauge("demo_depth", "queue depth")
    calls.inc(method="agent.poll", fault="none")
    calls.inc(2, method="agent.poll", fault="none")
    calls.inc(method="admin.job_submit", fault="forbidden")
    depth.set(7)
    assert registry.exposition().decode() == (
        "# HELP demo_calls_total calls by method\n"
        "# TYPE demo_calls_total counter\n"
        'demo_calls_total{method="admin.job_submit",fault="forbidden"} 1\n'
        'demo_calls_total{method="agent.poll",fault="none"} 3\n'
        "# HELP demo_depth queue depth\n"
        "# TYPE demo_depth gauge\n"
        "demo_depth 7\n"
    )
    assert calls.value(method="agent.poll", fault="none") == 3


def test_label_values_and_help_are_escaped() -> None:
    registry = metrics.Registry()
    gauge = registry.gauge("demo_info", 'a "help"\nwith a \\ line', ("name",))
    gauge.set(1.5, name='we"ird\\\nname')
    text = registry.exposition().decode()
    assert '# HELP demo_info a "help"\\nwith a \\\\ line\n' in text
    assert 'demo_info{name="we\\"ird\\\\\\nname"} 1.5\n' in text


def test_special_values() -> None:
    registry = metrics.Registry()
    gauge = registry.gauge("demo_value", "v", ("kind",))
    gauge.replace({("inf",): float("inf"), ("nan",): float("nan"), ("neg",): float("-inf")})
    text = registry.exposition().decode()
    assert 'demo_value{kind="inf"} +Inf' in text
    assert 'demo_value{kind="nan"} NaN' in text
    assert 'demo_value{kind="neg"} -Inf' in text


def test_gauge_replace_drops_label_sets_not_given() -> None:
    gauge = metrics.Gauge("demo_state", "by state", ("state",))
    gauge.replace({("pending",): 2, ("sent",): 1})
    gauge.replace({("sent",): 4})
    assert gauge.value(state="pending") == 0
    assert gauge.value(state="sent") == 4


@dataclasses.dataclass(frozen=True)
class _Stats:
    open_connections: int
    accepted: int


def test_snapshot_collector_reads_dataclasses_and_mappings() -> None:
    registry = metrics.Registry()
    registry.register(
        metrics.SnapshotCollector(
            "demo_listener", lambda: _Stats(3, 40), gauges=("open_connections",)
        )
    )
    registry.register(
        metrics.SnapshotCollector(
            "demo_push", lambda: {"attempts": 5, "failures": 1}, help={"failures": "failed pushes"}
        )
    )
    text = registry.exposition().decode()
    assert "# TYPE demo_listener_open_connections gauge\ndemo_listener_open_connections 3\n" in text
    assert "# TYPE demo_listener_accepted_total counter\ndemo_listener_accepted_total 40\n" in text
    assert "demo_push_attempts_total 5\n" in text
    assert "# HELP demo_push_failures_total failed pushes\n" in text


@pytest.mark.parametrize(
    ("name", "kind"),
    [("bad-name", "gauge"), ("1st", "gauge"), ("calls", "counter"), ("", "gauge")],
)
def test_bad_metric_names_are_refused(name: str, kind: metrics.Kind) -> None:
    with pytest.raises(ValueError):
        metrics.check_name(name, kind)


def test_wrong_labels_and_negative_increments_are_refused() -> None:
    counter = metrics.Counter("demo_total", "d", ("method",))
    with pytest.raises(ValueError, match="takes the labels"):
        counter.inc(fault="x")
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-1, method="m")
    with pytest.raises(ValueError, match="label name"):
        metrics.Gauge("demo_g", "d", ("__reserved",))


def test_a_name_exposed_twice_is_an_error() -> None:
    registry = metrics.Registry()
    registry.gauge("demo_same", "one")
    registry.gauge("demo_same", "two")
    with pytest.raises(ValueError, match="exposed twice"):
        registry.exposition()


def test_a_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    registry = metrics.Registry()
    latency = registry.histogram("rpc_seconds", "call time", ("method",), buckets=(0.01, 0.1, 1))
    for value in (0.005, 0.01, 0.05, 3.0):
        latency.observe(value, method="poll")
    assert latency.count(method="poll") == 4
    assert latency.count(method="report") == 0
    assert registry.exposition().decode() == (
        "# HELP rpc_seconds call time\n"
        "# TYPE rpc_seconds histogram\n"
        'rpc_seconds_bucket{method="poll",le="0.01"} 2\n'
        'rpc_seconds_bucket{method="poll",le="0.1"} 3\n'
        'rpc_seconds_bucket{method="poll",le="1"} 3\n'
        'rpc_seconds_bucket{method="poll",le="+Inf"} 4\n'
        'rpc_seconds_sum{method="poll"} 3.065\n'
        'rpc_seconds_count{method="poll"} 4\n'
    )


def test_a_histogram_refuses_its_own_suffixes_and_label() -> None:
    with pytest.raises(ValueError, match="suffix"):
        metrics.Histogram("rpc_seconds_count", "x")
    with pytest.raises(ValueError, match="'le'"):
        metrics.Histogram("rpc_seconds", "x", ("le",))
    with pytest.raises(ValueError, match="bucket"):
        metrics.Histogram("rpc_seconds", "x", buckets=())
