"""The benchmark convention: every figure of ours stands beside a bare baseline measured in
the same run, pinned the same way, and their ratio.

``msixhub bench NAME`` prints a table; ``--json`` prints one object
``{"bench", "pinning", "results": [{"metric", "unit", "ours", "baseline", "ratio",
"higher_is_better"}]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class Result:
    metric: str
    unit: str
    ours: float
    baseline: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")


@dataclass(slots=True)
class Report:
    bench: str
    pinning: str
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self, metric: str, unit: str, ours: float, baseline: float, *, higher_is_better: bool
    ) -> None:
        self.results.append(Result(metric, unit, ours, baseline, higher_is_better))

    def to_json(self) -> dict[str, object]:
        return {
            "bench": self.bench,
            "pinning": self.pinning,
            "results": [asdict(r) | {"ratio": r.ratio} for r in self.results],
            "notes": self.notes,
        }

    def render(self) -> str:
        rows = [("metric", "unit", "ours", "baseline", "ratio", "better")]
        for r in self.results:
            rows.append(
                (
                    r.metric,
                    r.unit,
                    _fmt(r.ours),
                    _fmt(r.baseline),
                    f"{r.ratio:.2f}x",
                    "higher" if r.higher_is_better else "lower",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"bench {self.bench}  (pinning: {self.pinning})"]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def pin_to(cpu: int) -> str:
    """Pin the calling process (and its future children) to one CPU; return a description."""
    available = sorted(os.sched_getaffinity(0))
    chosen = available[cpu % len(available)]
    os.sched_setaffinity(0, {chosen})
    return f"cpu{chosen}"
