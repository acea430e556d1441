"""A small metrics registry and the Prometheus text exposition format 0.0.4.

Why not ``prometheus-client``: Scire needs counters, gauges and histograms
with labels, collectors that read numbers other objects already keep, and the
text format; that is this page, with no global registry and no new dependency
(docs/ARCHITECTURE.md, "Metrics", records the decision).

Two kinds of metric:

* :class:`Counter`, :class:`Gauge` and :class:`Histogram` are owned by the
  code that counts (``inc``, ``set``, ``observe``), safe from any thread;
* a *collector* is any object with ``collect() -> Iterable[Family]``, asked at
  each scrape. :class:`SnapshotCollector` turns an object's ``snapshot()`` (a
  mapping or a dataclass of numbers, such as ``Listener.stats()``) into one
  family per field, so a module that already counts need not know this one.

Counters are named ``..._total``; a family's samples are written in the order
of their label values, so the output is stable.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol

#: The Content-Type of :meth:`Registry.exposition`.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Sample:
    labels: Labels
    value: float
    #: Added to the family's name: a histogram's ``_bucket``, ``_sum`` and ``_count``.
    suffix: str = ""


@dataclasses.dataclass(frozen=True)
class Family:
    """One metric family as it is written: name, kind, help and samples."""

    name: str
    kind: Kind
    help: str
    samples: tuple[Sample, ...]

    def __post_init__(self) -> None:
        check_name(self.name, self.kind)
        for sample in self.samples:
            for label, _ in sample.labels:
                check_label(label)


class Collector(Protocol):
    """Anything asked for its families at each scrape."""

    def collect(self) -> Iterable[Family]: ...


def check_name(name: str, kind: Kind) -> None:
    """Refuse a name Prometheus would not parse, and a counter not named ``_total``."""
    if not _METRIC_NAME.match(name):
        raise ValueError(f"metric name {name!r} is not valid")
    if kind == "counter" and not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    if kind == "histogram" and name.endswith(("_total", "_bucket", "_sum", "_count")):
        raise ValueError(f"histogram {name!r} must not end in a suffix its samples add")


def check_label(label: str) -> None:
    if not _LABEL_NAME.match(label) or label.startswith("__"):
        raise ValueError(f"label name {label!r} is not valid")


class _Metric:
    kind: Kind

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        check_name(name, self.kind)
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        for label in self.labelnames:
            check_label(label)
        self._lock = threading.Lock()
        self._values: dict[Labels, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def _key(self, labels: Mapping[str, object]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes the labels ({', '.join(self.labelnames)}), "
                f"not ({', '.join(sorted(labels))})"
            )
        return tuple((name, str(labels[name])) for name in self.labelnames)

    def value(self, **labels: object) -> float:
        """The current value for these labels (0 when never touched)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def collect(self) -> Iterable[Family]:
        with self._lock:
            samples = tuple(Sample(k, v) for k, v in sorted(self._values.items()))
        yield Family(self.name, self.kind, self.help, samples)


class Counter(_Metric):
    """A number that only goes up, per combination of label values."""

    kind: Kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """A number that goes up and down, per combination of label values."""

    kind: Kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Set every sample at once: label values (in ``labelnames`` order) -> value.
        Label combinations not given are dropped (a state nothing is in any more)."""
        fresh: dict[Labels, float] = {}
        for label_values, value in values.items():
            if len(label_values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label value(s)")
            fresh[tuple(zip(self.labelnames, label_values, strict=True))] = float(value)
        with self._lock:
            self._values = fresh


#: Seconds from 1 ms to 10 s: a call answered from memory to one stuck on a busy database.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """How observed values fall into cumulative buckets (``le``), with their sum
    and count, per combination of label values."""

    kind: Kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        check_name(name, self.kind)
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        for label in self.labelnames:
            check_label(label)
            if label == "le":
                raise ValueError(f"{name}: 'le' is the histogram's own label")
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets or len(set(self.buckets)) != len(self.buckets):
            raise ValueError(f"{name}: give distinct bucket bounds")
        self._lock = threading.Lock()
        #: label values -> (count per bucket, not cumulative, plus +Inf; sum)
        self._values: dict[Labels, tuple[list[int], float]] = {}

    def _key(self, labels: Mapping[str, object]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes the labels ({', '.join(self.labelnames)}), "
                f"not ({', '.join(sorted(labels))})"
            )
        return tuple((name, str(labels[name])) for name in self.labelnames)

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._values.get(key) or ([0] * (len(self.buckets) + 1), 0.0)
            counts[slot] += 1
            self._values[key] = (counts, total + value)

    def count(self, **labels: object) -> int:
        """How many values were observed with these labels."""
        with self._lock:
            found = self._values.get(self._key(labels))
            return sum(found[0]) if found else 0

    def collect(self) -> Iterable[Family]:
        with self._lock:
            values = sorted((k, (list(c), t)) for k, (c, t) in self._values.items())
        samples: list[Sample] = []
        bounds = [*(_number(b) for b in self.buckets), "+Inf"]
        for labels, (counts, total) in values:
            running = 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                samples.append(Sample((*labels, ("le", bound)), running, "_bucket"))
            samples.append(Sample(labels, total, "_sum"))
            samples.append(Sample(labels, running, "_count"))
        yield Family(self.name, self.kind, self.help, tuple(samples))


class SnapshotCollector:
    """The numbers of ``snapshot()`` as families ``{prefix}_{field}``.

    ``snapshot`` returns a mapping of field name to number, or a dataclass
    whose fields are numbers. Fields named in ``gauges`` are gauges; the
    others are counters, written as ``{prefix}_{field}_total``. ``help`` gives
    a field its help text (default: the field name in words).
    """

    def __init__(
        self,
        prefix: str,
        snapshot: Callable[[], Any],
        *,
        gauges: Iterable[str] = (),
        help: Mapping[str, str] | None = None,
    ) -> None:
        self.prefix = prefix
        self.snapshot = snapshot
        self.gauges = frozenset(gauges)
        self.help = dict(help or {})

    def collect(self) -> Iterable[Family]:
        values = self.snapshot()
        if dataclasses.is_dataclass(values) and not isinstance(values, type):
            values = dataclasses.asdict(values)
        if not isinstance(values, Mapping):
            raise TypeError(f"{self.prefix}: snapshot() gave {type(values).__name__}")
        for field, value in values.items():
            kind: Kind = "gauge" if field in self.gauges else "counter"
            name = f"{self.prefix}_{field}" + ("_total" if kind == "counter" else "")
            text = self.help.get(field, field.replace("_", " "))
            yield Family(name, kind, text, (Sample((), float(value)),))


class Registry:
    """The metrics one program exposes: its own counters and gauges, and collectors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        metric = Counter(name, help, labelnames)
        self.register(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        metric = Gauge(name, help, labelnames)
        self.register(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help, labelnames, buckets)
        self.register(metric)
        return metric

    def collect(self) -> list[Family]:
        """Every family, in registration order; a name given twice is an error."""
        with self._lock:
            collectors = list(self._collectors)
        families: list[Family] = []
        seen: set[str] = set()
        for collector in collectors:
            for family in collector.collect():
                if family.name in seen:
                    raise ValueError(f"metric {family.name} is exposed twice")
                seen.add(family.name)
                families.append(family)
        return families

    def exposition(self) -> bytes:
        """Every family in the text format 0.0.4."""
        return render(self.collect())


def render(families: Iterable[Family]) -> bytes:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            lines.append(
                f"{family.name}{sample.suffix}{_labels(sample.labels)} {_number(sample.value)}"
            )
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape_value(value)}"' for name, value in labels)
    return "{" + inner + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
