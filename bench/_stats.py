"""Latency summaries shared by the bench scripts."""

from __future__ import annotations

import statistics


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def line(name: str, values_ms: list[float], target: str, width: int = 28) -> None:
    """Print one latency row: n, p50, p99, max and the target."""
    print(f"{name:<{width}} n={len(values_ms):<4} p50 {statistics.median(values_ms):7.2f} ms  "
          f"p99 {percentile(values_ms, 99):7.2f} ms  max {max(values_ms):7.2f} ms   {target}")
