"""Counters and gauges in the Prometheus text format, and a Sans-I/O HTTP responder.

Why not prometheus-client: our daemons run one single-threaded event loop
and need only counters and gauges. prometheus-client brings locks, its own
HTTP server thread and process-wide global state; this module is a few
dozen lines of dicts, and the HTTP side is a pure bytes-in/bytes-out object
the daemon drives from its own loop (like every other codec here).

Format reference: "Exposition formats", text format 0.0.4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "MAX_REQUEST_SIZE",
    "Counter",
    "Gauge",
    "Registry",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_SIZE = 8192

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Metric:
    """A named family of samples, one per combination of label values."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        labelnames = tuple(labelnames)
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names in {labelnames!r}")
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def _key(self, labels: dict[str, Any]) -> tuple[str, ...]:
        if labels.keys() != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def value(self, **labels: Any) -> float:
        """Current value for these label values (0 if never set)."""
        return self._values.get(self._key(labels), 0.0)

    def remove(self, **labels: Any) -> None:
        """Forget one labelled sample (e.g. a peer that went away)."""
        if self.labelnames:
            self._values.pop(self._key(labels), None)

    def samples(self) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` pairs in creation order."""
        return [(dict(zip(self.labelnames, k, strict=True)), v) for k, v in self._values.items()]

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples():
            if labels:
                inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{self.name}{{{inner}}} {_format_value(value)}")
            else:
                lines.append(f"{self.name} {_format_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """A value that only goes up (events, bytes). Name it ``..._total``."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: Any) -> None:
        if amount < 0:
            raise ValueError("a counter cannot decrease")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """A value that goes up and down (open connections, queued bytes)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._function: Callable[[], float] | None = None

    def set(self, value: float, **labels: Any) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1, **labels: Any) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1, **labels: Any) -> None:
        self.inc(-amount, **labels)

    def set_function(self, function: Callable[[], float]) -> None:
        """Compute the value when rendered (e.g. ``lambda: len(conns)``); unlabelled only."""
        if self.labelnames:
            raise ValueError("set_function needs a gauge without labels")
        self._function = function

    def samples(self) -> list[tuple[dict[str, str], float]]:
        if self._function is not None:
            self._values[()] = float(self._function())
        return super().samples()


class Registry:
    """The metrics of one daemon, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> Any:
        """Add ``metric`` and return it; names must be unique."""
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        counter: Counter = self.register(Counter(name, help, labelnames))
        return counter

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        gauge: Gauge = self.register(Gauge(name, help, labelnames))
        return gauge

    def render(self) -> str:
        """The whole registry in text format 0.0.4."""
        return "".join(m.render() for m in self._metrics.values())

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready values for a status query: ``{name: value}`` for metrics
        without labels, ``{name: [{"labels": {...}, "value": v}, ...]}`` otherwise."""
        out: dict[str, Any] = {}
        for name, metric in self._metrics.items():
            samples = metric.samples()
            if metric.labelnames:
                out[name] = [{"labels": labels, "value": value} for labels, value in samples]
            else:
                out[name] = samples[0][1]
        return out


@dataclass
class DaemonMetrics:
    """The counters every daemon exports."""

    registry: Registry = field(default_factory=Registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.connections_open = r.gauge("ipc_connections_open", "Network connections open now.")
        self.connections_total = r.counter(
            "ipc_connections_total", "Network connections accepted since start."
        )
        self.switched_total = r.counter(
            "ipc_switched_total", "Connections that completed the handshake and were switched."
        )
        self.handshake_failures = r.counter(
            "ipc_handshake_failures_total", "Handshakes that failed, by reason.", ["reason"]
        )
        self.errors = r.counter("ipc_errors_total", "Connections closed on an error.", ["kind"])
        self.messages = r.counter(
            "ipc_messages_total", "LibIPC messages relayed, by direction.", ["direction"]
        )
        self.bytes = r.counter("ipc_bytes_total", "Bytes relayed, by direction.", ["direction"])
        self.handoffs = r.counter(
            "ipc_handoffs_total",
            "Connections handed over to their service (no relay in the path).",
        )
        self.idle_closed = r.counter(
            "ipc_idle_closed_total", "Relayed connections closed by --idle-timeout."
        )
        self.local_timeouts = r.counter(
            "ipc_local_timeouts_total",
            "Local clients closed for sending no request in time, by service.",
            ["service"],
        )
