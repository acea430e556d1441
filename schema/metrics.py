"""A small metrics registry and the Prometheus text exposition format 0.0.4.

Why not ``prometheus-client``: Scire needs counters and gauges with labels,
collectors that read numbers other objects already keep, and the text format;
that is this page, with no global registry and no new dependency.

Two kinds of metric:

* :class:`Counter` and :class:`Gauge` are owned by the code that counts
  (``inc``, ``set``), safe from any thread;
* a *collector* is any object with ``collect() -> Iterable[Family]``, asked at
  each scrape. :class:`SnapshotCollector` turns an object's ``snapshot()`` (a
  mapping or a dataclass of numbers, such as ``Listener.stats()``) into one
  family per field, so a module that already counts need not know this one.

Counters are named ``..._total``; a family's samples are written in the order
of their label values, so the output is stable.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol

#: The Content-Type of :meth:`Registry.exposition`.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge"]
Labels = tuple[tuple[str, str], ...]

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Sample:
    labels: Labels
    value: float


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
            lines.append(f"{family.name}{_labels(sample.labels)} {_number(sample.value)}")
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
