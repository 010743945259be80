"""The Prometheus text exposition format (version 0.0.4), written without a dependency."""

from __future__ import annotations

import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsWriter:
    """Collect metric families and render them with their ``# HELP`` and ``# TYPE`` lines.

    Example::

        m = MetricsWriter("cluster_scheduler")
        m.add("workers", "gauge", "Workers connected.", len(workers))
        m.add("tasks", "gauge", "Tasks by state.", {("state", "memory"): 3})
        text = m.render()
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._families: list[tuple[str, str, str, list[tuple[dict, float]]]] = []

    def add(self, name: str, kind: str, help_text: str,
            samples: float | dict | list[tuple[dict, float]]) -> None:
        """Add one family.

        Args:
            name: without the prefix; counters should end in ``_total``.
            kind: ``"gauge"`` or ``"counter"``.
            samples: a number, ``{(label, value): number}`` for one label, or
                ``[({label: value, ...}, number), ...]``.
        """
        if isinstance(samples, dict):
            rows = [({k[0]: k[1]}, v) for k, v in samples.items()]
        elif isinstance(samples, list):
            rows = samples
        else:
            rows = [({}, samples)]
        self._families.append((f"{self.prefix}_{name}", kind, help_text, rows))

    def render(self) -> str:
        out = []
        for name, kind, help_text, rows in self._families:
            # In the 0.0.4 text format HELP and TYPE name the samples exactly,
            # counters' ``_total`` included.
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                if labels:
                    lab = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                    out.append(f"{name}{{{lab}}} {_format_value(value)}")
                else:
                    out.append(f"{name} {_format_value(value)}")
        return "\n".join(out) + "\n"
